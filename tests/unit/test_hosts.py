"""vtpm_driver.hosts (HostSet, ServerBackend's probe, CachedHostProbe) and the service's
moves between hosts (ServerService.migrate / live_migration_abort) on two fake hosts."""

from __future__ import annotations

import types
from pathlib import Path

import libvirt
import pytest

from tests.fakes.keymgr import FakeKeyManager
from tests.fakes.libvirt import CapsConnection, FakeLibvirt, join_hosts, libvirt_error
from tests.fakes.probe import FakeProbe, domcaps
from tests.unit.conftest import MEMBER, OWNER
from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception, policy
from vtpm_driver.hosts import CachedHostProbe, HostSet, ServerBackend
from vtpm_driver.service import ServerService

URIS = {"host-a": "qemu+tcp://127.0.0.1:16611/system",
        "host-b": "qemu+tcp://127.0.0.1:16612/system"}


@pytest.fixture(autouse=True)
def _fresh_facts():
    CachedHostProbe.forget()
    yield
    CachedHostProbe.forget()


def make_conf(tmp_path: Path, hosts: dict[str, str] | None = None):
    conf = vtpm_conf.new_conf()
    conf.set_override("virt_type", "qemu", group="libvirt")
    conf.set_override("swtpm_enabled", True, group="libvirt")
    for opt in ("swtpm_state_dir", "console_log_dir", "resize_backup_dir", "lock_path"):
        conf.set_override(opt, str(tmp_path / opt), group="vtpm")
    conf.set_override("guest_start_timeout", 1, group="vtpm")
    if hosts:
        conf.set_override("hosts", dict(hosts), group="vtpm")
    return conf


# --------------------------------------------------------------------------- HostSet


class Made:
    """A backend the HostSet factory made: how it was called, whether it was closed."""

    def __init__(self, conf, **kwargs):
        self.conf, self.kwargs, self.closed = conf, kwargs, False
        self.driver = types.SimpleNamespace(
            migration_side=lambda name: ("side", name, kwargs.get("name")))

    def close(self):
        self.closed = True


def test_one_unnamed_host_without_hosts_option(tmp_path):
    hosts = HostSet(make_conf(tmp_path), factory=Made)
    assert (hosts.names, hosts.default, hosts.several) == ([vtpm_conf.DEFAULT_HOST],
                                                          vtpm_conf.DEFAULT_HOST, False)
    assert hosts.backend(vtpm_conf.DEFAULT_HOST).kwargs == {}  # factory(conf): the old way


def test_named_hosts_make_one_backend_each_on_first_use(tmp_path):
    hosts = HostSet(make_conf(tmp_path, URIS), factory=Made)
    assert (hosts.names, hosts.default, hosts.several) == (["host-a", "host-b"], "host-a", True)
    b = hosts.backend("host-b")
    assert hosts.backend("host-b") is b
    assert b.kwargs == {"uri": URIS["host-b"], "name": "host-b", "peers": hosts.side}
    assert hosts.side("host-b") == ("side", "host-b", "host-b")
    a = hosts.backend("host-a")
    hosts.close()
    assert a.closed and b.closed


def test_an_unknown_host_is_refused_naming_the_configured_ones(tmp_path):
    hosts = HostSet(make_conf(tmp_path, URIS), factory=Made)
    with pytest.raises(exception.InvalidConfiguration, match="host-a, host-b"):
        hosts.backend("host-c")
    assert hosts.check("host-a") == "host-a"


# --------------------------------------------------------------------------- host facts


class CountingProbe(FakeProbe):
    closed = False

    def versions(self):
        self.asked_virt_types.append("versions")
        return super().versions()

    def close(self):
        self.closed = True


def test_host_facts_are_asked_once_per_uri_for_the_process():
    first, second, other = CountingProbe(), CountingProbe(), CountingProbe()
    for probe, uri in ((first, "qemu+tcp://a/system"), (second, "qemu+tcp://a/system"),
                       (other, "qemu+tcp://b/system")):
        cached = CachedHostProbe(uri, probe)
        assert cached.domain_capabilities("qemu") == domcaps()
        assert cached.versions()["libvirt"] == "9.0.0"
    assert first.asked_virt_types == ["qemu", "versions"]
    assert second.asked_virt_types == []  # a second HostSet's backend: no libvirt call
    assert other.asked_virt_types == ["qemu", "versions"]
    cached = CachedHostProbe("qemu+tcp://a/system", second)
    cached.versions()["libvirt"] = "changed"
    assert cached.versions()["libvirt"] == "9.0.0"  # callers get a copy
    assert cached.domain_capabilities("kvm") and second.asked_virt_types == ["kvm"]


def test_failed_answers_are_not_kept():
    probe = CountingProbe(xml=exception.HypervisorUnavailable("down"))
    cached = CachedHostProbe("qemu+tcp://a/system", probe)
    with pytest.raises(exception.HypervisorUnavailable):
        cached.domain_capabilities("qemu")
    probe.xml = domcaps()
    assert cached.domain_capabilities("qemu") == domcaps()
    assert probe.asked_virt_types == ["qemu", "qemu"]
    assert cached.which("swtpm") and cached.user_exists("tss") and cached.group_exists("tss")
    cached.close()
    assert probe.closed


def test_a_backends_probe_borrows_its_connection(tmp_path):
    backend = ServerBackend(make_conf(tmp_path, URIS), uri=URIS["host-a"], name="host-a")
    conn = CapsConnection(domcaps())
    closed = []
    backend.hypervisor = types.SimpleNamespace(conn=conn, uri=URIS["host-a"],
                                               close=lambda: closed.append(True))
    probe = backend.driver.probe
    assert isinstance(probe, CachedHostProbe)
    assert probe.domain_capabilities("qemu") == domcaps()
    assert conn.calls == [(None, None, None, "qemu")]  # asked over the backend's connection
    probe.close()
    assert not conn.closed  # not the probe's to close
    backend.close()
    assert closed == [True]


def test_a_lost_borrowed_connection_is_not_closed_by_the_probe(tmp_path):
    backend = ServerBackend(make_conf(tmp_path, URIS), uri=URIS["host-a"], name="host-a")
    conn = CapsConnection(error=libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR,
                                              libvirt.VIR_FROM_RPC, "connection reset"))
    backend.hypervisor = types.SimpleNamespace(conn=conn, uri=URIS["host-a"])
    with pytest.raises(exception.HypervisorUnavailable):
        backend.driver.probe.domain_capabilities("qemu")
    assert not conn.closed  # the Hypervisor reconnects on its next use


# --------------------------------------------------------------------------- the service


class World:
    """Two fake libvirt hosts joined for migrations, one key manager."""

    def __init__(self, tmp_path: Path) -> None:
        self.km = FakeKeyManager()
        self.conns = {}
        for name in URIS:
            base = tmp_path / name / "swtpm"
            base.mkdir(parents=True)
            self.conns[name] = FakeLibvirt(state_base=base)
            self.conns[name].keymgr = self.km
        join_hosts({URIS[n]: c for n, c in self.conns.items()})
        self.conf = make_conf(tmp_path, URIS)
        # Each host's swtpm directory as seen from here: what its fake libvirt writes.
        self.conf.set_override("host_state_dirs", {n: str(tmp_path / n / "swtpm") for n in URIS},
                               group="vtpm")
        self.conf.set_override("state_backup_dir", str(tmp_path / "store"), group="vtpm")
        #: THIS machine's swtpm directory ([vtpm] swtpm_state_dir): no host of the world's.
        self.local = Path(self.conf.vtpm.swtpm_state_dir)
        self.local.mkdir()

    def factory(self, conf, uri=None, name=vtpm_conf.DEFAULT_HOST, peers=None):
        backend = ServerBackend(conf, uri, name, peers)
        backend.hypervisor = types.SimpleNamespace(conn=self.conns[name], uri=uri,
                                                   close=lambda: None)
        driver = backend.driver  # the real wiring: host name, peers, state base
        driver._probe, driver._keymgr = FakeProbe(), self.km
        return backend

    def service(self, context=OWNER, host=None):
        return ServerService(self.conf, None, context=lambda: context,
                             hosts=HostSet(self.conf, factory=self.factory), host=host)

    def create(self, mode="user"):
        return self.service(host="host-a").create(
            "vm1", flavor_extra_specs={"hw:tpm_version": "2.0",
                                       "hw:tpm_secret_security": mode},
            image_properties={}, kernel="/boot/k", initrd="/boot/i")

    def where(self, server_uuid):
        return sorted(n for n, c in self.conns.items() if server_uuid in c.domains)


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


def test_live_migrate_moves_the_server_and_shows_it_on_the_destination(world):
    created = world.create("user")
    shown = world.service().migrate("vm1", "host-b", live=True)
    assert shown["host"] == "host-b" and shown["power_state"] == "running"
    assert world.where(created["uuid"]) == ["host-b"]
    assert world.conns["host-a"].secrets == {} and world.conns["host-b"].secrets == {}
    # found wherever it is: back again without naming the source
    world.service().migrate("vm1", "host-a", live=True)
    assert world.where(created["uuid"]) == ["host-a"]


def test_refused_moves_change_nothing(world):
    created = world.create("user")
    with pytest.raises(exception.VTPMSecretForbidden):
        world.service(context=MEMBER).migrate("vm1", "host-b", live=True)
    with pytest.raises(exception.VTPMError, match="already on host 'host-a'"):
        world.service().migrate("vm1", "host-a", live=True)
    with pytest.raises(exception.VTPMError, match="unknown destination host 'host-c'"):
        world.service().migrate("vm1", "host-c", live=True)
    assert world.where(created["uuid"]) == ["host-a"]
    assert world.conns["host-a"].migrations == []


def test_cold_migration_awaits_a_decision_and_reverts(world):
    created = world.create("host")
    shown = world.service().migrate("vm1", "host-b", live=False)
    assert shown["host"] == "host-b"
    assert world.where(created["uuid"]) == ["host-a", "host-b"]  # the source copy waits
    with pytest.raises(exception.VTPMError, match="awaits confirm or revert"):
        world.service().migrate("vm1", "host-a", live=True)
    world.service().revert_resize("vm1")
    assert world.where(created["uuid"]) == ["host-a"]
    assert world.conns["host-a"].domains[created["uuid"]].active


def test_cold_migration_confirm_drops_the_source(world):
    created = world.create("deployment")
    world.service(context=MEMBER).migrate("vm1", "host-b", live=False)
    world.service().confirm_resize("vm1")
    assert world.where(created["uuid"]) == ["host-b"]
    inst = world.service(host="host-b").locate("vm1")
    assert policy.migrated_from(inst) is None


def test_live_migration_abort_without_a_running_migration(world):
    world.create("user")
    assert world.service().live_migration_abort("vm1") is False


def test_a_single_host_service_cannot_move_servers(world):
    class One:
        name, uri = None, "qemu:///system"

        def connect(self):
            pass

        def find(self, name):
            return world.service(host="host-a").locate(name)

    world.create("user")
    service = ServerService(world.conf, One(), context=lambda: OWNER)
    with pytest.raises(exception.InvalidConfiguration, match="only one host"):
        service.migrate("vm1", "host-b", live=True)


# --------------------------------------------------------------------------- each host's state


def _plant(base: Path, name: str) -> Path:
    """A state directory ``base/name`` with one file (what a test creates and checks)."""
    path = base / name / "tpm2"
    path.mkdir(parents=True)
    (path / "tpm2-00.permall").write_bytes(b"planted")
    return base / name


def test_a_hosts_state_base_is_its_own_directory_everywhere(world):
    """One place says where host-b's swtpm state is; its driver and operations take it."""
    backend = world.service(host="host-b").backend
    expected = str(world.conns["host-b"].state_base)
    driver = backend.driver
    assert backend.state_base == expected
    assert driver.state_base == expected
    assert driver.guests.state_base == expected
    assert str(driver.resize_ops.backups.state_base) == expected
    assert driver._site().state_base == expected
    assert expected != str(world.local)


def test_operations_on_host_b_use_host_b_directory(world):
    """Resize backs up host-b's state and delete removes host-b's, never this machine's
    directory of the same UUID."""
    created = world.service(host="host-b").create(
        "vm1", flavor_extra_specs={"hw:tpm_version": "2.0"}, image_properties={},
        kernel="/boot/k", initrd="/boot/i")
    uuid = created["uuid"]
    on_b = Path(world.conns["host-b"].state_base, uuid, "tpm2", "tpm2-00.permall")
    ek = on_b.read_bytes()
    local = _plant(world.local, uuid)  # same UUID on this machine: not host-b's
    world.service().resize("vm1", set_specs={}, memory_mb=512)
    backup = Path(world.conf.vtpm.resize_backup_dir, uuid)
    assert [p.read_bytes() for p in backup.rglob("tpm2-00.permall")] == [ek]
    world.service().revert_resize("vm1")
    assert on_b.read_bytes() == ek
    world.service().delete("vm1")
    assert not on_b.parent.parent.exists()
    assert (local / "tpm2" / "tpm2-00.permall").read_bytes() == b"planted"


def test_remove_state_dir_of_host_a_never_touches_this_machines_directory(world):
    backend = world.service(host="host-a").backend
    uuid = "0b5a3c1e-2f4d-4e6a-8b7c-9d0e1f2a3b4c"
    local = _plant(world.local, uuid)
    on_a = _plant(Path(world.conns["host-a"].state_base), uuid)
    assert backend.remove_state_dir(uuid) is True
    assert not on_a.exists()
    assert local.exists() and backend.remove_state_dir(uuid) is False


def test_a_host_missing_from_host_state_dirs_is_refused_naming_the_option(world):
    """Several hosts and no directory for host-b: a clear error, nothing touched."""
    created = world.service(host="host-b").create(
        "vm1", flavor_extra_specs={"hw:tpm_version": "2.0"}, image_properties={},
        kernel="/boot/k", initrd="/boot/i")
    uuid = created["uuid"]
    local = _plant(world.local, uuid)
    world.conf.set_override("host_state_dirs",
                            {"host-a": str(world.conns["host-a"].state_base)}, group="vtpm")
    service = world.service(host="host-b")
    backend = service.backend
    for what in (lambda: backend.state_base, lambda: backend.driver.state_base,
                 lambda: backend.remove_state_dir(uuid), lambda: service.delete("vm1"),
                 lambda: service.resize("vm1", set_specs={}, memory_mb=512),
                 lambda: service.audit(None)):
        with pytest.raises(exception.InvalidConfiguration,
                           match=r"\[vtpm\] host_state_dirs .*'host-b'"):
            what()
    assert local.exists()
    assert world.where(uuid) == ["host-b"]
    assert world.conns["host-b"].domains[uuid].active
    assert Path(world.conns["host-b"].state_base, uuid).exists()
    assert not Path(world.conf.vtpm.resize_backup_dir, uuid).exists()


def test_one_host_without_host_state_dirs_keeps_swtpm_state_dir(tmp_path):
    conf = make_conf(tmp_path)
    backend = ServerBackend(conf)
    assert backend.state_base == conf.vtpm.swtpm_state_dir
    assert backend.driver.state_base == conf.vtpm.swtpm_state_dir
