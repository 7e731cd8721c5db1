"""Fakes for the ``vtpm_driver.virt`` unit tests: libvirt errors, secrets, domains.

The fakes keep the libvirt rules the code relies on (one vTPM secret per usage
name, private secrets refuse to give their value, undefine of a missing object
raises the right ``VIR_ERR_*``) and can be told to fail a given call.
"""

from __future__ import annotations

import libvirt
from lxml import etree


def libvirt_error(
    code: int, domain: int = libvirt.VIR_FROM_NONE, message: str = "it failed"
) -> libvirt.libvirtError:
    """A ``libvirtError`` carrying ``code``/``domain`` as the real bindings fill them."""
    exc = libvirt.libvirtError(message)
    exc.args = (message,)
    exc.err = (code, domain, message, libvirt.VIR_ERR_ERROR, None, None, None, -1, -1)
    return exc


class FakeSecret:
    def __init__(self, conn: FakeConn, xml: str) -> None:
        root = etree.fromstring(xml.encode())
        self.conn = conn
        self.xml = xml
        self.uuid = root.findtext("uuid")
        self.usage_type = root.find("usage").get("type")
        self.usage_id = root.findtext("usage/name")
        self.private = root.get("private") == "yes"
        self.stored: bytes | None = None

    def UUIDString(self) -> str:
        return self.uuid

    def usageType(self) -> int:
        return {"vtpm": libvirt.VIR_SECRET_USAGE_TYPE_VTPM}.get(
            self.usage_type, libvirt.VIR_SECRET_USAGE_TYPE_VOLUME
        )

    def XMLDesc(self, flags: int = 0) -> str:
        return self.xml

    def setValue(self, value: bytes, flags: int = 0) -> int:
        self.conn.calls.append(("setValue", self.uuid))
        if self.conn.fail_set_value:
            raise libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, message="cannot store value")
        self.stored = value
        return 0

    def value(self, flags: int = 0) -> bytes:
        if self.private:
            raise libvirt_error(libvirt.VIR_ERR_INVALID_SECRET, message="secret is private")
        return self.stored or b""

    def undefine(self) -> int:
        self.conn.calls.append(("undefine", self.uuid))
        if self.conn.fail_undefine:
            raise libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, message="cannot undefine")
        if self.conn.secrets.pop(self.uuid, None) is None:
            raise libvirt_error(libvirt.VIR_ERR_NO_SECRET, message="no secret")
        return 0


class FakeConn:
    """Just the secret API of ``virConnect``."""

    def __init__(self) -> None:
        self.secrets: dict[str, FakeSecret] = {}
        self.calls: list[tuple[str, str]] = []
        self.defined_xml: list[str] = []
        self.fail_set_value = False
        self.fail_undefine = False

    def secretDefineXML(self, xml: str, flags: int = 0) -> FakeSecret:
        self.defined_xml.append(xml)
        secret = FakeSecret(self, xml)
        for other in self.secrets.values():
            if other.uuid != secret.uuid and (other.usage_type, other.usage_id) == (
                secret.usage_type,
                secret.usage_id,
            ):
                raise libvirt_error(
                    libvirt.VIR_ERR_INTERNAL_ERROR,
                    message=f"a secret with UUID {other.uuid} already defined for use with "
                    f"{other.usage_id}",
                )
        self.secrets[secret.uuid] = secret
        self.calls.append(("define", secret.uuid))
        return secret

    def secretLookupByUUIDString(self, uuid: str) -> FakeSecret:
        try:
            return self.secrets[uuid]
        except KeyError:
            raise libvirt_error(libvirt.VIR_ERR_NO_SECRET, message="no secret") from None

    def secretLookupByUsage(self, usage_type: int, usage_id: str) -> FakeSecret:
        for secret in self.secrets.values():
            if secret.usageType() == usage_type and secret.usage_id == usage_id:
                return secret
        raise libvirt_error(libvirt.VIR_ERR_NO_SECRET, message="no secret")

    def listAllSecrets(self, flags: int = 0) -> list[FakeSecret]:
        return list(self.secrets.values())
