"""MLflow tracking for the trainer: rank 0 only, batched, off the hot path, outage tolerant.

The training step only appends to an in-memory queue (``log_metrics`` costs microseconds). A
daemon thread owns the ``MlflowClient``: it creates or reopens the run, sends params, metrics
(``log_batch``, <= 1000 entries a call) and artifacts. When the tracking server is unreachable it
keeps the queue (bounded), retries with back-off and warns once per outage; what is still unsent
when the trainer closes is written to ``<output_dir>/mlflow_unsent.jsonl`` so nothing is lost.

Each (metric, step) is logged once. MLflow metrics are append-only (no API overwrites or deletes a
point), so a run resumed after kill -9 would add a second point for every step it redoes after its
checkpoint. On resume the tracker reads the run's metric history and keeps, per key, the highest step
already logged; later points at or below it are not sent (an exact resume recomputes the same values).

Artifacts follow the store: with a SQLite store (the default ``sqlite:///<output_dir>/mlflow.db``, or a
shared one) a new experiment gets the artifact location ``<folder of the .db>/mlartifacts``, not MLflow's
default ``./mlruns`` of whatever directory the job started in. A tracking server decides for itself.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # MLflow's log_batch limit (metrics + params + tags)
MAX_PARAMS = 100
MAX_QUEUE = 200_000  # metric entries kept during an outage; the oldest are dropped beyond it


def default_uri(output_dir: str | os.PathLike, configured: str = "") -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else a SQLite file in the run directory."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """``<folder of the .db>/mlartifacts`` (file URI) for a SQLite store; None (MLflow decides) otherwise."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return (db.resolve().parent / "mlartifacts").as_uri()


class NullTracker:
    """What ranks other than 0 (and tracking.enabled=false) get: every call is a no-op."""

    run_id: str | None = None
    enabled = False

    def start(self, *a, **k) -> None: ...
    def log_metrics(self, *a, **k) -> None: ...
    def log_params(self, *a, **k) -> None: ...
    def log_artifact(self, *a, **k) -> None: ...
    def wait_run_id(self, timeout: float = 0) -> str | None: return None
    def flush(self, timeout: float = 0) -> bool: return True
    def close(self, timeout: float = 0, status: str = "FINISHED") -> None: ...


class MlflowTracker:
    """Background-thread MLflow logger (see module doc)."""

    enabled = True

    def __init__(self, uri: str, experiment: str, output_dir: str | os.PathLike, run_name: str = "",
                 retry_s: float = 2.0, max_retry_s: float = 30.0):
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.output_dir = Path(output_dir)
        self.run_id: str | None = None
        self._resume_id: str | None = None
        self._metrics: collections.deque = collections.deque()
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._artifacts: list[tuple[str, str | None]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._run_ready = threading.Event()
        self._dropped = 0
        self._retry_s, self._max_retry_s = retry_s, max_retry_s
        self._outage = False
        self._client = None
        self._thread: threading.Thread | None = None
        self.sent_batches = 0
        self._high: dict[str, int] = {}  # per metric key: highest step already in the run
        self.not_relogged = 0  # points of a resumed run that were already in the store

    # ---- API used by the trainer (cheap, never blocks on the network)
    def start(self, run_id: str | None = None, tags: dict[str, str] | None = None) -> None:
        """Begin in the background: reopen ``run_id`` (a resumed training continues its run) or create one."""
        self._resume_id = run_id
        self._tags.update({k: str(v) for k, v in (tags or {}).items()})
        self._thread = threading.Thread(target=self._loop, name="mlflow-tracker", daemon=True)
        self._thread.start()

    def log_params(self, params: dict[str, Any]) -> None:
        with self._lock:
            self._params.update({k: _param_str(v) for k, v in params.items()})
        self._wake.set()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        with self._lock:
            for k, v in metrics.items():
                if v is None:
                    continue
                if len(self._metrics) >= MAX_QUEUE:
                    self._metrics.popleft()
                    self._dropped += 1
                self._metrics.append(Metric(k, float(v), ts, int(step)))
        self._wake.set()

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        with self._lock:
            self._artifacts.append((str(path), artifact_path))
        self._wake.set()

    def wait_run_id(self, timeout: float = 60.0) -> str | None:
        """The run id, waiting up to ``timeout`` s for the background thread to create the run; during an
        outage it does not wait (the checkpoint then records no run id and a resume starts a new run)."""
        end = time.monotonic() + timeout
        while not self._run_ready.is_set() and not self._outage and time.monotonic() < end:
            self._run_ready.wait(0.2)
        if self.run_id is None:
            log.warning("MLflow: no run id yet (tracking server %s %s)", self.uri,
                        "unreachable" if self._outage else "slow")
        return self.run_id

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until the queue is empty (True) or ``timeout`` passes (False)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                empty = not self._metrics and not self._params and not self._artifacts and not self._tags
            if empty and self._run_ready.is_set():
                return True
            self._idle.clear()
            self._wake.set()
            self._idle.wait(min(0.5, max(end - time.monotonic(), 0.01)))
        return False

    def close(self, timeout: float = 60.0, status: str = "FINISHED") -> None:
        """Flush (bounded; during an outage only one more retry window), end the run, spill anything
        unsent to mlflow_unsent.jsonl."""
        ok = self.flush(min(timeout, 2 * self._retry_s + 1.0) if self._outage else timeout)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, min(timeout, 30.0)))
        if ok and self._client is not None and self.run_id is not None and status:
            try:
                self._client.set_terminated(self.run_id, status=status)
            except Exception as e:  # noqa: BLE001 - tracking must never fail training
                log.warning("MLflow: could not end run %s: %s", self.run_id, e)
        if not ok:
            self._spill()

    # ---- background thread
    def _loop(self) -> None:
        delay = self._retry_s
        while True:
            self._wake.wait(timeout=5.0)
            self._wake.clear()
            try:
                self._ensure_run()
                self._send()
                if self._outage:
                    log.warning("MLflow: tracking server %s reachable again; sent the buffered data", self.uri)
                self._outage = False
                delay = self._retry_s
                self._idle.set()
            except Exception as e:  # noqa: BLE001 - an outage: keep buffering
                if not self._outage:
                    log.warning("MLflow: cannot reach %s (%s: %s); buffering metrics and retrying",
                                self.uri, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                self._outage = True
                self._idle.set()
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, self._max_retry_s)
                self._wake.set()
                continue
            if self._stop.is_set():
                return

    def _ensure_run(self) -> None:
        if self.run_id is not None:
            return
        from mlflow import MlflowClient

        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.uri)
        c = self._client
        if self._resume_id:
            run = c.get_run(self._resume_id)  # raises if the store lost it
            if run.info.status != "RUNNING":
                c.update_run(self._resume_id, status="RUNNING")
            for key in run.data.metrics:  # the steps the run already has (see module doc)
                hist = c.get_metric_history(self._resume_id, key)
                if hist:
                    self._high[key] = max(m.step for m in hist)
            existing = dict(run.data.params)
            with self._lock:
                for k in list(self._params):
                    if k in existing:
                        if existing[k] != self._params[k]:
                            self._tags[f"resume_changed.{k}"] = f"{existing[k]} -> {self._params[k]}"[:5000]
                        del self._params[k]
            self.run_id = self._resume_id
        else:
            exp = c.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp is not None else \
                c.create_experiment(self.experiment, artifact_location=artifact_location(self.uri))
            run = c.create_run(exp_id, run_name=self.run_name or None)
            self.run_id = run.info.run_id
        self._run_ready.set()

    def _send(self) -> None:
        from mlflow.entities import Param, RunTag

        c = self._client
        with self._lock:
            params = dict(self._params)
            tags = dict(self._tags)
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS):
            c.log_batch(self.run_id, params=items[i:i + MAX_PARAMS], synchronous=True)
            with self._lock:
                for p in items[i:i + MAX_PARAMS]:
                    self._params.pop(p.key, None)
        if tags:
            c.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
            with self._lock:
                for k in tags:
                    self._tags.pop(k, None)
        while True:
            with self._lock:
                chunk = [self._metrics[i] for i in range(min(MAX_BATCH, len(self._metrics)))]
            if not chunk:
                break
            high, fresh = dict(self._high), []
            for m in chunk:
                if m.step <= high.get(m.key, -1):
                    self.not_relogged += 1
                else:
                    fresh.append(m)
                    high[m.key] = m.step
            if fresh:
                c.log_batch(self.run_id, metrics=fresh, synchronous=True)
                self.sent_batches += 1
            self._high = high  # only once sent: a failed batch is retried unfiltered
            with self._lock:
                for _ in chunk:
                    self._metrics.popleft()
        while True:
            with self._lock:
                if not self._artifacts:
                    break
                path, apath = self._artifacts[0]
            if os.path.exists(path):
                c.log_artifact(self.run_id, path, apath)
            else:
                log.warning("MLflow: artifact %s vanished before upload; skipped", path)
            with self._lock:
                self._artifacts.pop(0)
        if self._dropped:
            log.warning("MLflow: %d metric entries were dropped during the outage (queue limit %d)",
                        self._dropped, MAX_QUEUE)
            self._dropped = 0

    def _spill(self) -> None:
        with self._lock:
            metrics = list(self._metrics)
            params = dict(self._params)
        if not metrics and not params:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / "mlflow_unsent.jsonl"
        with open(path, "a", encoding="utf-8") as f:
            for m in metrics:
                f.write(json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n")
            if params:
                f.write(json.dumps({"params": params}) + "\n")
        log.warning("MLflow: tracking server %s unreachable at exit; %d metric entries written to %s",
                    self.uri, len(metrics), path)


def _param_str(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return s[:6000]


def make_tracker(cfg, rank: int):
    """The trainer's tracker: MlflowTracker on rank 0 when tracking.enabled, else NullTracker."""
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    # An unreachable server must not stall the background thread for minutes per call.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    return MlflowTracker(default_uri(cfg.train.output_dir, cfg.tracking.uri), cfg.tracking.experiment,
                         cfg.train.output_dir, cfg.tracking.run_name)
