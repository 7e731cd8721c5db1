"""Plain helpers shared by the functional fixture modules (no fixtures here)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """CI must never skip functional tests silently."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it under CI=true (a missing service is a CI failure)."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: functional tests must not skip)", pytrace=False)
    pytest.skip(reason)


def run_tool_script(script: Path, action: str, timeout: float,
                    env: dict[str, str]) -> tuple[int, str]:
    """Run ``bash script action`` (a tools/ service script): exit code and its output."""
    try:
        proc = subprocess.run(
            ["bash", str(script), action],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(os.environ, **env),
            check=False,
        )
    except subprocess.TimeoutExpired:
        return 124, f"'{script.name} {action}' did not finish in {timeout:.0f} s"
    return proc.returncode, (proc.stdout + proc.stderr).strip()
