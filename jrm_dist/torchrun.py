"""``python -m jrm_dist.torchrun [torchrun options] -m jrm_dist.train ...``: torchrun that keeps the requeue code.

Stock ``torchrun`` is the per-node agent of the launchers, with three changes they need:

* SIGUSR1 / SIGTERM (Slurm preemption, ``--signal=B:USR1@120`` forwarded by the batch shell, scancel) do
  not kill the agent: it passes them on to its workers and keeps waiting, so the trainer can finish the
  step, checkpoint and exit. Stock torchrun dies on SIGUSR1 (default action), or on SIGTERM tears the
  workers down after ``--shutdown-timeout`` (30 s), which is too short for a 72B checkpoint.
* When the first worker to fail exited with the trainer's ``REQUEUE_EXIT_CODE``, this process exits with
  it too (stock torchrun turns every worker failure into exit code 1), so the batch script can tell
  "checkpointed after a preemption signal, requeue me" from a crash.
* On that requeue path every agent waits until all nodes' agents have reported their workers done (at
  most ``JRM_REQUEUE_GRACE_S``, default 60 s), and the agent hosting the c10d store (``is_host``) keeps
  it up meanwhile: an exit barrier like the one stock torchrun has only on success. Without it the
  first agent to leave ends the step early (``srun --kill-on-bad-exit``) or takes the store with it,
  while rank 0 may still be flushing MLflow on another node, whose agent then dies instead of exiting 75.

Everything else (options, rendezvous, restarts, logs) is torch.distributed.run itself.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
from datetime import timedelta

import psutil
from torch.distributed import TCPStore
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.utils import _parse_rendezvous_config, parse_rendezvous_endpoint
from torch.distributed.run import get_args_parser, parse_min_max_nnodes, run

from jrm_dist.runguard import LAUNCHER_PID_ENV
from jrm_dist.train import REQUEUE_EXIT_CODE

FORWARDED = (signal.SIGUSR1, signal.SIGTERM)
DEFAULT_C10D_PORT = 29400  # torchrun's default for an endpoint without a port


def _forward(signum: int, frame) -> None:
    """Pass the signal to the workers (torchrun starts them as direct children of the agent).

    Under Slurm the step's processes may already have it (slurmstepd signals the whole step); the
    trainer's handler only sets a flag, so a second copy is harmless."""
    for child in psutil.Process().children():
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


class RequeueGrace:
    """Counts, in the rendezvous store, the agents whose workers exited for a requeue (see module doc)."""

    def __init__(self, args) -> None:
        self.store: TCPStore | None = None
        self.key = f"jrm_torchrun/{args.rdzv_id}/requeue_done"
        conf = _parse_rendezvous_config(args.rdzv_conf or "")
        self.nnodes = parse_min_max_nnodes(str(args.nnodes))[1]
        self.active = args.rdzv_backend == "c10d" and not args.standalone and self.nnodes > 1
        self.is_host = conf.get("is_host", "").lower() in ("1", "true", "t", "yes", "y")
        if self.active:
            self.host, self.port = parse_rendezvous_endpoint(args.rdzv_endpoint, DEFAULT_C10D_PORT)
        if self.active and self.is_host:
            # Same port, same process, multi_tenant: the rendezvous reuses this server, and it lives as
            # long as this object, not only as long as torchrun's agent.
            self.store = TCPStore(self.host, self.port, is_master=True, multi_tenant=True,
                                  wait_for_workers=False, timeout=timedelta(seconds=60))

    def done(self) -> None:
        if not self.active:
            return
        try:
            store = self.store or TCPStore(self.host, self.port, is_master=False, timeout=timedelta(seconds=10))
            store.add(self.key, 1)
        except (RuntimeError, ValueError, TimeoutError) as e:  # the host is gone already: nothing to wait for
            print(f"[jrm-torchrun] could not report to the rendezvous store: {e}", file=sys.stderr, flush=True)
            return
        deadline = time.monotonic() + float(os.environ.get("JRM_REQUEUE_GRACE_S", "60"))
        try:
            while (n := store.add(self.key, 0)) < self.nnodes and time.monotonic() < deadline:
                time.sleep(0.2)
        except (RuntimeError, ValueError, TimeoutError):  # the host left: everyone had reported
            return
        if n < self.nnodes:
            print(f"[jrm-torchrun] only {n} of {self.nnodes} node(s) reported done; leaving anyway",
                  file=sys.stderr, flush=True)
        elif self.store is not None:
            time.sleep(1.0)  # the host goes last: let the others read the count before the store closes


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    names = {signal.Signals(s).name for s in FORWARDED}
    kept = [s.strip() for s in args.signals_to_handle.split(",") if s.strip() and s.strip() not in names]
    args.signals_to_handle = ",".join(kept or ["SIGINT"])
    for s in FORWARDED:
        signal.signal(s, _forward)
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    print(f"[jrm-torchrun] {node}: node_rank {args.node_rank}, nnodes {args.nnodes}, {args.nproc_per_node} "
          f"process(es), rendezvous {'standalone' if args.standalone else f'{args.rdzv_backend} {args.rdzv_endpoint}'}",
          file=sys.stderr, flush=True)
    grace = RequeueGrace(args)
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # the workers check that their parent is still this agent
    try:
        run(args)
    except ChildFailedError as e:
        rank, first = e.get_first_failure()
        if first.exitcode == REQUEUE_EXIT_CODE:
            # The workers are gone: from here a SIGTERM (srun ending the step as the first node leaves)
            # must not turn this node's 75 into "killed by signal".
            for s in FORWARDED:
                signal.signal(s, signal.SIG_IGN)
            grace.done()
            print(f"[jrm-torchrun] {node}: rank {rank} exited {REQUEUE_EXIT_CODE} (checkpointed after a "
                  f"preemption signal): exiting {REQUEUE_EXIT_CODE} for requeue", file=sys.stderr, flush=True)
            return REQUEUE_EXIT_CODE
        print(e.format_msg(), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    if code == REQUEUE_EXIT_CODE:  # leave at once: interpreter teardown would restore SIGTERM's default action
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
