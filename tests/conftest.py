"""Shared fixtures: the tiny offline backbone and a processor (built once per session)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Tell train_launch which test runs (its fixtures included), so a launch from a test not marked
    ``launch`` fails loudly instead of slowing down ``make test-quick`` (which runs ``-m "not launch"``)."""
    import train_launch

    train_launch.RUNNING_TEST = item
    try:
        yield
    finally:
        train_launch.RUNNING_TEST = None


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


@pytest.fixture(scope="session")
def lora_zero3_run(tiny_backbone, synthetic_shards, tmp_path_factory):
    """One short LoRA run under ZeRO-3 on 2 ranks (3 steps, final eval, merged export), shared by the tests of
    the LoRA export (test_train_optim: scores = the live engine's; test_export_plain: plain transformers)."""
    from train_launch import base_overrides, spawn

    out = tmp_path_factory.mktemp("lora_zero3") / "run"
    r = spawn(base_overrides(tiny_backbone, synthetic_shards, out, steps=3,
                             **{"model.lora.r": 4, "train.save_every": 0, "tracking.enabled": "false",
                                "optim.head_lr": "1e-2"}))
    assert r.codes == [0, 0], r.log
    return out


@pytest.fixture(scope="session")
def torchrun_six_steps(tiny_backbone, synthetic_shards, tmp_path_factory):
    """One uninterrupted 6-step run on 2 ranks started by torchrun, eval at steps 3 and 6, export: the run
    test_train_dist inspects, and the reference trajectory test_train_resume's kill -9 resume must match
    bit for bit (an eval touches no training state, so the steps equal those of a run without one)."""
    import subprocess
    import sys

    from train_launch import ROOT, TINY, base_overrides, check_marked_launch, env_for, free_port

    check_marked_launch()
    out = tmp_path_factory.mktemp("train") / "run"
    ov = base_overrides(tiny_backbone, synthetic_shards, out, steps=6, **{"train.eval_every": 3})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "jrm_dist.train", "--config", TINY, *ov]
    env = env_for(0, 2, 0)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-8000:]
    return {"out": out, "overrides": ov, "stdout": p.stdout, "stderr": p.stderr}
