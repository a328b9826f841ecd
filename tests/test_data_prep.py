"""jrm-prep: reject reasons, determinism, kill/resume, verify, rationales, synthetic task."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data_prep.cli import main
from data_prep.shards import iter_tar_samples, load_manifest
from data_prep.synthetic import PALETTE, make_group
from jrm_dist.data.schema import validate_group

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def png(colour=(10, 200, 30), size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def records(out: str) -> dict[str, dict]:
    """key -> sample (with parsed 'rec') of every shard listed in the manifest."""
    manifest, folder = load_manifest(out)
    got = {}
    for s in manifest["shards"]:
        for sample in iter_tar_samples(os.path.join(folder, s["name"])):
            sample["rec"] = json.loads(sample["json"])
            got[sample["__key__"]] = sample
    return got


def rejects(out: str) -> list[dict]:
    with open(os.path.join(out, "rejects.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def shard_digests(out: str) -> dict[str, str]:
    return {n: hashlib.sha256(open(os.path.join(out, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(out)) if n.endswith(".tar")}


# ---- EditReward parquet -----------------------------------------------------------------------

def er_row(key, vote="leftvote", **over):
    row = {
        "key": f"src-{key}", "unique_key": key, "instruction": f"edit {key}", "left_model": "mA",
        "right_model": "mB", "vote_type": vote, "pair_index": 0, "metadata_index": 1,
        "source_img": {"bytes": png((1, 2, 3)), "path": None},
        "left_output_image": {"bytes": png((200, 0, 0)), "path": None},
        "right_output_image": {"bytes": png((0, 0, 200)), "path": None},
        "left_overall_score": 7.0, "right_overall_score": 3.0,
        "left_instruction_following_score": 4.0, "right_instruction_following_score": 1.0,
        "left_quality_aesthetic_score": 3.0, "right_quality_aesthetic_score": 2.0,
        "left_img_rel": "l.png", "right_img_rel": "r.png",
    }
    row.update(over)
    return row


IMG = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
ER_SCHEMA = pa.schema([
    *(pa.field(c, pa.string()) for c in ("key", "unique_key", "instruction", "left_model", "right_model", "vote_type")),
    pa.field("pair_index", pa.int32()), pa.field("metadata_index", pa.int32()),
    *(pa.field(c, IMG) for c in ("source_img", "left_output_image", "right_output_image")),
    *(pa.field(f"{s}_{d}_score", pa.float32()) for s in ("left", "right")
      for d in ("overall", "instruction_following", "quality_aesthetic")),
    pa.field("left_img_rel", pa.string()), pa.field("right_img_rel", pa.string()),
])


def write_parquet(path, rows, row_group_size=4):
    cols = {f.name: [r.get(f.name) for r in rows] for f in ER_SCHEMA}
    pq.write_table(pa.table(cols, schema=ER_SCHEMA), path, row_group_size=row_group_size)


def test_editreward_each_reject_reason_once_and_good_rows_land(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "right.png").write_bytes(png((0, 90, 0)))
    good = [er_row("g-left", "leftvote"), er_row("g-right", "rightvote"), er_row("g-tie", "tie"),
            er_row("g-tievote", "tievote"), er_row("g-bothbad", "bothbad_vote"),
            er_row("g-path", "leftvote", right_output_image={"bytes": None, "path": "right.png"}),
            er_row("g.dotted/key", "rightvote")]
    bad = {
        "missing_image": er_row("b-missing", left_output_image={"bytes": None, "path": "nope.png"}),
        "undecodable_image": er_row("b-undecodable", source_img={"bytes": b"\x89PNG garbage", "path": None}),
        "missing_field": er_row("b-noinstr", instruction=None),
        "score_out_of_range": er_row("b-score", left_overall_score=9.0),
        "duplicate_key": er_row("g-left", "rightvote"),
        "bad_vote": er_row("b-vote", "maybe"),
    }
    rows = good[:3] + list(bad.values())[:3] + good[3:] + list(bad.values())[3:]
    write_parquet(tmp_path / "part-0.parquet", rows)
    out = str(tmp_path / "out")
    assert main(["editreward", "--input", str(tmp_path), "--images", str(tmp_path / "imgs"), "--out", out,
                 "--max-count", "3", "--workers", "2", "--quiet"]) == 0

    rej = rejects(out)
    assert sorted(r["reason"] for r in rej) == sorted(bad)
    by_reason = {r["reason"]: r for r in rej}
    assert by_reason["score_out_of_range"]["key"] == "b-score"
    assert "left_overall_score" in by_reason["score_out_of_range"]["detail"]
    assert by_reason["missing_image"]["row"] == rows.index(bad["missing_image"])
    assert by_reason["missing_field"]["file"].endswith("part-0.parquet")
    assert "instruction" in by_reason["missing_field"]["detail"]

    got = records(out)
    assert set(got) == {"g-left", "g-right", "g-tie", "g-tievote", "g-bothbad", "g-path", "g_dotted_key"}
    rank = {k: s["rec"]["ranking"] for k, s in got.items()}
    assert rank["g-left"] == [[0], [1]] and rank["g-right"] == [[1], [0]]
    assert rank["g-tie"] == rank["g-tievote"] == rank["g-bothbad"] == [[0, 1]]
    rec = got["g-left"]["rec"]
    validate_group(rec, set(got["g-left"]) - {"__key__", "json", "rec"})
    assert rec["candidates"][0]["scores"] == {"overall": 7.0, "instruction_following": 4.0, "quality_aesthetic": 3.0}
    assert rec["candidates"][1]["model"] == "mB"
    assert got["g-left"]["c0_0.png"] == png((200, 0, 0))  # original bytes, no re-encode
    assert got["g-path"]["c1_0.png"] == png((0, 90, 0))
    assert got["g_dotted_key"]["rec"]["meta"]["unique_key"] == "g.dotted/key"
    manifest, _ = load_manifest(out)
    assert manifest["total_samples"] == 7 and manifest["rejected"] == 6 and manifest["input_records"] == 13
    assert [s["count"] for s in manifest["shards"]] == [3, 3, 1]
    assert main(["verify", out, "--quiet"]) == 0


def test_editreward_resume_skips_whole_row_groups(tmp_path):
    from data_prep import editreward
    for f in range(2):
        write_parquet(tmp_path / f"p{f}.parquet", [er_row(f"k{f}-{i}") for i in range(10)], row_group_size=4)
    files = editreward.list_parquet([str(tmp_path)])
    full = list(editreward.iter_items(files))
    assert [it.index for it in full] == list(range(20)) and editreward.count_rows(files) == 20
    for skip in (0, 3, 4, 9, 10, 13, 19, 20):
        part = list(editreward.iter_items(files, skip))
        assert [(it.index, it.file, it.locator, it.key) for it in part] == \
               [(it.index, it.file, it.locator, it.key) for it in full[skip:]]


# ---- generic JSONL ------------------------------------------------------------------------------

def write_jsonl_fixture(root, n_good=6, bad=True):
    """Groups with image files on disk, plus one line per reject reason the JSONL path can have."""
    (root / "img").mkdir(exist_ok=True)
    lines = []
    for i in range(n_good):
        for name, col in ((f"s{i}", (i, 0, 0)), (f"a{i}", (0, i, 0)), (f"b{i}", (0, 0, i))):
            (root / "img" / f"{name}.png").write_bytes(png(col, size=(32 + i % 5, 20)))
        lines.append({"key": f"g{i}", "instruction": f"make it {i}", "source_images": [f"img/s{i}.png"],
                      "candidates": [{"id": "a", "images": [f"img/a{i}.png"], "scores": {"overall": 5},
                                      "rationale": "good"},
                                     {"id": "b", "images": [f"img/b{i}.png"], "scores": {"overall": 5}}],
                      "ranking": [[0, 1]] if i % 3 == 0 else None})
    if bad:
        (root / "img" / "broken.png").write_bytes(png()[:40])  # truncated PNG
        c = lambda img, **kw: {"images": [img], "scores": {"overall": 1}, **kw}  # noqa: E731
        bad_lines = {
            "missing_image": {"key": "x1", "instruction": "i", "candidates": [c("img/a0.png"), c("img/none.png")]},
            "undecodable_image": {"key": "x2", "instruction": "i", "candidates": [c("img/a0.png"), c("img/broken.png")]},
            "missing_field": {"key": "x3", "candidates": [c("img/a0.png"), c("img/b0.png")]},
            "score_out_of_range": {"key": "x4", "instruction": "i",
                                   "candidates": [c("img/a0.png"), {"images": ["img/b0.png"], "scores": {"overall": float("nan")}}]},
            "duplicate_key": {"key": "g1", "instruction": "again", "candidates": [c("img/a0.png"), c("img/b0.png")]},
            "too_few_candidates": {"key": "x5", "instruction": "i", "candidates": [c("img/a0.png")]},
        }
        for j, (reason, obj) in enumerate(bad_lines.items()):
            lines.insert(2 + j * (n_good // 6 or 1), obj)
    text = "\n".join(json.dumps(obj) for obj in lines) + "\n"
    if bad:
        text += "{not json\n"
    (root / "groups.jsonl").write_text(text)
    return root / "groups.jsonl"


def test_jsonl_each_reject_reason_once_and_good_records_land(tmp_path):
    src = write_jsonl_fixture(tmp_path)
    out = str(tmp_path / "out")
    assert main(["jsonl", "--input", str(src), "--out", out, "--quiet"]) == 0
    rej = rejects(out)
    assert sorted(r["reason"] for r in rej) == sorted(["missing_image", "undecodable_image", "missing_field",
                                                       "score_out_of_range", "duplicate_key",
                                                       "too_few_candidates", "bad_json"])
    assert all(r["file"] == str(src) and isinstance(r["line"], int) for r in rej)
    assert {r["key"] for r in rej if r["reason"] != "bad_json"} == {"x1", "x2", "x3", "x4", "x5", "g1"}
    assert "candidates[1].images[0]" in next(r["detail"] for r in rej if r["reason"] == "missing_image")
    got = records(out)
    assert set(got) == {f"g{i}" for i in range(6)}
    assert got["g1"]["rec"]["instruction"] == "make it 1"  # the first g1 wins, the duplicate is rejected
    assert got["g0"]["rec"]["ranking"] == [[0, 1]] and got["g1"]["rec"]["ranking"] is None
    assert got["g2"]["rec"]["candidates"][0]["rationale"] == "good"
    assert got["g2"]["src0.png"] == (tmp_path / "img" / "s2.png").read_bytes()


def test_max_pixels_reencodes_only_when_asked(tmp_path):
    src = write_jsonl_fixture(tmp_path, n_good=2, bad=False)
    out1, out2 = str(tmp_path / "o1"), str(tmp_path / "o2")
    assert main(["jsonl", "--input", str(src), "--out", out1, "--quiet"]) == 0
    assert main(["jsonl", "--input", str(src), "--out", out2, "--max-pixels", "100", "--quiet"]) == 0
    a, b = records(out1)["g1"], records(out2)["g1"]
    assert a["c0_0.png"] == (tmp_path / "img" / "a1.png").read_bytes()
    small = Image.open(io.BytesIO(b["c0_0.png"]))
    assert small.size[0] * small.size[1] <= 100 and small.size[0] > small.size[1]  # aspect kept


# ---- determinism, kill/resume, verify ----------------------------------------------------------

def test_two_runs_give_byte_identical_shards(tmp_path):
    src = write_jsonl_fixture(tmp_path, n_good=12)
    outs = [str(tmp_path / f"o{w}") for w in (1, 2)]
    for w, out in zip((1, 2), outs):
        assert main(["jsonl", "--input", str(src), "--out", out, "--max-count", "4", "--workers", str(w),
                     "--quiet"]) == 0
    d1, d2 = shard_digests(outs[0]), shard_digests(outs[1])
    assert len(d1) == 3 and d1 == d2
    m1, m2 = load_manifest(outs[0])[0], load_manifest(outs[1])[0]
    assert m1["shards"] == m2["shards"]
    assert [s["sha256"] for s in m1["shards"]] == list(d1.values())
    assert rejects(outs[0]) == rejects(outs[1])


def _prep_cmd(out, groups):
    return [sys.executable, "-m", "data_prep.cli", "synthetic", "--out", out, "--groups", str(groups),
            "--seed", "3", "--k", "3", "--image-size", "64", "--max-count", "10", "--quiet"]


def test_killed_run_resumes_to_the_same_result(tmp_path):
    groups = 400
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    assert main(_prep_cmd(ref, groups)[3:]) == 0
    journal = os.path.join(out, ".jrm-prep-progress.jsonl")
    proc = subprocess.Popen(_prep_cmd(out, groups), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(journal) and open(journal).read().count("\n") >= 4:  # header + 3 shards
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "manifest.json")), "the run finished before it could be killed"
    n_before = len([n for n in os.listdir(out) if n.endswith(".tar")])
    assert 3 <= n_before < groups // 10
    assert main(_prep_cmd(out, groups)[3:]) == 0  # the rerun resumes
    assert shard_digests(out) == shard_digests(ref)
    assert load_manifest(out)[0]["shards"] == load_manifest(ref)[0]["shards"]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert main(["verify", out, "--quiet"]) == 0


def test_interrupted_jsonl_run_keeps_rejects_exact(tmp_path):
    """Resume from a journal cut after the first shard: rejects.jsonl is rebuilt without duplicates."""
    src = write_jsonl_fixture(tmp_path, n_good=12)
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    args = ["jsonl", "--input", str(src), "--max-count", "4", "--quiet"]
    assert main(args + ["--out", ref]) == 0
    assert main(args + ["--out", out]) == 0
    # Put `out` back in the state a kill right after shard 0 leaves: journal up to shard 0, a partial
    # shard 1 as .tmp, later shards and the manifest not yet written, rejects.jsonl longer than acknowledged.
    journal = os.path.join(out, ".jrm-prep-progress.jsonl")
    lines = open(journal).read().splitlines()
    open(journal, "w").write("\n".join(lines[:2]) + "\n")
    os.rename(os.path.join(out, "shard-000001.tar"), os.path.join(out, "shard-000001.tar.tmp"))
    for n in ("shard-000002.tar", "manifest.json"):
        os.remove(os.path.join(out, n))
    assert main(args + ["--out", out]) == 0
    assert shard_digests(out) == shard_digests(ref)
    assert rejects(out) == rejects(ref)
    # rerunning a finished job changes nothing
    assert main(args + ["--out", out]) == 0
    assert shard_digests(out) == shard_digests(ref) and rejects(out) == rejects(ref)


def test_shard_size_rolls_shards_by_bytes(tmp_path):
    out = str(tmp_path / "o")
    assert main(["synthetic", "--out", out, "--groups", "40", "--shard-size", "20KB", "--quiet"]) == 0
    manifest = load_manifest(out)[0]
    sizes = [s["bytes"] for s in manifest["shards"]]
    assert len(sizes) > 3 and sum(s["count"] for s in manifest["shards"]) == 40
    # on-disk bytes: at most one sample (~4 KB with tar headers) past the target, plus tar's final 10 KB record
    assert max(sizes) <= 20_000 + 5_000 + 10_240
    assert main(["synthetic", "--out", str(tmp_path / "bad"), "--groups", "4", "--k", "9", "--quiet"]) == 2


def test_other_job_in_out_dir_is_refused(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["synthetic", "--out", out, "--groups", "4", "--quiet"]) == 0
    assert main(["synthetic", "--out", out, "--groups", "5", "--quiet"]) == 2
    assert "different job" in capsys.readouterr().err
    assert main(["synthetic", "--out", out, "--groups", "5", "--overwrite", "--quiet"]) == 0
    assert load_manifest(out)[0]["total_samples"] == 5


def test_verify_catches_a_flipped_byte(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["synthetic", "--out", out, "--groups", "30", "--max-count", "10", "--quiet"]) == 0
    assert main(["verify", out, "--quiet"]) == 0
    path = os.path.join(out, "shard-000001.tar")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3] ^= 0x01
    open(path, "wb").write(bytes(data))
    capsys.readouterr()
    assert main(["verify", out, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "shard-000001.tar" in err and "sha256" in err
    os.remove(path)
    assert main(["verify", out, "--quiet"]) == 1
    assert "missing" in capsys.readouterr().err


def test_jsonl_non_utf8_text_is_rejected_not_replaced(tmp_path):
    """A byte that is not UTF-8 inside a text field rejects the record (bad_encoding, naming the line and
    the field); it is never turned into U+FFFD and trained on. Good records around it still land."""
    src = write_jsonl_fixture(tmp_path, n_good=3, bad=False)
    good = src.read_bytes().splitlines()
    c = lambda img, **kw: {"images": [img], "scores": {"overall": 1}, **kw}  # noqa: E731
    bad_instr = json.dumps({"key": "e1", "instruction": "make it MARK", "candidates": [
        c("img/a0.png"), c("img/b0.png")]}).encode().replace(b"MARK", b"caf\xe9")
    bad_rat = json.dumps({"key": "e2", "instruction": "ok", "candidates": [
        c("img/a0.png"), c("img/b0.png", rationale="MARK")]}).encode().replace(b"MARK", b"\xff\xfe text")
    outside = b'{"key": "e3", \x80 "instruction": "x"}'
    fine_utf8 = json.dumps({"key": "u1", "instruction": "f\u00e4rbe es gr\u00fcn", "candidates": [
        c("img/a0.png"), c("img/b0.png")]}, ensure_ascii=False).encode("utf-8")
    src.write_bytes(b"\n".join([good[0], bad_instr, good[1], bad_rat, outside, fine_utf8, good[2]]) + b"\n")
    out = str(tmp_path / "out")
    assert main(["jsonl", "--input", str(src), "--out", out, "--quiet"]) == 0
    rej = {r["line"]: r for r in rejects(out)}
    assert sorted(rej) == [2, 4, 5] and {r["reason"] for r in rej.values()} == {"bad_encoding"}
    assert "field 'instruction'" in rej[2]["detail"] and "0xe9" in rej[2]["detail"]
    assert "field 'candidates[1].rationale'" in rej[4]["detail"] and "0xff" in rej[4]["detail"]
    assert all(r["file"] == str(src) for r in rej.values())
    got = records(out)
    assert set(got) == {"g0", "g1", "g2", "u1"}
    assert got["u1"]["rec"]["instruction"] == "f\u00e4rbe es gr\u00fcn"
    assert not any("\ufffd" in json.dumps(g["rec"], ensure_ascii=False) for g in got.values())
    assert json.load(open(os.path.join(out, "manifest.json")))["rejects_by_reason"] == {"bad_encoding": 3}


def test_jsonl_byte_order_mark_keeps_the_first_record(tmp_path):
    """A file saved with a UTF-8 byte-order mark lost its first (good) record as bad_json (issue 18 §4)."""
    src = write_jsonl_fixture(tmp_path, n_good=3, bad=False)
    src.write_bytes(b"\xef\xbb\xbf" + src.read_bytes())
    out = str(tmp_path / "out")
    assert main(["jsonl", "--input", str(src), "--out", out, "--quiet"]) == 0
    assert rejects(out) == []
    assert set(records(out)) == {"g0", "g1", "g2"}


def test_jsonl_unpaired_surrogate_escape_is_rejected_naming_the_field(tmp_path):
    """JSON escapes such as \\ud800 decode to a lone surrogate that has no UTF-8 form: the record was
    rejected as 'unexpected_error: UnicodeEncodeError' naming no field (issue 18 §4). A proper pair
    (an emoji) is fine."""
    src = write_jsonl_fixture(tmp_path, n_good=2, bad=False)
    c = lambda img, **kw: {"images": [img], "scores": {"overall": 1}, **kw}  # noqa: E731
    lone = json.dumps({"key": "s1", "instruction": "x\ud800y", "candidates": [c("img/a0.png"), c("img/b0.png")]})
    low = json.dumps({"key": "s2", "instruction": "ok", "candidates": [
        c("img/a0.png"), c("img/b0.png", rationale="bad \udc80")]})
    pair = json.dumps({"key": "s3", "instruction": "smile \U0001f600",
                       "candidates": [c("img/a0.png"), c("img/b0.png")]})
    assert "\\ud800" in lone and "\\ud83d\\ude00" in pair  # written as JSON escapes, as the user's file had them
    src.write_text(src.read_text() + "\n".join([lone, low, pair]) + "\n")
    out = str(tmp_path / "out")
    assert main(["jsonl", "--input", str(src), "--out", out, "--quiet"]) == 0
    rej = {r["line"]: r for r in rejects(out)}
    assert sorted(rej) == [3, 4] and {r["reason"] for r in rej.values()} == {"bad_encoding"}, rej
    assert "field 'instruction'" in rej[3]["detail"] and "surrogate" in rej[3]["detail"]
    assert "field 'candidates[1].rationale'" in rej[4]["detail"]
    assert records(out)["s3"]["rec"]["instruction"] == "smile \U0001f600"


def test_jsonl_image_paths_outside_images_root_need_opt_in(tmp_path):
    """An absolute path, or one with .., outside --images was read and published in the shards (issue 18
    §4): it is rejected as image_outside_root naming the field, unless --allow-outside-images."""
    data = tmp_path / "data"
    data.mkdir()
    src = write_jsonl_fixture(data, n_good=2, bad=False)
    secret = tmp_path / "secret.png"
    secret.write_bytes(png((9, 9, 9)))
    c = lambda img: {"images": [img], "scores": {"overall": 1}}  # noqa: E731
    lines = [json.dumps({"key": "o1", "instruction": "i", "candidates": [c("img/a0.png"), c(str(secret))]}),
             json.dumps({"key": "o2", "instruction": "i", "source_images": ["../secret.png"],
                         "candidates": [c("img/a0.png"), c("img/b0.png")]})]
    src.write_text(src.read_text() + "\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    assert main(["jsonl", "--input", str(src), "--images", str(data), "--out", out, "--quiet"]) == 0
    rej = {r["key"]: r for r in rejects(out)}
    assert sorted(rej) == ["o1", "o2"] and {r["reason"] for r in rej.values()} == {"image_outside_root"}, rej
    assert "candidates[1].images[0]" in rej["o1"]["detail"] and "--allow-outside-images" in rej["o1"]["detail"]
    assert "source_images[0]" in rej["o2"]["detail"]
    assert set(records(out)) == {"g0", "g1"}
    out2 = str(tmp_path / "out2")
    assert main(["jsonl", "--input", str(src), "--images", str(data), "--allow-outside-images", "--out", out2,
                 "--quiet"]) == 0
    assert rejects(out2) == [] and records(out2)["o1"]["c1_0.png"] == secret.read_bytes()


def test_rationales_non_utf8_line_is_rejected(tmp_path):
    shards, out = str(tmp_path / "s"), str(tmp_path / "o")
    assert main(["synthetic", "--out", shards, "--groups", "3", "--quiet"]) == 0
    keys = sorted(records(shards))
    rfile = tmp_path / "r.jsonl"
    rfile.write_bytes(json.dumps({"key": keys[0], "rationale": "fine"}).encode() + b"\n"
                      + json.dumps({"key": keys[1], "candidates": ["MARK", "x"]}).encode().replace(b"MARK", b"bad \xc3(")
                      + b"\n")
    assert main(["rationales", "--shards", shards, "--rationales", str(rfile), "--out", out, "--quiet"]) == 0
    rej = rejects(out)
    assert [(r["line"], r["reason"]) for r in rej] == [(2, "bad_encoding")]
    assert "field 'candidates[0]'" in rej[0]["detail"]
    after = records(out)
    assert after[keys[0]]["rec"]["rationale"] == "fine"
    assert not any("\ufffd" in json.dumps(g["rec"], ensure_ascii=False) for g in after.values())


# ---- rationales ---------------------------------------------------------------------------------

def test_rationales_join_by_key(tmp_path):
    shards, out = str(tmp_path / "s"), str(tmp_path / "o")
    assert main(["synthetic", "--out", shards, "--groups", "8", "--max-count", "3", "--quiet"]) == 0
    before = records(shards)
    keys = sorted(before)
    rfile = tmp_path / "r.jsonl"
    rfile.write_text("\n".join([
        json.dumps({"key": keys[0], "rationale": "group critique"}),
        json.dumps({"key": keys[1], "candidates": ["first", None]}),
        json.dumps({"key": keys[2], "candidates": {"c1": "by id"}}),
        json.dumps({"key": "no-such-group", "rationale": "x"}),
        json.dumps({"key": keys[3], "candidates": ["only one"]}),
        json.dumps({"key": keys[0], "rationale": "again"}),
        "{oops",
    ]) + "\n")
    assert main(["rationales", "--shards", shards, "--rationales", str(rfile), "--out", out, "--quiet"]) == 0
    after = records(out)
    assert set(after) == set(keys)
    assert after[keys[0]]["rec"]["rationale"] == "group critique"
    c1 = after[keys[1]]["rec"]["candidates"]
    assert c1[0]["rationale"] == "first" and c1[1]["rationale"] == before[keys[1]]["rec"]["candidates"][1]["rationale"]
    assert after[keys[2]]["rec"]["candidates"][1]["rationale"] == "by id"
    assert after[keys[3]]["rec"] == before[keys[3]]["rec"]  # bad line: group written unchanged
    for k in keys:
        assert {f: v for f, v in after[k].items() if f.endswith(".png")} == \
               {f: v for f, v in before[k].items() if f.endswith(".png")}
    rej = rejects(out)
    assert sorted((r["line"], r["reason"]) for r in rej) == [
        (4, "unknown_key"), (5, "bad_rationale"), (6, "duplicate_key"), (7, "bad_json")]
    assert all(r["file"] == str(rfile) for r in rej)
    assert main(["verify", out, "--quiet"]) == 0
    # rerun (resume of a finished job): nothing duplicated
    assert main(["rationales", "--shards", shards, "--rationales", str(rfile), "--out", out, "--quiet"]) == 0
    assert len(rejects(out)) == 4


# ---- synthetic task ----------------------------------------------------------------------------

def test_make_group_is_deterministic_valid_and_learnable():
    kinds = set()
    for index in range(12):
        rec, imgs = make_group(7, index, k=4)
        rec2, imgs2 = make_group(7, index, k=4)
        assert rec == rec2 and imgs == imgs2
        validate_group(rec, set(imgs))
        asked = rec["instruction"].split()[-1]
        assert asked in PALETTE
        kind = rec["meta"]["kind"]
        kinds.add(kind)
        best = rec["ranking"][0]
        assert len(best) == 1
        speckles = []
        for k, c in enumerate(rec["candidates"]):
            im = Image.open(io.BytesIO(imgs[c["images"][0]]))
            assert im.size == (56, 56) and im.mode == "RGB"
            colours = im.getcolors(56 * 56)
            painted = [name for name, rgb in PALETTE.items() if rgb in {rgb for _, rgb in colours}]
            assert len(painted) == 1  # exactly one palette colour in the picture
            speckles.append(sum(n for n, (r, g, b) in colours if r == g == b and (r, g, b) != (225, 225, 225)))
            assert painted[0] in c["rationale"]
            if kind == "colour":  # instruction following decides: the asked colour wins, images are clean
                assert (painted[0] == asked) == (k in best)
                assert ("does not follow" in c["rationale"]) == (k not in best)
            else:  # quality decides: all paint the asked colour, the cleanest wins
                assert painted[0] == asked
        if kind == "colour":
            assert speckles == [0] * 4
        else:
            assert speckles.index(min(speckles)) == best[0] and min(speckles) == 0
            order = [i for tier in rec["ranking"] for i in tier]
            assert [speckles[i] for i in order] == sorted(speckles)  # more noise, lower rank
    assert kinds == {"colour", "quality"}
    assert make_group(7, 12, k=4)[1] != make_group(7, 11, k=4)[1]
    src = Image.open(io.BytesIO(make_group(7, 0)[1]["src0.png"]))
    assert (128, 128, 128) in {rgb for _, rgb in src.getcolors()}
