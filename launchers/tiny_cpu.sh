#!/usr/bin/env bash
# The tiny JRM model on CPU ranks (gloo): train_72b.sh's exact launch path where there is no GPU,
# so CI exercises sbatch, srun, c10d rendezvous across nodes, preemption and requeue for real.
#   sbatch launchers/tiny_cpu.sh [dotted.overrides ...]         (from the repository root)
#SBATCH --job-name=jrm-tiny-cpu
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

# Defaults (the #SBATCH lines above must agree with them).
DEFAULT_NODES=2
DEFAULT_PROCS_PER_NODE=1    # CPU training ranks per node: world size = nodes x procs
DEFAULT_MICRO_BATCH=4       # groups per rank micro-batch -> data.groups_per_batch (configs/tiny.yaml)
DEFAULT_GRAD_ACCUM=1        # -> train.grad_accum

JRM_CONFIG="${JRM_CONFIG:-configs/tiny.yaml}"
JRM_DEVICE="${JRM_DEVICE:-cpu}"
JRM_NPROC_PER_NODE="${JRM_NPROC_PER_NODE:-$DEFAULT_PROCS_PER_NODE}"
: "${JRM_ROOT:=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
[[ -f "$JRM_ROOT/launchers/common.sh" ]] ||
    { echo "no $JRM_ROOT/launchers/common.sh: submit from the repository root or export JRM_ROOT" >&2; exit 2; }
# shellcheck source=launchers/common.sh
source "$JRM_ROOT/launchers/common.sh"

jrm_slurm_main "$@"  # adds data.groups_per_batch / train.grad_accum from DEFAULT_* (common.sh)
