#!/usr/bin/env bash
# JRM on one machine: torchrun --standalone with the same checks and environment as the Slurm launchers.
#   launchers/train_local.sh [dotted.overrides ...]
#   JRM_CONFIG=configs/qwen2_5_vl_7b.yaml JRM_NPROC_PER_NODE=8 launchers/train_local.sh
# Defaults: configs/tiny.yaml; one process per GPU when there are GPUs, else 2 CPU ranks over gloo.
# Exit status is the trainer's: 75 after a SIGUSR1/SIGTERM checkpoint (run it again to resume).
set -euo pipefail

DEFAULT_CPU_PROCS=2

JRM_ROOT="${JRM_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source=launchers/common.sh
source "$JRM_ROOT/launchers/common.sh"

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"; fi
if [[ -z "${JRM_DEVICE:-}" ]]; then
    if ((gpus > 0)); then JRM_DEVICE=cuda; else JRM_DEVICE=cpu; fi
fi
if [[ -z "${JRM_NPROC_PER_NODE:-}" ]]; then
    if [[ "$JRM_DEVICE" == cuda ]]; then JRM_NPROC_PER_NODE="$gpus"; else JRM_NPROC_PER_NODE="$DEFAULT_CPU_PROCS"; fi
fi
JRM_CONFIG="${JRM_CONFIG:-configs/tiny.yaml}"

jrm_local_main "$@"
