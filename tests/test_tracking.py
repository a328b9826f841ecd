"""MLflow tracking: batched background logging into a real store, reopening a run on resume, and
training that survives an unreachable tracking server (metrics spilled to mlflow_unsent.jsonl)."""
from __future__ import annotations

import json

import pytest

from jrm_dist.tracking import MlflowTracker, default_uri
from train_launch import base_overrides, free_port, spawn

pytestmark = pytest.mark.timeout(300)


def test_default_uri_is_sqlite_in_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert default_uri(tmp_path) == "http://tracking:5000"
    assert default_uri(tmp_path, "http://cfg:1") == "http://cfg:1"


def test_background_batches_reach_the_store_and_resume_reopens_the_run(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = MlflowTracker(uri, "exp", tmp_path)
    t.start(None)
    t.log_params({"loss.alpha": 0.3, "optim.betas": [0.9, 0.999]})
    for step in range(1, 1501):  # > one log_batch (1000 entries)
        t.log_metrics({"loss/total": 1.0 / step}, step)
    run_id = t.wait_run_id(60)
    t.close(timeout=60, status="")  # requeue: leave the run open
    assert run_id is not None and t.sent_batches >= 2
    c = MlflowClient(tracking_uri=uri)
    hist = c.get_metric_history(run_id, "loss/total")
    assert len(hist) == 1500 and {m.step for m in hist} == set(range(1, 1501))
    # the resumed trainer reopens the same run; a changed param is recorded as a tag, not an error
    t2 = MlflowTracker(uri, "exp", tmp_path)
    t2.start(run_id)
    t2.log_params({"loss.alpha": 0.5, "train.max_steps": 10})
    t2.log_metrics({"loss/total": 0.0}, 1501)
    assert t2.wait_run_id(60) == run_id
    t2.close(timeout=60)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.alpha"] == "0.3" and run.data.params["train.max_steps"] == "10"
    assert run.data.params["optim.betas"] == "[0.9, 0.999]"
    assert run.data.tags["resume_changed.loss.alpha"] == "0.3 -> 0.5"
    assert len(c.get_metric_history(run_id, "loss/total")) == 1501
    assert len(c.search_runs([run.info.experiment_id])) == 1


def test_unreachable_server_buffers_then_spills(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    t = MlflowTracker(f"http://127.0.0.1:{free_port()}", "exp", tmp_path, retry_s=0.2, max_retry_s=0.5)
    t.start(None)
    for step in range(1, 51):
        t.log_metrics({"alpha": 0.3, "loss/total": 1.0}, step)
    t.close(timeout=3)
    lines = [json.loads(ln) for ln in (tmp_path / "mlflow_unsent.jsonl").read_text().splitlines()]
    metrics = [ln for ln in lines if "key" in ln]
    assert len(metrics) == 100 and {m["step"] for m in metrics} == set(range(1, 51))


def test_training_survives_a_stopped_tracking_server(tiny_backbone, synthetic_shards, tmp_path):
    """Nothing listens at the tracking URI for the whole run: training completes, exports, and the
    metrics it could not send are on disk."""
    out = tmp_path / "run"
    ov = base_overrides(tiny_backbone, synthetic_shards, out, steps=3,
                        **{"tracking.uri": f"http://127.0.0.1:{free_port()}", "train.save_every": 0,
                           "data.eval_shards": ""})
    r = spawn(ov, world=1, env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"})
    assert r.codes == [0], r.log
    assert "MLflow: cannot reach" in r.log
    assert (out / "export" / "jrm_config.json").exists()
    unsent = [json.loads(ln) for ln in (out / "mlflow_unsent.jsonl").read_text().splitlines()]
    assert {m["step"] for m in unsent if m.get("key") == "loss/total"} == {1, 2, 3}
