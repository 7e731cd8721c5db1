"""The ops tests' driver harness (tests/unit/conftest.py), with lock files under tmp_path."""

from __future__ import annotations

import pytest

from tests.unit.conftest import Env


@pytest.fixture
def env(env: Env) -> Env:
    env.drv.conf.set_override("lock_path", str(env.tmp / "locks"), group="vtpm")
    return env
