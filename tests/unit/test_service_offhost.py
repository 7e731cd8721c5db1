"""ServerService's off-host actions on two fake hosts: each host's site (its guests and
swtpm directory) comes from its backend's ``state_base``, never from this machine's
``[vtpm] swtpm_state_dir``, and a host missing from ``[vtpm] host_state_dirs`` is
refused before anything moves. Rescue, unrescue, rebuild and shelve decide under the
server's lock, on its record re-read there (issue 13)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.unit import test_hosts
from tests.unit import test_service_locks as locks_tests
from tests.unit.conftest import INITRD, KERNEL, OWNER, Env
from vtpm_driver import exception, objects, policy, servers
from vtpm_driver.hosts import CachedHostProbe
from vtpm_driver.service import ServerService


@pytest.fixture(autouse=True)
def _fresh_facts():
    CachedHostProbe.forget()
    yield
    CachedHostProbe.forget()


@pytest.fixture
def world(tmp_path):
    return test_hosts.World(tmp_path)


def _create_on_b(world) -> str:
    created = world.service(host="host-b").create(
        "vm1", flavor_extra_specs={"hw:tpm_version": "2.0"}, image_properties={},
        kernel="/boot/k", initrd="/boot/i")
    return created["uuid"]


def _planted(base: Path, name: str) -> Path:
    path = base / name / "tpm2"
    path.mkdir(parents=True)
    (path / "tpm2-00.permall").write_bytes(b"planted")
    return base / name


def test_each_hosts_site_is_its_backends_state_base(world):
    service = world.service(host="host-a")
    for name in ("host-a", "host-b"):
        site = service.site(name)
        assert site.name == name
        assert site.state_base == service._hosts.backend(name).state_base
        assert site.state_base == str(world.conns[name].state_base)
    assert service.site().name == "host-a"  # default: the host the command acts on
    assert str(world.local) not in {service.site(n).state_base for n in ("host-a", "host-b")}


def test_shelve_on_host_b_and_unshelve_on_host_a_use_their_own_directories(world):
    uuid = _create_on_b(world)
    on_b = Path(world.conns["host-b"].state_base, uuid)
    ek = (on_b / "tpm2" / "tpm2-00.permall").read_bytes()
    local = _planted(world.local, uuid)  # same UUID on this machine: not host-b's
    world.service().shelve("vm1")
    assert not on_b.exists() and world.where(uuid) == []
    stored = Path(world.conf.vtpm.state_backup_dir, uuid)
    assert [p.read_bytes() for p in stored.rglob("tpm2-00.permall")] == [ek]
    world.service().unshelve("vm1", host="host-a")
    assert world.where(uuid) == ["host-a"]
    on_a = Path(world.conns["host-a"].state_base, uuid, "tpm2", "tpm2-00.permall")
    assert on_a.read_bytes() == ek
    assert (local / "tpm2" / "tpm2-00.permall").read_bytes() == b"planted"


def test_a_site_of_a_host_missing_from_host_state_dirs_is_refused(world):
    uuid = _create_on_b(world)
    world.conf.set_override("host_state_dirs",
                            {"host-a": str(world.conns["host-a"].state_base)}, group="vtpm")
    service = world.service(host="host-b")
    for what in (lambda: service.site(), lambda: service.shelve("vm1")):
        with pytest.raises(exception.InvalidConfiguration,
                           match=r"\[vtpm\] host_state_dirs does not name host 'host-b': "
                                 r"cannot tell where it keeps its swtpm state"):
            what()
    assert world.where(uuid) == ["host-b"]
    assert world.conns["host-b"].domains[uuid].active
    assert Path(world.conns["host-b"].state_base, uuid).exists()
    assert not Path(world.conf.vtpm.state_backup_dir, uuid).exists()
    assert service.site("host-a").state_base == str(world.conns["host-a"].state_base)


# ------------------------------------ rescue, unrescue, rebuild, shelve under the lock
# (issue 13) Each command read the server, then waited for its lock while other
# workers changed it; under the lock it must act on the record re-read there, or
# refuse what is pending then. The interleaving hook is test_service_locks.meanwhile.

ADD_A_VTPM = {"hw:tpm_version": "2.0", "hw:tpm_secret_security": "user"}


def _without_vtpm(env: Env) -> objects.Instance:
    return env.spawn(servers.new_instance("vm1", OWNER, flavor_extra_specs={},
                                          kernel=KERNEL, initrd=INITRD))


def _offhost_call(service: ServerService, operation: str, name: str) -> Callable[[], Any]:
    return {"rescue": lambda: service.rescue(name),
            "unrescue": lambda: service.unrescue(name),
            "rebuild": lambda: service.rebuild(name, cmdline="console=ttyS0 rebuilt"),
            "shelve": lambda: service.shelve(name)}[operation]


@pytest.mark.parametrize("operation", ["rescue", "unrescue", "rebuild"])
def test_restarts_act_on_a_resize_confirmed_while_they_waited(
        env: Env, monkeypatch: pytest.MonkeyPatch, operation: str) -> None:
    """While A's rescue, unrescue or rebuild waits for the lock, B resizes the server to
    a flavor with a vTPM (and 2 vCPUs) and C confirms it. A restarts the guest: with the
    flavor it read before (no vTPM) the domain would be defined without its TPM and
    the record would forget the secret (the TPM lost). It must use the re-read record."""
    service = locks_tests.record_service(env)
    inst = _without_vtpm(env)
    if operation == "unrescue":
        service.rescue(inst.name)

    def resize_and_confirm() -> None:
        other = locks_tests.other_worker(env, service)
        other.resize(inst.name, set_specs=ADD_A_VTPM, vcpus=2)
        other.confirm_resize(inst.name)

    landed = locks_tests.meanwhile(monkeypatch, resize_and_confirm)
    _offhost_call(service, operation, inst.name)()
    assert landed == [operation]
    found = servers.find(env.conn, inst.uuid)
    secret = policy.recorded_secret(found)
    assert policy.has_vtpm(found) and found.flavor.vcpus == 2
    assert secret is not None and list(env.km.passphrases) == [secret]
    assert "<tpm" in env.dom(inst).xml and secret in env.dom(inst).xml
    assert env.dom(inst).active
    assert policy.is_rescued(found) == (operation == "rescue")


@pytest.mark.parametrize("operation", ["rescue", "unrescue", "rebuild", "shelve"])
def test_a_resize_ended_while_waiting_is_refused_under_the_lock(
        env: Env, monkeypatch: pytest.MonkeyPatch, operation: str) -> None:
    """B's resize ends (awaiting confirm or revert) while A waits for the lock: A is
    refused, naming the command that decides the resize, and changes nothing."""
    service = locks_tests.record_service(env)
    inst = env.spawn(env.instance("user"))
    if operation == "unrescue":
        service.rescue(inst.name)
    resized: list[str] = []

    def resize() -> None:
        locks_tests.other_worker(env, service).resize(inst.name, set_specs={}, vcpus=2)
        resized.append(env.dom(inst).xml)

    landed = locks_tests.meanwhile(monkeypatch, resize)
    with pytest.raises(exception.VTPMError,
                       match=rf"cannot {operation} server 'vm1': a resize is awaiting "
                             r"confirm or revert; run 'vtpm-driver server resize "
                             r"confirm\|revert vm1' first"):
        _offhost_call(service, operation, inst.name)()
    assert landed == [operation]
    assert service.backend.resize_pending(inst)  # B's resize, untouched
    found = servers.find(env.conn, inst.uuid)
    assert found.flavor.vcpus == 2 and policy.recorded_secret(found) in env.km.passphrases
    assert env.dom(inst).active and [env.dom(inst).xml] == resized
    assert service.store.list() == []


@pytest.mark.parametrize("operation", ["rescue", "unrescue", "rebuild", "shelve"])
@pytest.mark.parametrize("key", [policy.MIGRATED_FROM_KEY, policy.MIGRATING_TO_KEY])
def test_a_move_decided_while_waiting_is_refused_under_the_lock(
        env: Env, monkeypatch: pytest.MonkeyPatch, operation: str, key: str) -> None:
    """While A waits for the lock the server's record comes to say a cold move awaits
    confirm or revert: it arrived from h2 (``migrated_from``), or this is the stopped
    source copy of its move to h2 (``migrating_to``). A must refuse under the lock:
    restarting or shelving the source copy would run or store a server that lives on
    h2 now (two copies, a stale TPM state)."""
    hosts = locks_tests.two_hosts(env)
    service = locks_tests.record_service(env, hosts)
    inst = env.spawn(env.instance("user"))
    if operation == "unrescue":
        service.rescue(inst.name)
    changed: list[str] = []

    def move_pending() -> None:
        locks_tests.set_record(env, inst, **{key: "h2"})
        changed.append(env.dom(inst).xml)

    landed = locks_tests.meanwhile(monkeypatch, move_pending)
    if key == policy.MIGRATED_FROM_KEY:
        match = (rf"cannot {operation} server 'vm1': its migration from h2 awaits confirm "
                 r"or revert; run 'vtpm-driver server resize confirm\|revert vm1' first")
    else:
        match = (rf"cannot {operation} server 'vm1': its migration to 'h2' awaits confirm "
                 r"or revert \(the server is there now; this is its stopped source copy\); "
                 r"run 'vtpm-driver --host h2 server resize confirm\|revert vm1' first")
    with pytest.raises(exception.VTPMError, match=match):
        _offhost_call(service, operation, inst.name)()
    assert landed == [operation]
    assert env.dom(inst).active and [env.dom(inst).xml] == changed
    assert service.store.list() == []
    assert hosts.backends["h2"].driver.calls == []


def test_shelve_of_a_stale_source_copy_is_refused(env: Env) -> None:
    """The server moved to h2 and the move awaits confirm: h1 keeps its stopped source
    copy (``migrating_to``). Shelving that copy would store a stale TPM state and record
    as the server's and free a host the server no longer uses: refused (no interleaving
    needed), with the command that decides the move."""
    service = locks_tests.record_service(env)
    inst = env.spawn(env.instance("user"))
    env.drv.power_off(inst)
    locks_tests.set_record(env, inst, **{policy.MIGRATING_TO_KEY: "h2"})
    with pytest.raises(exception.VTPMError, match="its migration to 'h2' awaits confirm or "
                                                  "revert"):
        service.shelve(inst.name)
    assert inst.uuid in env.conn.domains and env.state_file(inst).exists()
    assert service.store.list() == []
    assert list(env.km.passphrases) == [policy.recorded_secret(inst)]
