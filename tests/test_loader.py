"""Streaming loader: split across ranks x workers, equal steps, exact resume, corrupt samples, and
the full path through the real processor + collate."""
from __future__ import annotations

import collections
import io
import json
import logging
import os
import shutil
import tarfile

import pytest
import torch

from data_prep.cli import main as prep
from jrm_dist.data.loader import StreamingLoader
from jrm_dist.data.shards import resolve_shards
from jrm_dist.data.slices import shuffle_order
from jrm_dist.processing import IGNORE_INDEX


def key_of(rec, images):
    """Cheap encode step for the cursor tests: the group key (images untouched)."""
    return rec["key"]


def keys_batch(groups):
    return {"keys": list(groups)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """48 synthetic groups in 10 shards of uneven size (5 x 9 + 3)."""
    out = str(tmp_path_factory.mktemp("shards") / "syn")
    assert prep(["synthetic", "--out", out, "--groups", "48", "--seed", "5", "--max-count", "5", "--quiet"]) == 0
    return out


def all_keys(n, seed=5):
    return {f"syn-{seed}-{i:08d}" for i in range(n)}


def epoch_keys(loader):
    batches = [b["keys"] for b in loader]
    return batches, [k for b in batches for k in b]


def make(shards, rank, world, workers=2, batch=3, **kw):
    return StreamingLoader(shards, key_of, keys_batch, batch_size=batch, rank=rank, world_size=world,
                           num_workers=workers, seed=11, shuffle_buffer=kw.pop("buf", 4), **kw)


def test_split_covers_every_sample_exactly_once_2_ranks_x_2_workers(shards):
    seen = []
    lens = []
    for rank in (0, 1):
        loader = make(shards, rank, 2)
        batches, keys = epoch_keys(loader)
        assert len(batches) == len(loader)
        lens.append(len(batches))
        seen += keys
    assert lens[0] == lens[1] == 2 * 4  # 48 / 4 slices = 12 samples per worker = 4 batches of 3
    assert collections.Counter(seen) == collections.Counter(all_keys(48))
    # the next epoch covers everything again, in another order
    loader = make(shards, 0, 2)
    e0 = epoch_keys(loader)[1]
    e1 = epoch_keys(loader)[1]
    assert loader.epoch == 2 and e0 != e1


@pytest.mark.parametrize("even", ["pad", "drop"])
def test_uneven_data_gives_equal_steps_on_every_rank(tmp_path, even):
    out = str(tmp_path / "s")
    assert prep(["synthetic", "--out", out, "--groups", "50", "--seed", "5", "--max-count", "7", "--quiet"]) == 0
    seen, steps = [], []
    for rank in (0, 1):
        loader = make(out, rank, 2, even=even, batch=4)
        batches, keys = epoch_keys(loader)
        steps.append(len(batches))
        assert len(batches) == len(loader)
        seen += keys
    counts = collections.Counter(seen)
    assert steps[0] == steps[1]
    if even == "pad":  # 50 -> 4 slices of 13: every sample once, 2 samples a second time
        assert set(counts) == all_keys(50) and sum(counts.values()) == 52 and max(counts.values()) == 2
    else:  # 4 slices of 12: 48 distinct samples, 2 left out this epoch
        assert len(counts) == 48 and max(counts.values()) == 1


def test_resume_mid_epoch_yields_exactly_the_remaining_samples(shards):
    full = make(shards, 1, 2)
    ref = [b["keys"] for b in full] + [b["keys"] for b in full]  # two epochs
    for stop in (1, 3, 6):
        first = make(shards, 1, 2)
        got = []
        for b in first:
            got.append(b["keys"])
            if len(got) == stop:
                break
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
        resumed = make(shards, 1, 2)
        resumed.load_state_dict(state)
        got += [b["keys"] for b in resumed]
        assert got == ref[: len(ref) // 2], f"stop={stop}"  # exact order, no repeat, no skip
        got2 = [b["keys"] for b in resumed]
        assert got2 == ref[len(ref) // 2:]


def test_resume_at_the_end_of_an_epoch_starts_the_next(shards):
    a = make(shards, 0, 2, workers=0)
    it = iter(a)
    n = len(a)
    first = [next(it)["keys"] for _ in range(n)]  # the last batch handed out, iterator not exhausted
    b = make(shards, 0, 2, workers=0)
    b.load_state_dict(a.state_dict())
    assert b.epoch == 1  # the checkpoint already counts the finished epoch (a trainer's epoch limit sees it)
    nxt = [x["keys"] for x in b]
    ref = make(shards, 0, 2, workers=0)
    assert [x["keys"] for x in ref] == first
    assert [x["keys"] for x in ref] == nxt and b.epoch == 2


def test_changed_world_size_restarts_the_epoch_and_says_so(shards, caplog):
    a = make(shards, 0, 2)
    it = iter(a)
    next(it), next(it)
    state = a.state_dict()
    del it
    b = make(shards, 0, 1)
    with caplog.at_level(logging.WARNING, logger="jrm_dist.data.loader"):
        b.load_state_dict(state)
    assert "world_size 2 -> 1" in caplog.text and "start of epoch 0" in caplog.text
    keys = epoch_keys(b)[1]
    assert collections.Counter(keys) == collections.Counter(all_keys(48))


def test_shuffle_order_is_a_bounded_permutation():
    order = shuffle_order(100, 8, seed=1, epoch=0, slot=0)
    assert sorted(order) == list(range(100)) and order != list(range(100))
    # a position is handed out at most bufsize-1 steps before the reader reaches it
    assert all(x <= t + 7 for t, x in enumerate(order))
    assert shuffle_order(100, 8, 1, 0, 0) == order and shuffle_order(100, 8, 1, 1, 0) != order
    assert shuffle_order(10, 1, 1, 0, 0) == list(range(10))


def test_brace_pattern_without_manifest_counts_samples(shards, tmp_path, caplog):
    copy = tmp_path / "nomanifest"
    copy.mkdir()
    for n in os.listdir(shards):
        if n.endswith(".tar"):
            shutil.copy(os.path.join(shards, n), copy / n)
    with caplog.at_level(logging.WARNING, logger="jrm_dist.data.shards"):
        from_pattern = resolve_shards(str(copy / "shard-{000000..000009}.tar"))
    assert "counting its samples" in caplog.text
    from_manifest = resolve_shards(shards)
    assert [s.count for s in from_pattern] == [s.count for s in from_manifest] == [5] * 9 + [3]
    # a brace pattern next to a manifest takes its counts from it (no counting pass)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jrm_dist.data.shards"):
        assert [s.count for s in resolve_shards(os.path.join(shards, "shard-{000000..000009}.tar"))] == [5] * 9 + [3]
    assert "counting" not in caplog.text
    # pipe: URLs go through webdataset's gopen
    pipe = [f"pipe:cat {os.path.join(shards, f'shard-{i:06d}.tar')}" for i in range(10)]
    loader = StreamingLoader(pipe, key_of, keys_batch, batch_size=4, num_workers=0, shuffle_buffer=1)
    assert collections.Counter(epoch_keys(loader)[1]) == collections.Counter(all_keys(48))


# ---- real processor + collate ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from jrm_dist.backbones import build_tiny_tokenizer
    from jrm_dist.processing import RewardProcessor
    return RewardProcessor(build_tiny_tokenizer(), Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56))


def test_full_pipeline_batches_through_processor_and_collate(tmp_path, processor):
    from jrm_dist.config import DataConfig
    out = str(tmp_path / "s")
    assert prep(["synthetic", "--out", out, "--groups", "12", "--k", "3", "--max-count", "4", "--quiet"]) == 0
    cfg = DataConfig(train_shards=out, groups_per_batch=2, num_workers=2, shuffle_buffer=4)
    loader = StreamingLoader.from_config(cfg, processor, rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 2 * 3
    b = batches[0]
    assert b["input_ids"].shape[0] == 6  # 2 groups x K=3 candidates, in one micro-batch
    assert (b["input_ids"][torch.arange(6), b["reward_pos"]] == processor.reward_token_id).all()
    assert b["pixel_values"] is not None and b["image_grid_thw"].shape[0] == 12  # source + candidate each
    lab = b["labels"]
    for i in range(6):  # LM labels only after the reward token (the rationale), -100 elsewhere
        on = (lab[i] != IGNORE_INDEX).nonzero().flatten()
        assert len(on) > 0 and on.min() > b["reward_pos"][i]
    text = processor.tokenizer.decode(b["input_ids"][0][lab[0] != IGNORE_INDEX])
    assert text.startswith("The square is now")
    # pairs: the asked colour wins against both others in each group; the two losers tie
    assert b["win_idx"].numel() == b["lose_idx"].numel() == b["tie"].numel() == 2 * 3
    assert collections.Counter(k for bb in batches for k in bb["keys"]) == \
        collections.Counter(f"syn-0-{i:08d}" for i in range(12))
    assert loader.stats()["data/corrupt_samples"] == 0


def _rewrite_shard(path, mutate):
    """Rewrite a tar shard, letting ``mutate(name, data)`` change member bytes."""
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            data = mutate(m.name, data)
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))


def test_corrupt_samples_are_skipped_counted_and_steps_stay_equal(tmp_path, processor, caplog):
    out = str(tmp_path / "s")
    assert prep(["synthetic", "--out", out, "--groups", "24", "--max-count", "6", "--quiet"]) == 0
    bad_key = "syn-0-00000002"  # in shard 0: its candidate image becomes garbage
    _rewrite_shard(os.path.join(out, "shard-000000.tar"),
                   lambda name, data: b"not a png" if name == f"{bad_key}.c1_0.png" else data)
    path = os.path.join(out, "shard-000003.tar")  # truncated in the middle of its 4th sample
    members = tarfile.open(path).getmembers()
    cut = [m for m in members if m.name.startswith("syn-0-00000021.")][1].offset_data + 10
    with open(path, "r+b") as f:
        f.truncate(cut)
    from functools import partial

    from jrm_dist.data.collate import Collator, encode_group
    from jrm_dist.data.loader import _encode
    enc = partial(_encode, processor=processor, rank_by="overall", use_rationale=True, encode_group=encode_group)
    seen, steps, corrupt = [], [], 0
    for rank in (0, 1):
        loader = StreamingLoader(out, enc, Collator(processor), batch_size=2, rank=rank, world_size=2,
                                 num_workers=2, shuffle_buffer=3)
        with caplog.at_level(logging.WARNING, logger="jrm_dist.data.loader"):
            batches = list(loader)
        steps.append(len(batches))
        assert len(batches) == len(loader)
        seen += [k for b in batches for k in b["keys"]]
        corrupt += loader.stats()["data/corrupt_samples"]
    assert steps[0] == steps[1]
    lost = {bad_key} | {f"syn-0-{i:08d}" for i in (21, 22, 23)}  # 21 cut mid-sample, 22-23 never read
    assert corrupt == len(lost)
    assert set(seen) == all_keys(24, seed=0) - lost
    assert bad_key in caplog.text and "shard-000003.tar" in caplog.text


# ---- shard damage: records assembled by key, everything unusable counted ------------------------------

def _rewrite_members(path, change):
    """Rewrite a tar shard member by member: ``change(members) -> members`` on [(name, bytes)]."""
    with tarfile.open(path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in change(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _huge_png() -> bytes:
    """A 12000 x 12000 (144 Mpx) PNG of a few KB: bilevel, all black. Decoded to RGB it is 432 MB."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")
    return buf.getvalue()


def damage_shards(out: str) -> dict:
    """Damage shards 0-3 of a jrm-prep folder, one way each (the record index i is within its shard):
    shard 0: a stray member between two members of record 2 (the old loader then dropped the shard's last
    two records); shard 1: record 2 without its json; shard 2: cut in the middle of record 3's second
    member; shard 3: record 2's candidate image replaced by a 144 Mpx PNG. Returns the keys per shard,
    the lost keys and the number of counted entries to expect."""
    names = sorted(n for n in os.listdir(out) if n.endswith(".tar"))[:4]
    keys = []
    for n in names:
        with tarfile.open(os.path.join(out, n)) as tf:
            keys.append(list(dict.fromkeys(m.name.split(".", 1)[0] for m in tf.getmembers())))

    def stray(ms):
        i = next(j for j, (n, _) in enumerate(ms) if n.startswith(keys[0][2] + ".")) + 1
        return ms[:i] + [("stray.bin", b"\0" * 100)] + ms[i:]
    _rewrite_members(os.path.join(out, names[0]), stray)
    _rewrite_members(os.path.join(out, names[1]), lambda ms: [m for m in ms if m[0] != keys[1][2] + ".json"])
    path = os.path.join(out, names[2])
    cut = [m for m in tarfile.open(path).getmembers() if m.name.startswith(keys[2][3] + ".")][1].offset_data + 10
    with open(path, "r+b") as f:
        f.truncate(cut)
    huge = _huge_png()
    _rewrite_members(os.path.join(out, names[3]),
                     lambda ms: [(n, huge if n == keys[3][2] + ".c1_0.png" else d) for n, d in ms])
    lost = {keys[1][2], keys[3][2], *keys[2][3:]}
    # counted: stray, record without json, the cut record, the positions after it but one, the huge image
    return {"keys": keys, "lost": lost, "counted": 1 + 1 + 1 + (len(keys[2]) - 4) + 1}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """24 groups in 4 shards of 6 (syn-0-00000000 ...), each shard damaged differently."""
    out = str(tmp_path_factory.mktemp("damaged") / "s")
    assert prep(["synthetic", "--out", out, "--groups", "24", "--max-count", "6", "--quiet"]) == 0
    info = damage_shards(out)
    k = lambda i: f"syn-0-{i:08d}"  # noqa: E731
    assert info["lost"] == {k(8), k(15), k(16), k(17), k(20)} and info["counted"] == 6
    return out


def test_damaged_shards_lose_only_the_damaged_records_and_count_each(damaged, caplog):
    manifest_keys = all_keys(24, seed=0)
    trained, entries, substituted = [], [], 0
    for rank in (0, 1):
        loader = make(damaged, rank, 2, workers=2, batch=2, buf=3)
        with caplog.at_level(logging.INFO, logger="jrm_dist.data.loader"):
            trained += [key for b in loader for key in b["keys"]]
        assert loader.corrupt_samples == len(loader.corrupt_log) == loader.stats()["data/corrupt_samples"]
        entries += loader.corrupt_log
        substituted += loader.substituted_batches
    k = lambda i: f"syn-0-{i:08d}"  # noqa: E731
    lost = {k(8), k(15), k(16), k(17), k(20)}
    assert set(trained) == manifest_keys - lost
    # every good record once; a batch left empty by damage repeats one group (equal steps on every rank)
    assert len(trained) == len(set(trained)) + substituted
    assert {k(3), k(4), k(5)} <= set(trained)  # the records after the stray member are not lost
    by_key = {e["key"]: e for e in entries if e["key"]}
    assert set(by_key) == {"stray", k(8), k(15), k(20)}
    assert len(entries) == 6  # + 2 positions of shard 2 the truncation left without a record (keys unknown)
    # trained keys = the manifest's keys minus the counted corrupt ones
    unknown = [e for e in entries if not e["key"]]
    assert len(manifest_keys) - len(set(trained)) == len(entries) - sum(bool(e["key"]) and e["key"] not in manifest_keys
                                                                         for e in entries)
    assert all(e["shard"] == "shard-000002.tar" and "stopped reading" in e["reason"] for e in unknown)
    assert by_key["stray"]["shard"] == "shard-000000.tar" and "no json member" in by_key["stray"]["reason"]
    assert by_key[k(8)]["shard"] == "shard-000001.tar" and "no json member" in by_key[k(8)]["reason"]
    assert "over jrm-prep's decoded-pixel cap" in by_key[k(20)]["reason"] and "144.0 Mpx" in by_key[k(20)]["reason"]
    assert all(isinstance(by_key[x]["offset"], int) and by_key[x]["offset"] >= 0 for x in by_key)
    assert '"key": "stray"' in caplog.text and '"offset":' in caplog.text


def test_damaged_shards_resume_exactly(damaged):
    """The cursor stays exact with damaged shards: stop, resume, same batches, same count. (A batch left
    empty by damage repeats the previous group, or right after a resume the next one: stop where the
    batch after the cut is not such a batch.)"""
    full = make(damaged, 0, 2, workers=2, batch=2, buf=3)
    ref = [b["keys"] for b in full]
    first = make(damaged, 0, 2, workers=2, batch=2, buf=3)
    got = []
    for b in first:
        got.append(b["keys"])
        if len(got) == 3:
            break
    resumed = make(damaged, 0, 2, workers=2, batch=2, buf=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [b["keys"] for b in resumed]
    assert got == ref and resumed.corrupt_samples == full.corrupt_samples



def _shard_keys(path):
    with tarfile.open(path) as tf:
        return list(dict.fromkeys(m.name.split(".", 1)[0] for m in tf.getmembers()))


@pytest.fixture(scope="module")
def six_per_shard(tmp_path_factory):
    """24 groups in 4 shards of 6 (syn-0-00000000 ...), undamaged: each test copies and damages it."""
    out = str(tmp_path_factory.mktemp("six") / "s")
    assert prep(["synthetic", "--out", out, "--groups", "24", "--max-count", "6", "--quiet"]) == 0
    return out


@pytest.mark.parametrize("n_stray", [1, 4, 9])
def test_no_good_record_is_lost_however_many_strays_sit_inside_it(six_per_shard, tmp_path, n_stray, caplog):
    out = str(tmp_path / "s")
    shutil.copytree(six_per_shard, out)
    path = os.path.join(out, "shard-000000.tar")
    rec = _shard_keys(path)[2]

    def strays(ms):  # right after the first member of record 2, before its json and its other images
        i = next(j for j, (n, _) in enumerate(ms) if n.startswith(rec + ".")) + 1
        return ms[:i] + [(f"stray{s}.bin", b"\0" * 10) for s in range(n_stray)] + ms[i:]
    _rewrite_members(path, strays)
    loader = make(out, 0, 1, workers=0, batch=2, buf=1)
    with caplog.at_level(logging.WARNING, logger="jrm_dist.data.loader"):
        trained = [k for b in loader for k in b["keys"]]
    assert sorted(trained) == sorted(all_keys(24, seed=0))  # record 2 and every record after it kept
    assert loader.corrupt_samples == n_stray
    assert {e["key"] for e in loader.corrupt_log} == {f"stray{s}" for s in range(n_stray)}


def test_strays_and_a_cut_shard_end_count_each_lost_record_once_at_warning(six_per_shard, tmp_path, caplog):
    """A stray member in record 1 and a cut at the start of record 4 of 6: the stray and records 4 and 5 are
    damaged (3), each counted once and logged at WARNING with its shard and offset (the records beyond the
    cut have no key to name: their entry says where the tar stopped reading)."""
    out = str(tmp_path / "s")
    shutil.copytree(six_per_shard, out)
    path = os.path.join(out, "shard-000000.tar")
    keys = _shard_keys(path)

    def stray(ms):
        i = next(j for j, (n, _) in enumerate(ms) if n.startswith(keys[1] + ".")) + 1
        return ms[:i] + [("stray.bin", b"\0" * 10)] + ms[i:]
    _rewrite_members(path, stray)
    first = next(m for m in tarfile.open(path).getmembers() if m.name.startswith(keys[4] + "."))
    with open(path, "r+b") as f:
        f.truncate(first.offset_data + 10)  # inside the first member of record 4
    loader = make(out, 0, 1, workers=0, batch=2, buf=1)
    with caplog.at_level(logging.INFO, logger="jrm_dist.data.loader"):
        trained = [k for b in loader for k in b["keys"]]
    assert set(trained) == all_keys(24, seed=0) - {keys[4], keys[5]}
    assert loader.corrupt_samples == len(loader.corrupt_log) == 3
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "skipped corrupt record" in r.message]
    assert len(warned) == 3 and "counted with the unusable members above" not in caplog.text
    cut = [e for e in loader.corrupt_log if e["key"] is None]
    assert len(cut) == 2 and all(e["shard"] == "shard-000000.tar" and isinstance(e["offset"], int)
                                 and e["offset"] <= first.offset_data + 10 and "stopped reading" in e["reason"]
                                 for e in cut)
