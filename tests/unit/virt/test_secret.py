"""The libvirt vTPM secret: XML (E1), define/undefine/list, LibvirtSecretStore."""

from __future__ import annotations

import logging
import uuid

import libvirt
import pytest
from lxml import etree

from tests.fakes.libvirt import FakeConn
from vtpm_driver import exception
from vtpm_driver.virt import connection, secret

SECRET = "6f1c2a7e-0d1b-4c53-9a44-6a0b7b1f5d10"
INSTANCE = "0b7e6f0e-3a8a-4f51-8c1f-1d2a3b4c5d6e"
PASSPHRASE = "c2VjcmV0LXBhc3NwaHJhc2U=" * 20  # looks like D1's base64 passphrase


def test_secret_xml_user_mode() -> None:
    root = etree.fromstring(
        secret.secret_xml(SECRET, INSTANCE, ephemeral=True, private=True).encode()
    )
    assert root.tag == "secret"
    assert root.get("ephemeral") == "yes"
    assert root.get("private") == "yes"
    assert root.findtext("uuid") == SECRET
    assert root.find("usage").get("type") == "vtpm"
    assert root.findtext("usage/name") == INSTANCE
    assert INSTANCE in root.findtext("description")
    assert root.find("value") is None


def test_secret_xml_host_mode_and_canonical_uuids() -> None:
    xml = secret.secret_xml(SECRET.upper(), INSTANCE.upper(), ephemeral=False, private=False)
    root = etree.fromstring(xml.encode())
    assert (root.get("ephemeral"), root.get("private")) == ("no", "no")
    assert root.findtext("uuid") == SECRET
    assert root.findtext("usage/name") == INSTANCE


@pytest.mark.parametrize("bad", ["", None, "not-a-uuid", "../../etc", 42, "x" * 10000])
def test_secret_xml_refuses_bad_uuid(bad: object) -> None:
    with pytest.raises(exception.InvalidVTPMConfig, match="vtpm_secret_uuid"):
        secret.secret_xml(bad, INSTANCE, ephemeral=True, private=True)  # type: ignore[arg-type]
    with pytest.raises(exception.InvalidVTPMConfig, match="instance uuid"):
        secret.secret_xml(SECRET, bad, ephemeral=True, private=True)  # type: ignore[arg-type]


@pytest.mark.parametrize("persistent", [False, True])
def test_define_sets_value_outside_xml(persistent: bool) -> None:
    conn = FakeConn()
    defined = secret.define_vtpm_secret(conn, SECRET, INSTANCE, PASSPHRASE, persistent=persistent)
    assert defined.stored == PASSPHRASE.encode()
    assert conn.calls == [("define", SECRET), ("setValue", SECRET)]
    (xml,) = conn.defined_xml
    assert PASSPHRASE not in xml
    assert PASSPHRASE[:16] not in xml
    flag = "no" if persistent else "yes"
    root = etree.fromstring(xml.encode())
    assert (root.get("ephemeral"), root.get("private")) == (flag, flag)


def test_define_undefines_when_set_value_fails() -> None:
    conn = FakeConn()
    conn.fail_set_value = True
    with pytest.raises(exception.VirtError) as info:
        secret.define_vtpm_secret(conn, SECRET, INSTANCE, PASSPHRASE, persistent=False)
    assert conn.secrets == {}
    assert conn.calls == [("define", SECRET), ("setValue", SECRET), ("undefine", SECRET)]
    assert SECRET in str(info.value)
    assert PASSPHRASE[:16] not in str(info.value)
    assert connection.libvirt_error_code(info.value) == libvirt.VIR_ERR_INTERNAL_ERROR


@pytest.mark.parametrize("bad", ["", b"", None, 12])
def test_define_refuses_empty_passphrase_without_showing_it(bad: object) -> None:
    conn = FakeConn()
    with pytest.raises(exception.InvalidVTPMConfig, match="passphrase"):
        secret.define_vtpm_secret(conn, SECRET, INSTANCE, bad, persistent=False)  # type: ignore[arg-type]
    assert conn.calls == []


def test_define_conflict_names_both() -> None:
    conn = FakeConn()
    secret.define_vtpm_secret(conn, SECRET, INSTANCE, PASSPHRASE, persistent=False)
    other = str(uuid.uuid4())
    with pytest.raises(exception.VirtError) as info:
        secret.define_vtpm_secret(conn, other, INSTANCE, PASSPHRASE, persistent=False)
    assert other in str(info.value) and INSTANCE in str(info.value)
    assert set(conn.secrets) == {SECRET}


def test_lookup_and_undefine_are_idempotent() -> None:
    conn = FakeConn()
    assert secret.lookup_vtpm_secret(conn, SECRET) is None
    assert secret.undefine_vtpm_secret(conn, SECRET) is False
    secret.define_vtpm_secret(conn, SECRET, INSTANCE, PASSPHRASE, persistent=False)
    assert secret.lookup_vtpm_secret(conn, SECRET.upper()) is conn.secrets[SECRET]
    assert secret.lookup_vtpm_secret_by_instance(conn, INSTANCE) is conn.secrets[SECRET]
    assert secret.undefine_vtpm_secret(conn, SECRET) is True
    assert secret.undefine_vtpm_secret(conn, SECRET) is False
    assert secret.lookup_vtpm_secret_by_instance(conn, INSTANCE) is None


def test_lookup_refuses_a_non_vtpm_secret() -> None:
    conn = FakeConn()
    conn.secretDefineXML(
        f"<secret><uuid>{SECRET}</uuid><usage type='volume'><volume>/x</volume></usage></secret>"
    )
    with pytest.raises(exception.VirtError, match="not a vTPM secret"):
        secret.lookup_vtpm_secret(conn, SECRET)


def test_list_only_vtpm_secrets_with_flags() -> None:
    conn = FakeConn()
    host_secret, host_instance = str(uuid.uuid4()), str(uuid.uuid4())
    secret.define_vtpm_secret(conn, SECRET, INSTANCE, PASSPHRASE, persistent=False)
    secret.define_vtpm_secret(conn, host_secret, host_instance, PASSPHRASE, persistent=True)
    conn.secretDefineXML(
        f"<secret><uuid>{uuid.uuid4()}</uuid><usage type='volume'><volume>/x</volume>"
        "</usage></secret>"
    )
    listed = secret.list_vtpm_secrets(conn)
    assert sorted(listed) == listed
    assert set(listed) == {
        (SECRET, INSTANCE, True, True),
        (host_secret, host_instance, False, False),
    }


def test_passphrase_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    conn = FakeConn()
    store = secret.LibvirtSecretStore(conn)
    store.define(SECRET, INSTANCE, PASSPHRASE, persistent=False)
    assert store.find(INSTANCE) == SECRET
    assert store.undefine(SECRET) is True and store.undefine(SECRET) is False
    conn.fail_set_value = True
    with pytest.raises(exception.VirtError):
        secret.define_vtpm_secret(conn, SECRET, INSTANCE, PASSPHRASE, persistent=False)
    assert caplog.records, "expected debug records to check"
    assert PASSPHRASE[:16] not in caplog.text


def test_secret_store_over_a_connection_factory() -> None:
    conn = FakeConn()
    store = secret.LibvirtSecretStore(lambda: conn)
    assert store.find(INSTANCE) is None
    store.define(SECRET, INSTANCE, PASSPHRASE, persistent=True)
    assert store.find(INSTANCE.upper()) == SECRET
    assert PASSPHRASE not in repr(store)
