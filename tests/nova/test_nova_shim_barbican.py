"""The Nova shim against the real Keystone + Barbican stack (functional).

A Nova ``RequestContext`` carrying a real Keystone token goes through the
shim to vtpm_driver's KeyManager and Barbican: the secret is created with the
owner-only ACL, another member of the project cannot start the server, and a
server delete removes the secret. libvirt is the fake connection (the
libvirt side is covered by test_nova_shim_libvirt.py). Needs
``tools/keymgr-stack.sh start``; fails (never skips) under CI=true without it.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
from nova import context as nova_context
from nova import exception as nova_exception
from nova.compute import task_states
from nova.virt import fake as fake_virt
from nova.virt.libvirt import driver as libvirt_driver

from nova.virt.vtpm import translate
from nova.virt.vtpm.driver import VTPMLibvirtDriver
from tests.nova.nova_fakes import FakeLibvirt, FakeProbe, Flags, make_flavor, make_instance
from vtpm_driver import exception, keymgr
from vtpm_driver.keymgr import context as vtpm_context

pytestmark = pytest.mark.functional


def nova_context_for(creds: dict[str, str]) -> nova_context.RequestContext:
    """What nova-compute receives for a request by this user: token, roles, catalog."""
    ours = vtpm_context.RequestContext.from_credentials(
        creds["auth_url"], creds["username"], creds["password"], creds["project_name"],
        creds["user_domain_name"], creds["project_domain_name"], timeout=30)
    return nova_context.RequestContext(
        user_id=ours.user_id, project_id=ours.project_id, auth_token=ours.auth_token,
        roles=list(ours.roles), service_catalog=ours.service_catalog,
        user_name=ours.user_name, project_name=ours.project_name)


@pytest.fixture
def drv(keymgr_stack, monkeypatch):
    flags = Flags()
    flags.config(group="libvirt", virt_type="qemu", swtpm_enabled=True)
    driver = VTPMLibvirtDriver(fake_virt.FakeVirtAPI(), host_probe=FakeProbe())
    flags.config(group="key_manager", barbican_endpoint=None)  # from the token's catalog
    flags.config(group="vtpm", owner_only_acl=True)
    conn = FakeLibvirt()
    monkeypatch.setattr(driver._host, "get_connection", lambda: conn)
    driver.fake_conn = conn
    yield driver
    flags.clear()


def recorded(instance: Any, secret_uuid: str) -> types.SimpleNamespace:
    """A stand-in server that records ``secret_uuid`` (to look it up after a delete)."""
    return types.SimpleNamespace(uuid=instance.uuid, flavor=instance.flavor,
                                 system_metadata={keymgr.SYSMETA_KEY: secret_uuid})


def secret_exists(drv: VTPMLibvirtDriver, ctx: Any, secret_uuid: str, instance: Any) -> bool:
    try:
        drv.vtpm_key_manager.get_vtpm_secret(
            translate.request_context(ctx), recorded(instance, secret_uuid), "user")
    except exception.VTPMSecretNotFound:
        return False
    return True


def test_owner_only_secret_from_spawn_to_delete(drv, clouds, monkeypatch):
    owner = nova_context_for(clouds["owner"])
    member = nova_context_for(clouds["member"])
    assert owner.project_id == member.project_id != ""
    instance = make_instance(make_flavor(**{"hw:tpm_version": "2.0"}))
    instance.user_id, instance.project_id = owner.user_id, owner.project_id
    secret_uuid = None
    try:
        # Spawn: secret created (POST + ACL PUT) before Nova's _create_guest starts it.
        with drv._vtpm_passphrase_first(owner, instance, create=True):
            drv._create_guest(owner, "<domain/>", instance)
        secret_uuid = instance.system_metadata[keymgr.SYSMETA_KEY]
        stored, private = drv.fake_conn.secrets_at_start[secret_uuid]
        assert private and len(stored) == 512
        assert drv.fake_conn.secrets == {}
        assert drv.vtpm_key_manager.get_vtpm_secret(
            translate.request_context(owner), instance).encode() == stored

        # Another member of the project may not start it: refused before Nova's reboot.
        monkeypatch.setattr(libvirt_driver.LibvirtDriver, "_hard_reboot",
                            lambda *a, **k: pytest.fail("the guest was touched"))
        with pytest.raises(nova_exception.VTPMSecretForbidden, match="HTTP 403"):
            drv._hard_reboot(member, instance, [], None)

        # Delete by the owner (Nova passes an elevated context): the secret is gone
        # and the compute manager's castellan call has nothing left to do.
        monkeypatch.setattr(libvirt_driver.LibvirtDriver, "destroy", lambda *a, **k: None)
        instance.task_state = task_states.DELETING
        drv.destroy(owner.elevated(), instance, [])
        assert keymgr.SYSMETA_KEY not in instance.system_metadata
        assert not secret_exists(drv, owner, secret_uuid, instance)
        secret_uuid = None
    finally:
        if secret_uuid is not None:  # the test failed midway: leave no orphan
            drv.vtpm_key_manager.delete_vtpm_secret(
                translate.request_context(owner), recorded(instance, secret_uuid), "user")
