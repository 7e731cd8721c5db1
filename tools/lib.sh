# shellcheck shell=bash
# Shell helpers shared by every tools/*.sh script (one library, one way to log,
# fail, probe ports and stop processes). Source it after setting TAG (the
# "[name]" prefix of every message).

say() { printf '[%s] %s\n' "$TAG" "$*"; }
die() { printf '[%s] ERROR: %s\n' "$TAG" "$*" >&2; exit 1; }

# die_with_log MESSAGE LOG...: die, showing the end of the logs that explain why.
die_with_log() {
    local msg="$1" f
    shift
    printf '[%s] ERROR: %s\n' "$TAG" "$msg" >&2
    for f in "$@"; do
        if [ -s "$f" ]; then
            printf '[%s] --- last lines of %s ---\n' "$TAG" "$f" >&2
            tail -n 30 "$f" >&2
        fi
    done
    exit 1
}

# find_python [PREFERRED]: a Python >= 3.11 with the venv module (the services need it).
find_python() {
    local c
    for c in "${1:-}" python3.11 python3.12 python3.13 python3; do
        [ -n "$c" ] || continue
        command -v "$c" >/dev/null 2>&1 || continue
        if "$c" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}

# port_in_use HOST:PORT|PORT: something listens on that TCP port.
port_in_use() { ss -Hltn "sport = :${1##*:}" 2>/dev/null | grep -q .; }

# http_code URL: the HTTP status of a GET (empty when nothing answers within 5 s).
http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$1" 2>/dev/null || true; }

# pid_if_matches PIDFILE PATTERN: the pid in PIDFILE if that process's command line
# matches the extended regex PATTERN (a stale pid file may point at a reused pid).
pid_if_matches() {
    local pid
    pid="$(cat "$1" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] && [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -Eq "$2" || return 1
    echo "$pid"
}

# running PID: the process exists and is not a zombie.
running() {
    local state
    state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

# wait_gone PID NAME [SECONDS]: wait for PID to exit after a SIGTERM; SIGKILL it (and
# its children) when it has not within SECONDS (default 20).
wait_gone() {
    local pid="$1" name="$2" limit="${3:-20}" deadline
    deadline=$((SECONDS + limit))
    while running "$pid"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            say "$name did not stop in $limit s; sending SIGKILL to $pid and its children"
            pkill -KILL -P "$pid" 2>/dev/null || true
            kill -KILL "$pid" 2>/dev/null || true
            return 0
        fi
        sleep 0.25
    done
}

# stop_service NAME: SIGTERM the service whose pid the caller's `service_pid NAME`
# prints, wait for it (wait_gone), and remove $RUN/NAME.pid. Idempotent.
stop_service() {
    local name="$1" pid
    if ! pid="$(service_pid "$name")"; then
        rm -f "$RUN/$name.pid"
        say "$name: not running"
        return 0
    fi
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    wait_gone "$pid" "$name"
    rm -f "$RUN/$name.pid"
}

# lock_dir DIR SECONDS: hold DIR/.lock on fd 9 for the rest of the script (one run of a
# tools script per state directory at a time); fail after SECONDS. Daemons started
# afterwards must be given 9>&- so they do not keep the lock.
lock_dir() {
    mkdir -p "$1"
    exec 9>"$1/.lock"
    flock -w "$2" 9 || die "another $(basename "$0") holds $1/.lock"
}
