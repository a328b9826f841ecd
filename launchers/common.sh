# shellcheck shell=bash
# Shared logic of every JRM launcher. Sourced (never executed) by train_72b.sh, train_7b.sh, tiny_cpu.sh
# (sbatch scripts that differ only in their defaults) and train_local.sh. See launchers/README.md.
#
# The caller sets, before sourcing:
#   JRM_ROOT            repository checkout (configs/, jrm_dist/)
#   JRM_CONFIG          YAML config (relative to the working directory or absolute)
#   JRM_DEVICE          cuda | cpu (cpu: gloo, CUDA hidden; used by tiny_cpu.sh and CPU-only machines)
#   JRM_NPROC_PER_NODE  training processes per node (GPUs per node on cuda)
# Everything below is overridable by exporting the variable before sbatch (sbatch exports the
# submitting environment by default).

JRM_REQUEUE_EXIT_CODE=75  # jrm_dist.train.REQUEUE_EXIT_CODE (tests/test_launchers.py checks they agree)

jrm_log() { printf '[jrm-launch %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
jrm_die() { printf '[jrm-launch] ERROR: %s\n' "$*" >&2; exit 2; }

# jrm_default VAR VALUE: export VAR=VALUE unless VAR is already set (even to "") by the user.
jrm_default() {
    if [[ -z "${!1+x}" ]]; then export "$1=$2"; fi
}

# Environment shared by every launch: communication libraries, threads, Python.
jrm_setup_env() {
    : "${JRM_ROOT:?JRM_ROOT must be set}" "${JRM_CONFIG:?JRM_CONFIG must be set}"
    : "${JRM_DEVICE:?JRM_DEVICE must be cuda or cpu}" "${JRM_NPROC_PER_NODE:?JRM_NPROC_PER_NODE must be set}"
    [[ "$JRM_DEVICE" == cuda || "$JRM_DEVICE" == cpu ]] || jrm_die "JRM_DEVICE=$JRM_DEVICE: expected cuda or cpu"
    [[ "$JRM_NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] ||
        jrm_die "JRM_NPROC_PER_NODE=$JRM_NPROC_PER_NODE: expected a positive integer"
    [[ -f "$JRM_ROOT/jrm_dist/train.py" ]] ||
        jrm_die "JRM_ROOT=$JRM_ROOT is not a jrm-dist checkout (submit from the repository root or export JRM_ROOT)"

    # Python: the checkout's venv if there is one, else what is on PATH; the checkout's code wins.
    if [[ -z "${JRM_PYTHON:-}" ]]; then
        if [[ -x "$JRM_ROOT/.venv/bin/python" ]]; then JRM_PYTHON="$JRM_ROOT/.venv/bin/python"; else JRM_PYTHON=python3; fi
    fi
    export JRM_PYTHON
    export PYTHONPATH="$JRM_ROOT${PYTHONPATH:+:$PYTHONPATH}"

    # Threads: the node's CPUs split over its training processes (torch otherwise uses every core per rank).
    local cpus="${SLURM_CPUS_PER_TASK:-$(nproc)}"
    jrm_default OMP_NUM_THREADS "$(( cpus / JRM_NPROC_PER_NODE > 0 ? cpus / JRM_NPROC_PER_NODE : 1 ))"
    jrm_default TOKENIZERS_PARALLELISM false
    jrm_default HF_HUB_OFFLINE 1            # never download weights at run time (preflight checks they exist)
    jrm_default PYTHONUNBUFFERED 1          # logs reach the Slurm output file as they happen

    # NCCL (GPU runs): fail loudly instead of hanging when a peer dies; cluster-specific knobs such as
    # NCCL_SOCKET_IFNAME / NCCL_IB_HCA are left to the site (export them before sbatch).
    jrm_default NCCL_DEBUG WARN
    jrm_default TORCH_NCCL_ASYNC_ERROR_HANDLING 1
    jrm_default PYTORCH_CUDA_ALLOC_CONF expandable_segments:True   # less fragmentation under ZeRO-3 gathers

    if [[ "$JRM_DEVICE" == cpu ]]; then
        jrm_default CUDA_VISIBLE_DEVICES ""   # gloo on CPU ranks even on a GPU node
        jrm_default DS_ACCELERATOR cpu
    fi
}

# The c10d rendezvous port: derived from the job id so two jobs sharing a head node do not collide,
# stable across requeues of the same job; JRM_RDZV_PORT overrides.
jrm_rdzv_port() {
    if [[ -n "${JRM_RDZV_PORT:-}" ]]; then echo "$JRM_RDZV_PORT"; else echo $((20000 + ${SLURM_JOB_ID:-0} % 10000)); fi
}

# Run the preflight checks (jrm_dist/preflight.py); prints the resolved train.output_dir on stdout.
# Exits the launcher (status 2) before any torchrun starts when a check fails.
jrm_preflight() {
    local out
    if [[ "${JRM_SKIP_PREFLIGHT:-0}" == 1 ]]; then
        jrm_log "preflight skipped (JRM_SKIP_PREFLIGHT=1)"
        return 0
    fi
    out="$("$JRM_PYTHON" -m jrm_dist.preflight --config "$JRM_CONFIG" --device "$JRM_DEVICE" \
        --nproc "$JRM_NPROC_PER_NODE" --print-output-dir "$@")" ||
        jrm_die "preflight failed (see the messages above); fix the config or paths and resubmit"
    echo "$out"
}

jrm_print_env() {
    jrm_log "python $JRM_PYTHON; OMP_NUM_THREADS=$OMP_NUM_THREADS NCCL_DEBUG=$NCCL_DEBUG" \
        "TORCH_NCCL_ASYNC_ERROR_HANDLING=$TORCH_NCCL_ASYNC_ERROR_HANDLING" \
        "${NCCL_SOCKET_IFNAME:+NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>}"
}

# Forward a signal caught by the batch shell to the job step (srun passes it to every task, and
# jrm_dist.torchrun passes it to the trainer processes), then let the wait loop go on.
jrm_forward_signal() {
    JRM_TRAPPED=1
    jrm_log "batch shell got SIG$1: forwarding to the training step (checkpoint, then exit $JRM_REQUEUE_EXIT_CODE)"
    if [[ -n "${JRM_STEP_PID:-}" ]]; then kill -s "$1" "$JRM_STEP_PID" 2>/dev/null || true; fi
}

# Wait for the step even when trapped signals interrupt `wait`; sets JRM_STEP_RC.
jrm_wait_step() {
    local rc
    while :; do
        JRM_TRAPPED=0
        rc=0
        wait "$JRM_STEP_PID" || rc=$?
        # A trapped signal makes `wait` return 128+n while the step still runs: wait again (bash
        # keeps the status of a step that ended meanwhile).
        if ((rc > 128 && JRM_TRAPPED)); then continue; fi
        break
    done
    JRM_STEP_RC=$rc
}

# Decide and perform the requeue after the step ended with JRM_STEP_RC. $1: train.output_dir, $2: a file
# created just before the step started (the trainer's REQUEUE marker must be newer than it).
jrm_maybe_requeue() {
    local out_dir="$1" stamp="$2" why=""
    if ((JRM_STEP_RC == JRM_REQUEUE_EXIT_CODE)); then
        why="the trainer exited $JRM_REQUEUE_EXIT_CODE"
    elif [[ -n "$out_dir" && -f "$out_dir/REQUEUE" && "$out_dir/REQUEUE" -nt "$stamp" ]]; then
        why="the trainer wrote $out_dir/REQUEUE (step exit $JRM_STEP_RC)"
    else
        return 1
    fi
    local restarts="${SLURM_RESTART_COUNT:-0}" max="${JRM_MAX_REQUEUES:-50}"
    if ((restarts >= max)); then
        jrm_log "$why, but the job was already requeued $restarts times (JRM_MAX_REQUEUES=$max): not requeueing"
        return 1
    fi
    jrm_log "$why: checkpoint written; requeueing job $SLURM_JOB_ID (restart $((restarts + 1)); resumes with --resume auto)"
    # Slurm signals every process of the job (this shell and scontrol included) as part of a successful
    # requeue, so scontrol can die with 143 although the job was requeued: ignore TERM meanwhile, and
    # on a non-zero status ask Slurm whether the requeue happened before calling it a failure. On success
    # TERM stays ignored: the requeue's TERM can arrive after scontrol returns and would cut the message.
    local rc=0 msg
    trap '' TERM
    msg="$(scontrol requeue "$SLURM_JOB_ID" 2>&1)" || rc=$?
    if ((rc == 0)) || jrm_job_requeued "$restarts"; then
        jrm_log "job $SLURM_JOB_ID requeued (scontrol requeue exit $rc); Slurm ends this run now"
        return 0
    fi
    trap - TERM
    jrm_log "scontrol requeue failed (exit $rc: ${msg:-no message}); resubmit the same sbatch line to resume from the checkpoint"
    return 1
}

# True when Slurm shows the job requeued: more restarts than $1, or a pending/requeue state.
jrm_job_requeued() {
    local info
    info="$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null)" || return 1
    [[ "$info" =~ Restarts=([0-9]+) ]] && ((BASH_REMATCH[1] > $1)) && return 0
    [[ "$info" =~ JobState=(PENDING|REQUEUED|REQUEUE_HOLD|REQUEUE_FED) ]]
}

# The body of every sbatch launcher: one jrm_dist.torchrun (torchrun) per node, c10d rendezvous on the
# first host of the allocation, preemption signal -> checkpoint -> requeue. "$@": trainer overrides.
jrm_slurm_main() {
    [[ -n "${SLURM_JOB_ID:-}" ]] ||
        jrm_die "not inside a Slurm job: submit this script with sbatch (or use launchers/train_local.sh)"
    # The launcher's planned micro-batch / accumulation (DEFAULT_*, env-overridable) go first, so the
    # caller's own overrides in "$@" still win.
    local planned=()
    if [[ -n "${DEFAULT_MICRO_BATCH:-}" ]]; then planned+=(data.groups_per_batch="${JRM_MICRO_BATCH:-$DEFAULT_MICRO_BATCH}"); fi
    if [[ -n "${DEFAULT_GRAD_ACCUM:-}" ]]; then planned+=(train.grad_accum="${JRM_GRAD_ACCUM:-$DEFAULT_GRAD_ACCUM}"); fi
    set -- "${planned[@]}" "$@"
    jrm_setup_env
    local nnodes="${SLURM_NNODES:?}" head port out_dir stamp
    head="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    port="$(jrm_rdzv_port)"
    jrm_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
        "$nnodes node(s) x $JRM_NPROC_PER_NODE process(es) = world size $((nnodes * JRM_NPROC_PER_NODE))," \
        "rendezvous c10d $head:$port, config $JRM_CONFIG, device $JRM_DEVICE"
    jrm_print_env
    # The launcher's planned layout (DEFAULT_* in the sbatch script, sized with jrm-plan).
    if [[ -n "${DEFAULT_NODES:-}" && "$nnodes" != "$DEFAULT_NODES" ]]; then
        jrm_log "note: $nnodes node(s) instead of the planned $DEFAULT_NODES${DEFAULT_GPU:+ x $DEFAULT_GPU}:" \
            "the global batch changes; check memory and throughput with jrm-plan --nodes $nnodes"
    fi
    out_dir="$(jrm_preflight "$@")" || exit 2

    local torchrun_args=(
        --nnodes="$nnodes" --nproc_per_node="$JRM_NPROC_PER_NODE"
        --rdzv_backend=c10d --rdzv_endpoint="$head:$port" --rdzv_id="jrm-$SLURM_JOB_ID"
        --max_restarts=0
    )
    local srun_args=(--nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
    # Slurm 22.05's srun does not inherit --cpus-per-task from sbatch: pass it on.
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi

    stamp="$(mktemp)"
    # Each node expands its own $SLURM_NODEID (single quotes: not expanded here on the batch node). The
    # first host (node 0) hosts the c10d store; the others connect to it (is_host pinned, not guessed).
    # shellcheck disable=SC2016
    srun "${srun_args[@]}" bash -c \
        'exec "$0" -m jrm_dist.torchrun --node_rank="$SLURM_NODEID" --rdzv_conf="is_host=$((SLURM_NODEID == 0))" "$@"' \
        "$JRM_PYTHON" "${torchrun_args[@]}" \
        -m jrm_dist.train --config "$JRM_CONFIG" --resume auto "$@" &
    JRM_STEP_PID=$!
    trap 'jrm_forward_signal USR1' USR1
    trap 'jrm_forward_signal TERM' TERM
    jrm_wait_step
    trap - USR1 TERM
    jrm_log "training step ended with exit code $JRM_STEP_RC"
    if jrm_maybe_requeue "$out_dir" "$stamp"; then
        rm -f "$stamp"
        exit 0
    fi
    rm -f "$stamp"
    exit "$JRM_STEP_RC"
}

# The same entry on one machine: torchrun --standalone, used by `make demo`. "$@": trainer overrides.
# Exits with the trainer's status (75 after a SIGUSR1/SIGTERM checkpoint: run it again to resume).
jrm_local_main() {
    jrm_setup_env
    jrm_log "local run: $JRM_NPROC_PER_NODE process(es), config $JRM_CONFIG, device $JRM_DEVICE"
    jrm_print_env
    jrm_preflight "$@" >/dev/null || exit 2
    exec "$JRM_PYTHON" -m jrm_dist.torchrun --standalone --nnodes=1 --nproc_per_node="$JRM_NPROC_PER_NODE" \
        -m jrm_dist.train --config "$JRM_CONFIG" --resume auto "$@"
}
