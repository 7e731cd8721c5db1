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

# stop_services NAME...: stop_service for each, at once: every one gets its SIGTERM first, then
# each is waited for (their shutdowns overlap instead of adding up). Idempotent.
stop_services() {
    local name pid pids=()
    for name in "$@"; do
        if pid="$(service_pid "$name")"; then
            say "stopping $name (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$name:$pid")
        else
            say "$name: not running"
        fi
    done
    for pid in "${pids[@]}"; do
        wait_gone "${pid#*:}" "${pid%%:*}"
    done
    for name in "$@"; do
        rm -f "$RUN/$name.pid"
    done
}

# lock_dir DIR SECONDS: hold DIR/.lock on fd 9 for the rest of the script (one run of a
# tools script per state directory at a time); fail after SECONDS. Daemons started
# afterwards must be given 9>&- so they do not keep the lock.
lock_dir() {
    mkdir -p "$1"
    exec 9>"$1/.lock"
    flock -w "$2" 9 || die "another $(basename "$0") holds $1/.lock"
}

# --- virtualenvs -------------------------------------------------------------------------
# Every virtualenv of the project is built by one script from one declared file (pyproject.toml
# for .venv, requirements/stack.txt, requirements/aio.txt) and nothing installs into it later:
# no test run adds a package. A venv is reused only while the hash of what it was built from is
# unchanged; under CI=true tools/run-tests.sh first removes them all (tools/reset.sh).

# pip's downloads in a cache of the project's own, which tools/reset.sh removes.
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-/var/cache/vtpm-driver/pip}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# inputs_digest PYTHON FILE... [-- WORD...]: sha256 of the files' contents, the Python's
# version and any extra words (e.g. the path of a checkout installed editable).
inputs_digest() {
    local py="$1" files=() words=()
    shift
    while [ $# -gt 0 ] && [ "$1" != -- ]; do files+=("$1"); shift; done
    [ $# -gt 0 ] && shift
    words=("$@")
    { cat "${files[@]}"; "$py" -VV; printf '%s\n' "${words[@]}"; } | sha256sum | cut -d' ' -f1
}

# venv_current VENV DIGEST: VENV was built, completely, from inputs whose digest is DIGEST.
venv_current() { [ -x "$1/bin/python" ] && [ "$(cat "$1/.vtpm-inputs" 2>/dev/null)" = "$2" ]; }

# build_venv VENV PYTHON DIGEST LOG PIP-INSTALL-ARGS...: VENV from nothing (whatever was there
# is removed first), `pip install ARGS`, then `pip check` (a broken or conflicting set fails
# here, by name, not in a test); DIGEST is written last, so an interrupted build is redone.
build_venv() {
    local venv="$1" py="$2" digest="$3" log="$4"
    shift 4
    rm -rf "$venv"
    mkdir -p "$(dirname "$log")"
    "$py" -m venv "$venv" >"$log" 2>&1 || die_with_log "could not create $venv with $py" "$log"
    "$venv/bin/pip" install -q "$@" >>"$log" 2>&1 || die_with_log "pip install into $venv failed" "$log"
    "$venv/bin/pip" check >>"$log" 2>&1 || die_with_log "pip check found broken requirements in $venv" "$log"
    echo "$digest" >"$venv/.vtpm-inputs"
}
