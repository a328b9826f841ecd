"""Process-level guards of a ``jrm-train`` run (issue 18): one run per output folder, ranks that die with
their launcher, stop signals that end a run that has nothing to checkpoint, and a divergence guard.

* **Output-folder lock.** Rank 0 holds ``fcntl.flock`` on ``<output_dir>/.jrm-train.lock`` for the whole
  run. The kernel drops a flock when the last descriptor of its holder closes, which includes every kind
  of death (SIGKILL, OOM kill, a node reboot for local disks), so the lock cannot go stale and needs no
  clean-up; the file itself only names the holder for the error message. (On NFS, Linux emulates flock
  with byte-range locks held by the server's lock manager; on Lustre it needs the ``flock`` mount option.)
* **Die with the launcher.** torchrun starts each rank in its own session, so a ``kill -9`` of torchrun's
  process group leaves the ranks training on, with no agent to collect their exit codes or requeue them,
  and writing into the folder a restarted run would use. Each rank started by torchrun asks the kernel
  (``prctl(PR_SET_PDEATHSIG)``) for SIGKILL when its parent (the agent) exits (strictly: the parent
  thread that started it; torchrun starts workers from its main thread). SIGKILL, not SIGTERM:
  with the agent (and the rendezvous store it hosts) gone there is nobody to act on a checkpoint-and-requeue
  exit, a stuck collective could delay SIGTERM forever, and the last checkpoint is intact anyway (saves are
  write-then-rename). Plain ``jrm-train`` runs (a shell or ``nohup`` as parent) are left alone.
* **Stop signals.** SIGTERM / SIGUSR1 normally mean "finish the step, checkpoint, exit 75". When there is
  no progress to save (start-up, the first step, after the final save: data loading, image resizing,
  model construction, eval, export), waiting for a step boundary only makes the run unkillable; the
  rank then exits 75 at once and the requeued run resumes from the same checkpoint.
"""
from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".jrm-train.lock"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
EXITING_HOLDER_WAIT_S = 20.0  # how long a new run waits for a dead holder's lock to be released
LAUNCHER_PID_ENV = "JRM_LAUNCHER_PID"  # exported by jrm_dist.torchrun: closes the race of a launcher dying early


class OutputDirBusy(RuntimeError):
    """Another live run holds the output folder."""


def _try_lock(path: Path) -> tuple[int | None, str]:
    """(descriptor holding the exclusive flock of ``path``, "") or (None, the holder's self-description)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "a process that has not named itself yet"
        os.close(fd)
        return None, holder
    return fd, ""


def _holder_exiting(holder: str) -> bool:
    """Whether the named holder is a process of this host that is gone or exiting. A killed multi-threaded
    rank shows as a zombie as soon as its main thread is done, while its other threads still tear down
    (unmapping gigabytes) and keep the descriptor table, hence the lock, for a moment longer."""
    try:
        info = json.loads(holder)
        pid, host = int(info["pid"]), info["host"]
    except (ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname():
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # gone: the kernel is closing its files
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _busy(out: Path, holder: str) -> str:
    return (f"train.output_dir={str(out)!r} is in use by a live jrm-train run ({holder}); refusing to start a "
            f"second run there. Stop that run, or choose another train.output_dir")


def lock_output_dir(out: Path) -> int:
    """Take the run lock of ``out`` (created if needed); return the descriptor to keep open for the run.
    Raises OutputDirBusy naming the holder when a live run has it."""
    out.mkdir(parents=True, exist_ok=True)
    fd, holder = _try_lock(out / LOCK_NAME)
    deadline = time.monotonic() + EXITING_HOLDER_WAIT_S
    while fd is None and _holder_exiting(holder) and time.monotonic() < deadline:
        time.sleep(0.1)
        fd, holder = _try_lock(out / LOCK_NAME)
    if fd is None:
        raise OutputDirBusy(_busy(out, holder))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
    # A forked child (a DataLoader worker) shares the locked file description, so the lock would outlive the
    # run until the last worker noticed its parent was gone: children drop their copy at once.
    os.register_at_fork(after_in_child=lambda: _close_quietly(fd))
    return fd


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def output_dir_busy(out: Path) -> str | None:
    """For jrm-preflight: why ``out`` cannot be trained in now (a live run holds it), or None. Takes the
    lock for an instant when it is free, so it never blocks a run."""
    if not (out / LOCK_NAME).exists():
        return None
    fd, holder = _try_lock(out / LOCK_NAME)
    if fd is None:
        return _busy(out, holder)
    os.close(fd)
    return None


def die_with_launcher() -> bool:
    """Under torchrun (``TORCHELASTIC_RUN_ID`` set), SIGKILL this rank when its parent, the agent, exits
    (see module doc). Returns whether the request is in place (Linux only)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return False
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher and os.getppid() != int(launcher):  # the agent died before the request was in place
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def exit_for_requeue(out: Path, rank: int, signum: int, step: int, code: int, marker: str | None) -> None:
    """Leave at once with the requeue code: nothing new to checkpoint (see module doc). The holder of the
    output folder's lock writes the requeue marker the launchers read (``marker``: its name, else None).
    No logging here: a signal handler must not wait on a lock."""
    name = signal.Signals(signum).name
    print(f"[rank{rank}] received {name} with no progress to checkpoint (checkpointed step: {step}): "
          f"exiting {code} for requeue now", file=sys.stderr, flush=True)
    if marker is not None:
        try:
            (out / marker).write_text(json.dumps({"step": step, "signal": name, "checkpointed": False}))
        except OSError:
            pass
    os._exit(code)


def divergence(norm: float, start_norm: float, factor: float) -> str | None:
    """Why the weights count as diverged (global norm above ``factor`` times the run's starting norm), or
    None. Finite but blown-up weights (lr=1e30 gave |w| ~ 3e29) must not become the 'last good' checkpoint."""
    if start_norm <= 0 or norm <= factor * start_norm:  # (a NaN norm fails the comparison: diverged)
        return None
    return (f"the global weight norm {norm:.3g} is {norm / start_norm:.3g}x "
            f"the run's starting norm {start_norm:.3g} (train.divergence_factor={factor:g})")
