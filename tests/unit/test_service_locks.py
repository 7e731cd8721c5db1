"""ServerService holds the per-server lock around every operation that changes a server.

The service runs over the real VTPMDriver on the fake libvirt and key manager
(``env``); another thread holds the server's lock, and the operation must be
refused with ServerLocked before anything is touched.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fakes.service import FakeBackend
from tests.unit.conftest import OWNER, Env
from vtpm_driver import exception, policy
from vtpm_driver.ops import locks
from vtpm_driver.service import ServerService

WAIT = 60  # a bound for a stuck helper thread, never a speed check


class Backend(FakeBackend):
    """Finds the test's servers; the real driver (``env.drv``) does the work."""

    def __init__(self, drv: Any) -> None:
        super().__init__()
        self.driver = drv

    def resize_pending(self, instance: Any) -> bool:
        return bool(self.driver.resize_ops.has_backup(instance.uuid))


class Hosts:
    """Two configured hosts: h1 (the test's driver) and h2 (a fake backend)."""

    names = ("h1", "h2")
    several = True
    default = "h1"

    def __init__(self, h1: Any) -> None:
        self.backends = {"h1": h1, "h2": FakeBackend()}

    def check(self, name: str) -> str:
        return name

    def backend(self, name: str) -> Any:
        return self.backends[name]

    def side(self, name: str) -> Any:
        raise AssertionError("the move must be refused before a side is asked for")

    def close(self) -> None:
        pass


@pytest.fixture
def service(env: Env) -> ServerService:
    env.drv.conf.set_override("lock_path", str(env.tmp / "locks"), group="vtpm")
    env.drv.conf.set_override("lock_timeout", 0, group="vtpm")
    # never the host's real state store: a shelve here writes a copy
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


@pytest.mark.parametrize("operation", ["shelve", "rescue", "rebuild", "hard reboot", "stop"])
def test_operations_on_a_locked_server_are_refused(env: Env, service: ServerService,
                                                   operation: str) -> None:
    inst = spawned(env, service)
    call = {"shelve": lambda: service.shelve(inst.name),
            "rescue": lambda: service.rescue(inst.name),
            "rebuild": lambda: service.rebuild(inst.name),
            "hard reboot": lambda: service.reboot(inst.name, hard=True),
            "stop": lambda: service.stop(inst.name, 0)}[operation]
    with held_elsewhere(env.drv.conf, inst.uuid), \
            pytest.raises(exception.ServerLocked, match=f"cannot {operation} server"):
        call()
    assert env.names() == []
    assert env.dom(inst).active
    assert service.store.list() == []


@pytest.mark.parametrize("live", [True, False])
def test_migrate_of_a_locked_server_is_refused(env: Env, live: bool) -> None:
    env.drv.conf.set_override("lock_path", str(env.tmp / "locks"), group="vtpm")
    env.drv.conf.set_override("lock_timeout", 0, group="vtpm")
    hosts = Hosts(Backend(env.drv))
    service = ServerService(env.drv.conf, None, lambda: OWNER, hosts=hosts)
    inst = spawned(env, service)
    verb = "live-migrate" if live else "migrate"
    with held_elsewhere(env.drv.conf, inst.uuid), \
            pytest.raises(exception.ServerLocked, match=f"cannot {verb} server"):
        service.migrate(inst.name, "h2", live=live)
    assert env.names() == []
    assert env.dom(inst).active
    assert hosts.backends["h2"].driver.calls == []


@pytest.mark.parametrize("confirm", [True, False])
def test_confirm_or_revert_of_a_locked_migration_is_refused(env: Env, confirm: bool) -> None:
    env.drv.conf.set_override("lock_path", str(env.tmp / "locks"), group="vtpm")
    env.drv.conf.set_override("lock_timeout", 0, group="vtpm")
    hosts = Hosts(Backend(env.drv))
    service = ServerService(env.drv.conf, None, lambda: OWNER, hosts=hosts)
    inst = spawned(env, service)
    inst.system_metadata[policy.MIGRATED_FROM_KEY] = "h2"  # arrived from h2, awaiting
    action = service.confirm_resize if confirm else service.revert_resize
    with held_elsewhere(env.drv.conf, inst.uuid), \
            pytest.raises(exception.ServerLocked,
                          match=f"cannot {'confirm' if confirm else 'revert'} the migration"):
        action(inst.name)
    assert env.names() == []
    assert hosts.backends["h2"].driver.calls == []


def test_shelve_sees_a_resize_that_finished_while_it_waited_for_the_lock(
        env: Env, service: ServerService, monkeypatch: pytest.MonkeyPatch) -> None:
    """The soak (issue 13): another worker's resize ends while this shelve waits for
    the server's lock. The shelve must see it under the lock and refuse, not shelve a
    server whose resize awaits confirm or revert (its copy would carry the record read
    before the resize, its resize backup would be left behind)."""
    env.drv.conf.set_override("lock_timeout", 60, group="vtpm")
    inst = spawned(env, service)
    real_lock = locks.server_lock
    landed: list[str] = []

    @contextlib.contextmanager
    def lock_after_a_resize(conf: Any, instance_uuid: str, operation: str,
                            **kwargs: Any) -> Iterator[None]:
        if operation == "shelve" and not landed:
            landed.append(operation)
            other = ServerService(env.drv.conf, service.backend, lambda: OWNER)
            worker = threading.Thread(target=other.resize, args=(inst.name,),
                                      kwargs={"set_specs": {}, "vcpus": 2})
            worker.start()
            worker.join(WAIT)
        with real_lock(conf, instance_uuid, operation, **kwargs):
            yield

    monkeypatch.setattr(locks, "server_lock", lock_after_a_resize)
    with pytest.raises(exception.VTPMError, match="awaits confirm or revert"):
        service.shelve(inst.name)
    assert landed == ["shelve"]
    assert service.backend.resize_pending(inst)  # the other worker's resize, untouched
    assert env.dom(inst).active and inst.uuid in env.conn.domains
    assert service.store.list() == []
