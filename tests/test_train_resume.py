"""Exact resume on 2 CPU ranks: a crash in the middle of a checkpoint save, then kill -9 between
checkpoints; ``--resume auto`` each time. The stitched per-step losses must equal an uninterrupted
run's bit for bit (CPU fp32, same world size), every group is seen exactly once, one MLflow run."""
from __future__ import annotations

import json

import pytest

from train_launch import base_overrides, mlflow_run, spawn, steps

pytestmark = [pytest.mark.timeout(600), pytest.mark.launch]
STEPS = 6


@pytest.fixture(scope="module")
def reference(torchrun_six_steps):
    """The uninterrupted run of the same config (conftest.py, shared with test_train_dist)."""
    assert STEPS == 6
    return steps(torchrun_six_steps["out"])


@pytest.fixture(scope="module")
def interrupted(tiny_backbone, synthetic_shards, tmp_path_factory):
    """save_every=2. Run A: SIGKILL on rank 0 in the middle of saving step 4 (step 2 is complete).
    Run B (resume auto): must restart from step 2; SIGKILL on both ranks after step 5 (4 is saved).
    Run C (resume auto): from step 4 to the end."""
    out = tmp_path_factory.mktemp("int") / "run"
    ov = base_overrides(tiny_backbone, synthetic_shards, out, steps=STEPS)
    a = spawn(ov, faults="crash_save@4:0")
    ckpts = out / "checkpoints"
    after_a = {
        "codes": a.codes, "latest": (ckpts / "latest").read_text(),
        "tmp_left": sorted(p.name for p in ckpts.glob("*.tmp")), "log": a.log,
    }
    b = spawn(ov, faults="kill@5:0,kill@5:1")
    after_b = {"codes": b.codes, "latest": (ckpts / "latest").read_text(), "log": b.log}
    c = spawn(ov)
    return {"out": out, "a": after_a, "b": after_b, "c": c}


def test_crash_mid_save_leaves_previous_checkpoint_and_resume_uses_it(interrupted):
    a, b = interrupted["a"], interrupted["b"]
    assert a["codes"][0] == -9, a["log"]
    assert a["latest"] == "step_00000002"  # the half-written step 4 was never published
    assert a["tmp_left"] == ["step_00000004.tmp"]
    assert "resumed from" in b["log"] and "step_00000002 at step 2" in b["log"], b["log"]
    assert b["codes"] == [-9, -9]
    assert b["latest"] == "step_00000004"


def test_kill9_resume_is_bit_identical_and_sees_each_sample_once(interrupted, reference):
    c = interrupted["c"]
    assert c.codes == [0, 0], c.log
    assert "step_00000004 at step 4" in c.log
    got = steps(interrupted["out"])
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        for k in ("loss/total", "loss/rank", "loss/lm", "grad_norm", "lr"):
            assert got[s][k] == reference[s][k], (s, k, got[s][k], reference[s][k])  # exact, not approx
        assert got[s]["keys"] == reference[s]["keys"]
    keys = [k for s in got.values() for rk in s["keys"] for k in rk]
    assert len(keys) == len(set(keys))  # no group seen twice, none missed (same as the reference)


def test_resumed_runs_continue_one_mlflow_run(interrupted):
    client, runs = mlflow_run(interrupted["out"])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    hist = client.get_metric_history(run.info.run_id, "loss/total")
    assert sorted(m.step for m in hist) == list(range(1, STEPS + 1))  # each step once, none re-logged
    state = json.loads((interrupted["out"] / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["mlflow_run_id"] == run.info.run_id
