"""`vtpm-driver server migrate` and `server live-migrate`: parse, one service call, exit code."""

from __future__ import annotations

import pytest

from tests.fakes.service import add_server
from vtpm_driver import exception
from vtpm_driver.service import ServerService


@pytest.fixture
def moves(monkeypatch):
    """What ServerService.migrate / live_migration_abort were asked (the service is
    unit-tested on its own in tests/unit/test_hosts.py)."""
    calls: list[tuple] = []
    outcome: dict = {"error": None, "aborted": True}

    def migrate(self, name, dest, *, live, bandwidth_mib=None):
        calls.append(("migrate", name, dest, live))
        if outcome["error"]:
            raise outcome["error"]
        return {}

    def abort(self, name):
        calls.append(("abort", name))
        return outcome["aborted"]

    monkeypatch.setattr(ServerService, "migrate", migrate)
    monkeypatch.setattr(ServerService, "live_migration_abort", abort)
    return calls, outcome


@pytest.mark.parametrize(("command", "live"), [("migrate", False), ("live-migrate", True)])
def test_move_calls_the_service_once(cli, backend, moves, command, live):
    add_server(backend)
    assert cli("server", command, "vm1", "--to", "host-b") == (0, "", "")
    assert moves[0] == [("migrate", "vm1", "host-b", live)]


@pytest.mark.parametrize("command", ["migrate", "live-migrate"])
def test_a_destination_is_required(cli, moves, command):
    rc, _out, err = cli("server", command, "vm1")
    assert rc == 2 and "--to" in err
    assert moves[0] == []


def test_a_refused_move_exits_1_with_one_line(cli, backend, moves):
    add_server(backend)
    moves[1]["error"] = exception.VTPMSecretForbidden(
        "cannot live-migrate server vm1: only its owner can hand the passphrase over")
    rc, out, err = cli("server", "live-migrate", "vm1", "--to", "host-b")
    assert (rc, out) == (1, "")
    assert "only its owner" in err and len(err.strip().splitlines()) == 1


def test_abort_cancels_or_says_none_runs(cli, backend, moves):
    add_server(backend)
    assert cli("server", "live-migrate", "vm1", "--abort") == (0, "", "")
    moves[1]["aborted"] = False
    rc, out, err = cli("server", "live-migrate", "vm1", "--abort")
    assert (rc, out) == (1, "") and "no live migration" in err
    assert moves[0] == [("abort", "vm1"), ("abort", "vm1")]


def test_abort_and_a_destination_exclude_each_other(cli, moves):
    rc, _out, _err = cli("server", "live-migrate", "vm1", "--abort", "--to", "host-b")
    assert rc == 2 and moves[0] == []


def test_without_several_hosts_the_move_is_refused(cli, backend):
    add_server(backend)
    rc, out, err = cli("server", "live-migrate", "vm1", "--to", "host-b")
    assert (rc, out) == (1, "") and "unknown destination host 'host-b'" in err
