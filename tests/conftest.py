"""Test-suite wiring.

Functional fixtures live in ``tests/functional/fixtures_<area>.py``; they are
registered here because pytest only honours ``pytest_plugins`` in the
top-level conftest. Everything under ``tests/functional`` is marked
``functional`` automatically so ``-m "not functional"`` gives the fast suite.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

_FIXTURE_MODULES = (
    "tests.functional.fixtures_libvirt",
    "tests.functional.fixtures_keymgr",
    "tests.functional.fixtures_server",
    "tests.functional.fixtures_nova",
)

pytest_plugins = [m for m in _FIXTURE_MODULES if importlib.util.find_spec(m) is not None]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/functional/" in str(item.path):
            item.add_marker(pytest.mark.functional)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Under CI a skipped test is a test that did not run: say so loudly."""
    skipped = terminalreporter.stats.get("skipped", [])
    if IN_CI and skipped:
        terminalreporter.write_line(
            f"CI: {len(skipped)} test(s) skipped; CI treats skips as failures", red=True
        )


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if IN_CI and session.testsfailed == 0 and exitstatus == 0:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None and reporter.stats.get("skipped"):
            session.exitstatus = 1
