"""alpha = 0 is truly rank-only: no rationale tokens, the LM head never called, no gradient and no
optimizer state for it; with an alpha schedule, steps where alpha is 0 skip the LM work on every rank."""
from __future__ import annotations

import json

import pytest
import torch

from train_launch import base_overrides, spawn, steps

pytestmark = pytest.mark.timeout(400)


def _cfg(backbone, *ov):
    from jrm_dist.config import load_config
    from train_launch import TINY

    return load_config(TINY, [f"model.name={backbone}", *ov])


def _batch(proc, with_rationale=True):
    from data_prep.synthetic import make_group
    from jrm_dist.data.collate import Collator, encode_group

    return Collator(proc)([encode_group(proc, *make_group(0, i), use_rationale=with_rationale) for i in range(2)])


def test_rank_only_never_calls_the_lm_head_and_gives_it_no_optimizer_state(tiny_backbone, tiny_processor):
    from jrm_dist.engine import build_model, build_optimizer, param_groups
    from jrm_dist.objective import drop_lm, joint_objective, local_items, rank_only

    cfg = _cfg(tiny_backbone, "loss.alpha=0")
    assert rank_only(cfg.loss)
    model = build_model(cfg, tiny_processor.reward_token_id, None)
    lm_head = model.backbone.get_output_embeddings()
    assert lm_head.weight is not model.backbone.get_input_embeddings().weight  # untied: it can be frozen
    assert not any(p.requires_grad for p in lm_head.parameters())
    opt = build_optimizer(param_groups(model, cfg), cfg)
    assert all(p is not lm_head.weight for g in opt.param_groups for p in g["params"])
    calls = []
    lm_head.register_forward_hook(lambda *a: calls.append(1))
    b = drop_lm(_batch(tiny_processor), cfg.loss, 0)  # even with rationales in the data, labels go
    assert b["labels"] is None and local_items(b, cfg.loss)[1] == 0
    for step in range(2):
        obj = joint_objective(model(b), b, cfg.loss, step)
        opt.zero_grad(set_to_none=True)
        obj["loss"].backward()
        opt.step()
    assert calls == []
    assert lm_head.weight.grad is None and lm_head.weight not in opt.state
    assert float(obj["lm"]) == 0.0 and float(obj["lm_tokens"]) == 0.0 and torch.isfinite(obj["rank"])
    # the reward path still trains
    assert any(model.reward_head.out.weight is p for p in opt.state)


def test_alpha_schedule_skips_the_lm_head_exactly_on_alpha_zero_steps(tiny_backbone, tiny_processor):
    from jrm_dist.engine import build_model
    from jrm_dist.objective import drop_lm, joint_objective, rank_only

    cfg = _cfg(tiny_backbone, "loss.alpha=0.3", "loss.alpha_schedule=linear", "loss.alpha_start=0",
               "loss.alpha_ramp_steps=4")
    assert not rank_only(cfg.loss)
    model = build_model(cfg, tiny_processor.reward_token_id, None)
    lm_head = model.backbone.get_output_embeddings()
    assert lm_head.weight.requires_grad  # alpha > 0 later: the LM head trains
    calls = []
    lm_head.register_forward_hook(lambda *a: calls.append(1))
    full = _batch(tiny_processor)
    lm = []
    for step in range(3):
        b = drop_lm(full, cfg.loss, step)
        lm.append(float(joint_objective(model(b), b, cfg.loss, step)["lm"]))
    assert len(calls) == 2  # step 0 has alpha 0: skipped; steps 1 and 2 call it
    assert lm[0] == 0.0 and lm[1] > 0 and lm[2] > 0


def test_rank_only_loader_encodes_no_rationale(tiny_processor):
    b = _batch(tiny_processor, with_rationale=False)
    assert int((b["labels"] != -100).sum()) == 0
    with_r = _batch(tiny_processor)
    assert b["input_ids"].shape[1] < with_r["input_ids"].shape[1]  # no rationale tokens in the sequence


@pytest.mark.launch
def test_trainer_rank_only_has_no_lm_state_and_schedule_runs_on_two_ranks(tiny_backbone, tiny_processor,
                                                                          synthetic_shards, tmp_path):
    """Real jrm-train runs: rank-only (1 rank) holds optimizer state for everything but the LM head;
    a linear alpha ramp from 0 (2 ranks, ZeRO-3) skips the LM head on step 1 on both ranks, then uses it."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_backbone)
    vocab = cfg.get_text_config().vocab_size
    hidden = cfg.get_text_config().hidden_size
    common = {"train.save_every": 0, "tracking.enabled": "false", "data.eval_shards": ""}
    out0 = tmp_path / "rank_only"
    r = spawn(base_overrides(tiny_backbone, synthetic_shards, out0, steps=2, **{"loss.alpha": 0, **common}), world=1)
    assert r.codes == [0], r.log
    info = json.loads((out0 / "ranks" / "rank_00000.json").read_text())
    rec = steps(out0)
    assert rec[1]["loss/lm"] == 0.0 and rec[2]["loss/lm"] == 0.0
    out1 = tmp_path / "full"
    r = spawn(base_overrides(tiny_backbone, synthetic_shards, out1, steps=2, **{"loss.alpha": 0.3, **common}), world=1)
    assert r.codes == [0], r.log
    full = json.loads((out1 / "ranks" / "rank_00000.json").read_text())
    lm_numel = max(vocab, tiny_processor.reward_token_id + 1) * hidden  # rows grow to hold the reward token
    assert full["optimizer_state_bytes"] - info["optimizer_state_bytes"] == 12 * lm_numel  # fp32 master + 2 moments
    out2 = tmp_path / "ramp"
    r = spawn(base_overrides(tiny_backbone, synthetic_shards, out2, steps=3,
                             **{"loss.alpha": 0.3, "loss.alpha_schedule": "linear", "loss.alpha_start": 0,
                                "loss.alpha_ramp_steps": 2, **common}), world=2)
    assert r.codes == [0, 0], r.log
    rec = steps(out2)
    assert rec[1]["alpha"] == 0.0 and rec[1]["loss/lm"] == 0.0
    assert rec[2]["alpha"] > 0 and rec[2]["loss/lm"] > 0 and rec[3]["loss/lm"] > 0
