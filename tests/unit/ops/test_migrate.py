"""ops.migrate: the secret steps of a move, over a SecretStore and a KeyManagerAPI."""

from __future__ import annotations

import dataclasses
import types
import uuid
from pathlib import Path

import libvirt
import pytest

from tests.fakes.keymgr import FakeKeyManager
from tests.fakes.libvirt import FakeLibvirt, join_hosts, libvirt_error
from tests.fakes.probe import FakeProbe
from tests.unit.conftest import MEMBER as CTX_MEMBER
from tests.unit.conftest import OWNER as CTX_OWNER
from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception, policy, servers, spec
from vtpm_driver.driver import VTPMDriver
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
            policy.SYSMETA_KEY: SECRET},
        flavor=types.SimpleNamespace(extra_specs={"hw:tpm_version": "2.0",
                                                  "hw:tpm_secret_security": mode}),
        image_meta=None)


OWNER = types.SimpleNamespace(user_id="u-owner", user_name="alice")
MEMBER = types.SimpleNamespace(user_id="u-member", user_name="bob")


def fetch(mode, context=OWNER, host_secret=None, keymgr=None):
    inst = server(mode)
    return migrate.fetch_secret(context, inst, policy.vtpm_of(inst), keymgr or Keymgr(),
                                host_secret, live=True)


def test_user_mode_reads_barbican_once_with_the_owner():
    km = Keymgr()
    inst = server("user")
    got = migrate.fetch_secret(OWNER, inst, policy.vtpm_of(inst), km, None)
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
        migrate.fetch_secret(OWNER, inst, policy.vtpm_of(inst), Keymgr(), None)


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
    assert spec.SECRET_HOST == "host"


# --------------------------------------------------------------------------- two fake hosts
# The domain steps (LiveMigration, ColdMigration) on two drivers over two fake
# libvirt hosts that migrate to each other (tests.fakes.libvirt.join_hosts).

URIS = {"host-a": "qemu+tcp://127.0.0.1:16611/system",
        "host-b": "qemu+tcp://127.0.0.1:16612/system"}


@dataclasses.dataclass
class TwoHosts:
    drivers: dict
    conns: dict
    km: FakeKeyManager
    events: list
    tmp: Path

    def side(self, name):
        return self.drivers[name].migration_side(name)

    def live(self, src="host-a", dest="host-b"):
        return migrate.LiveMigration(self.side(src), self.side(dest))

    def cold(self, src="host-a", dest="host-b"):
        return migrate.ColdMigration(self.side(src), self.side(dest))

    def spawn(self, mode="user", host="host-a", context=CTX_OWNER):
        inst = servers.new_instance(
            "vm1", CTX_OWNER, flavor_extra_specs={"hw:tpm_version": "2.0",
                                              "hw:tpm_secret_security": mode},
            kernel="/boot/k", initrd="/boot/i")
        self.drivers[host].spawn(context, inst, inst.image_meta, [], None, {})
        return inst

    def state(self, host, inst):
        return Path(self.conns[host].state_base, inst.uuid, "tpm2", "tpm2-00.permall")

    def dom(self, host, inst):
        return self.conns[host].domains.get(inst.uuid)

    def secrets(self, host):
        return {u: s.private for u, s in self.conns[host].secrets.items()}

    def assert_only_on(self, host, inst, ek):
        other = next(h for h in URIS if h != host)
        assert self.dom(host, inst) is not None and self.dom(host, inst).active
        assert self.state(host, inst).read_bytes() == ek  # same TPM (same EK)
        assert self.dom(other, inst) is None
        assert not self.state(other, inst).parent.parent.exists()


@pytest.fixture
def two(tmp_path: Path) -> TwoHosts:
    events: list = []
    km = FakeKeyManager(events)
    drivers, conns = {}, {}
    for name, uri in URIS.items():
        conf = vtpm_conf.new_conf()
        conf.set_override("virt_type", "qemu", group="libvirt")
        conf.set_override("swtpm_enabled", True, group="libvirt")
        for opt in ("swtpm_state_dir", "console_log_dir", "resize_backup_dir"):
            conf.set_override(opt, str(tmp_path / name / opt), group="vtpm")
        conf.set_override("lock_path", str(tmp_path / "locks"), group="vtpm")
        conf.set_override("guest_start_timeout", 1, group="vtpm")
        state_base = tmp_path / name / "swtpm_state_dir"
        state_base.mkdir(parents=True)
        conn = FakeLibvirt(events, state_base)
        conn.keymgr = km
        drv = VTPMDriver(conf, probe=FakeProbe(),
                         hypervisor=types.SimpleNamespace(conn=conn, uri=uri), keymgr=km)
        drv.host_name = name
        drivers[name], conns[name] = drv, conn
    join_hosts({URIS[n]: c for n, c in conns.items()})
    for drv in drivers.values():
        drv.peers = lambda n: drivers[n].migration_side(n)
    return TwoHosts(drivers, conns, km, events, tmp_path)


def _after(events, what, since):
    return [i for i, (w, _) in enumerate(events) if w == what and i >= since]


@pytest.mark.parametrize("mode", ["user", "deployment"])
def test_live_user_and_deployment_modes_hand_over_an_ephemeral_secret(two, mode):
    inst = two.spawn(mode)
    ek = two.state("host-a", inst).read_bytes()
    two.events.clear()
    two.live().run(CTX_OWNER, inst)
    two.assert_only_on("host-b", inst, ek)
    # Passphrase read first, secret defined on B before the move, none left anywhere.
    names = [w for w, _ in two.events]
    assert names.index("barbican.get") < names.index("virt.secret.define") < names.index(
        "virt.migrate")
    assert two.conns["host-b"].started_with[-1] == (policy.recorded_secret(inst), True)
    assert two.secrets("host-a") == {} and two.secrets("host-b") == {}
    (_name, uri, params, flags), = two.conns["host-a"].migrations
    assert uri == URIS["host-b"]
    assert params == {libvirt.VIR_MIGRATE_PARAM_URI: "tcp://127.0.0.1",
                      libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: "127.0.0.1"}
    assert flags & libvirt.VIR_MIGRATE_LIVE and flags & libvirt.VIR_MIGRATE_UNDEFINE_SOURCE


def test_live_host_mode_moves_the_persistent_secret_without_the_owner(two):
    inst = two.spawn("host")
    secret_uuid = policy.recorded_secret(inst)
    ek = two.state("host-a", inst).read_bytes()
    two.events.clear()
    two.live().run(CTX_MEMBER, inst)
    two.assert_only_on("host-b", inst, ek)
    assert "barbican.get" not in [w for w, _ in two.events]  # read from host-a's libvirt
    assert two.secrets("host-b") == {secret_uuid: False} and two.secrets("host-a") == {}


def test_live_user_mode_by_another_user_is_refused_before_anything_moves(two):
    inst = two.spawn("user")
    ek = two.state("host-a", inst).read_bytes()
    with pytest.raises(exception.VTPMSecretForbidden):
        two.live().run(CTX_MEMBER, inst)
    two.assert_only_on("host-a", inst, ek)
    assert two.conns["host-a"].migrations == [] and two.secrets("host-b") == {}


@pytest.mark.parametrize("fault", ["cancelled", "unreachable", "wrong_secret"])
def test_failed_live_migration_leaves_the_guest_on_the_source_and_nothing_there(two, fault):
    inst = two.spawn("user")
    ek = two.state("host-a", inst).read_bytes()
    if fault == "cancelled":
        two.conns["host-a"].fail_migrate = libvirt_error(
            libvirt.VIR_ERR_OPERATION_ABORTED, message="migration job: canceled by client")
    elif fault == "unreachable":
        two.conns["host-a"].peers = {}
    else:
        two.km.get_vtpm_secret = lambda *args, **kwargs: "not-the-state-key"
    with pytest.raises(exception.VTPMError, match="stays on the source"):
        two.live().run(CTX_OWNER, inst)
    two.assert_only_on("host-a", inst, ek)
    assert two.secrets("host-b") == {}


def test_live_migration_of_a_stopped_server_is_refused(two):
    inst = two.spawn("user")
    two.drivers["host-a"].power_off(inst)
    with pytest.raises(exception.VTPMError, match="not running"):
        two.live().run(CTX_OWNER, inst)
    assert two.conns["host-a"].migrations == [] and two.secrets("host-b") == {}


def test_a_same_named_domain_on_the_destination_refuses_before_barbican(two):
    inst = two.spawn("user")
    two.conns["host-b"].defineXML(two.dom("host-a", inst).xml.replace(inst.uuid, str(
        uuid.uuid4())))
    two.events.clear()
    with pytest.raises(exception.InstanceExists):
        two.live().run(CTX_OWNER, inst)
    assert "barbican.get" not in [w for w, _ in two.events]
    assert two.dom("host-a", inst).active


def test_abort_without_a_running_migration_says_so(two):
    inst = two.spawn("user")
    assert two.live().abort(inst) is False


def test_cold_migration_then_confirm_keeps_the_tpm_and_drops_the_source(two):
    inst = two.spawn("user")
    ek = two.state("host-a", inst).read_bytes()
    two.cold().migrate(CTX_OWNER, inst)
    moved = two.dom("host-b", inst)
    assert moved.active and not moved.paused
    assert two.state("host-b", inst).read_bytes() == ek
    source = two.dom("host-a", inst)  # kept, stopped, for a revert
    assert source is not None and not source.active and two.state("host-a", inst).exists()
    assert inst.system_metadata[policy.MIGRATED_FROM_KEY] == "host-a"
    assert two.secrets("host-a") == {} and two.secrets("host-b") == {}
    two.cold().confirm(CTX_OWNER, inst)
    two.assert_only_on("host-b", inst, ek)
    assert policy.MIGRATED_FROM_KEY not in inst.system_metadata
    two.cold().confirm(CTX_OWNER, inst)  # idempotent


def test_cold_migration_revert_brings_the_old_state_back(two):
    inst = two.spawn("host")
    ek = two.state("host-a", inst).read_bytes()
    two.cold().migrate(CTX_OWNER, inst)
    two.cold().revert(CTX_OWNER, inst)
    two.assert_only_on("host-a", inst, ek)
    assert two.secrets("host-b") == {}
    assert policy.MIGRATED_FROM_KEY not in inst.system_metadata


def test_failed_cold_migration_restarts_the_guest_on_the_source(two):
    inst = two.spawn("user")
    ek = two.state("host-a", inst).read_bytes()
    two.conns["host-a"].fail_migrate = libvirt_error(libvirt.VIR_ERR_OPERATION_FAILED)
    with pytest.raises(exception.VTPMError, match="stays on the source"):
        two.cold().migrate(CTX_OWNER, inst)
    two.assert_only_on("host-a", inst, ek)
    assert not two.dom("host-a", inst).paused
    assert two.secrets("host-a") == {} and two.secrets("host-b") == {}
