#!/usr/bin/env bash
# JRM on Qwen2.5-VL-7B: 1 node x 8 H100/H200, DeepSpeed ZeRO-3, bf16, gradient checkpointing.
#   sbatch launchers/train_7b.sh [dotted.overrides ...]         (from the repository root)
# Requeues itself after a preemption/time-limit checkpoint and resumes (--resume auto). launchers/README.md.
#SBATCH --job-name=jrm-7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

# Defaults, checked against `jrm-plan` (jrm_dist/plan.py) and configs/qwen2_5_vl_7b.yaml by the tests.
# The #SBATCH lines above must agree with them (sbatch cannot read variables).
DEFAULT_NODES=1
DEFAULT_GPUS_PER_NODE=8
DEFAULT_GPU=h100            # the smaller of H100 80 GB / H200 141 GB: the micro-batch must fit on it
DEFAULT_MICRO_BATCH=4       # groups (pairs) per GPU micro-batch -> data.groups_per_batch
DEFAULT_GRAD_ACCUM=2        # -> train.grad_accum; global batch = nodes x GPUs x micro-batch x accum = 64

JRM_CONFIG="${JRM_CONFIG:-configs/qwen2_5_vl_7b.yaml}"
JRM_DEVICE="${JRM_DEVICE:-cuda}"
JRM_NPROC_PER_NODE="${JRM_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-$DEFAULT_GPUS_PER_NODE}}"
: "${JRM_ROOT:=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
[[ -f "$JRM_ROOT/launchers/common.sh" ]] ||
    { echo "no $JRM_ROOT/launchers/common.sh: submit from the repository root or export JRM_ROOT" >&2; exit 2; }
# shellcheck source=launchers/common.sh
source "$JRM_ROOT/launchers/common.sh"

jrm_slurm_main "$@"  # adds data.groups_per_batch / train.grad_accum from DEFAULT_* (common.sh)
