"""Issue 18 §2-§3 and stop signals: the run guards of jrm_dist.runguard in-process, then real launches:

* the output-folder lock refuses a second holder and is released by the kernel when its holder dies;
* the weight norm of blown-up (finite) weights stays finite, and the divergence guard flags it;
* SIGTERM with no progress to checkpoint exits 75 at once (start-up, right after a save), and otherwise
  still means "finish the step, checkpoint, exit 75";
* torchrun's ranks die with their agent (``kill -9`` of its process group), and while they live a second
  jrm-train on the same train.output_dir refuses to start (exit 2);
* a save whose weights diverged (finite, 1e6x) is refused; the message names the last sane checkpoint."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from jrm_dist.runguard import LOCK_NAME, OutputDirBusy, divergence, lock_output_dir
from jrm_dist.train import ABORT_EXIT_CODE, REQUEUE_EXIT_CODE, REQUEUE_MARKER
from train_launch import ROOT, TINY, base_overrides, env_for, spawn

pytestmark = pytest.mark.timeout(600)


def test_output_dir_lock_refuses_a_second_holder_and_cannot_go_stale(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from jrm_dist.runguard import "
         "lock_output_dir; lock_output_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)",
         str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirBusy, match=rf'in use by a live jrm-train run \(.*"pid": {holder.pid}'):
            lock_output_dir(tmp_path)
    finally:
        holder.kill()  # SIGKILL: no clean-up code of the holder runs
        holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # the file stays; the kernel dropped the lock itself
    os.close(lock_output_dir(tmp_path))


_LEADER_EXITS_FIRST = """
import ctypes, os, sys, threading, time
from pathlib import Path
from jrm_dist.runguard import lock_output_dir
lock_output_dir(Path(sys.argv[1]))
def tear_down():  # a rank's other threads, still exiting after its main thread is done
    time.sleep(float(sys.argv[2]))
    os._exit(0)
threading.Thread(target=tear_down).start()
print("locked", flush=True)
ctypes.CDLL(None).syscall(60, 0)  # SYS_exit (x86-64): ends the main thread only; the leader shows as a zombie
"""


def test_a_killed_holder_whose_threads_still_tear_down_is_waited_for_not_reported_live(tmp_path):
    """The CI race of the torchrun test: the holder's main thread is a zombie, its process still holds the lock
    for a moment. A new run waits for it (the holder is not live); a live holder is still refused at once."""
    holder = subprocess.Popen([sys.executable, "-c", _LEADER_EXITS_FIRST, str(tmp_path), "3"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        deadline = time.monotonic() + 10
        while psutil.Process(holder.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t0 = time.monotonic()
        fd = lock_output_dir(tmp_path)  # raised OutputDirBusy before the wait for exiting holders
        waited = time.monotonic() - t0
        os.close(fd)
        assert holder.wait(timeout=10) == 0
        assert 0.5 < waited < 10, waited  # it did wait for the tear-down, and no longer than it took
    finally:
        holder.kill()
        holder.wait()


def test_weight_norm_of_blown_up_weights_and_the_divergence_guard():
    from jrm_dist.checkpoint import weight_stats

    m = torch.nn.Linear(4, 4)
    finite, bad, start = weight_stats(m, torch.device("cpu"))
    want = math.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in m.parameters()))
    assert finite and bad is None and math.isclose(start, want, rel_tol=1e-5)
    with torch.no_grad():
        m.weight.fill_(3.3e29)  # what optim.lr=1e30 left in the checkpoint `latest` pointed to
    finite, _, norm = weight_stats(m, torch.device("cpu"))
    assert finite and math.isfinite(norm) and math.isclose(norm, 4 * 3.3e29, rel_tol=1e-3)  # squares overflow fp32
    assert "train.divergence_factor=100" in divergence(norm, start, 100.0)
    assert divergence(50 * start, start, 100.0) is None
    assert divergence(float("nan"), start, 100.0) is not None
    with torch.no_grad():
        m.bias[0] = float("inf")
    assert weight_stats(m, torch.device("cpu"))[:2] == (False, "bias")


SIGNAL_PROBE = """
import os, signal, sys
from pathlib import Path
from jrm_dist.train import Trainer
t = Trainer.__new__(Trainer)  # the handler alone: no process group, no model
t.out, t.rank, t.stop_signal, t.run_lock = Path(sys.argv[1]), 0, None, 3  # rank 0 holds the folder
signal.signal(signal.SIGTERM, t._on_signal)
if sys.argv[2] == "after_build":  # saved_step is set once build() is done, and by every save
    t.saved_step, t.step = 2, 3  # a step trained since the last checkpoint: finish, checkpoint, exit 75
    os.kill(os.getpid(), signal.SIGTERM)
    print("still running, stop_signal", t.stop_signal, flush=True)
    t.saved_step = 3  # the checkpoint is written: the next signal has nothing to wait for
os.kill(os.getpid(), signal.SIGTERM)
print("not reached", flush=True)
"""


@pytest.mark.parametrize("phase, step", [("startup", 0), ("after_build", 3)])
def test_sigterm_exits_at_once_when_there_is_nothing_to_checkpoint(tmp_path, phase, step):
    """Before, SIGTERM only set a flag read at the next step's end: during start-up or a slow first step
    (data.min_pixels=1e8: 10 GiB of resized images) the run could not be stopped. Unsaved progress still
    means: finish the step, checkpoint, exit 75."""
    r = subprocess.run([sys.executable, "-c", SIGNAL_PROBE, str(tmp_path), phase], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == REQUEUE_EXIT_CODE, r.stdout + r.stderr
    assert "not reached" not in r.stdout and "no progress to checkpoint" in r.stderr
    assert (f"still running, stop_signal {int(signal.SIGTERM)}" in r.stdout) == (phase == "after_build")
    marker = json.loads((tmp_path / REQUEUE_MARKER).read_text())
    assert marker == {"step": step, "signal": "SIGTERM", "checkpointed": False}


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _steps_logged(out) -> int:
    """Complete lines of steps.jsonl (rank 0 may be writing one right now, or was killed in the middle)."""
    f = out / "steps.jsonl"
    return f.read_bytes().count(b"\n") if f.exists() else 0


@pytest.mark.launch
def test_ranks_die_with_torchrun_and_a_held_output_dir_is_refused(tiny_backbone, synthetic_shards, tmp_path):
    out = tmp_path / "run"
    ov = base_overrides(tiny_backbone, synthetic_shards, out, steps=100_000,
                        **{"train.save_every": 0, "train.epochs": 10_000, "tracking.enabled": False})
    env = env_for(0, 1, 0)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k)
    log = open(tmp_path / "torchrun.log", "w")
    agent = subprocess.Popen([sys.executable, "-m", "jrm_dist.torchrun", "--standalone", "--nproc_per_node=2",
                              "--monitor_interval=0.1", "-m", "jrm_dist.train", "--config", TINY, *ov],
                             cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ranks: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while _steps_logged(out) < 2:
            assert agent.poll() is None and time.monotonic() < deadline, (tmp_path / "torchrun.log").read_text()
            time.sleep(0.2)
        ranks = [p for p in psutil.Process(agent.pid).children() if "jrm_dist.train" in " ".join(p.cmdline())]
        assert len(ranks) == 2

        second = spawn(ov, world=1, timeout=120)  # same train.output_dir while the first run trains
        assert second.codes == [2], second.log
        assert "is in use by a live jrm-train run" in second.log and '"pid": ' in second.log
        assert int(second.log.split('"pid": ')[1].split(",")[0]) in {p.pid for p in ranks}  # rank 0 holds it

        os.killpg(agent.pid, signal.SIGKILL)  # torchrun's group only: the ranks run in sessions of their own
        agent.wait()
        t0 = time.monotonic()
        while _alive(ranks) and time.monotonic() - t0 < 30:
            time.sleep(0.1)
        assert not _alive(ranks), "ranks outlived their torchrun agent"
        os.close(lock_output_dir(out))  # the dead run's lock is gone with it
        n = _steps_logged(out)
        time.sleep(1.0)
        assert _steps_logged(out) == n and not (out / "export").exists()
    finally:
        for p in _alive(ranks):
            p.kill()
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
        log.close()


@pytest.mark.launch
def test_diverged_weights_are_never_saved_and_the_message_names_the_last_sane_checkpoint(
        tiny_backbone, synthetic_shards, tmp_path):
    """optim.lr=1e30 left `latest` at a checkpoint with finite weights up to 3.3e29, and the error advised
    resuming from it. Here the weights blow up (finite, 1e6x on one rank's ZeRO-3 partitions) right before
    the save at step 4, after a good save at step 2."""
    out = tmp_path / "run"
    ov = base_overrides(tiny_backbone, synthetic_shards, out, steps=4,
                        **{"train.save_every": 2, "tracking.enabled": False})
    r = spawn(ov, faults="big_weights@4:1")
    assert r.codes == [ABORT_EXIT_CODE, ABORT_EXIT_CODE], r.log
    sane = str(out / "checkpoints" / "step_00000002")
    for text in r.logs:
        assert "step 4: the weights diverged: the global weight norm" in text, r.log
        assert "train.divergence_factor=100" in text and f"The last sane checkpoint: {sane}" in text
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
    assert not (out / "checkpoints" / "step_00000004").exists() and not (out / "export").exists()
