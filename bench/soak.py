"""Soak run (issue 13): ``python -m bench.soak [--seconds S] [--workers N] [--servers M]
[--calls FILE]``.

Runs tests/functional/test_soak.py on the real stack with the long bounds
(default 300 s, 3 workers, 3 servers; CI runs the test itself at 75 s) and
prints its figures as JSON: operations run, servers created, refusals by kind
(each proven by the call log), failures by kind with their whole messages,
invariant violations. ``--calls FILE`` keeps the whole call log (worker, server,
operation, times, outcome). Exit status: pytest's (0 when there was no failure
and every invariant held).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--calls", type=Path, default=None,
                        help="write the whole call log (JSON) to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "soak.json"
        env = os.environ | {"VTPM_SOAK_SECONDS": str(args.seconds),
                            "VTPM_SOAK_WORKERS": str(args.workers),
                            "VTPM_SOAK_SERVERS": str(args.servers),
                            "VTPM_SOAK_REPORT": str(report)}
        if args.calls is not None:
            env["VTPM_SOAK_CALLS"] = str(args.calls.resolve())
        rc = subprocess.call([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                              "tests/functional/test_soak.py"], cwd=ROOT, env=env)
        if report.exists():
            print(json.dumps({"soak": json.loads(report.read_text())}, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
