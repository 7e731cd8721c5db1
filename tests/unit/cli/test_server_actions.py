"""`vtpm-driver server reboot|stop|start|suspend|resume|delete` and the refused operations."""

from __future__ import annotations

import pytest

from tests.fakes.service import OWNER, add_server
from vtpm_driver import exception

# -- actions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "call"),
    [
        (["server", "reboot", "vm1"], ("reboot", OWNER, "vm1", "SOFT")),
        (["server", "reboot", "--hard", "vm1"], ("reboot", OWNER, "vm1", "HARD")),
        (["server", "stop", "vm1"], ("power_off", "vm1", 60, 10)),
        (["server", "stop", "--shutdown-timeout", "5", "vm1"], ("power_off", "vm1", 5, 10)),
        (["server", "stop", "--force", "vm1"], ("power_off", "vm1", 0, 0)),
        (["server", "start", "vm1"], ("power_on", OWNER, "vm1")),
        (["server", "suspend", "vm1"], ("suspend", OWNER, "vm1")),
        (["server", "resume", "vm1"], ("resume", OWNER, "vm1")),
        (["server", "delete", "vm1"], ("destroy", OWNER, "vm1", True, True)),
    ],
)
def test_actions_call_the_driver(cli, backend, logins, argv, call):
    add_server(backend)
    rc, out, err = cli(*argv)
    assert (rc, out, err) == (0, "", "")
    assert backend.driver.calls == [call]
    assert len(logins) == 1


def test_actions_work_by_uuid(cli, backend, logins):
    instance = add_server(backend)
    rc, _, _ = cli("server", "start", instance.uuid)
    assert rc == 0 and backend.driver.calls == [("power_on", OWNER, "vm1")]


def test_second_delete_says_the_server_does_not_exist(cli, backend, logins):
    add_server(backend)
    assert cli("server", "delete", "vm1") == (0, "", "")
    rc, out, err = cli("server", "delete", "vm1")
    assert (rc, out) == (1, "")
    assert err == "vtpm-driver: error: no server with name or UUID 'vm1' on this host\n"
    assert [c[0] for c in backend.driver.calls] == ["destroy"]


def test_refused_hard_reboot_is_one_line(cli, backend, logins):
    add_server(backend)
    backend.driver.fail["reboot"] = exception.VTPMSecretForbidden(
        "Barbican refused to read vTPM secret x (HTTP 403): this needs the server owner's "
        "credentials (secret security mode 'user')")
    rc, out, err = cli("server", "reboot", "--hard", "vm1")
    assert (rc, out) == (1, "")
    assert len(err.splitlines()) == 1
    assert "needs the server owner's credentials" in err


def test_unsupported_operation_names_it(cli, backend, logins):
    add_server(backend)
    backend.driver.fail["suspend"] = exception.OperationNotSupportedForVTPM(
        "suspend is not supported for servers with a vTPM: reason")
    rc, _, err = cli("server", "suspend", "vm1")
    assert rc == 1
    assert err == ("vtpm-driver: error: suspend is not supported for servers with a vTPM: "
                   "reason\n")


def test_action_without_a_server_argument_is_usage_error(cli, backend, logins):
    rc, _, err = cli("server", "reboot")
    assert rc == 2 and "NAME|UUID" in err




def test_other_projects_may_not_act(cli, backend, logins):
    instance = add_server(backend)
    instance.project_id = "p-other"
    rc, out, err = cli("server", "stop", "vm1")
    assert (rc, out) == (1, "")
    assert err.startswith("vtpm-driver: error: cannot stop server vm1: it belongs to project "
                          "p-other and alice is not a member of it")
    assert backend.driver.calls == []
