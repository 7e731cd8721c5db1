"""The shim's adapters: key manager by ``[key_manager] backend``, Nova's Host, the host check."""

from __future__ import annotations

from unittest import mock

import pytest
from castellan.common import exception as castellan_exception
from nova import crypto
from nova import exception as nova_exception
from nova.tests import fixtures as nova_fixtures  # noqa: F401 - registers Nova's test opts
from nova.virt import fake as fake_virt
from nova.virt.libvirt import driver as libvirt_driver

from nova.virt.vtpm import keymgr as shim_keymgr
from nova.virt.vtpm.driver import VTPMLibvirtDriver
from tests.nova.nova_fakes import (
    CONF,
    PASSPHRASE,
    FakeLibvirt,
    FakeProbe,
    make_flavor,
    make_instance,
    nova_ctx,
)
from vtpm_driver import exception
from vtpm_driver.model import request


@pytest.mark.parametrize("backend", [
    "barbican", "castellan.key_manager.barbican_key_manager.BarbicanKeyManager"])
def test_barbican_backend_gets_our_owner_only_client(flags, backend):
    flags.config(group="key_manager", backend=backend)
    km = shim_keymgr.build(CONF)
    assert isinstance(km, shim_keymgr.OwnerOnlyBarbican)
    assert km.token_required is True


def test_other_backend_gets_castellan_with_one_warning(flags, caplog):
    flags.config(group="key_manager", backend="vault")
    with caplog.at_level("WARNING"):
        km = shim_keymgr.build(CONF)
    assert isinstance(km, shim_keymgr.CastellanKeyManager)
    assert km.token_required is False
    assert [r for r in caplog.records if "owner-only" in r.getMessage()]


class _Castellan:
    """What nova.crypto reaches: castellan's KeyManager API (store/get/delete)."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.stored: dict[str, object] = {}
        self.contexts: list = []

    def store(self, context, managed_object):
        self.contexts.append(context)
        self.stored["6f1c5b8e-4a1e-4c1e-9b1e-2f1e4a1e4c1e"] = managed_object
        return "6f1c5b8e-4a1e-4c1e-9b1e-2f1e4a1e4c1e"

    def get(self, context, secret_uuid):
        self.contexts.append(context)
        if self.fail is not None:
            raise self.fail
        return self.stored[secret_uuid]

    def delete(self, context, secret_uuid):
        self.contexts.append(context)
        if self.fail is not None:
            raise self.fail
        self.stored.pop(secret_uuid)


@pytest.fixture
def castellan(monkeypatch):
    fake = _Castellan()
    monkeypatch.setattr(crypto, "_get_key_manager", lambda: fake)
    return fake


def test_castellan_adapter_creates_reads_and_deletes_novas_secret(castellan):
    km, ctx, instance = shim_keymgr.CastellanKeyManager(), nova_ctx(), make_instance()
    secret_uuid, passphrase = km.ensure_vtpm_secret(ctx, instance, request.SECRET_USER)
    assert instance.system_metadata["vtpm_secret_uuid"] == secret_uuid
    assert isinstance(passphrase, str) and len(passphrase) == 512
    assert km.get_vtpm_secret(ctx, instance) == passphrase
    km.delete_vtpm_secret(ctx, instance)
    assert "vtpm_secret_uuid" not in instance.system_metadata
    assert castellan.contexts == [ctx, ctx, ctx]


def test_castellan_adapter_uses_novas_service_user_for_deployment(castellan, monkeypatch):
    service = object()
    monkeypatch.setattr("nova.context.get_nova_service_user_context", lambda: service)
    km = shim_keymgr.CastellanKeyManager()
    km.ensure_vtpm_secret(nova_ctx(), make_instance(), request.SECRET_DEPLOYMENT)
    assert castellan.contexts == [service]


@pytest.mark.parametrize(("error", "ours"), [
    (castellan_exception.KeyManagerError("Key manager error: Forbidden: not allowed"),
     exception.VTPMSecretForbidden),
    (castellan_exception.ManagedObjectNotFoundError(), exception.VTPMSecretNotFound),
    (castellan_exception.KeyManagerError("Key manager error: 503"),
     exception.KeyManagerUnavailable),
])
def test_castellan_errors_are_mapped_once(castellan, error, ours):
    km, instance = shim_keymgr.CastellanKeyManager(), make_instance(secret_uuid=None)
    km.ensure_vtpm_secret(nova_ctx(), instance, request.SECRET_USER)
    castellan.fail = error
    with pytest.raises(ours) as info:
        km.get_vtpm_secret(nova_ctx(), instance)
    if ours is exception.VTPMSecretForbidden:
        assert "Key manager error: Forbidden: not allowed" in str(info.value)


def test_get_without_a_recorded_secret_is_not_found_without_asking(castellan):
    with pytest.raises(exception.VTPMSecretNotFound):
        shim_keymgr.CastellanKeyManager().get_vtpm_secret(nova_ctx(), make_instance())
    assert castellan.contexts == []


@pytest.fixture
def drv(flags, monkeypatch):
    conn = FakeLibvirt()
    driver = VTPMLibvirtDriver(fake_virt.FakeVirtAPI(), host_probe=FakeProbe())
    monkeypatch.setattr(driver._host, "get_connection", lambda: conn)
    driver.conn = conn
    return driver


def test_secret_store_defines_finds_and_undefines_through_novas_host(drv):
    store, conn = drv.vtpm_secrets, drv.conn
    instance = make_instance()
    secret_uuid = "0f1c5b8e-4a1e-4c1e-9b1e-2f1e4a1e4c1e"
    store.define(secret_uuid, instance.uuid, PASSPHRASE, persistent=False)
    assert conn.secrets[secret_uuid].stored == PASSPHRASE.encode()
    assert store.find(instance.uuid) == secret_uuid
    assert store.undefine(secret_uuid) is True
    assert store.undefine(secret_uuid) is False  # idempotent
    assert conn.secrets == {}
    assert store.find(instance.uuid) is None


def test_host_errors_are_mapped_to_ours(drv, monkeypatch):
    def down():
        raise nova_exception.HypervisorUnavailable()

    monkeypatch.setattr(drv._host, "get_connection", down)
    with pytest.raises(exception.HypervisorUnavailable):
        drv.vtpm_secrets.find(make_instance().uuid)


def test_the_host_check_is_always_ours(flags, monkeypatch):
    """Replacing Nova's check changes nothing: ours checks what Nova's does, and more."""
    conn = FakeLibvirt()
    driver = VTPMLibvirtDriver(fake_virt.FakeVirtAPI(), host_probe=FakeProbe(binaries=()))
    monkeypatch.setattr(driver._host, "get_connection", lambda: conn)
    with mock.patch.object(libvirt_driver.LibvirtDriver, "_check_vtpm_support") as nova_check:
        with pytest.raises(nova_exception.InvalidConfiguration, match="swtpm not found"):
            driver._check_vtpm_support()
    nova_check.assert_not_called()


def test_the_driver_adds_no_public_method_to_novas_api(drv):
    """Nova's ComputeDriver API is the driver's contract (Nova's test_public_api_signatures)."""
    from nova.virt import driver as virt_driver

    ours = {name for name, value in vars(VTPMLibvirtDriver).items()
            if callable(value) and not name.startswith("_")}
    assert ours - set(dir(virt_driver.ComputeDriver)) == set()


def test_deleting_with_castellan_needs_no_token(drv, castellan):
    drv._vtpm_keymgr = shim_keymgr.CastellanKeyManager()
    instance = make_instance(make_flavor(**{"hw:tpm_version": "2.0"}))
    drv._vtpm_keymgr.ensure_vtpm_secret(nova_ctx(), instance, request.SECRET_USER)
    drv._vtpm_delete_secret(nova_ctx(token=None), instance, instance.flavor)
    assert castellan.stored == {}
    assert "vtpm_secret_uuid" not in instance.system_metadata
