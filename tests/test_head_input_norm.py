"""model.head_input_norm=standardize: the reward head standardises its input with the statistics of the first
step's reward-token states (issue 19: on raw pretrained reward-token states the head barely learns)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_standardized_head_equals_the_plain_head_on_standardized_input():
    from jrm_dist.model import RewardHead

    torch.manual_seed(0)
    plain, std = RewardHead(8, 4), RewardHead(8, 4, input_norm="standardize")
    plain.reset_parameters()
    std.load_state_dict({**plain.state_dict(), "in_shift": torch.zeros(8), "in_scale": torch.ones(8)})
    h = 5.0 + 0.1 * torch.randn(6, 8)  # a large shared vector plus small differences
    mean, var = h.mean(0), h.var(0)
    std.set_input_stats(mean, var)
    mu_s, lv_s = std(h)
    mu_p, lv_p = plain((h - mean) / (var + 1e-5 * var.mean()).sqrt())
    assert torch.allclose(mu_s, mu_p, atol=1e-5) and torch.allclose(lv_s, lv_p, atol=1e-5)
    assert set(std.state_dict()) == set(plain.state_dict()) | {"in_shift", "in_scale"}
    with pytest.raises(ValueError, match="input_norm"):
        RewardHead(8, 4, input_norm="batch")
    with pytest.raises(ValueError, match="standardize"):
        plain.set_input_stats(mean, var)


def test_calibrate_sets_the_reward_token_statistics_and_save_load_keeps_them(tiny_backbone, tiny_processor,
                                                                              synthetic_shards, tmp_path):
    from jrm_dist.data.collate import Collator, encode_group
    from jrm_dist.model import JointRewardModel, calibrate_head_input
    from jrm_dist.repro import _read_groups

    proc = tiny_processor
    model = JointRewardModel.from_backbone(tiny_backbone, proc.reward_token_id, head_hidden=16,
                                           head_input_norm="standardize").eval()
    recs = list(_read_groups(Path(synthetic_shards["eval"])))[:4]
    batch = Collator(proc)([encode_group(proc, r, im, use_rationale=False) for r, im in recs])
    seen = []
    assert calibrate_head_input(model, [batch], all_reduce=lambda t: seen.append(t.clone())) == 8
    assert len(seen) == 1  # the statistics go through the (rank) reduction once
    f = model.features(batch).double()
    assert torch.allclose(model.reward_head.in_shift.double(), f.mean(0), atol=1e-5)
    var = f.var(0)
    assert torch.allclose(model.reward_head.in_scale.double(), (var + 1e-5 * var.mean()).rsqrt(), rtol=1e-4)
    mu, sigma = model.score(batch)
    model.save_pretrained(tmp_path / "ck", proc)
    assert json.loads((tmp_path / "ck" / "jrm_config.json").read_text())["head_input_norm"] == "standardize"
    back = JointRewardModel.from_pretrained(tmp_path / "ck").eval()
    assert back.reward_head.input_norm == "standardize"
    mu2, sigma2 = back.score(batch)
    assert torch.allclose(mu, mu2, atol=1e-5) and torch.allclose(sigma, sigma2, atol=1e-5)


def test_default_head_keeps_the_checkpoint_format(jrm_checkpoint):
    from safetensors.torch import load_file

    from jrm_dist.model import HEAD_WEIGHTS, JointRewardModel

    assert "head_input_norm" not in json.loads((Path(jrm_checkpoint) / "jrm_config.json").read_text())
    assert not {"in_shift", "in_scale"} & set(load_file(str(Path(jrm_checkpoint) / HEAD_WEIGHTS)))
    assert JointRewardModel.from_pretrained(jrm_checkpoint).reward_head.input_norm == "none"


def test_jrm_train_calibrates_the_head_under_zero3_and_exports_the_statistics(tiny_backbone, tmp_path):
    """A real jrm-train launch (1 process, ZeRO-3): the buffers are set at step 0, saved in the DeepSpeed
    checkpoint and consolidated into the export, whose model scores with them."""
    from safetensors.torch import load_file

    from data_prep.cli import main as prep
    from jrm_dist.model import HEAD_WEIGHTS, JointRewardModel

    prep(["synthetic", "--out", str(tmp_path / "train"), "--groups", "8", "--seed", "0", "--quiet"])
    run_dir = tmp_path / "run"
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29617", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run([sys.executable, "-m", "jrm_dist.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
                        f"model.name={tiny_backbone}", f"data.train_shards={tmp_path / 'train'}", "data.eval_shards=",
                        f"train.output_dir={run_dir}", "train.max_steps=2", "train.eval_every=0", "train.save_every=0",
                        "model.head_input_norm=standardize", "loss.alpha=0"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "reward head input standardised with the statistics of 8 reward-token states" in p.stderr + p.stdout
    head = load_file(str(run_dir / "export" / HEAD_WEIGHTS))
    assert head["in_shift"].abs().sum() > 0 and not torch.allclose(head["in_scale"], torch.ones_like(head["in_scale"]))
    model = JointRewardModel.from_pretrained(run_dir / "export")
    assert torch.equal(model.reward_head.in_shift, head["in_shift"])
