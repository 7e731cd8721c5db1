#!/bin/bash
# The project's virtualenv (.venv): this checkout (editable) with the extras pyproject.toml
# declares for tests and benchmarks (test, bench), and nothing else. Rebuilt from nothing
# when pyproject.toml or the Python changed; reused, untouched, while they have not.
set -euo pipefail
TAG=dev-venv
# shellcheck source=tools/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(dirname "$0")/.."
VENV=${VTPM_VENV:-.venv}
PY=$(find_python "${VTPM_PYTHON:-}") || die "no Python >= 3.11 with the venv module found; set VTPM_PYTHON"

digest=$(inputs_digest "$PY" pyproject.toml -- "$PWD")
if venv_current "$VENV" "$digest"; then
    say "up to date ($VENV, built from pyproject.toml [test,bench])"
    exit 0
fi
t0=$SECONDS
say "building $VENV from pyproject.toml [test,bench] (libvirt-python compiles, ~30-60 s)"
build_venv "$VENV" "$PY" "$digest" "$VENV.pip.log" -e '.[test,bench]'
"$VENV/bin/python" -c 'import vtpm_driver, libvirt' || die "the new $VENV cannot import vtpm_driver"
say "done in $((SECONDS - t0)) s"
