"""Group packing (data.packing=group) is exact: the packed path gives the unpacked path's mu, log_var,
LM loss and gradients (fp32, 1e-5) on the tiny Qwen2.5-VL, and so do packed scoring and the trainer."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from jrm_dist.config import LossConfig
from jrm_dist.data.collate import Collator, EncodedGroup
from jrm_dist.data.packing import PackedCollator, pack_for_scoring, padding_stats
from jrm_dist.model import JointRewardModel
from jrm_dist.objective import joint_objective, local_items

WORDS = ("the square is now red and the edit follows the instruction while the background stays the same "
         "but the image is slightly noisy so the result is not perfect").split()


@pytest.fixture(scope="module")
def model(tiny_backbone, tiny_processor):
    torch.manual_seed(0)
    m = JointRewardModel.from_backbone(tiny_backbone, tiny_processor.reward_token_id, head_hidden=32,
                                       attn_implementation="sdpa", lm_ce="reference")
    return m.eval()


def _img(seed: int, side: int = 56) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def _group(proc, key: str, k: int, n_src: int, seed: int, text: bool = False, ties: bool = False,
           side: int = 56) -> EncodedGroup:
    """K candidates sharing n_src source images; candidate images (or texts) and rationale lengths differ."""
    rng = random.Random(seed)
    src = [_img(seed * 100 + j, side) for j in range(n_src)]
    encs = []
    for i in range(k):
        rat = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
        if text:
            encs.append(proc.encode("make the square red", src, (), f"candidate {i} says {rng.choice(WORDS)}", rat))
        else:
            encs.append(proc.encode("make the square red", src, [_img(seed * 100 + 50 + i, side)], None, rat))
    win, lose, tie = [], [], []
    for a in range(k):
        for b in range(a + 1, k):
            win.append(a)
            lose.append(b)
            tie.append(ties and (a + b) % 3 == 0)
    return EncodedGroup(key, encs, win, lose, tie)


def _compare(model, proc, groups, loss_cfg=None):
    ub, pb = Collator(proc)(groups), PackedCollator(proc)(groups)
    ou, op = model(ub), model(pb)
    torch.testing.assert_close(op["mu"], ou["mu"], rtol=0, atol=1e-5)
    torch.testing.assert_close(op["log_var"], ou["log_var"], rtol=0, atol=1e-5)
    torch.testing.assert_close(op["lm_loss_sum"], ou["lm_loss_sum"], rtol=1e-5, atol=1e-5)
    assert int(op["lm_tokens"]) == int(ou["lm_tokens"]) > 0
    cfg = loss_cfg or LossConfig()
    assert local_items(pb, cfg) == local_items(ub, cfg)
    lu, lp = joint_objective(ou, ub, cfg, 0)["loss"], joint_objective(op, pb, cfg, 0)["loss"]
    torch.testing.assert_close(lp, lu, rtol=1e-5, atol=1e-6)
    return ub, pb, lu, lp


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("n_src", [1, 2])
def test_packed_equals_unpacked(model, tiny_processor, k, n_src):
    groups = [_group(tiny_processor, f"g{i}", k, n_src, seed=10 * k + i, ties=(i == 1)) for i in range(3)]
    ub, pb, _, _ = _compare(model, tiny_processor, groups)
    assert pb["input_ids"].shape[0] == 1 and padding_stats(pb)["padding_fraction"] == 0.0
    assert padding_stats(ub)["padding_fraction"] > 0  # varying rationale lengths: the reference pads
    # the shared prefix (header + source images) is there once per group; each source image encoded once
    assert (pb["pack_prefix"][:, 1] > 0).all()
    assert pb["image_grid_thw"].shape[0] == 3 * (n_src + k)
    assert ub["image_grid_thw"].shape[0] == 3 * k * (n_src + 1)
    assert pb["input_ids"].shape[1] == int(ub["attention_mask"].sum()) - int(pb["pack_prefix"][:, 1].sum()) * (k - 1)


def test_no_source_image_and_text_candidate_groups(model, tiny_processor):
    """Groups without a source image (prefix = chat header) and text-only groups (no image at all:
    the dummy vision input keeps ZeRO-3 in step), mixed with an image group in one micro-batch."""
    groups = [_group(tiny_processor, "nosrc", 3, 0, seed=1), _group(tiny_processor, "text", 4, 0, seed=2, text=True),
              _group(tiny_processor, "img", 2, 1, seed=3)]
    _, pb, _, _ = _compare(model, tiny_processor, groups)
    assert (pb["pack_prefix"][:, 1] > 0).all()
    text_only = [_group(tiny_processor, "t1", 2, 0, seed=4, text=True), _group(tiny_processor, "t2", 3, 0, seed=5,
                                                                                 text=True)]
    _, pb, _, _ = _compare(model, tiny_processor, text_only)
    assert pb["pixel_values"] is None
    # the text prefix reaches into the instruction, not only the chat header
    assert int(pb["pack_prefix"][0, 1]) > 20


def test_ties_ignored_or_modelled_same_objective(model, tiny_processor):
    groups = [_group(tiny_processor, f"g{i}", 4, 1, seed=40 + i, ties=True) for i in range(2)]
    for ties in ("model", "ignore"):
        _compare(model, tiny_processor, groups, LossConfig(ties=ties))


def test_unshareable_prefix_falls_back_to_whole_candidates(model, tiny_processor):
    """Candidates whose 'source' pixels differ share nothing: packed with an empty prefix, still exact."""
    g = _group(tiny_processor, "a", 3, 1, seed=7)
    other = _group(tiny_processor, "b", 3, 1, seed=8)
    g.candidates[1] = other.candidates[1]  # same tokens, different source image
    _, pb, _, _ = _compare(model, tiny_processor, [g, _group(tiny_processor, "c", 2, 1, seed=9)])
    assert pb["pack_prefix"].tolist()[0][1] == 0 and pb["pack_prefix"].tolist()[1][1] > 0


def test_identical_images_are_encoded_once(model, tiny_processor):
    """The same candidate image in two groups, and a tie between identical candidates, is encoded once."""
    g1 = _group(tiny_processor, "a", 2, 1, seed=11)
    g2 = _group(tiny_processor, "b", 2, 1, seed=11)  # same images as g1
    _, pb, _, _ = _compare(model, tiny_processor, [g1, g2])
    assert pb["image_grid_thw"].shape[0] == 3  # one source + two candidate images
    assert pb["image_index"].numel() == 6


def test_packed_gradients_equal_unpacked(tiny_backbone, tiny_processor):
    torch.manual_seed(0)
    m = JointRewardModel.from_backbone(tiny_backbone, tiny_processor.reward_token_id, head_hidden=32,
                                       attn_implementation="sdpa", lm_ce="reference")
    groups = [_group(tiny_processor, f"g{i}", 3, 1, seed=60 + i) for i in range(2)]
    grads = []
    for b in (Collator(tiny_processor)(groups), PackedCollator(tiny_processor)(groups)):
        m.zero_grad()
        joint_objective(m(b), b, LossConfig(), 0)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


def test_packed_scoring_equals_unpacked(model, tiny_processor):
    """pack_for_scoring groups candidates by identical prefix on its own, whatever their order."""
    groups = [_group(tiny_processor, f"g{i}", k, n, seed=80 + i) for i, (k, n) in enumerate([(4, 1), (2, 2), (3, 0)])]
    groups.append(_group(tiny_processor, "t", 3, 0, seed=90, text=True))
    encs = [c for g in groups for c in g.candidates]
    assert model.supports_packing()
    ref_mu, ref_sigma = model.score(Collator(tiny_processor)(groups))
    perm = list(range(len(encs)))
    random.Random(0).shuffle(perm)
    batch = pack_for_scoring([encs[i] for i in perm], tiny_processor)
    assert batch["pack_prefix"].shape[0] == len(groups)  # one shared prefix per item
    mu, sigma = model.score(batch)
    torch.testing.assert_close(mu, ref_mu[perm], rtol=0, atol=1e-5)
    torch.testing.assert_close(sigma, ref_sigma[perm], rtol=1e-5, atol=1e-6)
    # no rationale is carried into scoring
    assert batch["input_ids"].shape[1] < sum(c.input_ids.numel() for c in encs)


def test_packing_config_key(tmp_path):
    from jrm_dist.config import ConfigError, load_config

    assert load_config(None, []).data.packing == "none"
    assert load_config(None, ["data.packing=group"]).data.packing == "group"
    with pytest.raises(ConfigError, match="data.packing"):
        load_config(None, ["data.packing=rows"])
    with pytest.raises(ConfigError, match="data.packing=group needs model.attn_implementation=sdpa"):
        load_config(None, ["data.packing=group", "model.attn_implementation=eager"])


# ----------------------------------------------------------------------------- trainer (2 ranks, ZeRO-3)
DIST_STEPS = 20


@pytest.fixture(scope="module")
def runs(tiny_backbone, synthetic_shards, tmp_path_factory):
    """Uninterrupted 20-step runs, unpacked and packed; then a packed run killed after step 9
    (step 8 saved) and resumed to the end."""
    from train_launch import base_overrides, spawn, steps

    out = {}
    for name, packing in (("none", "none"), ("group", "group")):
        d = tmp_path_factory.mktemp(name) / "run"
        r = spawn(base_overrides(tiny_backbone, synthetic_shards, d, steps=DIST_STEPS,
                                 **{"data.packing": packing, "train.save_every": 4}))
        assert r.codes == [0, 0], r.log
        out[name] = steps(d)
    d = tmp_path_factory.mktemp("resume") / "run"
    ov = base_overrides(tiny_backbone, synthetic_shards, d, steps=DIST_STEPS,
                        **{"data.packing": "group", "train.save_every": 4})
    a = spawn(ov, faults="kill@9:0,kill@9:1")
    assert a.codes == [-9, -9], a.log
    b = spawn(ov)
    assert b.codes == [0, 0], b.log
    assert "step_00000008 at step 8" in b.log, b.log
    out["resumed"] = steps(d)
    return out


@pytest.mark.timeout(900)
@pytest.mark.launch
def test_packed_training_follows_the_unpacked_trajectory(runs):
    ref, got = runs["none"], runs["group"]
    assert sorted(got) == sorted(ref) == list(range(1, DIST_STEPS + 1))
    for s in ref:
        assert got[s]["keys"] == ref[s]["keys"]
        for k in ("loss/total", "loss/rank", "loss/lm"):
            assert got[s][k] == pytest.approx(ref[s][k], rel=1e-4, abs=1e-6), (s, k)
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-3, abs=1e-6), s


@pytest.mark.timeout(900)
@pytest.mark.launch
def test_packed_resume_is_bit_identical(runs):
    ref, got = runs["group"], runs["resumed"]
    assert sorted(got) == list(range(1, DIST_STEPS + 1))
    for s in ref:
        for k in ("loss/total", "loss/rank", "loss/lm", "grad_norm", "lr"):
            assert got[s][k] == ref[s][k], (s, k, got[s][k], ref[s][k])  # exact, not approx
        assert got[s]["keys"] == ref[s]["keys"]


def test_plan_knows_packing():
    """jrm-plan: the packed row holds each group's prefix (header + source image) once and no padding, so
    tokens, images, activations and step time drop; the labelled tokens (LM loss) do not."""
    from argparse import Namespace
    from pathlib import Path

    from jrm_dist import plan as P

    root = Path(__file__).resolve().parents[1]
    args = P.build_parser().parse_args(["--config", str(root / "configs/qwen2_5_vl_7b.yaml"), "--seq-len", "1024",
                                        "--mean-seq-len", "800", "--candidates", "4"])
    out = {}
    for packing in ("none", "group"):
        args.overrides = [f"data.packing={packing}"]
        out[packing], text = P.run(args)
        assert f"packing    {packing}" in text
    cfg = P.load_config(str(root / "configs/qwen2_5_vl_7b.yaml"), ["data.packing=group"])
    arch = P.load_arch(cfg.model.name)
    w = P.workload_from(cfg, arch, args)
    img = P.image_tokens_for(cfg.data.max_pixels, arch)
    prefix = (img + 2) + P.PROMPT_HEADER_TOKENS
    assert (w.shared_tokens, w.shared_images) == (prefix, 1)
    assert w.tokens == w.groups * (prefix + 4 * (800 - prefix))  # prefix once, no padding
    assert w.images == w.groups * (1 + 4 * 1)  # vs groups * 4 * 2 unpacked
    none, group = out["none"], out["group"]
    assert none["tokens_per_gpu"] == w.groups * 4 * 1024
    assert group["tokens_per_gpu"] == w.tokens and group["patches_per_gpu"] < none["patches_per_gpu"]
    assert group["activations_gib"] < none["activations_gib"]
    assert group["step_s"] < none["step_s"] and group["max_micro_batch"] > none["max_micro_batch"]
    assert group["loss_buffer_gib"] == none["loss_buffer_gib"]  # same labelled tokens
    assert cfg.data.packing == "group"
    # a mean sequence no longer than the shared prefix is an error naming the option
    bad = Namespace(**{**vars(args), "mean_seq_len": 100, "overrides": ["data.packing=group"]})
    with pytest.raises(P.PlanError, match="--mean-seq-len"):
        P.run(bad)


def test_packing_needs_sdpa(tiny_backbone, tiny_processor):
    m = JointRewardModel.from_backbone(tiny_backbone, tiny_processor.reward_token_id, head_hidden=32,
                                       attn_implementation="eager", lm_ce="reference")
    assert not m.supports_packing()
    batch = PackedCollator(tiny_processor)([_group(tiny_processor, "g", 2, 1, seed=1)])
    with pytest.raises(ValueError, match="data.packing=group needs model.attn_implementation=sdpa"):
        m(batch)


def test_loader_packs_when_configured(synthetic_shards, tiny_processor):
    """data.packing=group reaches the loader: batches are one packed row; none keeps padded rows."""
    from jrm_dist.config import load_config
    from jrm_dist.data.loader import StreamingLoader

    shapes = {}
    for packing in ("none", "group"):
        cfg = load_config(None, [f"data.train_shards={synthetic_shards['train']}", "data.groups_per_batch=2",
                                 f"data.packing={packing}"])
        b = next(iter(StreamingLoader.from_config(cfg.data, tiny_processor, rank=0, world_size=1)))
        shapes[packing] = (tuple(b["input_ids"].shape), bool(b.get("packed")), b["keys"])
    assert shapes["none"][1] is False and shapes["none"][0][0] > 2
    assert shapes["group"][1] is True and shapes["group"][0][0] == 1
    assert shapes["group"][2] == shapes["none"][2]  # same groups, same order
