"""Optimizer choices under ZeRO-3 on 2 CPU ranks: bitsandbytes AdamW8bit as the client optimizer."""
from __future__ import annotations

import json

import pytest

from train_launch import base_overrides, spawn, steps

pytestmark = pytest.mark.timeout(400)


def test_adamw8bit_under_zero3_trains(tiny_backbone, synthetic_shards, tmp_path):
    out = tmp_path / "run"
    ov = base_overrides(tiny_backbone, synthetic_shards, out, steps=8,
                        **{"optim.name": "adamw8bit", "optim.schedule": "constant", "train.save_every": 0,
                           "tracking.enabled": "false", "data.eval_shards": ""})
    r = spawn(ov)
    assert r.codes == [0, 0], r.log
    rec = steps(out)
    losses = [rec[s]["loss/total"] for s in range(1, 9)]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3, losses  # the loss falls
    for rank in (0, 1):
        info = json.loads((out / "ranks" / f"rank_{rank:05d}.json").read_text())
        assert info["params_local"] < 0.55 * info["params_total"]  # still ZeRO-3 partitioned
        # fp32 master partition (4 B) + two 8-bit moments (~1 B each + block absmax): well under AdamW's 12 B
        assert info["optimizer_state_bytes"] / info["params_local"] < 7.0, info
