# shellcheck shell=bash
# Shell helpers shared by tools/keymgr-stack.sh and tools/openstack-aio.sh.
# Source it after setting TAG (the "[name]" prefix of every message).

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
