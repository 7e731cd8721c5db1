"""ServerService holds the per-server lock around every operation that changes a server.

The service runs over the real VTPMDriver on the fake libvirt and key manager
(``env``); another thread holds the server's lock, and the operation must be
refused with ServerLocked before anything is touched.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.fakes.service import FakeBackend
from tests.unit.conftest import OWNER, Env
from vtpm_driver import exception
from vtpm_driver.model import rules
from vtpm_driver.model.server import recorded_secret
from vtpm_driver.ops import locks
from vtpm_driver.standalone import servers
from vtpm_driver.standalone.service import ServerService

WAIT = 60  # a bound for a stuck helper thread, never a speed check


class Backend(FakeBackend):
    """Finds the test's servers; the real driver (``env.drv``) does the work."""

    def __init__(self, drv: Any) -> None:
        super().__init__()
        self.driver = drv

    def resize_pending(self, instance: Any) -> bool:
        return bool(self.driver.resize_ops.has_backup(instance.uuid))


@pytest.fixture
def service(env: Env) -> ServerService:
    env.drv.conf.set_override("lock_path", str(env.tmp / "locks"), group="vtpm")
    env.drv.conf.set_override("lock_timeout", 0, group="vtpm")
    # never the host's real state store: a stop here may write a copy
    env.drv.conf.set_override("state_backup_dir", str(env.tmp / "store"), group="vtpm")
    return ServerService(env.drv.conf, Backend(env.drv), lambda: OWNER)


@contextlib.contextmanager
def held_elsewhere(conf: Any, instance_uuid: str, operation: str = "stop") -> Iterator[None]:
    """Another thread holds the server's lock for ``operation`` meanwhile."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with locks.server_lock(conf, instance_uuid, operation):
            holding.set()
            release.wait(WAIT)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(WAIT)
        yield
    finally:
        release.set()
        thread.join(WAIT)


def lock_is_free(conf: Any, instance_uuid: str) -> bool:
    """Whether another thread could take the server's lock now (without waiting)."""
    free: list[bool] = []

    def attempt() -> None:
        try:
            with locks.server_lock(conf, instance_uuid, "probe", timeout=0):
                free.append(True)
        except exception.ServerLocked:
            free.append(False)

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join(WAIT)
    return free == [True]


def spawned(env: Env, service: ServerService, mode: str = "deployment") -> Any:
    inst = env.spawn(env.instance(mode))
    service.backend.instances.append(inst)
    env.reset()
    return inst


def test_resize_holds_the_lock_across_both_steps(env: Env, service: ServerService) -> None:
    inst = spawned(env, service)
    seen: list[tuple[str, str | None, bool]] = []
    drv = env.drv
    for step in ("migrate_disk_and_power_off", "finish_migration"):
        real = getattr(drv, step)

        def wrapped(*args: Any, _real: Any = real, _step: str = step, **kwargs: Any) -> Any:
            # Between (and before) the steps the server is held: another thread waits.
            seen.append((_step, locks.held_operation(inst.uuid),
                         lock_is_free(drv.conf, inst.uuid)))
            return _real(*args, **kwargs)

        setattr(drv, step, wrapped)
    service.resize(inst.name, set_specs={}, vcpus=2)
    assert seen == [("migrate_disk_and_power_off", "resize", False),
                    ("finish_migration", "resize", False)]
    assert service.backend.resize_pending(inst)
    assert lock_is_free(drv.conf, inst.uuid)  # released afterwards


def test_resize_of_a_locked_server_is_refused_and_changes_nothing(
        env: Env, service: ServerService) -> None:
    inst = spawned(env, service)
    with held_elsewhere(env.drv.conf, inst.uuid, "rebuild"), \
            pytest.raises(exception.ServerLocked, match="operation 'rebuild'"):
        service.resize(inst.name, set_specs={}, vcpus=2)
    assert env.names() == []
    assert env.dom(inst).active and inst.flavor.vcpus == 1
    assert not service.backend.resize_pending(inst)


@pytest.mark.parametrize("operation", ["rescue", "rebuild", "hard reboot", "stop"])
def test_operations_on_a_locked_server_are_refused(env: Env, service: ServerService,
                                                   operation: str) -> None:
    inst = spawned(env, service)
    call = {"rescue": lambda: service.rescue(inst.name),
            "rebuild": lambda: service.rebuild(inst.name),
            "hard reboot": lambda: service.reboot(inst.name, hard=True),
            "stop": lambda: service.stop(inst.name, 0)}[operation]
    with held_elsewhere(env.drv.conf, inst.uuid), \
            pytest.raises(exception.ServerLocked, match=f"cannot {operation} server"):
        call()
    assert env.names() == []
    assert env.dom(inst).active
    assert service.store.list() == []


# ------------------------------------------------------------ checks made under the lock


class RecordBackend(Backend):
    """Each find reads the server from its domain record into a new object, as the real
    ServerBackend does: what one command read is its own, and goes stale when another
    command changes the server."""

    def __init__(self, env: Env) -> None:
        super().__init__(env.drv)
        self.conn = env.conn
        self.state_base = str(env.state_base)  # the site's swtpm directory (backups)

    def find(self, name_or_uuid: str) -> Any:
        return servers.find(self.conn, name_or_uuid)

    def domain_exists(self, domain_uuid: str) -> bool:
        return domain_uuid in self.conn.domains


def record_service(env: Env) -> ServerService:
    env.drv.conf.set_override("lock_path", str(env.tmp / "locks"), group="vtpm")
    env.drv.conf.set_override("lock_timeout", 60, group="vtpm")
    env.drv.conf.set_override("state_backup_dir", str(env.tmp / "store"), group="vtpm")
    return ServerService(env.drv.conf, RecordBackend(env), lambda: OWNER)


def meanwhile(monkeypatch: pytest.MonkeyPatch, others: Callable[[], None]) -> list[str]:
    """When this thread first asks for a server's lock (its command has read the server
    and made its checks), ``others`` runs to the end in another thread (other workers'
    commands); then the lock is taken. Returns the operations that waited (one)."""
    real_lock = locks.server_lock
    me = threading.current_thread()
    landed: list[str] = []

    @contextlib.contextmanager
    def lock_after_others(conf: Any, instance_uuid: str, operation: str,
                          **kwargs: Any) -> Iterator[None]:
        if threading.current_thread() is me and not landed:
            landed.append(operation)
            failed: list[BaseException] = []

            def run() -> None:
                try:
                    others()
                except BaseException as exc:  # reported in this thread
                    failed.append(exc)

            worker = threading.Thread(target=run)
            worker.start()
            worker.join(WAIT)
            assert not worker.is_alive() and failed == []
        with real_lock(conf, instance_uuid, operation, **kwargs):
            yield

    monkeypatch.setattr(locks, "server_lock", lock_after_others)
    return landed


def other_worker(env: Env, service: ServerService) -> ServerService:
    return ServerService(env.drv.conf, service.backend, lambda: OWNER)


NO_VTPM = ("hw:tpm_version", "hw:tpm_secret_security")


def test_confirm_acts_on_the_resize_pending_under_the_lock(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The soak (issue 13): A's confirm passes its check; B confirms that resize and C
    starts another one that removes the vTPM; then A's confirm runs. It must confirm
    what is pending under the lock (C's resize, as re-read from the record), not write
    its stale flavor over it: the removed vTPM's secret is deleted and the record says
    the server has no vTPM."""
    service = record_service(env)
    inst = env.spawn(env.instance("user"))
    service.resize(inst.name, set_specs={}, vcpus=2)
    secret = recorded_secret(servers.find(env.conn, inst.uuid))
    assert secret in env.km.passphrases

    def confirm_then_remove_the_vtpm() -> None:
        other = other_worker(env, service)
        other.confirm_resize(inst.name)
        other.resize(inst.name, set_specs={}, unset=NO_VTPM, vcpus=1)

    landed = meanwhile(monkeypatch, confirm_then_remove_the_vtpm)
    service.confirm_resize(inst.name)
    assert len(landed) == 1
    assert not service.backend.resize_pending(inst)
    found = servers.find(env.conn, inst.uuid)
    assert not rules.has_vtpm(found)
    assert recorded_secret(found) is None
    assert found.flavor.vcpus == 1
    assert env.km.passphrases == {}  # the removed vTPM's passphrase did not leak
    assert env.conn.secrets == {}
    assert env.dom(inst).active


def test_revert_acts_on_the_resize_pending_under_the_lock(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A's revert passes its check; B confirms that resize (the vTPM removed) and C
    starts another one that adds a vTPM; then A's revert runs. Reverting C's resize
    on the record re-read under the lock deletes the secret C created (A's stale
    read does not name it: it would leak)."""
    service = record_service(env)
    inst = env.spawn(env.instance("user"))
    service.resize(inst.name, set_specs={}, unset=NO_VTPM)

    def confirm_then_add_a_vtpm() -> None:
        other = other_worker(env, service)
        other.confirm_resize(inst.name)
        assert env.km.passphrases == {}
        other.resize(inst.name, set_specs={"hw:tpm_version": "2.0",
                                           "hw:tpm_secret_security": "user"}, vcpus=2)
        assert len(env.km.passphrases) == 1

    landed = meanwhile(monkeypatch, confirm_then_add_a_vtpm)
    service.revert_resize(inst.name)
    assert len(landed) == 1
    assert not service.backend.resize_pending(inst)
    found = servers.find(env.conn, inst.uuid)
    assert not rules.has_vtpm(found)
    assert recorded_secret(found) is None
    assert found.flavor.vcpus == 1
    assert env.km.passphrases == {}  # the added vTPM's secret went with the revert
    assert env.conn.secrets == {}
    assert env.dom(inst).active


@pytest.mark.parametrize("confirm", [True, False])
def test_confirm_or_revert_of_a_resize_decided_meanwhile_is_refused(
        env: Env, monkeypatch: pytest.MonkeyPatch, confirm: bool) -> None:
    """B decides the resize while A's confirm or revert waits: A is refused with the
    answer of its check, under the lock, and changes nothing."""
    service = record_service(env)
    inst = env.spawn(env.instance("user"))
    service.resize(inst.name, set_specs={}, vcpus=2)
    meanwhile(monkeypatch, lambda: other_worker(env, service).confirm_resize(inst.name))
    action = service.confirm_resize if confirm else service.revert_resize
    with pytest.raises(exception.VTPMError, match="has no resize awaiting confirm or revert"):
        action(inst.name)
    found = servers.find(env.conn, inst.uuid)
    assert found.flavor.vcpus == 2 and recorded_secret(found) in env.km.passphrases
    assert env.dom(inst).active
