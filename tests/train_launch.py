"""Launch ``jrm_dist.train`` as real multi-process jobs for the trainer tests (CPU, gloo).

``spawn`` starts one process per rank with env:// rendezvous (what torchrun/srun provide), so a
test sees every rank's exit code and can inject faults (JRM_FAULTS). Like torchrun, when one rank
dies from a signal the others are stopped, instead of waiting in a collective forever.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_overrides(backbone: str, shards: dict, out: Path, steps: int = 6, **extra) -> list[str]:
    ov = {
        "model.name": backbone, "data.train_shards": shards["train"], "data.eval_shards": shards["eval"],
        "data.groups_per_batch": 2, "data.shuffle_buffer": 8, "train.output_dir": str(out),
        "train.max_steps": steps, "train.save_every": 2, "train.eval_every": 0, "optim.warmup_ratio": 0.0,
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def env_for(rank: int, world: int, port: int, faults: str = "", extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", JRM_FAULTS=faults,
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra or {})
    return env


class Result:
    def __init__(self, codes: list[int], logs: list[str]):
        self.codes, self.logs = codes, logs

    @property
    def log(self) -> str:
        return "\n".join(f"----- rank {r} (exit {c})\n{t}" for r, (c, t) in enumerate(zip(self.codes, self.logs)))


RUNNING_TEST = None  # the pytest item being run (set by conftest.py)


def check_marked_launch() -> None:
    """A test that launches jrm-train must carry ``@pytest.mark.launch`` (``make test-quick`` leaves it out)."""
    item = RUNNING_TEST
    if item is not None and item.get_closest_marker("launch") is None:
        raise RuntimeError(f"{item.nodeid} launches jrm-train but is not marked @pytest.mark.launch "
                           "(tests/train_launch.py; `make test-quick` runs only the unmarked tests)")


def spawn(overrides: list[str], world: int = 2, faults: str = "", resume: str = "auto", timeout: float = 240,
          env: dict | None = None, on_start=None, poll=None) -> Result:
    """Start ``world`` ranks of jrm-train on the tiny config; ``poll()`` is called every 0.1 s while they run."""
    check_marked_launch()
    port = free_port()
    cmd = [sys.executable, "-m", "jrm_dist.train", "--config", TINY, *overrides, "--resume", resume]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env_for(r, world, port, faults, env), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    if on_start:
        on_start(procs)
    logs = [""] * world
    import threading

    def pump(i):
        logs[i] = procs[i].stdout.read()
    threads = [threading.Thread(target=pump, args=(i,), daemon=True) for i in range(world)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    died_at = None
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            break
        if died_at is None and any(p.poll() is not None and p.returncode < 0 for p in procs):
            died_at = time.monotonic()
        if died_at is not None and time.monotonic() - died_at > 3:  # torchrun-like: a dead rank stops the job
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
        if poll:
            poll()
        time.sleep(0.1)
    for p in procs:
        p.wait()
    for t in threads:
        t.join(5)
    return Result([p.returncode for p in procs], logs)


def steps(out: Path) -> dict[int, dict]:
    """steps.jsonl → {step: record} (a resumed run rewrites the steps after its checkpoint)."""
    recs = {}
    for ln in (Path(out) / "steps.jsonl").read_text().splitlines():
        if ln.strip():
            r = json.loads(ln)
            recs[r["step"]] = r
    return recs


def mlflow_run(out: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{Path(out).resolve() / 'mlflow.db'}")
    exps = [e for e in client.search_experiments() if e.name == "jrm-tiny"]
    runs = client.search_runs([e.experiment_id for e in exps])
    return client, runs
