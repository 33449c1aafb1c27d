#!/usr/bin/env bash
# A single-node SLURM cluster on this machine: to try attnbench's cluster path before
# you have a cluster, and for its tests (docs/cluster.md).
#
#   scripts/slurm_local.sh start    install what is missing (Debian, as root), configure, start,
#                                   and wait until the node is idle; does nothing if it runs already
#   scripts/slurm_local.sh status   the daemons this script started, and sinfo; exit 0 if all is up
#   scripts/slurm_local.sh stop     stop the daemons this script started, by their recorded PIDs
#
# Daemons: munged, MariaDB and slurmdbd (job accounting, so that sacct, which submitit
# polls for job states, answers), slurmctld and slurmd. The node is this host with its
# real core count and memory (slurmd -C); its partition is "local". Everything lives in
# $ATTNBENCH_SLURM_DIR (default /var/tmp/attnbench-slurm): configs, logs, spool, the
# database, and the PIDs of what was started. /etc/slurm/slurm.conf is made a link to
# its slurm.conf (so sbatch, sinfo and sacct find it) unless the machine has one of its own.
set -euo pipefail

DIR=${ATTNBENCH_SLURM_DIR:-/var/tmp/attnbench-slurm}
CONF="$DIR/slurm.conf"
PIDS="$DIR/started.pids"
LINK=/etc/slurm/slurm.conf
HOST=$(hostname -s)
DB_PORT=${ATTNBENCH_SLURM_DB_PORT:-6820}
PACKAGES=(munge mariadb-server slurmdbd slurmctld slurmd slurm-client)

say() { echo "slurm_local: $*"; }
die() { echo "slurm_local: $*" >&2; exit 1; }

alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

pid_of() {  # the recorded PID of a daemon this script started
    [[ -f "$PIDS" ]] && awk -v n="$1" '$1 == n {print $2}' "$PIDS" | tail -1
}

record() {  # name pid-file: the daemon's PID, once it has written it
    wait_for 10 "$1's PID file" test -s "$2"
    echo "$1 $(cat "$2")" >> "$PIDS"
}

wait_for() {  # seconds, description, command...
    local secs=$1 what=$2
    shift 2
    for _ in $(seq $((secs * 5))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    die "$what did not come up within ${secs} s (logs in $DIR/log/)"
}

install_missing() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
        die "needs the Debian packages ${missing[*]}: sudo apt-get install ${missing[*]} (then run this as root)"
    fi
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null
        apt-get install -y -qq "${missing[@]}" >/dev/null
    }
}

write_configs() {
    local node
    node=$(slurmd -C | head -1)  # NodeName=<host> CPUs=... RealMemory=...
    cat > "$CONF" <<EOF
# written by scripts/slurm_local.sh: a single-node cluster for attnbench
ClusterName=attnbench
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
KillWait=5
$node State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat > "$DIR/slurmdbd.conf" <<EOF
# written by scripts/slurm_local.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=attnbench
StorageLoc=slurm_acct_db
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
EOF
    chmod 600 "$DIR/slurmdbd.conf"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi  # one runs already
    [[ -f /etc/munge/munge.key ]] || { mungekey --create >/dev/null 2>&1 || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged
    wait_for 10 munged sh -c 'munge -n | unmunge'
    record munged /run/munge/munged.pid
}

start_mariadb() {
    if [[ ! -d "$DIR/mysql/mysql" ]]; then
        mkdir -p "$DIR/mysql" && chown mysql:mysql "$DIR/mysql"
        mariadb-install-db --user=mysql --datadir="$DIR/mysql" --skip-test-db >/dev/null 2>&1
    fi
    chown mysql:mysql "$DIR/run"
    /usr/sbin/mariadbd --user=mysql --datadir="$DIR/mysql" --socket="$DIR/run/mysqld.sock" \
        --pid-file="$DIR/run/mysqld.pid" --bind-address=127.0.0.1 --port="$DB_PORT" \
        --log-error="$DIR/log/mariadb.log" >/dev/null 2>&1 &
    wait_for 30 MariaDB mariadb --socket="$DIR/run/mysqld.sock" -e 'select 1'
    record mariadbd "$DIR/run/mysqld.pid"
    mariadb --socket="$DIR/run/mysqld.sock" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'attnbench';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start() {
    if status >/dev/null 2>&1; then
        say "already up: $(sinfo -h -o '%n %T %c CPUs %m MB')"
        return 0
    fi
    [[ $EUID -eq 0 ]] || die "start needs root (it starts munged, MariaDB and the SLURM daemons): sudo $0 start"
    install_missing
    if [[ -e "$LINK" && ! -L "$LINK" ]] || { [[ -L "$LINK" ]] && [[ "$(readlink "$LINK")" != "$CONF" ]]; }; then
        die "$LINK belongs to another SLURM setup on this machine; not touching it"
    fi
    stop >/dev/null 2>&1 || true  # whatever a previous start left half up
    mkdir -p "$DIR"/{state,spool,log,run}
    : > "$PIDS"
    write_configs
    ln -sfn "$CONF" "$LINK"
    start_munge
    start_mariadb
    SLURM_CONF="$CONF" slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
    record slurmdbd "$DIR/run/slurmdbd.pid"
    sacctmgr -i add cluster attnbench >/dev/null 2>&1 || true
    slurmctld -f "$CONF"
    wait_for 30 slurmctld scontrol ping
    record slurmctld "$DIR/run/slurmctld.pid"
    slurmd -f "$CONF"
    record slurmd "$DIR/run/slurmd.pid"
    wait_for 60 "the node" sh -c "sinfo -h -o %T | grep -qx idle"
    say "up: $(sinfo -h -o '%n %T, %c CPUs, %m MB, partition %R')"
}

status() {
    local down=0 name pid
    if [[ ! -f "$PIDS" ]]; then say "not started (no $PIDS)"; return 1; fi
    while read -r name pid; do
        if alive "$pid"; then say "$name running (pid $pid)"; else say "$name NOT running (pid $pid)"; down=1; fi
    done < "$PIDS"
    sinfo 2>&1 || down=1
    sacct -n -X -o JobID -S now-1minutes >/dev/null 2>&1 || { say "sacct does not answer"; down=1; }
    return $down
}

stop() {
    [[ -f "$PIDS" ]] || { say "nothing to stop"; return 0; }
    local name pid
    for name in slurmd slurmctld slurmdbd mariadbd munged; do
        pid=$(pid_of "$name")
        alive "$pid" || continue
        kill "$pid"
        for _ in $(seq 50); do alive "$pid" || break; sleep 0.2; done
        alive "$pid" && kill -9 "$pid"
        say "stopped $name (pid $pid)"
    done
    rm -f "$PIDS"
    [[ -L "$LINK" && "$(readlink "$LINK")" == "$CONF" ]] && rm -f "$LINK"
    return 0
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|status|stop" >&2; exit 2 ;;
esac
