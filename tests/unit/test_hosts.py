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
from vtpm_driver.driver import VTPMDriver
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

    def factory(self, conf, uri=None, name=vtpm_conf.DEFAULT_HOST, peers=None):
        world = self

        class Backend(ServerBackend):
            @property
            def driver(self):
                if self._driver is None:
                    self._driver = VTPMDriver(self.conf, probe=FakeProbe(),
                                              hypervisor=self.hypervisor, keymgr=world.km)
                    self._driver.host_name, self._driver.peers = self.name, self._peers
                return self._driver

        backend = Backend(conf, uri, name, peers)
        backend.hypervisor = types.SimpleNamespace(conn=self.conns[name], uri=uri,
                                                   close=lambda: None)
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
