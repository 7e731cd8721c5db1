"""A nova-compute killed in the middle of a move leaves no passphrase in libvirt (issue 20, 6).

``user``/``deployment`` passphrases are defined in libvirt (ephemeral, private)
only between a define and an undefine of one step: a live migration's
``pre_live_migration`` .. ``post_live_migration_at_destination``, a start in
``finish_migration``. A SIGKILL in between runs no ``finally``: the first
driver below simply stops at the define, as a killed process does. A NEW
driver on the same (fake) libvirt is the restarted nova-compute; its
``init_host`` removes every ephemeral vTPM secret, never a ``host`` mode
persistent one nor a secret of another usage type.
"""

from __future__ import annotations

import uuid

import pytest
from nova import objects
from nova.virt import fake as fake_virt
from nova.virt.libvirt import driver as libvirt_driver

from nova.virt.vtpm.driver import VTPMLibvirtDriver
from tests.nova.nova_fakes import PASSPHRASE, FakeProbe, make_flavor, make_instance
from vtpm_driver.virt import secret


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no ``except Exception`` cleans up."""


@pytest.fixture
def nova_init_host(monkeypatch):
    """Nova's own init_host needs a real host (libvirt events, CPU models...): not here."""
    called: list = []
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "init_host",
                        lambda self, host: called.append(host))
    return called


def restarted(keymgr, conn, monkeypatch) -> VTPMLibvirtDriver:
    """nova-compute started again on the same host (same libvirtd, new process)."""
    driver = VTPMLibvirtDriver(fake_virt.FakeVirtAPI(), key_manager=keymgr,
                               host_probe=FakeProbe())
    monkeypatch.setattr(driver._host, "get_connection", lambda: conn)
    return driver


def bystanders(conn) -> dict[str, str]:
    """A ``host`` mode server's persistent secret and a volume secret: never touched."""
    host_mode = str(uuid.uuid4())
    conn.secretDefineXML(secret.secret_xml(host_mode, str(uuid.uuid4()), ephemeral=False,
                                           private=False))
    volume = str(uuid.uuid4())
    conn.secretDefineXML(
        f"<secret ephemeral='yes' private='yes'><uuid>{volume}</uuid>"
        f"<usage type='volume'><name>{uuid.uuid4()}</name></usage></secret>")
    return {"host": host_mode, "volume": volume}


def defined(conn) -> dict[str, bytes | None]:
    return {u: s.stored for u, s in conn.secrets.items()}


def test_restart_after_a_kill_during_live_migration_removes_the_destinations_secret(
        drv, ctx, keymgr, conn, monkeypatch, nova_init_host, caplog):
    others = bystanders(conn)
    recorded = str(uuid.uuid4())
    keymgr.secrets[recorded] = PASSPHRASE
    instance = make_instance(secret_uuid=recorded)  # user mode
    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "pre_live_migration",
                        lambda self, *a, **k: "nova's pre_live_migration")
    data = objects.LibvirtLiveMigrateData(vtpm_secret_uuid=recorded, vtpm_secret_value=None)
    drv.pre_live_migration(ctx, instance, None, [], {}, data)
    assert defined(conn)[recorded] == PASSPHRASE.encode()
    # killed here: post_live_migration_at_destination / rollback never run

    with caplog.at_level("WARNING"):
        restarted(keymgr, conn, monkeypatch).init_host("h")
    assert nova_init_host == ["h"]  # Nova's first
    assert recorded not in conn.secrets
    assert set(conn.secrets) == set(others.values())
    assert recorded in caplog.text and instance.uuid in caplog.text
    assert PASSPHRASE not in caplog.text


def test_restart_after_a_kill_during_finish_migration_removes_the_started_secret(
        drv, ctx, keymgr, conn, monkeypatch, nova_init_host):
    """A cold migration (or resize) killed after the define, before Nova's undefine."""
    others = bystanders(conn)
    recorded = str(uuid.uuid4())
    instance = make_instance(secret_uuid=recorded, flavor=make_flavor(**{
        "hw:tpm_version": "2.0", "hw:tpm_secret_security": "deployment"}))
    keymgr.secrets[recorded] = PASSPHRASE

    def nova_finish_migration(self, context, migration, instance, *args, **kwargs):
        # Nova's _create_guest up to the define; the kill comes before its finally.
        self._get_or_create_secret_for_vtpm(context, instance)
        raise Killed()

    monkeypatch.setattr(libvirt_driver.LibvirtDriver, "finish_migration",
                        nova_finish_migration)
    with pytest.raises(Killed):
        drv.finish_migration(ctx, None, instance, {}, [], instance.image_meta, True, {})
    assert defined(conn)[recorded] == PASSPHRASE.encode()

    restarted(keymgr, conn, monkeypatch).init_host("h")
    assert set(conn.secrets) == set(others.values())


def test_start_up_removes_nothing_with_swtpm_disabled(keymgr, conn, flags, monkeypatch,
                                                      nova_init_host):
    """Nova touches nothing vTPM then (its own unit tests' mocks expect no libvirt call)."""
    flags.config(group="libvirt", swtpm_enabled=False)
    leftover = str(uuid.uuid4())
    conn.secretDefineXML(secret.secret_xml(leftover, str(uuid.uuid4()), ephemeral=True,
                                           private=True))
    restarted(keymgr, conn, monkeypatch).init_host("h")
    assert list(conn.secrets) == [leftover]


def test_a_libvirt_failure_in_the_sweep_does_not_stop_start_up(
        keymgr, conn, flags, monkeypatch, nova_init_host, caplog):
    leftover = str(uuid.uuid4())
    conn.secretDefineXML(secret.secret_xml(leftover, str(uuid.uuid4()), ephemeral=True,
                                           private=True))
    conn.fail_undefine = True
    with caplog.at_level("WARNING"):
        restarted(keymgr, conn, monkeypatch).init_host("h")  # no exception
    assert list(conn.secrets) == [leftover]
    assert "Could not remove vTPM secrets" in caplog.text
