"""The one fake libvirt: errors, secrets, domains, a connection, a capabilities probe.

The fakes keep the libvirt rules the code relies on (one vTPM secret per usage
name, private secrets refuse to give their value, undefine of a missing object
raises the right ``VIR_ERR_*``, a vTPM guest only starts with the right
secret) and can be told to fail a given call.

* :class:`FakeConn`: the secret API of ``virConnect``;
* :class:`FakeLibvirt`: secrets plus domains (:class:`FakeDomain`), with an
  event log shared with :class:`tests.fakes.keymgr.FakeKeyManager`;
* :class:`ScriptedDomain`/:class:`ScriptedConn`: one domain whose every call
  can be made to fail, for the flag and error-mapping tests of ``virt.guest``;
* :class:`CapsConnection`: what :class:`~vtpm_driver.virt.probe.LibvirtHostProbe` reads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import libvirt
from lxml import etree

from vtpm_driver.virt import domain, record

if TYPE_CHECKING:
    from tests.fakes.keymgr import FakeKeyManager

STATE_FILES = {"2.0": ("tpm2", "tpm2-00.permall"), "1.2": ("tpm1.2", "tpm-00.permall")}


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
        hook = getattr(self.conn, "on_event", None)
        if hook is not None:  # not an event of the list, but a test can stop here
            hook("virt.secret.undefine", self.uuid)
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
        self.fail_secret_define = False

    def secretDefineXML(self, xml: str, flags: int = 0) -> FakeSecret:
        self.defined_xml.append(xml)
        if self.fail_secret_define:
            raise libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, message="cannot define secret")
        secret = FakeSecret(self, xml)
        same_uuid = self.secrets.get(secret.uuid)
        if same_uuid is not None and same_uuid.usage_type != secret.usage_type:
            raise libvirt_error(
                libvirt.VIR_ERR_INTERNAL_ERROR,
                message=f"a secret with UUID {secret.uuid} is already defined for use with "
                f"{same_uuid.usage_id}",
            )
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


class FakeDomain:
    def __init__(self, conn: FakeLibvirt, xml: str) -> None:
        self.conn = conn
        self.xml = xml
        root = etree.fromstring(xml.encode())
        self._name = root.findtext("name")
        self._uuid = root.findtext("uuid")
        self.active = False
        self.managed_save = False
        self.stuck = False  # start "works" but the guest never runs
        self.paused = False  # libvirt has it paused (e.g. a start whose caller died)

    def _check(self) -> None:
        if self.conn.domains.get(self._uuid) is not self:
            raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, message="no domain")

    def name(self) -> str:
        return self._name

    def UUIDString(self) -> str:
        return self._uuid

    def XMLDesc(self, flags: int = 0) -> str:
        self._check()
        return self.xml

    def isActive(self) -> int:
        self._check()
        return int(self.active)

    def isPersistent(self) -> int:
        return 1

    def state(self) -> list[int]:
        self._check()
        if self.active and self.paused:
            return [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_STARTING_UP]
        if self.active and not self.stuck:
            return [libvirt.VIR_DOMAIN_RUNNING, 1]
        return [libvirt.VIR_DOMAIN_SHUTOFF, 0]

    def createWithFlags(self, flags: int = 0) -> int:
        self._check()
        self.conn.log("virt.start", self._name)
        if self.conn.fail_start:
            raise libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, message="cannot open kernel")
        tpm = domain.get_tpm(self.xml)
        if tpm is not None:
            found = self.conn.secrets.get(tpm.secret_uuid)
            if found is None:
                raise libvirt_error(libvirt.VIR_ERR_NO_SECRET, message="no secret")
            keymgr = self.conn.keymgr
            expected = keymgr.passphrases.get(tpm.secret_uuid) if keymgr else None
            if found.stored != (expected or "").encode():
                raise libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR,
                                    message="TPM result for CMD_INIT: 0x101")
            self.conn.started_with.append((tpm.secret_uuid, found.private))
            self.conn.manufacture(self._uuid, tpm.version)
        self.active = True
        self.stuck = self.conn.stuck_after_start
        self.managed_save = False
        if flags & libvirt.VIR_DOMAIN_START_PAUSED:
            self.paused = True
        return 0

    def destroy(self) -> int:
        self._check()
        self.conn.log("virt.destroy", self._name)
        if not self.active:
            raise libvirt_error(libvirt.VIR_ERR_OPERATION_INVALID, message="not running")
        self.active = False
        self.paused = False  # a destroyed guest is shut off, paused or not before
        return 0

    def shutdown(self) -> int:
        self.conn.log("virt.shutdown", self._name)
        self.active = False
        return 0

    def reboot(self, flags: int = 0) -> int:
        self.conn.log("virt.reboot", self._name)
        if self.conn.fail_reboot:
            raise libvirt_error(libvirt.VIR_ERR_OPERATION_FAILED, message="no ACPI")
        return 0

    def undefineFlags(self, flags: int) -> int:
        self._check()
        self.conn.log("virt.undefine", self._name)
        del self.conn.domains[self._uuid]
        if not flags & libvirt.VIR_DOMAIN_UNDEFINE_KEEP_TPM:
            state_dir = Path(self.conn.state_base, self._uuid)
            if state_dir.exists():
                for path in sorted(state_dir.rglob("*"), reverse=True):
                    path.rmdir() if path.is_dir() else path.unlink()
                state_dir.rmdir()
        return 0

    def managedSave(self, flags: int = 0) -> int:
        self.conn.log("virt.managedsave", self._name)
        self.active = False
        self.managed_save = True
        return 0

    def hasManagedSaveImage(self, flags: int = 0) -> int:
        return int(self.managed_save)

    def managedSaveRemove(self, flags: int = 0) -> int:
        self.managed_save = False
        return 0

    def resume(self) -> int:
        self._check()
        if not self.active:
            raise libvirt_error(libvirt.VIR_ERR_OPERATION_INVALID, message="not running")
        self.conn.log("virt.resume", self._name)
        self.paused = False
        return 0

    def metadata(self, kind: int, uri: str, flags: int = 0) -> str:
        server = record.get_server_record(self.xml)
        if server is None:
            raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN_METADATA, message="no metadata")
        return record.record_xml(server)

    def setMetadata(self, kind: int, xml: str, prefix: str, uri: str, flags: int) -> int:
        self.conn.log("virt.setmetadata", self._name)
        self.xml = record.set_server_record(self.xml, record.parse_record_xml(xml))
        return 0


class FakeLibvirt(FakeConn):
    """Domains and secrets; ``events`` is shared with the fake key manager.

    A vTPM domain only starts when its libvirt secret exists with the value
    the key manager holds (as swtpm needs it); the first start "manufactures"
    a TPM (a state file with a random endorsement key); an undefine without
    KEEP_TPM deletes the state.
    """

    def __init__(self, events: list[tuple[str, str]] | None = None,
                 state_base: Path | str = "/nonexistent/swtpm") -> None:
        super().__init__()
        self.events = events if events is not None else []
        self.state_base = state_base
        self.domains: dict[str, FakeDomain] = {}
        self.started_with: list[tuple[str, bool]] = []
        self.fail_define = False
        self.fail_start = False
        self.fail_reboot = False
        self.stuck_after_start = False
        self.keymgr: FakeKeyManager | None = None  # checks the value a start is given
        #: Called as ``on_event(what, detail)`` after each logged step: a test can block
        #: there (races) or raise a BaseException there (a process killed mid-way).
        self.on_event: Callable[[str, str], None] | None = None

    def log(self, what: str, detail: str) -> None:
        self.events.append((what, detail))
        if self.on_event is not None:
            self.on_event(what, detail)

    def isAlive(self) -> int:
        return 1

    def manufacture(self, dom_uuid: str, version: str) -> None:
        """swtpm_setup: a new TPM (random EK) when there is no state yet."""
        subdir, name = STATE_FILES[version]
        path = Path(self.state_base, dom_uuid, subdir, name)
        if not path.exists():
            path.parent.mkdir(parents=True, mode=0o700)
            path.write_bytes(b"\x02\x01\x00\x0a\x00\x09" + os.urandom(16))
            path.chmod(0o600)
            if os.geteuid() == 0:  # swtpm's files belong to its user
                for owned in (path, path.parent):
                    os.chown(owned, 65534, 65534)

    def defineXML(self, xml: str) -> FakeDomain:
        new = FakeDomain(self, xml)
        self.log("virt.define", new.name())
        if self.fail_define:
            raise libvirt_error(libvirt.VIR_ERR_XML_ERROR, message="bad XML")
        for other in self.domains.values():
            if other.name() == new.name() and other.UUIDString() != new.UUIDString():
                raise libvirt_error(libvirt.VIR_ERR_OPERATION_FAILED,
                                    message=f"domain '{new.name()}' already exists with uuid")
        existing = self.domains.get(new.UUIDString())
        if existing is not None:
            existing.xml = xml
            return existing
        self.domains[new.UUIDString()] = new
        return new

    def lookupByUUIDString(self, value: str) -> FakeDomain:
        try:
            return self.domains[value]
        except KeyError:
            raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, message="no domain") from None

    def lookupByName(self, name: str) -> FakeDomain:
        for dom in self.domains.values():
            if dom.name() == name:
                return dom
        raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, message="no domain")

    def listAllDomains(self, flags: int = 0) -> list[FakeDomain]:
        return list(self.domains.values())

    def secretDefineXML(self, xml: str, flags: int = 0):
        self.log("virt.secret.define", etree.fromstring(xml.encode()).findtext("uuid"))
        return super().secretDefineXML(xml, flags)


class ScriptedDomain:
    """One domain; ``fail[method]`` makes that call raise."""

    def __init__(self, name: str = "vm1", state: int = libvirt.VIR_DOMAIN_SHUTOFF) -> None:
        self._name = name
        self._state = state
        self.calls: list[tuple[str, object]] = []
        self.fail: dict[str, libvirt.libvirtError] = {}
        self.metadata_xml: str | None = None
        self.shutdown_works = True
        self.presses_needed = 1
        self.managed_save = False

    def _maybe_fail(self, method: str) -> None:
        if method in self.fail:
            raise self.fail[method]

    def name(self) -> str:
        return self._name

    def state(self) -> list[int]:
        self._maybe_fail("state")
        return [self._state, 0]

    def isActive(self) -> int:
        self._maybe_fail("isActive")
        return int(self._state != libvirt.VIR_DOMAIN_SHUTOFF)

    def hasManagedSaveImage(self, flags: int = 0) -> int:
        self._maybe_fail("hasManagedSaveImage")
        return int(self.managed_save)

    def reboot(self, flags: int = 0) -> int:
        self.calls.append(("reboot", flags))
        self._maybe_fail("reboot")
        return 0

    def createWithFlags(self, flags: int) -> int:
        self.calls.append(("create", flags))
        self._maybe_fail("create")
        self._state = libvirt.VIR_DOMAIN_RUNNING
        return 0

    def shutdown(self) -> int:
        self.calls.append(("shutdown", None))
        self._maybe_fail("shutdown")
        self.presses_needed -= 1
        if self.shutdown_works and self.presses_needed <= 0:
            self._state = libvirt.VIR_DOMAIN_SHUTOFF
        return 0

    def destroy(self) -> int:
        self.calls.append(("destroy", None))
        self._maybe_fail("destroy")
        self._state = libvirt.VIR_DOMAIN_SHUTOFF
        return 0

    def undefineFlags(self, flags: int) -> int:
        self.calls.append(("undefine", flags))
        self._maybe_fail("undefine")
        return 0

    def metadata(self, kind: int, uri: str, flags: int) -> str:
        if self.metadata_xml is None:
            raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN_METADATA, libvirt.VIR_FROM_DOMAIN)
        assert (kind, uri) == (libvirt.VIR_DOMAIN_METADATA_ELEMENT, record.NS)
        return self.metadata_xml


class ScriptedConn:
    """Domain lookups and define over :class:`ScriptedDomain` objects."""

    def __init__(self, domains: list[ScriptedDomain]) -> None:
        self.domains = domains
        self.by_uuid: dict[str, ScriptedDomain] = {}
        self.defined: list[str] = []
        self.define_error: libvirt.libvirtError | None = None

    def lookupByName(self, name: str) -> ScriptedDomain:
        for dom in self.domains:
            if dom.name() == name:
                return dom
        raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, "no domain")

    def lookupByUUIDString(self, uuid: str) -> ScriptedDomain:
        try:
            return self.by_uuid[uuid]
        except KeyError:
            raise libvirt_error(
                libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, "no domain"
            ) from None

    def listAllDomains(self, flags: int = 0) -> list[ScriptedDomain]:
        return list(self.domains)

    def defineXML(self, xml: str) -> ScriptedDomain:
        if self.define_error is not None:
            raise self.define_error
        self.defined.append(xml)
        return ScriptedDomain()


class CapsConnection:
    """What the host probe asks libvirt: capabilities and versions."""

    def __init__(self, caps: str = "", error: libvirt.libvirtError | None = None) -> None:
        self.caps = caps
        self.error = error
        self.calls: list[tuple] = []
        self.closed = False

    def getDomainCapabilities(self, *args):
        self.calls.append(args)
        if self.error:
            raise self.error
        return self.caps

    def getLibVersion(self):
        return 9_000_000

    def getType(self):
        return "QEMU"

    def getVersion(self):
        return 7_002_022

    def close(self):
        self.closed = True
        return 0
