"""Optimizer choices under ZeRO-3 on 2 CPU ranks: bitsandbytes AdamW8bit as the client optimizer."""
from __future__ import annotations

import json

import pytest

from train_launch import base_overrides, spawn, steps

pytestmark = [pytest.mark.timeout(400), pytest.mark.launch]


def test_adamw8bit_under_zero3_trains(tiny_backbone, synthetic_shards, tmp_path):
    out = tmp_path / "run"
    ov = base_overrides(tiny_backbone, synthetic_shards, out, steps=8,
                        **{"optim.name": "adamw8bit", "optim.lr": "3e-3", "optim.schedule": "constant",
                           "train.save_every": 0,
                           "tracking.enabled": "false", "data.eval_shards": ""})
    r = spawn(ov)
    assert r.codes == [0, 0], r.log
    rec = steps(out)
    losses = [rec[s]["loss/total"] for s in range(1, 9)]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3, losses  # the loss falls
    for rank in (0, 1):
        info = json.loads((out / "ranks" / f"rank_{rank:05d}.json").read_text())
        assert info["params_local"] < 0.55 * info["params_total"]  # still ZeRO-3 partitioned
        # fp32 master partition (4 B) + two 8-bit moments (~1 B each + block absmax): ~6 B, AdamW needs 12 B
        assert info["optimizer_state_bytes"] / info["params_local"] < 7.0, info


def test_lora_under_zero3_trains_and_the_export_merges_it(lora_zero3_run):
    """LoRA adapters on a ZeRO-3 partitioned backbone; the export merges them (scores = live engine's)."""
    import torch

    from data_prep.synthetic import make_group
    from jrm_dist.data.collate import Collator, encode_group
    from jrm_dist.model import JointRewardModel
    from jrm_dist.processing import RewardProcessor

    out = lora_zero3_run
    index = json.loads((out / "export" / "model.safetensors.index.json").read_text())
    assert not any("lora_" in k or "base_layer" in k for k in index["weight_map"])
    model = JointRewardModel.from_pretrained(out / "export").eval()
    proc = RewardProcessor.from_pretrained(str(out / "export"), max_pixels=3136, min_pixels=784, max_length=512)
    live = json.loads((out / "eval" / "step_00000003.json").read_text())["scores"]
    col = Collator(proc)
    for key, rec in list(live.items())[:6]:
        _, seed, idx = key.split("-")
        mu, _ = model.score(col([encode_group(proc, *make_group(int(seed), int(idx)))]))
        torch.testing.assert_close(mu, torch.tensor(rec["mu"]), rtol=1e-5, atol=1e-5)


def test_lora_bf16_under_zero3_starts_and_trains(tiny_backbone, synthetic_shards, tmp_path):
    """bf16 + ZeRO-3 + LoRA (what a 72B user with few GPUs runs): the adapters peft adds after zero.Init must
    join the bf16 partitions (DeepSpeed's stage-3 flat buffers need one dtype), with fp32 masters as usual."""
    out = tmp_path / "run"
    ov = base_overrides(tiny_backbone, synthetic_shards, out, steps=3,
                        **{"model.lora.r": 4, "model.precision": "bf16", "train.save_every": 0,
                           "tracking.enabled": "false", "data.eval_shards": "", "optim.lr": "1e-3"})
    r = spawn(ov)
    assert r.codes == [0, 0], r.log
    rec = steps(out)
    assert [s for s in sorted(rec)] == [1, 2, 3]
    assert all(rec[s]["loss/total"] == rec[s]["loss/total"] for s in rec)  # finite, not NaN
    index = json.loads((out / "export" / "model.safetensors.index.json").read_text())
    assert not any("lora_" in k or "base_layer" in k for k in index["weight_map"])
