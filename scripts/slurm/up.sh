#!/usr/bin/env bash
# A single-node Slurm on this machine, for tests/slurm.rs (and for trying `ternlab sweep
# --slurm` without a cluster): Debian's slurm-wlm (slurmctld, slurmd, the client commands) and
# munge, installed if missing; a minimal /etc/slurm/slurm.conf for this one host, with the
# node's CPUs and memory as `slurmd -C` reports them and one partition, `debug`; munged,
# slurmctld and slurmd started as plain background daemons (containers have no systemd).
# It returns once `sinfo` shows the node idle.
#
# Idempotent: when the node already answers, it does nothing; a daemon already running is
# left alone. It runs as root (it installs packages and writes /etc/slurm). It never
# overwrites a slurm.conf it did not write: on a machine with a real Slurm it stops and says so.
#
# Logs: /var/log/slurm/slurmctld.log, /var/log/slurm/slurmd.log, /var/log/munge/munged.log.
# To stop: kill "$(cat /run/slurmd.pid)" "$(cat /run/slurmctld.pid)"; munged -s
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# Written by ternlab's scripts/slurm/up.sh"
WAIT_S=${SLURM_UP_WAIT_S:-60}

say() { echo "slurm/up.sh: $*" >&2; }
die() {
    say "$*"
    exit 1
}

# The state of this host's node as sinfo sees it ("idle", "mixed", "down*", ...), or nothing
# when no controller answers.
node_state() {
    command -v sinfo >/dev/null 2>&1 || return 0
    { timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null || true; } | awk -v n="$1" '$1 == n { print $2 }'
}

usable() {
    case "$1" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac
}

# Whether this host's slurmd answers: the controller keeps calling a node idle for minutes
# (SlurmdTimeout) after its slurmd died.
slurmd_answers() {
    command -v scontrol >/dev/null 2>&1 && timeout 10 scontrol show slurmd >/dev/null 2>&1
}

# Whether the daemon whose pid file is $1 is alive. Not a zombie either: a killed daemon's
# pid file stays, and in a container whose init does not reap orphans its pid lingers as one.
alive() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/stat ]] || return 1
    [[ $(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$pid/stat") != Z ]]
}

NODE=$(hostname -s)
state=$(node_state "$NODE")
if usable "$state" && slurmd_answers; then
    say "Slurm is up (node $NODE: $state); nothing to do"
    exit 0
fi

[[ $(id -u) == 0 ]] || die "Slurm is not up and bringing it up needs root: sudo bash $0"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null ||
    ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurm-wlm and munge from Debian"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge >/dev/null
fi

# Daemons this invocation started: stopped again if it fails, so that a failed attempt leaves
# nothing half-configured running.
STARTED=()
cleanup() {
    local rc=$?
    if ((rc != 0)); then
        for pidfile in "${STARTED[@]}"; do
            [[ -s $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
        done
    fi
}
trap cleanup EXIT

# munge: the key (the package's postinst makes one; a bare install may not have it) and the
# daemon, which runs as the munge user.
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating a munge key"
    mungekey --create --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
if ! alive /run/munge/munged.pid; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged
    STARTED+=(/run/munge/munged.pid)
fi
for _ in $(seq 50); do
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.1
done
munge -n </dev/null | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"

# slurm.conf: this host as the controller and the one node, addressed as 127.0.0.1 so that no
# name resolution is involved.
if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script: this machine has a Slurm of its own" \
        "(start it as its admin does); not touching it"
fi
HW=$(slurmd -C | head -n 1)
[[ $HW == NodeName=* ]] || die "slurmd -C said: $HW"
NODE=$(sed -E 's/^NodeName=([^ ]+).*/\1/' <<<"$HW")
install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat >"$CONF.tmp" <<EOF
$MARK: a single-node Slurm for tests.
ClusterName=ternlab
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
# Cores are what jobs consume; memory is not tracked, so that tasks that do not ask for it
# (ternlab's) share the node instead of each taking all of it.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
$HW NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$CONF.tmp" "$CONF"; then
    mv "$CONF.tmp" "$CONF"
    # A controller already running read the old file.
    if alive /run/slurmctld.pid; then scontrol reconfigure || true; fi
else
    rm "$CONF.tmp"
fi

if ! alive /run/slurmctld.pid; then
    say "starting slurmctld"
    /usr/sbin/slurmctld
    STARTED+=(/run/slurmctld.pid)
fi
if ! alive /run/slurmd.pid; then
    say "starting slurmd"
    /usr/sbin/slurmd -N "$NODE"
    STARTED+=(/run/slurmd.pid)
fi

resumed=0
state=""
for ((t = 0; t < WAIT_S * 2; t++)); do
    state=$(node_state "$NODE")
    if usable "$state" && slurmd_answers; then
        say "Slurm is up: node $NODE $state, partition debug ($(sinfo --version))"
        exit 0
    fi
    # A node left drained or down by an earlier life of these daemons: it has registered
    # again, so give it back once.
    if ((resumed == 0 && t >= 6)) && [[ $state == drain* || $state == down ]]; then
        scontrol update NodeName="$NODE" State=RESUME || true
        resumed=1
    fi
    sleep 0.5
done
say "the node did not become idle within ${WAIT_S}s (state: ${state:-no answer from slurmctld})"
scontrol show node "$NODE" 2>&1 | sed 's/^/  /' >&2 || true
for log in /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log; do
    say "last lines of $log:"
    tail -n 15 "$log" 2>/dev/null | sed 's/^/  /' >&2 || true
done
exit 1
