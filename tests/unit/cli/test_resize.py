"""`vtpm-driver server resize` and `server resize confirm|revert`."""

from __future__ import annotations

import pytest

from tests.fakes.service import OWNER, add_server

# -- resize ---------------------------------------------------------------------------


def test_resize_merges_the_flavor_and_awaits_a_decision(cli, backend, logins):
    add_server(backend, **{"hw:tpm_version": "2.0", "hw:cpu_policy": "shared"})
    rc, out, err = cli("server", "resize", "vm1", "--flavor-property",
                       "hw:tpm_model=tpm-crb", "--unset-flavor-property", "hw:cpu_policy",
                       "--memory", "512")
    assert (rc, out, err) == (0, "", "")
    old = {"hw:tpm_version": "2.0", "hw:cpu_policy": "shared"}
    new = {"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}
    assert backend.driver.calls == [
        ("migrate_disk_and_power_off", OWNER, "vm1", None, old, new, 1, 512),
        ("finish_migration", OWNER, "vm1", "[]", new, old, True, True),
    ]
    rc, out, _ = cli("server", "show", "vm1", "-f", "value", "-c", "resize_status")
    assert (rc, out) == (0, "awaiting confirm or revert\n")


@pytest.mark.parametrize(
    ("argv", "call"),
    [
        (["server", "resize", "confirm", "vm1"], ("confirm_migration", OWNER, "vm1")),
        (["server", "resize", "--confirm", "vm1"], ("confirm_migration", OWNER, "vm1")),
        (["server", "resize", "revert", "vm1"], ("finish_revert_migration", OWNER, "vm1", True)),
        (["server", "resize", "--revert", "vm1"], ("finish_revert_migration", OWNER, "vm1", True)),
    ],
)
def test_resize_confirm_and_revert(cli, backend, logins, argv, call):
    instance = add_server(backend)
    backend.pending.add(instance.uuid)
    assert cli(*argv) == (0, "", "")
    assert backend.driver.calls == [call]
    assert not backend.resize_pending(instance)


@pytest.mark.parametrize("decision", ["confirm", "revert"])
def test_resize_decision_without_pending_resize_is_refused(cli, backend, logins, decision):
    add_server(backend)
    rc, out, err = cli("server", "resize", decision, "vm1")
    assert (rc, out) == (1, "")
    assert err == (f"vtpm-driver: error: cannot {decision} the resize of server 'vm1': it has "
                   "no resize awaiting confirm or revert\n")
    assert backend.driver.calls == []


def test_second_resize_while_pending_is_refused(cli, backend, logins):
    instance = add_server(backend)
    backend.pending.add(instance.uuid)
    rc, _, err = cli("server", "resize", "vm1", "--vcpus", "2")
    assert rc == 1
    assert "a resize is awaiting confirm or revert" in err
    assert "vtpm-driver server resize confirm|revert vm1" in err
    assert backend.driver.calls == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--flavor-property", "hw:tpm_model=tpm-crb", "--confirm"],
         "--confirm and --revert act on a pending resize and take no flavor changes"),
        (["--vcpus", "2", "--revert"], "take no flavor changes"),
        (["--confirm", "--revert"], "not allowed with argument"),
        ([], "nothing to resize"),
    ],
)
def test_resize_usage_errors(cli, backend, logins, args, needle):
    add_server(backend)
    rc, out, err = cli("server", "resize", "vm1", *args)
    assert (rc, out) == (2, "")
    assert needle in err
    assert backend.driver.calls == [] and logins == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--flavor-property", "hw:tpm_version=1.2", "--flavor-property", "hw:tpm_model=tpm-crb"],
         "tpm-crb needs TPM version 2.0"),
        (["--unset-flavor-property", "hw:nope"],
         "--unset-flavor-property 'hw:nope': the server's flavor has no such extra spec"),
    ],
)
def test_invalid_resize_changes_nothing(cli, backend, logins, args, needle):
    add_server(backend)
    rc, out, err = cli("server", "resize", "vm1", *args)
    assert (rc, out) == (1, "")
    assert needle in err and len(err.splitlines()) == 1
    assert backend.driver.calls == []


def test_command_help_mentions_resize_confirm(cli):
    rc, out, _ = cli("server", "resize", "--help")
    assert rc == 0
    assert "vtpm-driver server resize confirm NAME" in out
    assert "vtpm-driver server resize revert NAME" in out


