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


@pytest.mark.launch
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


STEPS = 30  # 64 groups / (1 rank x 2 groups) = one epoch of 32 steps


@pytest.mark.launch
def test_training_survives_a_tracking_server_stopped_mid_run(tiny_backbone, synthetic_shards, tmp_path):
    """A real ``mlflow server``: metrics reach it until it is stopped (once it holds step 2); training finishes,
    the rest goes to mlflow_unsent.jsonl."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time
    import urllib.request

    port = free_port()
    store = tmp_path / "server.db"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--artifacts-destination", str(tmp_path / "artifacts")],
        cwd=tmp_path, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start")
        out = tmp_path / "run"
        ov = base_overrides(tiny_backbone, synthetic_shards, out, steps=STEPS,
                            **{"tracking.uri": f"http://127.0.0.1:{port}", "train.save_every": 0,
                               "data.eval_shards": ""})
        stopped = {}

        def stop_after_step_2(procs):
            def watch():  # stop the server as soon as it holds step 2's loss
                from mlflow import MlflowClient

                live = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
                while True:
                    try:
                        runs = live.search_runs([e.experiment_id for e in live.search_experiments()])
                        if runs and any(m.step >= 2 for m in
                                        live.get_metric_history(runs[0].info.run_id, "loss/total")):
                            break
                    except Exception:  # noqa: BLE001 - not created yet
                        pass
                    time.sleep(0.05)
                os.killpg(server.pid, signal.SIGKILL)
                log = out / "steps.jsonl"
                stopped["at"] = len(log.read_text().splitlines())
            threading.Thread(target=watch, daemon=True).start()

        r = spawn(ov, world=1, on_start=stop_after_step_2,
                  env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"})
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    assert r.codes == [0], r.log
    assert stopped["at"] < STEPS and "MLflow: cannot reach" in r.log
    assert (out / "export" / "jrm_config.json").exists()
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert len(runs) == 1
    sent = {m.step for m in c.get_metric_history(runs[0].info.run_id, "loss/total")}
    unsent = {json.loads(ln)["step"] for ln in (out / "mlflow_unsent.jsonl").read_text().splitlines()
              if json.loads(ln).get("key") == "loss/total"}
    assert {1, 2} <= sent
    assert sent | unsent == set(range(1, STEPS + 1))  # nothing lost: on the server or on disk


def test_resumed_run_logs_each_step_once(tmp_path):
    """kill -9 after step 45 with the checkpoint at step 40: the resumed trainer redoes 41-45. MLflow
    metrics are append-only, so the tracker must not send those steps a second time."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = MlflowTracker(uri, "exp", tmp_path)
    t.start(None)
    for step in range(1, 46):
        t.log_metrics({"loss/total": 1.0 / step, "lr": 0.1}, step)
    run_id = t.wait_run_id(60)
    assert t.flush(60)
    t.close(timeout=60, status="")  # the kill: the run stays open
    t2 = MlflowTracker(uri, "exp", tmp_path)
    t2.start(run_id)
    for step in range(41, 51):  # resumed from the step-40 checkpoint
        t2.log_metrics({"loss/total": 1.0 / step, "lr": 0.1, "eval/accuracy": 0.5}, step)
    t2.log_metrics({"lr": 0.1}, 50)  # the same step twice in one run: once in the store
    t2.close(timeout=60)
    c = MlflowClient(tracking_uri=uri)
    for key in ("loss/total", "lr"):
        assert sorted(m.step for m in c.get_metric_history(run_id, key)) == list(range(1, 51)), key
    assert sorted(m.step for m in c.get_metric_history(run_id, "eval/accuracy")) == list(range(41, 51))
    assert t2.not_relogged == 2 * 5 + 1


def test_artifacts_follow_the_sqlite_store_not_the_working_directory(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from jrm_dist.tracking import artifact_location

    cwd, out = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    out.mkdir()
    monkeypatch.chdir(cwd)
    uri = default_uri(out)
    assert artifact_location(uri) == (out.resolve() / "mlartifacts").as_uri()
    (out / "config.yaml").write_text("a: 1\n")
    t = MlflowTracker(uri, "exp", out)
    t.start(None)
    t.log_artifact(out / "config.yaml")
    run_id = t.wait_run_id(60)
    t.close(timeout=60)
    assert not (cwd / "mlruns").exists()
    stored = list((out / "mlartifacts").rglob("config.yaml"))
    assert len(stored) == 1 and run_id in str(stored[0])
    c = MlflowClient(tracking_uri=uri)
    assert [f.path for f in c.list_artifacts(run_id)] == ["config.yaml"]


def test_several_runs_share_one_store_for_a_sweep(tmp_path):
    """An alpha sweep: every run points tracking.uri at one store and tracking.experiment at one name
    (docs: launchers/README.md); the runs land side by side in that experiment."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'sweep' / 'mlflow.db'}"
    (tmp_path / "sweep").mkdir()
    for alpha in (0.0, 0.3, 1.0):
        t = MlflowTracker(uri, "alpha-sweep", tmp_path / f"run-{alpha}", run_name=f"alpha-{alpha}")
        t.start(None)
        t.log_params({"loss.alpha": alpha})
        t.log_metrics({"eval/accuracy": alpha}, 10)
        t.close(timeout=60)
    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("alpha-sweep")
    runs = c.search_runs([exp.experiment_id], order_by=["params.`loss.alpha` ASC"])
    assert [r.info.run_name for r in runs] == ["alpha-0.0", "alpha-0.3", "alpha-1.0"]
    assert exp.artifact_location == (tmp_path / "sweep" / "mlartifacts").resolve().as_uri()
