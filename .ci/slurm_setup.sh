#!/usr/bin/env bash
# Start a 2-node emulated Slurm cluster on this one machine (CI, or a developer's box as root).
#
# Why: launchers/tiny_cpu.sh is tested with a real sbatch/srun/scontrol, not a mock. Debian's
# Slurm 22.05 has no systemd here (a container), so the daemons are started by hand:
# munged as user munge, slurmctld, and one slurmd per emulated node (`slurmd -N nodeX`, own Port).
#
# Idempotent: re-running keeps healthy daemons, restarts them only if slurm.conf changed, and
# resumes nodes left DOWN/DRAIN. Ends when `sinfo` shows every node idle (exit 0) or fails loudly.
#
# Knobs (env): JRM_SLURM_NODES (default 2), JRM_SLURM_NODE_PREFIX (node), JRM_SLURM_BASE_PORT (17001),
# JRM_SLURM_SKIP_APT=1 (do not apt-get; fail if packages are missing), JRM_SLURM_WAIT_S (60).
# Stop the daemons again (slurmd, slurmctld, munged) with: .ci/slurm_setup.sh --stop
set -euo pipefail

NODES="${JRM_SLURM_NODES:-2}"
PREFIX="${JRM_SLURM_NODE_PREFIX:-node}"
BASE_PORT="${JRM_SLURM_BASE_PORT:-17001}"
WAIT_S="${JRM_SLURM_WAIT_S:-60}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid

log() { printf '[slurm_setup] %s\n' "$*" >&2; }
die() { printf '[slurm_setup] ERROR: %s\n' "$*" >&2; exit 1; }

node_names() {
    local i
    for ((i = 1; i <= NODES; i++)); do printf '%s%d\n' "$PREFIX" "$i"; done
}

pid_alive() {  # pid_alive PIDFILE -> 0 if the process in PIDFILE runs
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop_pidfile() {  # stop_pidfile PIDFILE NAME: TERM the recorded pid, wait, remove the file
    local pid i
    [[ -s "$1" ]] || return 0
    pid="$(cat "$1")"
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping $2 (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$1"
}

stop_all() {
    local n
    for n in $(node_names); do stop_pidfile "/run/slurmd-$n.pid" "slurmd $n"; done
    stop_pidfile "$CTLD_PID" slurmctld
}

[[ "$(id -u)" == 0 ]] || die "must run as root (it installs packages and starts system daemons)"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "JRM_SLURM_NODES must be a positive integer, got '$NODES'"

if [[ "${1:-}" == "--stop" ]]; then
    stop_all
    stop_pidfile /run/munge/munged.pid munged
    exit 0
fi

# ---- 1. packages -------------------------------------------------------------------------------
PKGS=(slurmctld slurmd slurm-client munge shellcheck)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    [[ "${JRM_SLURM_SKIP_APT:-0}" == 1 ]] && die "packages missing and JRM_SLURM_SKIP_APT=1: ${missing[*]}"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d: the packages must not try to start services (no init system here); we do it below.
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
fi

# ---- 2. munge ----------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged
    for ((i = 0; i < 50; i++)); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# ---- 3. node names resolve to this machine -----------------------------------------------------
for n in $(node_names); do
    if ! grep -Eq "^[^#]*[[:space:]]$n([[:space:]]|\$)" /etc/hosts; then
        log "adding $n to /etc/hosts"
        printf '127.0.0.1 %s\n' "$n" >>/etc/hosts
    fi
done

# ---- 4. slurm.conf -----------------------------------------------------------------------------
CTLD_HOST="$(hostname -s)"
CPUS="$(nproc --all)"
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld
for n in $(node_names); do mkdir -p "/var/spool/slurmd/$n"; done
new_conf="$(mktemp)"
{
    cat <<EOF
# Written by .ci/slurm_setup.sh: $NODES emulated nodes on one machine (CI / local testing only).
ClusterName=jrmci
SlurmctldHost=$CTLD_HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
SlurmdTimeout=60
InactiveLimit=0
EOF
    port="$BASE_PORT"
    for n in $(node_names); do
        printf 'NodeName=%s NodeAddr=127.0.0.1 NodeHostname=%s Port=%d CPUs=%d State=UNKNOWN\n' \
            "$n" "$CTLD_HOST" "$port" "$CPUS"
        port=$((port + 1))
    done
    printf 'PartitionName=debug Nodes=%s Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO\n' \
        "$(node_names | paste -sd, -)"
} >"$new_conf"

if ! cmp -s "$new_conf" "$CONF" 2>/dev/null; then
    log "writing $CONF (changed: restarting daemons)"
    stop_all
    install -m 0644 "$new_conf" "$CONF"
fi
rm -f "$new_conf"

# ---- 5. daemons --------------------------------------------------------------------------------
if ! pid_alive "$CTLD_PID"; then
    log "starting slurmctld"
    slurmctld
fi
for ((i = 0; i < 100; i++)); do scontrol ping 2>/dev/null | grep -q "is UP" && break; sleep 0.2; done
scontrol ping | grep -q "is UP" || die "slurmctld is not up (see $LOG_DIR/slurmctld.log)"

for n in $(node_names); do
    if ! pid_alive "/run/slurmd-$n.pid"; then
        log "starting slurmd -N $n"
        slurmd -N "$n"
    fi
done

# ---- 6. wait until every node is idle ----------------------------------------------------------
all_nodes="$(node_names | paste -sd, -)"
deadline=$((SECONDS + WAIT_S))
while :; do
    states="$(sinfo -h -N -n "$all_nodes" -o '%N %T' 2>/dev/null | sort -u)"
    bad="$(awk '$2 != "idle" {print}' <<<"$states")"
    n_idle="$(awk '$2 == "idle"' <<<"$states" | wc -l)"
    ((n_idle == NODES)) && [[ -z "$bad" ]] && break
    if grep -Eq 'down|drain|fail' <<<"$bad"; then
        scontrol update NodeName="$all_nodes" State=RESUME 2>/dev/null || true
    fi
    if ((SECONDS >= deadline)); then
        die "nodes not idle after ${WAIT_S}s: $(tr '\n' ';' <<<"$states") (logs in $LOG_DIR)"
    fi
    sleep 0.5
done
log "cluster up: $(tr '\n' ' ' <<<"$states")"
