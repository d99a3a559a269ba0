#!/usr/bin/env bash
# Start a single-node Slurm cluster on this machine (the tests' real Slurm), as root.
#
# Usage: bash tests/slurm/start_slurm.sh        (idempotent: a running, idle cluster is left alone)
#
# Needs Debian's slurm-wlm and munge (.ci/run installs them). Writes /etc/slurm/slurm.conf,
# cgroup.conf and gres.conf for one node named after `hostname -s` with this machine's CPUs and
# memory, creates the munge key if missing, and starts munged, slurmctld and slurmd. Accounting
# is off (no slurmdbd, so no sacct). The node oversubscribes each CPU 4 times, so a 2-core
# machine runs several 1-CPU test tasks at once, and declares 2 fake GPUs (device nodes that
# alias /dev/null): Slurm allocates them and sets CUDA_VISIBLE_DEVICES, nothing uses them.
# Exit code: 0 when `sinfo` shows the node idle (or busy), 1 with the reason otherwise.
set -uo pipefail

NODE="$(hostname -s)"
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
READY_TIMEOUT_S=30
OVERSUBSCRIBE=4     # tasks per CPU: the tests' workers mostly sleep or wait on I/O
FAKE_GPUS=2
FAKE_GPU_DIR=/var/lib/slurm-fake-gpus

fail() { echo "start_slurm: $*" >&2; exit 1; }

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1; }

ready() {
    case "$(node_state)" in
        idle*|mixed*|allocated*|completing*) return 0 ;;
        *) return 1 ;;
    esac
}

if [ "$(id -u)" -ne 0 ]; then fail "must run as root (it starts munged, slurmctld and slurmd)"; fi
for tool in munged slurmctld slurmd sinfo scontrol; do
    command -v "$tool" >/dev/null || fail "$tool not found: apt-get install slurm-wlm munge"
done
if ready; then echo "start_slurm: node $NODE is $(node_state)"; exit 0; fi

CPUS="$(nproc --all)"
MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd /run/munge
# Slurm's gpu plugin wants one character device per GPU: nodes aliasing /dev/null stand in,
# so Slurm hands out indices and sets CUDA_VISIBLE_DEVICES while nothing touches a device.
mkdir -p "$FAKE_GPU_DIR"
for i in $(seq 0 $((FAKE_GPUS - 1))); do
    [ -c "$FAKE_GPU_DIR/gpu$i" ] || mknod "$FAKE_GPU_DIR/gpu$i" c 1 3 || FAKE_GPUS=0
done
if [ "$FAKE_GPUS" -gt 0 ]; then
    printf 'AutoDetect=off\nNodeName=%s Name=gpu File=%s/gpu[0-%d]\n' \
        "$NODE" "$FAKE_GPU_DIR" $((FAKE_GPUS - 1)) > "$CONF_DIR/gres.conf"
    GRES="Gres=gpu:$FAKE_GPUS"
else
    echo "start_slurm: mknod failed: the node declares no GPUs" >&2
    : > "$CONF_DIR/gres.conf"
    GRES=""
fi
cat > "$CONF_DIR/slurm.conf.new" <<CONF
# Written by tests/slurm/start_slurm.sh: a single-node test cluster.
ClusterName=esdtest
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
GresTypes=gpu
NodeName=$NODE CPUs=$CPUS RealMemory=$MEM_MB $GRES State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:$OVERSUBSCRIBE
CONF
mv "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf"

echo "CgroupAutomount=no" > "$CONF_DIR/cgroup.conf"

if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none || fail "cannot write the munge key"
fi
chown munge:munge /etc/munge/munge.key /run/munge && chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- munged || fail "munged did not start (see /var/log/munge/munged.log)"
munge -n | unmunge >/dev/null 2>&1 || fail "munge does not work: $(munge -n 2>&1 | unmunge 2>&1 | tail -n1)"

pgrep -x slurmctld >/dev/null || slurmctld || fail "slurmctld did not start: $(tail -n3 $LOG_DIR/slurmctld.log)"
pgrep -x slurmd >/dev/null || slurmd || fail "slurmd did not start: $(tail -n3 $LOG_DIR/slurmd.log)"

for _ in $(seq "$READY_TIMEOUT_S"); do
    if ready; then echo "start_slurm: node $NODE is $(node_state)"; exit 0; fi
    state="$(node_state)"
    case "$state" in  # a node left down by an earlier run comes back once slurmd answers
        down*|drain*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 ;;
    esac
    sleep 1
done
fail "node $NODE not idle after ${READY_TIMEOUT_S} s (state: ${state:-unknown}); slurmctld: $(tail -n2 $LOG_DIR/slurmctld.log); slurmd: $(tail -n2 $LOG_DIR/slurmd.log)"
