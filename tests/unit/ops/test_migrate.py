"""ops.migrate: the secret steps of a move, over a SecretStore and a KeyManagerAPI."""

from __future__ import annotations

import types

import pytest

from vtpm_driver import exception
from vtpm_driver.model import request, rules
from vtpm_driver.model.server import SYSMETA_KEY
from vtpm_driver.ops import migrate
from vtpm_driver.ops.secrets import StartSecret

SECRET = "5ec7e700-0000-4000-8000-000000000001"
SERVER_UUID = "c0ffee00-0000-4000-8000-000000000001"


class Store:
    """A SecretStore recording what it holds: uuid -> (usage, value, persistent)."""

    def __init__(self) -> None:
        self.held: dict[str, tuple[str, str, bool]] = {}

    def find(self, instance_uuid):
        return next((u for u, (usage, _, _) in self.held.items() if usage == instance_uuid),
                    None)

    def define(self, secret_uuid, instance_uuid, passphrase, *, persistent):
        self.held[secret_uuid] = (instance_uuid, passphrase, persistent)

    def undefine(self, secret_uuid):
        return self.held.pop(secret_uuid, None) is not None


class Keymgr:
    def __init__(self, error: Exception | None = None) -> None:
        self.reads: list[tuple[str, str]] = []
        self.error = error

    def get_vtpm_secret(self, context, instance, secret_security=None):
        if self.error:
            raise self.error
        self.reads.append((context.user_id, secret_security))
        return "pass-from-barbican"


def server(mode: str):
    return types.SimpleNamespace(
        name="vm1", uuid=SERVER_UUID, user_id="u-owner", system_metadata={
            SYSMETA_KEY: SECRET},
        flavor=types.SimpleNamespace(extra_specs={"hw:tpm_version": "2.0",
                                                  "hw:tpm_secret_security": mode}),
        image_meta=None)


OWNER = types.SimpleNamespace(user_id="u-owner", user_name="alice")
MEMBER = types.SimpleNamespace(user_id="u-member", user_name="bob")


def fetch(mode, context=OWNER, host_secret=None, keymgr=None):
    inst = server(mode)
    return migrate.fetch_secret(context, inst, rules.vtpm_of(inst), keymgr or Keymgr(),
                                host_secret, live=True)


def test_user_mode_reads_barbican_once_with_the_owner():
    km = Keymgr()
    inst = server("user")
    got = migrate.fetch_secret(OWNER, inst, rules.vtpm_of(inst), km, None)
    assert (got.secret_uuid, got.passphrase, got.persistent) == (SECRET, "pass-from-barbican",
                                                                 False)
    assert km.reads == [("u-owner", "user")]
    assert "pass-from-barbican" not in repr(got)


def test_user_mode_refuses_others_before_barbican():
    km = Keymgr()
    with pytest.raises(exception.VTPMSecretForbidden):
        fetch("user", MEMBER, keymgr=km)
    assert km.reads == []


def test_host_mode_takes_the_source_hosts_secret_without_the_owner():
    km = Keymgr()
    got = fetch("host", MEMBER, host_secret=lambda uuid: f"libvirt-{uuid[:4]}", keymgr=km)
    assert (got.passphrase, got.persistent) == ("libvirt-5ec7", True)
    assert km.reads == []


def test_host_mode_falls_back_to_barbican_when_the_host_lacks_it():
    km = Keymgr()
    got = fetch("host", OWNER, host_secret=lambda uuid: None, keymgr=km)
    assert got.passphrase == "pass-from-barbican" and km.reads == [("u-owner", "host")]


def test_deployment_mode_reads_with_any_caller_and_errors_pass_through():
    assert fetch("deployment", MEMBER).passphrase == "pass-from-barbican"
    with pytest.raises(exception.KeyManagerUnavailable):
        fetch("deployment", keymgr=Keymgr(exception.KeyManagerUnavailable("down")))


def test_no_recorded_secret_is_refused():
    inst = server("user")
    inst.system_metadata.clear()
    with pytest.raises(exception.VTPMSecretNotFound):
        migrate.fetch_secret(OWNER, inst, rules.vtpm_of(inst), Keymgr(), None)


@pytest.mark.parametrize(("persistent", "kept"), [(False, False), (True, True)])
def test_destination_gets_the_secret_before_and_ephemeral_ones_go_after(persistent, kept):
    dest = Store()
    start = StartSecret(SECRET, "pw", persistent)
    migrate.give_destination(dest, server("user"), start)
    assert dest.held == {SECRET: (SERVER_UUID, "pw", persistent)}
    migrate.incoming_running(dest, server("user"), start)
    assert (SECRET in dest.held) is kept


def test_rollback_leaves_no_secret_of_the_server_on_the_destination():
    dest = Store()
    dest.define("5ec7e700-0000-4000-8000-0000000000ff", SERVER_UUID, "x", persistent=True)
    migrate.give_destination(dest, server("host"), StartSecret(SECRET, "pw", True))
    migrate.forget_destination(dest, server("host"))
    assert dest.held == {}


def test_no_vtpm_moves_without_secret_steps():
    inst = server("user")
    inst.flavor.extra_specs = {}
    assert migrate.fetch_secret(MEMBER, inst, None, Keymgr(), None) is None
    dest = Store()
    migrate.give_destination(dest, inst, None)
    migrate.incoming_running(dest, inst, None)
    assert dest.held == {}
    assert request.SECRET_HOST == "host"
