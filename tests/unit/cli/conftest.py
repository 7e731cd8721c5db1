"""Run ``vtpm-driver`` in-process with a fake backend and a fixed login."""

from __future__ import annotations

import pytest

from tests.fakes.service import OWNER, FakeBackend
from vtpm_driver.cli import main as cli_main


@pytest.fixture(autouse=True)
def _no_default_config(monkeypatch, tmp_path):
    """Never read the machine's /etc/vtpm-driver/vtpm-driver.conf in unit tests."""
    monkeypatch.setattr(cli_main, "DEFAULT_CONFIG_FILES", (str(tmp_path / "absent.conf"),))


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def logins() -> list:
    """The parsed global options of every login (each returns OWNER)."""
    return []


@pytest.fixture
def cli(capsys, backend, logins):
    """``cli(*argv) -> (rc, stdout, stderr)``; ``keystone=True`` keeps the real login."""

    def fake_login(options):
        logins.append(options)
        return OWNER

    def run(*argv: str, keystone: bool = False) -> tuple[int, str, str]:
        rc = cli_main.main(list(argv), backend_factory=lambda conf: backend,
                           login=None if keystone else fake_login)
        out, err = capsys.readouterr()
        return rc, out, err

    return run
