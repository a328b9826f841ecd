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
