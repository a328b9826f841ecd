"""``python -m jrm_dist.torchrun [torchrun options] -m jrm_dist.train ...``: torchrun that keeps the requeue code.

Stock ``torchrun`` is the per-node agent of the launchers, with two changes they need:

* SIGUSR1 / SIGTERM (Slurm preemption, ``--signal=B:USR1@120`` forwarded by the batch shell, scancel) do
  not kill the agent: it passes them on to its workers and keeps waiting, so the trainer can finish the
  step, checkpoint and exit. Stock torchrun dies on SIGUSR1 (default action), or on SIGTERM tears the
  workers down after ``--shutdown-timeout`` (30 s), which is too short for a 72B checkpoint.
* When the first worker to fail exited with the trainer's ``REQUEUE_EXIT_CODE``, this process exits with
  it too (stock torchrun turns every worker failure into exit code 1), so the batch script can tell
  "checkpointed after a preemption signal, requeue me" from a crash.

Everything else (options, rendezvous, restarts, logs) is torch.distributed.run itself.
"""
from __future__ import annotations

import os
import signal
import socket
import sys

import psutil
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

from jrm_dist.train import REQUEUE_EXIT_CODE

FORWARDED = (signal.SIGUSR1, signal.SIGTERM)


def _forward(signum: int, frame) -> None:
    """Pass the signal to the workers (torchrun starts them as direct children of the agent).

    Under Slurm the step's processes may already have it (slurmstepd signals the whole step); the
    trainer's handler only sets a flag, so a second copy is harmless."""
    for child in psutil.Process().children():
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


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
    try:
        run(args)
    except ChildFailedError as e:
        rank, first = e.get_first_failure()
        if first.exitcode == REQUEUE_EXIT_CODE:
            print(f"[jrm-torchrun] rank {rank} exited {REQUEUE_EXIT_CODE} (checkpointed after a preemption "
                  f"signal): exiting {REQUEUE_EXIT_CODE} for requeue", file=sys.stderr, flush=True)
            return REQUEUE_EXIT_CODE
        print(e.format_msg(), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
