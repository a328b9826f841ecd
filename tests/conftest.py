"""Shared fixtures: the tiny offline backbone and a processor (built once per session)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    """Path of a tiny random Qwen2.5-VL checkpoint (model, tokenizer, image processor)."""
    from jrm_dist.backbones import build_tiny_backbone

    return str(build_tiny_backbone(tmp_path_factory.mktemp("tiny") / "backbone"))


@pytest.fixture(scope="session")
def tiny_processor(tiny_backbone):
    from jrm_dist.processing import RewardProcessor

    return RewardProcessor.from_pretrained(tiny_backbone)


@pytest.fixture(scope="session")
def jrm_checkpoint(tiny_backbone, tmp_path_factory) -> str:
    """A saved JointRewardModel (tiny backbone + reward head + processor files), as jrm-export writes one."""
    from jrm_dist.model import JointRewardModel
    from jrm_dist.processing import RewardProcessor

    proc = RewardProcessor.from_pretrained(tiny_backbone)
    model = JointRewardModel.from_backbone(tiny_backbone, proc.reward_token_id, head_hidden=32)
    out = tmp_path_factory.mktemp("jrm") / "checkpoint"
    model.save_pretrained(out, proc)
    return str(out)


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> dict[str, str]:
    """jrm-prep synthetic shards: {"train": 64 groups (seed 0, 4 shards), "eval": 16 groups (seed 1)}."""
    from data_prep.cli import main as prep

    root = tmp_path_factory.mktemp("synthetic")
    out = {}
    for split, n, seed in (("train", 64, 0), ("eval", 16, 1)):
        d = str(root / split)
        assert prep(["synthetic", "--out", d, "--groups", str(n), "--seed", str(seed), "--max-count", "16",
                     "--quiet"]) == 0
        out[split] = d
    return out
