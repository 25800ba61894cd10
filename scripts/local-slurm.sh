#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for the sweep's tests and for users
# who want to try `python -m gradbrain.sweep --executor slurm` before a real cluster.
#
#   scripts/local-slurm.sh start    install slurm-wlm + munge if missing (root + apt),
#                                   write slurm.conf under the state folder, start munged
#                                   (unless one runs), slurmctld and slurmd, wait until
#                                   the node is idle
#   scripts/local-slurm.sh stop     stop exactly the daemons `start` started (pid files)
#   scripts/local-slurm.sh status   say whether the cluster runs, and how to use it
#   scripts/local-slurm.sh env      print `export SLURM_CONF=...` (eval it in a shell)
#
# State (configuration, pid files, logs, spool) lives in $GRADBRAIN_SLURM_DIR (default
# /tmp/gradbrain-slurm); nothing is written under /etc. Slurm's commands find the
# cluster through SLURM_CONF=$GRADBRAIN_SLURM_DIR/slurm.conf. The daemons run as root
# (Slurm's default SlurmUser); one node, every core, 90 % of the memory, partition
# "debug", no accounting (so no `sacct`), and one placeholder GPU (/dev/null), so that
# GPU requests are scheduled and can be checked. Tested with Debian
# bookworm's Slurm 22.05.
set -euo pipefail

STATE=${GRADBRAIN_SLURM_DIR:-/tmp/gradbrain-slurm}
CONF=$STATE/slurm.conf
HOST=$(hostname -s)

say() { echo "local-slurm: $*"; }
die() { echo "local-slurm: error: $*" >&2; exit 1; }

alive() {  # alive <pid file>: the process it names runs
    [[ -f $1 ]] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
            && command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return
    fi
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        die "Slurm is not installed. As root on Debian/Ubuntu run: apt-get update && " \
            "apt-get install -y slurm-wlm munge (other systems: your package manager's " \
            "slurm and munge packages), then run this script again."
    fi
    say "installing slurm-wlm and munge with apt (about a minute)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge >/dev/null
}

write_conf() {
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 9 / 10 / 1024 ))
    mkdir -p "$STATE/spool" "$STATE/ctld"
    cat > "$CONF.tmp" <<EOF
# written by scripts/local-slurm.sh (gradbrain): a single-node test cluster
ClusterName=gradbrain-local
SlurmctldHost=$HOST
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# a job that asks for no memory gets one core's share, not the whole node (Slurm's
# default with memory as a resource), so that jobs run side by side, one per core
DefMemPerCPU=$(( mem_mb / cpus ))
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmdSpoolDir=$STATE/spool
StateSaveLocation=$STATE/ctld
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=300
GresTypes=gpu
NodeName=$HOST CPUs=$cpus RealMemory=$mem_mb Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    # one placeholder GPU whose "device" is /dev/null: GPU requests (--gpus-per-node=1)
    # are scheduled and can be checked with `scontrol show job`; the job gets
    # CUDA_VISIBLE_DEVICES=0 but no GPU (torch sees none and runs on the CPU)
    echo "Name=gpu File=/dev/null" > "$STATE/gres.conf"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return   # a munged already answers: not ours to start or stop
    fi
    [[ -f /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing: reinstall munge " \
        "(it creates the key) or run mungekey --create."
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    if id munge >/dev/null 2>&1 && [[ $(id -u) -eq 0 ]]; then
        su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=/run/munge/munged.pid"
    else
        /usr/sbin/munged --pid-file=/run/munge/munged.pid
    fi
    cp /run/munge/munged.pid "$STATE/munged.pid"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged did not start (see /var/log/munge/munged.log)."
}

start() {
    [[ $(id -u) -eq 0 ]] || die "the daemons of this test cluster run as root; run it as " \
        "root (e.g. in a container or CI), or use a real cluster."
    if alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid"; then
        say "already running ($CONF)"
        return
    fi
    install_packages
    mkdir -p "$STATE"
    write_conf
    start_munge
    export SLURM_CONF=$CONF
    alive "$STATE/slurmctld.pid" || /usr/sbin/slurmctld -f "$CONF"
    alive "$STATE/slurmd.pid" || /usr/sbin/slurmd -f "$CONF"
    for _ in $(seq 120); do
        state=$(sinfo -h -o %T 2>/dev/null | head -1 || true)
        if [[ $state == idle* || $state == mixed* || $state == allocated* ]]; then
            say "running: node $HOST is $state. Use it with: export SLURM_CONF=$CONF"
            return
        fi
        sleep 0.5
    done
    die "the node did not become idle within 60 s (sinfo: ${state:-no answer}); see " \
        "$STATE/slurmctld.log and $STATE/slurmd.log."
}

stop() {
    local stopped=0
    for daemon in slurmd slurmctld munged; do
        if alive "$STATE/$daemon.pid"; then
            kill "$(cat "$STATE/$daemon.pid")"
            stopped=1
        fi
    done
    for _ in $(seq 50); do
        alive "$STATE/slurmd.pid" || alive "$STATE/slurmctld.pid" || break
        sleep 0.1
    done
    rm -f "$STATE/munged.pid"
    if [[ $stopped -eq 1 ]]; then say "stopped"; else say "not running"; fi
}

status() {
    if alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid"; then
        say "running ($CONF)"
        SLURM_CONF=$CONF sinfo
    else
        say "not running (start it with: scripts/local-slurm.sh start)"
        return 1
    fi
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
