#!/bin/bash
# Every environment a test runs in holds what its tests import, checked in seconds before
# any test runs, so the next missing requirement fails here, by name, instead of in the
# middle of the suite (or never, on a machine whose venvs happen to hold it already):
#   .venv                  pip check; every module under tests/ collected (imported)
#   Keystone + Barbican    pip check (requirements/stack.txt)
#   all-in-one (AIO)       pip check; tests/nova collected (it must find nova: no test
#                          silently ignored) and Nova's own vTPM test modules collected
#                          exactly as tools/nova-vtpm-suite.sh runs them
# Nothing is installed: a failure names the missing module and the file that declares
# the environment (pyproject.toml, requirements/stack.txt, requirements/aio.txt).
set -euo pipefail
TAG=check-envs
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tools/lib.sh
. "$HERE/lib.sh"
cd "$HERE/.."
STACK_VENV="${VTPM_STACK_DIR:-/var/lib/vtpm-driver/stack}/venv"
AIO_VENV="${VTPM_AIO_DIR:-/var/lib/vtpm-driver/aio}/venv"
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT

# check NAME DECLARED-IN COMMAND...: run COMMAND quietly; on failure show its output.
check() {
    local name="$1" declared="$2"
    shift 2
    if "$@" >"$LOG" 2>&1; then
        say "ok: $name"
    else
        grep -E "ModuleNotFoundError|ImportError|No module named|has requirement|is not installed|^E " "$LOG" | sort -u | head -n 20 >&2 || true
        tail -n 5 "$LOG" >&2
        die "$name failed: add what is missing to $declared (command: $*)"
    fi
}

collect() { "$1" -m pytest -p no:cacheprovider --collect-only -q "${@:2}"; }

for venv in .venv "$STACK_VENV" "$AIO_VENV"; do
    [ -x "$venv/bin/python" ] || die "no virtualenv at $venv: tools/run-tests.sh builds it"
done
check ".venv: pip check" pyproject.toml .venv/bin/pip check
check ".venv: every test module imports" "pyproject.toml [test]" collect .venv/bin/python tests
check "Keystone + Barbican venv: pip check" requirements/stack.txt "$STACK_VENV/bin/pip" check
check "AIO venv: pip check" requirements/aio.txt "$AIO_VENV/bin/pip" check
check "AIO venv: tests/nova imports (and finds nova)" requirements/aio.txt \
    collect "$AIO_VENV/bin/python" tests/nova
check "AIO venv: Nova's own vTPM test modules import" requirements/aio.txt \
    bash tools/nova-vtpm-suite.sh --collect-only
