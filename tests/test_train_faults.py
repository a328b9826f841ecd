"""Faults on 2 CPU ranks: a NaN loss on one rank is skipped on both; SIGUSR1 on one rank makes both
finish the step, checkpoint and exit with the requeue code; the requeued run continues the MLflow run."""
from __future__ import annotations

import json
import math

import pytest

from jrm_dist.train import REQUEUE_EXIT_CODE, REQUEUE_MARKER
from train_launch import base_overrides, mlflow_run, spawn, steps

pytestmark = [pytest.mark.timeout(600), pytest.mark.launch]


@pytest.fixture(scope="module")
def faulty(tiny_backbone, synthetic_shards, tmp_path_factory):
    """NaN loss on rank 1 at step 2; SIGUSR1 delivered to rank 1 right after step 3 (agreed on during
    step 4) → checkpoint at step 4, exit 75. Then the requeued run (resume auto) finishes 6 steps."""
    out = tmp_path_factory.mktemp("faults") / "run"
    ov = base_overrides(tiny_backbone, synthetic_shards, out, steps=6, **{"train.save_every": 0})
    first = spawn(ov, faults="nan@2:1,signal@3:1:USR1")
    after_first = {"steps": steps(out), "latest": (out / "checkpoints" / "latest").read_text(),
                   "marker": json.loads((out / REQUEUE_MARKER).read_text())}
    second = spawn(ov)
    return {"out": out, "first": first, "after_first": after_first, "second": second}


def test_nan_on_one_rank_skips_the_step_on_both(faulty):
    first, rec = faulty["first"], faulty["after_first"]["steps"]
    for r in (0, 1):  # both ranks agreed (each logs the skip)
        assert "step 2: non-finite loss" in first.logs[r], first.log
    assert rec[2]["loss/total"] is None and rec[2]["grad_norm"] is None and rec[2]["skipped_steps"] == 1
    assert rec[1]["skipped_steps"] == 0
    assert rec[2]["lr"] == rec[1]["lr"]  # the LR scheduler did not step either
    assert rec[3]["lr"] != rec[2]["lr"]
    for s in (3, 4):  # training went on with finite losses
        assert math.isfinite(rec[s]["loss/total"]) and math.isfinite(rec[s]["grad_norm"])


def test_sigusr1_checkpoints_and_exits_with_requeue_code(faulty):
    first, after = faulty["first"], faulty["after_first"]
    assert first.codes == [REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE], first.log
    assert "received SIGUSR1" in first.logs[1]
    assert sorted(after["steps"]) == [1, 2, 3, 4]  # finished the step in flight, no more
    assert after["latest"] == "step_00000004"
    assert after["marker"]["step"] == 4


def test_requeued_run_resumes_and_continues_the_mlflow_run(faulty):
    second, out = faulty["second"], faulty["out"]
    assert second.codes == [0, 0], second.log
    assert "step_00000004 at step 4" in second.log
    assert not (out / REQUEUE_MARKER).exists()
    rec = steps(out)
    assert sorted(rec) == [1, 2, 3, 4, 5, 6] and rec[6]["skipped_steps"] == 1
    client, runs = mlflow_run(out)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(runs[0].info.run_id, "loss/total")} == {1, 3, 4, 5, 6}
    assert runs[0].data.metrics["skipped_steps"] == 1
