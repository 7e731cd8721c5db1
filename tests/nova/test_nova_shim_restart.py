"""A nova-compute killed in the middle of a move leaves no passphrase in libvirt (issue 20, 6).

``user``/``deployment`` passphrases are defined in libvirt (ephemeral, private)
only between a define and an undefine of one step: a live migration's
``pre_live_migration`` .. ``post_live_migration_at_destination``, a start in
``finish_migration``. A SIGKILL in between runs no ``finally``: the first
driver below simply stops at the define, as a killed process does. A NEW
driver on the same (fake) libvirt is the restarted nova-compute; its
``init_host`` asks Nova's record (a real Nova database, sqlite in memory) which
servers are on this host or named by its unfinished migrations, and removes
the secret of each ``user``/``deployment`` one; never a ``host`` mode secret,
a secret of another usage type, or one of a server Nova does not place here.
"""

from __future__ import annotations

import uuid

import oslo_messaging
import pytest
from nova import context as nova_context
from nova import objects
from nova.db import migration as db_migration
from nova.db.main import api as main_db_api
from nova.virt import fake as fake_virt
from nova.virt.libvirt import driver as libvirt_driver
from oslo_db.sqlalchemy import enginefacade
from oslo_db.sqlalchemy import test_fixtures as db_fixtures

from nova.virt.vtpm.driver import VTPMLibvirtDriver
from tests.nova.nova_fakes import (
    PASSPHRASE,
    FakeLibvirt,
    FakeProbe,
    make_flavor,
    make_instance,
)
from vtpm_driver.virt import secret

HOST = "h"  # the restarted nova-compute's CONF.host (make_instance's host)
NODE = FakeLibvirt.hostname  # its compute node, as libvirt names it
USER = {"hw:tpm_version": "2.0", "hw:tpm_secret_security": "user"}
HOST_MODE = {"hw:tpm_version": "2.0", "hw:tpm_secret_security": "host"}
DEPLOYMENT = {"hw:tpm_version": "2.0", "hw:tpm_secret_security": "deployment"}

_SCHEMA: list[str] = []  # Nova's main schema, built once (as Nova's Database fixture caches it)


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no ``except Exception`` cleans up."""


@pytest.fixture
def nova_init_host(monkeypatch):
    """Nova's own init_host needs a real host (libvirt events, CPU models...): not here."""
    called: list = []
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "init_host",
                        lambda self, host: called.append(host))
    return called


@pytest.fixture
def nova_db(flags):
    """Nova's main database, sqlite in memory, as Nova's own Database fixture sets it up
    (that fixture's module is not imported: it would monkey-patch eventlet for the run).

    Yields an admin context to write Nova's record with.
    """
    flags.config(group="database", connection="sqlite://")  # read by InstanceList queries
    engine_facade = db_fixtures.ReplaceEngineFacadeFixture(
        main_db_api.context_manager, enginefacade.transaction_context())
    engine_facade.setUp()
    main_db_api.context_manager.configure(connection="sqlite://", sqlite_synchronous=False)
    connection = main_db_api.get_engine().connect()
    if not _SCHEMA:
        db_migration.db_sync(database="main")
        _SCHEMA.append("".join(connection.connection.iterdump()))
    else:
        connection.connection.executescript(_SCHEMA[0])
    yield nova_context.get_admin_context()
    connection.close()
    engine_facade.cleanUp()


def record(context, instance, host: str = HOST) -> None:
    """Nova's record of ``instance``, on ``host`` (its node: libvirt's name for it)."""
    objects.Instance(
        context, uuid=instance.uuid, host=host, node=NODE if host == HOST else f"{host}-node",
        compute_id=1 if host == HOST else 2, project_id=instance.project_id,
        user_id=instance.user_id, vm_state=instance.vm_state, flavor=instance.flavor,
        old_flavor=instance.old_flavor, new_flavor=instance.new_flavor,
        system_metadata=dict(instance.system_metadata)).create()


def record_migration(context, instance, status: str, source: str = "src",
                     kind: str = "live-migration") -> None:
    """Nova's record of a move of ``instance`` from ``source`` to this host."""
    objects.Migration(
        context, instance_uuid=instance.uuid, source_compute=source,
        source_node=f"{source}-node", dest_compute=HOST, dest_node=NODE, dest_compute_id=1,
        status=status, migration_type=kind).create()


def restarted(keymgr, conn, monkeypatch) -> VTPMLibvirtDriver:
    """nova-compute started again on the same host (same libvirtd, new process)."""
    driver = VTPMLibvirtDriver(fake_virt.FakeVirtAPI(), key_manager=keymgr,
                               host_probe=FakeProbe())
    monkeypatch.setattr(driver._host, "get_connection", lambda: conn)
    return driver


def leave_secret(conn, instance, *, persistent: bool = False) -> str:
    """A vTPM secret of ``instance`` in libvirt, as a start (or ``host`` mode) defines it."""
    secret_uuid = str(uuid.uuid4())
    conn.secretDefineXML(secret.secret_xml(secret_uuid, instance.uuid, ephemeral=not persistent,
                                           private=not persistent))
    conn.secrets[secret_uuid].stored = PASSPHRASE.encode()
    return secret_uuid


def bystanders(context, conn) -> dict[str, str]:
    """Secrets the sweep never touches: a ``host`` mode server's (on this host) and a volume's."""
    host_mode = make_instance(flavor=make_flavor(**HOST_MODE))
    record(context, host_mode)
    volume = str(uuid.uuid4())
    conn.secretDefineXML(
        f"<secret ephemeral='yes' private='yes'><uuid>{volume}</uuid>"
        f"<usage type='volume'><name>{uuid.uuid4()}</name></usage></secret>")
    return {"host": leave_secret(conn, host_mode, persistent=True), "volume": volume}


def defined(conn) -> dict[str, bytes | None]:
    return {u: s.stored for u, s in conn.secrets.items()}


@pytest.mark.parametrize("status", [
    "running",  # the destination died while libvirt migrated
    "error",    # the source then gave up (its pre_live_migration call timed out)
])
def test_restart_after_a_kill_during_live_migration_removes_the_destinations_secret(
        drv, ctx, keymgr, conn, monkeypatch, nova_init_host, nova_db, caplog, status):
    """Only the migration names this host: ``instance.host`` is still the source."""
    others = bystanders(nova_db, conn)
    recorded = str(uuid.uuid4())
    keymgr.secrets[recorded] = PASSPHRASE
    instance = make_instance(secret_uuid=recorded)  # user mode
    record(nova_db, instance, host="src")
    record_migration(nova_db, instance, status)
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "pre_live_migration",
                        lambda self, *a, **k: "nova's pre_live_migration")
    data = objects.LibvirtLiveMigrateData(vtpm_secret_uuid=recorded, vtpm_secret_value=None)
    drv.pre_live_migration(ctx, instance, None, [], {}, data)
    assert defined(conn)[recorded] == PASSPHRASE.encode()
    # killed here: post_live_migration_at_destination / rollback never run

    with caplog.at_level("WARNING"):
        restarted(keymgr, conn, monkeypatch).init_host(HOST)
    assert nova_init_host == [HOST]  # Nova's first
    assert set(conn.secrets) == set(others.values())
    assert recorded in caplog.text and instance.uuid in caplog.text
    assert PASSPHRASE not in caplog.text


def test_restart_after_a_kill_during_finish_migration_removes_the_started_secret(
        drv, ctx, keymgr, conn, monkeypatch, nova_init_host, nova_db, caplog):
    """A cold migration (or resize) killed after the define, before Nova's undefine.

    Nova set ``instance.host`` to this host before ``finish_migration``.
    """
    others = bystanders(nova_db, conn)
    recorded = str(uuid.uuid4())
    instance = make_instance(secret_uuid=recorded, flavor=make_flavor(**DEPLOYMENT))
    keymgr.secrets[recorded] = PASSPHRASE
    record(nova_db, instance)
    record_migration(nova_db, instance, "post-migrating", kind="migration")

    def nova_finish_migration(self, context, migration, instance, *args, **kwargs):
        # Nova's _create_guest up to the define; the kill comes before its finally.
        self._get_or_create_secret_for_vtpm(context, instance)
        raise Killed()

    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "finish_migration",
                        nova_finish_migration)
    with pytest.raises(Killed):
        drv.finish_migration(ctx, None, instance, {}, [], instance.image_meta, True, {})
    assert defined(conn)[recorded] == PASSPHRASE.encode()

    restarted(keymgr, conn, monkeypatch).init_host(HOST)
    assert set(conn.secrets) == set(others.values())

    caplog.clear()
    with caplog.at_level("WARNING"):
        restarted(keymgr, conn, monkeypatch).init_host(HOST)  # idempotent
    assert set(conn.secrets) == set(others.values())
    assert caplog.text == ""


def test_only_the_secrets_of_user_and_deployment_servers_nova_places_here_go(
        keymgr, conn, monkeypatch, nova_init_host, nova_db):
    user_here = make_instance(flavor=make_flavor(**USER))
    record(nova_db, user_here)
    # a resize from host to user mode, not confirmed: the secret may be the host mode one
    resized = make_instance(flavor=make_flavor(**USER))
    resized.old_flavor = make_flavor(**HOST_MODE)
    record(nova_db, resized)
    # Nova places this one elsewhere (its move here is over): the audit judges its secret
    elsewhere = make_instance(flavor=make_flavor(**USER))
    record(nova_db, elsewhere, host="other")
    record_migration(nova_db, elsewhere, "completed", source="other")
    # a server without a vTPM (a secret of its UUID is not ours to judge either)
    plain = make_instance(flavor=make_flavor())
    record(nova_db, plain)
    kept = {leave_secret(conn, resized, persistent=True), leave_secret(conn, elsewhere),
            leave_secret(conn, plain), *bystanders(nova_db, conn).values()}
    removed = leave_secret(conn, user_here)

    restarted(keymgr, conn, monkeypatch).init_host(HOST)
    assert set(conn.secrets) == kept
    assert removed not in conn.secrets


@pytest.mark.parametrize(("specs", "image_properties"), [
    ({**USER, "hw:tpm_secret_security": "bogus"}, {}),  # nova.exception.Invalid
    # flavor and image disagree: FlavorImageConflict, or (nova 34) a NotImplementedError
    # while Nova words it (an image_meta rebuilt from system_metadata has no name)
    (USER, {"hw_tpm_version": "1.2"}),
])
def test_a_server_whose_vtpm_request_cannot_be_read_keeps_its_secret(
        keymgr, conn, monkeypatch, nova_init_host, nova_db, caplog, specs, image_properties):
    unreadable = make_instance(flavor=make_flavor(**specs), **image_properties)
    record(nova_db, unreadable)
    other = make_instance(flavor=make_flavor(**USER))
    record(nova_db, other)
    kept = leave_secret(conn, unreadable)
    leave_secret(conn, other)

    with caplog.at_level("WARNING"):
        restarted(keymgr, conn, monkeypatch).init_host(HOST)
    assert list(conn.secrets) == [kept]  # the other server's secret went
    assert "cannot tell its secret mode" in caplog.text and unreadable.uuid in caplog.text


def test_start_up_removes_nothing_with_swtpm_disabled(keymgr, conn, flags, monkeypatch,
                                                      nova_init_host, caplog):
    """Nova touches nothing vTPM then: neither its database nor libvirt is asked."""
    flags.config(group="libvirt", swtpm_enabled=False)
    leftover = leave_secret(conn, make_instance(flavor=make_flavor(**USER)))
    with caplog.at_level("WARNING"):
        restarted(keymgr, conn, monkeypatch).init_host(HOST)
    assert list(conn.secrets) == [leftover]
    assert caplog.text == ""


def test_a_libvirt_failure_in_the_sweep_does_not_stop_start_up(
        keymgr, conn, monkeypatch, nova_init_host, nova_db, caplog):
    instance = make_instance(flavor=make_flavor(**USER))
    record(nova_db, instance)
    leftover = leave_secret(conn, instance)
    conn.fail_undefine = True
    with caplog.at_level("WARNING"):
        restarted(keymgr, conn, monkeypatch).init_host(HOST)  # no exception
    assert list(conn.secrets) == [leftover]
    assert "Could not remove the libvirt vTPM secret of server" in caplog.text
    assert instance.uuid in caplog.text
    assert PASSPHRASE not in caplog.text


def test_a_database_failure_in_the_sweep_does_not_stop_start_up(
        keymgr, conn, monkeypatch, nova_init_host, nova_db, caplog):
    """The conductor does not answer (nova-compute reaches the database through it)."""
    instance = make_instance(flavor=make_flavor(**USER))
    record(nova_db, instance)
    leftover = leave_secret(conn, instance)

    def conductor_timeout(*args, **kwargs):
        raise oslo_messaging.MessagingTimeout("Timed out waiting for a reply")

    monkeypatch.setattr(objects.MigrationList, "get_in_progress_and_error", conductor_timeout)
    with caplog.at_level("WARNING"):
        restarted(keymgr, conn, monkeypatch).init_host(HOST)  # no exception
    assert list(conn.secrets) == [leftover]
    assert "Could not remove the vTPM secrets an interrupted operation left" in caplog.text
    assert "Timed out waiting for a reply" in caplog.text
