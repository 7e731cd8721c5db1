"""VTPMDriver lifecycle (SPEC E, F, G) over a fake libvirt and a fake key manager.

The fakes keep the rules the driver relies on: a vTPM domain only starts when
its libvirt secret exists with the right value (as swtpm needs it), the first
start "manufactures" a TPM (a state file with a random endorsement key), an
undefine without KEEP_TPM deletes the state, and Barbican refuses other users
than the owner in user/host mode. Every step appends to one event list, so
tests can assert the ORDER of Barbican and libvirt calls.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import stat
import types
import uuid
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from tests.unit.virt_fakes import FakeConn, libvirt_error
from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception, objects, resize, servers, spec, vtpm_ops
from vtpm_driver.context import RequestContext
from vtpm_driver.driver import VTPMDriver
from vtpm_driver.virt import domain

DOMCAPS = (Path(__file__).parent / "data" / "domcaps-qemu-host.xml").read_text()
KERNEL = "/boot/test-vmlinuz"
INITRD = "/boot/test-initrd.img"
OWNER = RequestContext(user_id="owner-id", project_id="proj-a", auth_token="tok-owner",
                       user_name="alice", project_name="a")
MEMBER = RequestContext(user_id="member-id", project_id="proj-a", auth_token="tok-member")

_STATE_FILES = {"2.0": ("tpm2", "tpm2-00.permall"), "1.2": ("tpm1.2", "tpm-00.permall")}


# --------------------------------------------------------------------------- fakes


class FakeProbe:
    """A sound qemu host (every trait) unless told otherwise."""

    def __init__(self, xml: str = DOMCAPS) -> None:
        self.xml = xml

    def domain_capabilities(self, virt_type: str) -> str:
        return self.xml

    def which(self, name: str) -> str:
        return f"/usr/bin/{name}"

    def user_exists(self, name: str) -> bool:
        return True

    def group_exists(self, name: str) -> bool:
        return True

    def versions(self) -> dict[str, str]:
        return {"libvirt": "9.0.0"}


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
            expected = self.conn.keymgr.passphrases.get(tpm.secret_uuid)
            if found.stored != (expected or "").encode():
                raise libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR,
                                    message="TPM result for CMD_INIT: 0x101")
            self.conn.started_with.append((tpm.secret_uuid, found.private))
            self.conn.manufacture(self._uuid, tpm.version)
        self.active = True
        self.stuck = self.conn.stuck_after_start
        self.managed_save = False
        return 0

    def destroy(self) -> int:
        self._check()
        self.conn.log("virt.destroy", self._name)
        if not self.active:
            raise libvirt_error(libvirt.VIR_ERR_OPERATION_INVALID, message="not running")
        self.active = False
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

    def metadata(self, kind: int, uri: str, flags: int = 0) -> str:
        record = domain.get_server_record(self.xml)
        if record is None:
            raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN_METADATA, message="no metadata")
        return domain.record_xml(record)

    def setMetadata(self, kind: int, xml: str, prefix: str, uri: str, flags: int) -> int:
        self.conn.log("virt.setmetadata", self._name)
        self.xml = domain.set_server_record(self.xml, domain.parse_record_xml(xml))
        return 0


class FakeLibvirt(FakeConn):
    """Domains and secrets; ``events`` is shared with the fake key manager."""

    def __init__(self, events: list[tuple[str, str]], state_base: Path) -> None:
        super().__init__()
        self.events = events
        self.state_base = state_base
        self.domains: dict[str, FakeDomain] = {}
        self.started_with: list[tuple[str, bool]] = []
        self.fail_define = False
        self.fail_start = False
        self.fail_reboot = False
        self.stuck_after_start = False
        self.keymgr: FakeKeyManager

    def log(self, what: str, detail: str) -> None:
        self.events.append((what, detail))

    def isAlive(self) -> int:
        return 1

    def manufacture(self, dom_uuid: str, version: str) -> None:
        """swtpm_setup: a new TPM (random EK) when there is no state yet."""
        subdir, name = _STATE_FILES[version]
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


class FakeKeyManager:
    """Barbican as the driver sees it: owner-only in user/host mode."""

    def __init__(self, events: list[tuple[str, str]]) -> None:
        self.events = events
        self.passphrases: dict[str, str] = {}
        self.owners: dict[str, str] = {}
        self.fail: dict[str, exception.VTPMError] = {}

    def _maybe_fail(self, op: str) -> None:
        if op in self.fail:
            raise self.fail[op]

    def _check_access(self, context: RequestContext, secret_uuid: str, mode: str) -> None:
        if mode != spec.SECRET_DEPLOYMENT and context.user_id != self.owners[secret_uuid]:
            raise exception.VTPMSecretForbidden(
                f"Barbican refused to read vTPM secret {secret_uuid} (HTTP 403)")

    def create_vtpm_secret(self, context, instance, secret_security):
        self.events.append(("barbican.create", instance.uuid))
        self._maybe_fail("create")
        secret_uuid = str(uuid.uuid4())
        passphrase = base64.b64encode(os.urandom(384)).decode()
        self.passphrases[secret_uuid] = passphrase
        self.owners[secret_uuid] = context.user_id
        instance.system_metadata["vtpm_secret_uuid"] = secret_uuid
        return secret_uuid, passphrase

    def ensure_vtpm_secret(self, context, instance, secret_security):
        secret_uuid = instance.system_metadata.get("vtpm_secret_uuid")
        if secret_uuid:
            return secret_uuid, self.get_vtpm_secret(context, instance, secret_security)
        return self.create_vtpm_secret(context, instance, secret_security)

    def get_vtpm_secret(self, context, instance, secret_security=None):
        secret_uuid = instance.system_metadata["vtpm_secret_uuid"]
        self.events.append(("barbican.get", secret_uuid))
        self._maybe_fail("get")
        if secret_uuid not in self.passphrases:
            raise exception.VTPMSecretNotFound(f"vTPM secret {secret_uuid} does not exist")
        self._check_access(context, secret_uuid, secret_security)
        return self.passphrases[secret_uuid]

    def delete_vtpm_secret(self, context, instance, secret_security=None):
        secret_uuid = instance.system_metadata.get("vtpm_secret_uuid")
        self.events.append(("barbican.delete", str(secret_uuid)))
        self._maybe_fail("delete")
        if secret_uuid in self.passphrases:
            self._check_access(context, secret_uuid, secret_security)
            del self.passphrases[secret_uuid]
        instance.system_metadata.pop("vtpm_secret_uuid", None)


class Env(types.SimpleNamespace):
    """One test's driver and fakes."""

    drv: VTPMDriver
    conn: FakeLibvirt
    km: FakeKeyManager
    events: list[tuple[str, str]]
    state_base: Path
    tmp: Path

    def instance(self, mode: str = "user", version: str = "2.0", model: str | None = None,
                 name: str = "vm1", **extra: str) -> objects.Instance:
        specs = {"hw:tpm_version": version, "hw:tpm_secret_security": mode, **extra}
        if model:
            specs["hw:tpm_model"] = model
        return servers.new_instance(name, OWNER, flavor_extra_specs=specs, kernel=KERNEL,
                                    initrd=INITRD)

    def spawn(self, inst: objects.Instance, context: RequestContext = OWNER,
              power_on: bool = True) -> objects.Instance:
        self.drv.spawn(context, inst, inst.image_meta, [], None, {}, power_on=power_on)
        return inst

    def dom(self, inst: objects.Instance) -> FakeDomain:
        return self.conn.domains[inst.uuid]

    def state_file(self, inst: objects.Instance, version: str = "2.0") -> Path:
        subdir, name = _STATE_FILES[version]
        return self.state_base / inst.uuid / subdir / name

    def names(self) -> list[str]:
        return [what for what, _ in self.events]

    def reset(self) -> None:
        self.events.clear()

    def assert_nothing_left(self, inst: objects.Instance) -> None:
        assert inst.uuid not in self.conn.domains
        assert not (self.state_base / inst.uuid).exists()
        assert self.conn.secrets == {}
        assert self.km.passphrases == {}
        assert "vtpm_secret_uuid" not in inst.system_metadata
        assert not Path(inst.console_log).exists()


@pytest.fixture
def env(tmp_path: Path) -> Env:
    conf = vtpm_conf.new_conf()
    conf.set_override("virt_type", "qemu", group="libvirt")
    conf.set_override("swtpm_enabled", True, group="libvirt")
    conf.set_override("swtpm_state_dir", str(tmp_path / "swtpm"), group="vtpm")
    conf.set_override("console_log_dir", str(tmp_path / "console"), group="vtpm")
    conf.set_override("guest_start_timeout", 1, group="vtpm")
    events: list[tuple[str, str]] = []
    state_base = tmp_path / "swtpm"
    state_base.mkdir()
    conn = FakeLibvirt(events, state_base)
    km = FakeKeyManager(events)
    conn.keymgr = km
    drv = VTPMDriver(conf, probe=FakeProbe(), hypervisor=types.SimpleNamespace(conn=conn),
                     keymgr=km)
    drv.resize_ops.backup_root = tmp_path / "resize"
    return Env(drv=drv, conn=conn, km=km, events=events, state_base=state_base, tmp=tmp_path)


def touch_console(inst: objects.Instance, text: str = "VTPM_RESULT old boot\n") -> None:
    Path(inst.console_log).write_text(text)


# --------------------------------------------------------------------------- spawn


@pytest.mark.parametrize("mode", spec.SECRET_SECURITY_MODES)
def test_spawn_defines_tpm_and_record_and_starts_with_the_secret(env: Env, mode: str) -> None:
    inst = env.spawn(env.instance(mode))
    secret_uuid = inst.system_metadata["vtpm_secret_uuid"]

    assert env.names() == ["barbican.create", "virt.define", "virt.secret.define",
                           "virt.start"]
    xml = env.dom(inst).xml
    assert domain.get_tpm(xml) == ("2.0", "tpm-tis", secret_uuid)
    record = domain.get_server_record(xml)
    assert record == servers.to_record(inst)
    assert record.system_metadata == {"vtpm_secret_uuid": secret_uuid}
    assert env.km.passphrases[secret_uuid] not in xml
    # E1/E3: private + ephemeral and gone after the start, except in host mode.
    assert env.conn.started_with == [(secret_uuid, mode != "host")]
    if mode == "host":
        assert list(env.conn.secrets) == [secret_uuid]
        assert env.conn.secrets[secret_uuid].private is False
    else:
        assert env.conn.secrets == {}
        assert ("undefine", secret_uuid) in env.conn.calls
    assert env.state_file(inst).exists()
    assert env.drv.get_info(inst) == "running"
    assert env.drv.list_instances() == ["vm1"]
    assert inst.console_log == str(env.tmp / "console" / f"{inst.uuid}.log")


def test_spawn_from_image_properties(env: Env) -> None:
    inst = servers.new_instance(
        "img", OWNER, image_properties={"hw_tpm_version": "2.0", "hw_tpm_model": "tpm-crb"},
        kernel=KERNEL)
    env.spawn(inst)
    assert domain.get_tpm(env.dom(inst).xml)[:2] == ("2.0", "tpm-crb")
    assert domain.get_server_record(env.dom(inst).xml).image_properties == {
        "hw_tpm_version": "2.0", "hw_tpm_model": "tpm-crb"}


def test_spawn_without_vtpm_touches_no_secret(env: Env) -> None:
    inst = servers.new_instance("plain", OWNER, kernel=KERNEL)
    env.spawn(inst)
    assert env.names() == ["virt.define", "virt.start"]
    assert domain.get_tpm(env.dom(inst).xml) is None
    env.drv.destroy(OWNER, inst)
    assert env.conn.domains == {}


def test_spawn_power_on_false_defines_only(env: Env) -> None:
    inst = env.spawn(env.instance(), power_on=False)
    assert env.names() == ["barbican.create", "virt.define"]
    assert env.drv.get_info(inst) == "shutdown"
    env.reset()
    env.drv.power_on(OWNER, inst, None)
    assert env.names()[:1] == ["barbican.get"]
    assert env.drv.get_info(inst) == "running"


def test_new_instance_refuses_a_bad_request_at_once() -> None:
    with pytest.raises(exception.FlavorImageConflict):
        servers.new_instance("x", OWNER, flavor_extra_specs={"hw:tpm_version": "2.0"},
                             image_properties={"hw_tpm_version": "1.2"})
    with pytest.raises(exception.InvalidVTPMConfig, match="flavor extra specs entry"):
        servers.new_instance("x", OWNER, flavor_extra_specs={"hw:tpm_version": 2})


@pytest.mark.parametrize(("change", "error", "needle"), [
    ({"hw:tpm_model": "tpm-crb", "hw:tpm_version": "1.2"}, exception.InvalidVTPMConfig,
     "tpm-crb"),
    ({"hw:tpm_secret_security": "nobody"}, exception.InvalidVTPMConfig, "'nobody'"),
])
def test_spawn_refuses_invalid_requests_before_anything(env, change, error, needle) -> None:
    inst = env.instance()
    inst.flavor.extra_specs.update(change)
    with pytest.raises(error, match=needle):
        env.spawn(inst)
    assert env.events == [] and env.conn.domains == {}


def test_spawn_refuses_what_the_host_lacks_before_anything(env: Env) -> None:
    env.drv.conf.set_override("supported_tpm_secret_security", ["user"], group="libvirt")
    with pytest.raises(exception.InvalidConfiguration) as err:
        env.spawn(env.instance("host"))
    assert "COMPUTE_SECURITY_TPM_SECRET_SECURITY_HOST" in str(err.value)
    assert env.events == []


def test_spawn_refuses_when_swtpm_is_disabled(tmp_path: Path, env: Env) -> None:
    env.drv.conf.set_override("swtpm_enabled", False, group="libvirt")
    with pytest.raises(exception.InvalidConfiguration, match="swtpm_enabled is False"):
        env.spawn(env.instance())
    assert env.events == []


def test_spawn_refuses_bad_boot_files_and_clashes_before_anything(env: Env) -> None:
    inst = env.instance()
    inst.image_meta.kernel = "relative/vmlinuz"
    with pytest.raises(exception.VirtError, match="must be absolute"):
        env.spawn(inst)
    first = env.spawn(env.instance(name="taken"))
    env.reset()
    with pytest.raises(exception.InstanceExists, match="'taken'"):
        env.spawn(env.instance(name="taken"))
    stale = env.instance(name="stale")
    (env.state_base / stale.uuid).mkdir()
    with pytest.raises(exception.VTPMError, match="already exists with no server"):
        env.spawn(stale)
    assert env.events == []
    assert list(env.conn.domains) == [first.uuid]


def _fail_barbican_create(env: Env) -> None:
    env.km.fail["create"] = exception.KeyManagerUnavailable("cannot reach Barbican")


def _fail_define(env: Env) -> None:
    env.conn.fail_define = True


def _fail_secret_define(env: Env) -> None:
    # Another libvirt secret already serves this usage (libvirt refuses a second one).
    env.conn.secretDefineXML(
        "<secret ephemeral='yes' private='yes'><uuid>11111111-2222-4333-8444-555555555555"
        f"</uuid><usage type='vtpm'><name>{env.current.uuid}</name></usage></secret>")


def _fail_set_value(env: Env) -> None:
    env.conn.fail_set_value = True


def _fail_start(env: Env) -> None:
    env.conn.fail_start = True


def _guest_never_runs(env: Env) -> None:
    env.conn.stuck_after_start = True


FAULTS = [
    pytest.param(_fail_barbican_create, exception.KeyManagerUnavailable, id="barbican"),
    pytest.param(_fail_define, exception.VirtError, id="define"),
    pytest.param(_fail_secret_define, exception.VirtError, id="secret-define"),
    pytest.param(_fail_set_value, exception.VirtError, id="secret-value"),
    pytest.param(_fail_start, exception.VirtError, id="start"),
    pytest.param(_guest_never_runs, exception.VirtError, id="not-running"),
]


@pytest.mark.parametrize("mode", ["user", "host"])
@pytest.mark.parametrize(("fault", "error"), FAULTS)
def test_g3_failed_spawn_leaves_nothing_and_retry_works(env: Env, fault, error,
                                                        mode: str) -> None:
    inst = env.current = env.instance(mode)
    fault(env)
    foreign = dict(env.conn.secrets)  # an injected conflicting secret is not ours to remove
    with pytest.raises(error) as err:
        env.spawn(inst)
    message = str(err.value)
    assert message.startswith(f"cannot spawn server 'vm1' ({inst.uuid}): ")
    assert message.endswith("(everything it had created was removed)")
    assert inst.uuid not in env.conn.domains
    assert not (env.state_base / inst.uuid).exists()
    assert env.conn.secrets == foreign
    assert env.km.passphrases == {}
    assert "vtpm_secret_uuid" not in inst.system_metadata
    assert not Path(inst.console_log).exists()

    # Fix the fault, retry with the same server: it works.
    env.km.fail.clear()
    env.conn.fail_define = env.conn.fail_set_value = env.conn.fail_start = False
    env.conn.stuck_after_start = False
    env.conn.secrets.clear()
    env.spawn(inst)
    assert env.drv.get_info(inst) == "running"


def test_failed_cleanup_is_reported(env: Env) -> None:
    inst = env.instance()
    env.conn.fail_start = True
    env.km.fail["delete"] = exception.KeyManagerUnavailable("Barbican went away")
    with pytest.raises(exception.VirtError) as err:
        env.spawn(inst)
    assert "cleanup incomplete, remove by hand: Barbican secret" in str(err.value)
    assert "Barbican went away" in str(err.value)


# --------------------------------------------------------------------------- delete


def test_f3_destroy_removes_everything_and_is_idempotent(env: Env) -> None:
    inst = env.spawn(env.instance("host"))
    touch_console(inst)
    env.reset()
    env.drv.destroy(OWNER, inst)
    assert env.names()[:2] == ["barbican.delete", "virt.destroy"]
    env.assert_nothing_left(inst)
    env.reset()
    env.drv.destroy(OWNER, inst)  # second call: a no-op
    assert env.names() == []
    with pytest.raises(exception.InstanceNotFound):
        env.drv.get_info(inst)


def test_destroy_refused_by_barbican_touches_nothing(env: Env) -> None:
    inst = env.spawn(env.instance())
    env.reset()
    with pytest.raises(exception.VTPMSecretForbidden):
        env.drv.destroy(MEMBER, inst)
    assert env.names() == ["barbican.delete"]
    assert env.dom(inst).active and env.state_file(inst).exists()
    assert inst.system_metadata["vtpm_secret_uuid"] in env.km.passphrases


def test_destroy_keeping_secrets_or_disks(env: Env) -> None:
    inst = env.spawn(env.instance())
    secret_uuid = inst.system_metadata["vtpm_secret_uuid"]
    env.drv.destroy(OWNER, inst, destroy_disks=False)
    assert inst.uuid not in env.conn.domains
    assert env.state_file(inst).exists(), "KEEP_TPM"
    assert secret_uuid in env.km.passphrases

    other = env.spawn(env.instance(name="vm2"))
    env.drv.destroy(OWNER, other, destroy_secrets=False)
    assert not (env.state_base / other.uuid).exists()
    assert other.system_metadata["vtpm_secret_uuid"] in env.km.passphrases


def test_destroy_keeps_a_console_log_the_user_chose(env: Env) -> None:
    inst = env.instance()
    inst.console_log = str(env.tmp / "mine.log")
    env.spawn(inst)
    touch_console(inst)
    env.drv.destroy(OWNER, inst)
    assert Path(inst.console_log).exists()


# --------------------------------------------------------------------------- reboot, power


def test_f2_hard_reboot_reads_barbican_before_touching_the_guest(env: Env) -> None:
    inst = env.spawn(env.instance())
    ek = env.state_file(inst).read_bytes()
    touch_console(inst)
    env.reset()
    env.drv.reboot(OWNER, inst, None, "HARD")
    names = env.names()
    assert names.index("barbican.get") < names.index("virt.destroy") < names.index(
        "virt.define") < names.index("virt.start")
    assert "virt.undefine" not in names, "redefined in place: the record never disappears"
    assert env.state_file(inst).read_bytes() == ek
    assert env.conn.secrets == {}
    assert not Path(inst.console_log).exists(), "fresh boot, fresh console"


def test_f5_hard_reboot_by_another_user_leaves_the_server_alone(env: Env) -> None:
    inst = env.spawn(env.instance())
    xml = env.dom(inst).xml
    env.reset()
    with pytest.raises(exception.VTPMSecretForbidden):
        env.drv.reboot(MEMBER, inst, None, "HARD")
    assert env.names() == ["barbican.get"]
    assert env.dom(inst).active and env.dom(inst).xml == xml
    env.drv.reboot(OWNER, inst, None, "HARD")
    assert env.dom(inst).active


def test_host_mode_restarts_without_barbican(env: Env) -> None:
    inst = env.spawn(env.instance("host"))
    env.reset()
    env.drv.reboot(MEMBER, inst, None, "HARD")
    env.drv.power_off(inst)
    env.drv.power_on(MEMBER, inst, None)
    assert not [e for e in env.names() if e.startswith("barbican")]
    assert "virt.secret.define" not in env.names()
    assert env.dom(inst).active
    # The persistent secret vanished (libvirtd lost it): read Barbican once, define it again.
    env.conn.secrets.clear()
    env.reset()
    env.drv.reboot(OWNER, inst, None, "HARD")
    assert env.names()[0] == "barbican.get"
    assert list(env.conn.secrets) == [inst.system_metadata["vtpm_secret_uuid"]]


def test_soft_reboot_needs_no_secret_and_falls_back_to_hard(env: Env) -> None:
    inst = env.spawn(env.instance())
    env.reset()
    env.drv.reboot(MEMBER, inst, None, "SOFT")  # the guest reboots itself: no secret
    assert env.names() == ["virt.reboot"]
    env.conn.fail_reboot = True
    env.reset()
    env.drv.reboot(OWNER, inst, None, "SOFT")
    assert env.names()[:2] == ["virt.reboot", "barbican.get"]
    assert "virt.start" in env.names()
    env.drv.power_off(inst)
    env.reset()
    env.drv.reboot(OWNER, inst, None, "SOFT")  # stopped: soft reboot starts it
    assert "virt.reboot" not in env.names() and env.dom(inst).active
    with pytest.raises(exception.VTPMError, match="reboot_type='WARM'"):
        env.drv.reboot(OWNER, inst, None, "WARM")


def test_power_off_and_on(env: Env) -> None:
    inst = env.spawn(env.instance("deployment"))
    env.drv.power_off(inst, timeout=5, retry_interval=1)
    assert "virt.shutdown" in env.names()
    assert env.drv.get_info(inst) == "shutdown"
    env.reset()
    env.drv.power_on(OWNER, inst, None)
    assert env.names()[0] == "barbican.get"
    assert env.drv.get_info(inst) == "running" and env.conn.secrets == {}
    env.reset()
    env.drv.power_on(OWNER, inst, None)  # already running: nothing
    assert env.names() == []


def test_suspend_and_resume(env: Env) -> None:
    inst = env.spawn(env.instance())
    touch_console(inst)
    env.drv.suspend(None, inst)
    assert env.drv.get_info(inst) == "suspended"
    with pytest.raises(exception.VirtError, match="it is shut off"):
        env.drv.suspend(None, inst)
    env.reset()
    with pytest.raises(exception.VTPMSecretForbidden):
        env.drv.resume(MEMBER, inst, None)
    assert env.names() == ["barbican.get"] and env.drv.get_info(inst) == "suspended"
    env.drv.resume(OWNER, inst, None)
    assert env.drv.get_info(inst) == "running" and env.conn.secrets == {}
    assert Path(inst.console_log).exists(), "a resume continues the same boot"
    env.drv.suspend(None, inst)
    env.drv.power_on(OWNER, inst, None)  # start of a suspended server resumes it
    assert env.drv.get_info(inst) == "running"
    env.drv.suspend(None, inst)
    env.drv.reboot(OWNER, inst, None, "HARD")  # a hard reboot discards the saved state
    assert not env.dom(inst).managed_save and env.dom(inst).active


# --------------------------------------------------------------------------- resize


def resize_to(env: Env, inst: objects.Instance, extra_specs: dict[str, str],
              revert: bool = False, power_on: bool = True) -> None:
    """What Nova's compute manager does around the four driver calls."""
    new = objects.Flavor(vcpus=2, memory_mb=512, extra_specs=extra_specs)
    inst.new_flavor = new
    env.drv.migrate_disk_and_power_off(OWNER, inst, None, new, None)
    inst.old_flavor, inst.flavor = inst.flavor, new
    env.drv.finish_migration(OWNER, None, inst, "[]", None, inst.image_meta, True, {},
                             power_on=power_on)
    if revert:
        inst.flavor = inst.old_flavor
        env.drv.finish_revert_migration(OWNER, inst, None, None)
    else:
        env.drv.confirm_migration(OWNER, None, inst, None)
    inst.old_flavor = inst.new_flavor = None


def test_f4_resize_keeping_the_tpm_keeps_its_state(env: Env) -> None:
    inst = env.spawn(env.instance())
    ek = env.state_file(inst).read_bytes()
    secret_uuid = inst.system_metadata["vtpm_secret_uuid"]
    resize_to(env, inst, {"hw:tpm_version": "2.0"})
    assert env.state_file(inst).read_bytes() == ek
    assert inst.system_metadata["vtpm_secret_uuid"] == secret_uuid
    record = domain.get_server_record(env.dom(inst).xml)
    assert (record.vcpus, record.memory_mb) == (2, 512)
    assert not (env.tmp / "resize" / inst.uuid).exists()
    assert env.conn.secrets == {} and env.dom(inst).active


def test_f4_version_change_is_a_fresh_tpm_and_revert_restores_the_old(env: Env) -> None:
    inst = env.spawn(env.instance())
    old_file = env.state_file(inst)
    ek = old_file.read_bytes()
    before = old_file.stat()
    secret_uuid = inst.system_metadata["vtpm_secret_uuid"]
    new = objects.Flavor(extra_specs={"hw:tpm_version": "1.2"})
    inst.new_flavor = new
    env.drv.migrate_disk_and_power_off(OWNER, inst, "localhost", new, None)
    backup = env.tmp / "resize" / inst.uuid
    assert (backup / "swtpm" / "tpm2" / "tpm2-00.permall").read_bytes() == ek
    assert stat.S_IMODE(backup.stat().st_mode) == 0o700
    inst.old_flavor, inst.flavor = inst.flavor, new
    env.drv.finish_migration(OWNER, None, inst, "[]", None, None, True, {})
    assert not old_file.exists(), "fresh TPM: the 2.0 state is gone"
    assert env.state_file(inst, "1.2").exists()
    assert domain.get_tpm(env.dom(inst).xml) == ("1.2", "tpm-tis", secret_uuid)
    # Revert: Nova has put the old flavor back.
    inst.flavor = inst.old_flavor
    env.reset()
    env.drv.finish_revert_migration(OWNER, inst, None, None)
    assert env.names()[0] == "barbican.get"
    assert old_file.read_bytes() == ek
    after = old_file.stat()
    assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (
        before.st_uid, before.st_gid, stat.S_IMODE(before.st_mode))
    assert not env.state_file(inst, "1.2").exists()
    assert domain.get_tpm(env.dom(inst).xml) == ("2.0", "tpm-tis", secret_uuid)
    assert domain.get_server_record(env.dom(inst).xml).flavor_extra_specs == {
        "hw:tpm_version": "2.0", "hw:tpm_secret_security": "user"}
    assert not backup.exists() and env.dom(inst).active


def test_f4_vtpm_added_creates_a_secret_and_revert_deletes_it(env: Env) -> None:
    inst = servers.new_instance("plain", OWNER, kernel=KERNEL)
    env.spawn(inst)
    resize_to(env, inst, {"hw:tpm_version": "2.0"}, revert=True)
    assert env.km.passphrases == {} and "vtpm_secret_uuid" not in inst.system_metadata
    assert domain.get_tpm(env.dom(inst).xml) is None
    assert not (env.state_base / inst.uuid).exists()
    resize_to(env, inst, {"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"})
    secret_uuid = inst.system_metadata["vtpm_secret_uuid"]
    assert list(env.km.passphrases) == [secret_uuid]
    assert domain.get_tpm(env.dom(inst).xml) == ("2.0", "tpm-crb", secret_uuid)
    assert domain.get_server_record(env.dom(inst).xml).system_metadata == {
        "vtpm_secret_uuid": secret_uuid}


def test_f4_vtpm_removed_deletes_the_secret_on_confirm_only(env: Env) -> None:
    inst = env.spawn(env.instance("host"))
    ek = env.state_file(inst).read_bytes()
    resize_to(env, inst, {}, revert=True)
    assert env.state_file(inst).read_bytes() == ek
    assert len(env.km.passphrases) == 1 and len(env.conn.secrets) == 1
    new = objects.Flavor(extra_specs={})
    inst.new_flavor = new
    env.drv.migrate_disk_and_power_off(OWNER, inst, None, new, None)
    inst.old_flavor, inst.flavor = inst.flavor, new
    env.drv.finish_migration(OWNER, None, inst, "[]", None, None, True, {})
    assert len(env.km.passphrases) == 1, "kept until confirm"
    with pytest.raises(exception.VTPMSecretForbidden):
        env.drv.confirm_migration(MEMBER, None, inst, None)
    assert (env.tmp / "resize" / inst.uuid).exists(), "a refused confirm changes nothing"
    env.drv.confirm_migration(OWNER, None, inst, None)
    assert env.km.passphrases == {} and env.conn.secrets == {}
    assert domain.get_server_record(env.dom(inst).xml).system_metadata == {}
    assert not (env.state_base / inst.uuid).exists()
    assert not (env.tmp / "resize" / inst.uuid).exists()


def test_resize_between_user_and_host_moves_the_libvirt_secret(env: Env) -> None:
    inst = env.spawn(env.instance("user"))
    resize_to(env, inst, {"hw:tpm_version": "2.0", "hw:tpm_secret_security": "host"})
    assert [s.private for s in env.conn.secrets.values()] == [False]
    resize_to(env, inst, {"hw:tpm_version": "2.0", "hw:tpm_secret_security": "user"})
    assert env.conn.secrets == {} and env.dom(inst).active


@pytest.mark.parametrize(("old", "new"), [("user", "deployment"), ("deployment", "host")])
def test_resize_to_or_from_deployment_is_refused_before_anything(env: Env, old, new) -> None:
    inst = env.spawn(env.instance(old))
    env.reset()
    flavor = objects.Flavor(extra_specs={"hw:tpm_version": "2.0",
                                         "hw:tpm_secret_security": new})
    with pytest.raises(exception.OperationNotSupportedForVTPM, match="change owner"):
        env.drv.migrate_disk_and_power_off(OWNER, inst, None, flavor, None)
    assert env.events == [] and env.dom(inst).active


def test_resize_refusals(env: Env) -> None:
    inst = env.spawn(env.instance())
    flavor = objects.Flavor(extra_specs={"hw:tpm_version": "2.0"})
    with pytest.raises(exception.VTPMError, match="only resizes on this host"):
        env.drv.migrate_disk_and_power_off(OWNER, inst, "compute-2", flavor, None)
    with pytest.raises(exception.InvalidVTPMConfig):
        env.drv.migrate_disk_and_power_off(
            OWNER, inst, None, objects.Flavor(extra_specs={"hw:tpm_version": "3"}), None)
    assert env.dom(inst).active
    env.drv.migrate_disk_and_power_off(OWNER, inst, None, flavor, None)
    with pytest.raises(exception.VTPMError, match="already in progress"):
        env.drv.migrate_disk_and_power_off(OWNER, inst, None, flavor, None)


def test_failed_finish_deletes_the_secret_it_created(env: Env) -> None:
    inst = servers.new_instance("plain", OWNER, kernel=KERNEL)
    env.spawn(inst)
    new = objects.Flavor(extra_specs={"hw:tpm_version": "2.0"})
    env.drv.migrate_disk_and_power_off(OWNER, inst, None, new, None)
    inst.old_flavor, inst.flavor = inst.flavor, new
    env.conn.fail_start = True
    with pytest.raises(exception.VirtError):
        env.drv.finish_migration(OWNER, None, inst, "[]", None, None, True, {})
    assert env.km.passphrases == {} and env.conn.secrets == {}
    env.conn.fail_start = False
    inst.flavor = inst.old_flavor
    env.drv.finish_revert_migration(OWNER, inst, None, None)
    assert domain.get_tpm(env.dom(inst).xml) is None and env.dom(inst).active


def test_standalone_revert_without_old_flavor_uses_the_stash(env: Env) -> None:
    inst = env.spawn(env.instance())
    ek = env.state_file(inst).read_bytes()
    new = objects.Flavor(extra_specs={"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"})
    env.drv.migrate_disk_and_power_off(OWNER, inst, None, new, None)
    inst.flavor = new
    env.drv.finish_migration(OWNER, None, inst, "[]", None, None, True, {})
    found = servers.find(env.conn, "vm1")  # a new process: no old/new flavor known
    env.drv.finish_revert_migration(OWNER, found, None, None)
    assert env.state_file(inst).read_bytes() == ek
    assert domain.get_tpm(env.dom(inst).xml)[1] == "tpm-tis"


# --------------------------------------------------------------------------- refused ops


@pytest.mark.parametrize(("call", "operation"), [
    (lambda d, i: d.rebuild(OWNER, i, None, [], None, {}, [], None, None), "rebuild"),
    (lambda d, i: d.rescue(OWNER, i, None, None, None, None, None), "rescue"),
    (lambda d, i: d.shelve(OWNER, i), "shelve"),
    (lambda d, i: d.evacuate(OWNER, i), "evacuate"),
    (lambda d, i: d.live_migration(OWNER, i, "h2", None, None), "live-migration"),
])
def test_f6_unsupported_operations(env: Env, call, operation: str) -> None:
    inst = env.instance()
    with pytest.raises(exception.OperationNotSupportedForVTPM) as err:
        call(env.drv, inst)
    assert str(err.value).startswith(
        f"operation '{operation}' is not supported for vTPM-enabled server 'vm1'")
    assert "Nova" in str(err.value)
    plain = servers.new_instance("plain", OWNER, kernel=KERNEL)
    with pytest.raises(exception.VTPMError, match="not implemented") as err:
        call(env.drv, plain)
    assert not isinstance(err.value, exception.OperationNotSupportedForVTPM)


def test_live_migration_reason_depends_on_the_mode(env: Env) -> None:
    with pytest.raises(exception.OperationNotSupportedForVTPM, match="not implemented"):
        env.drv.live_migration(OWNER, env.instance("host"), "h2", None, None)
    with pytest.raises(exception.OperationNotSupportedForVTPM, match="without the owner"):
        env.drv.live_migration(OWNER, env.instance("user"), "h2", None, None)


# --------------------------------------------------------------------------- host, store


def test_c4_lists_domains_with_an_emulated_tpm(env: Env) -> None:
    with_tpm = env.spawn(env.instance(name="a"))
    env.spawn(servers.new_instance("b", OWNER, kernel=KERNEL))
    env.conn.defineXML(
        f"<domain><name>foreign</name><uuid>{uuid.uuid4()}</uuid><devices><tpm model='tpm-tis'>"
        "<backend type='passthrough'/></tpm></devices></domain>")
    assert env.drv._vtpm_servers_on_host() == [with_tpm.uuid]
    env.drv.conf.set_override("swtpm_enabled", False, group="libvirt")
    with pytest.raises(exception.InvalidConfiguration, match=with_tpm.uuid):
        env.drv.init_host()


def test_servers_round_trip_through_the_domain_record(env: Env) -> None:
    inst = env.spawn(env.instance(name="b"))
    env.spawn(env.instance(name="a"))
    found = servers.find(env.conn, inst.uuid)
    assert found == dataclasses_replace(inst)
    assert servers.find(env.conn, "b") == found
    assert [i.name for i in servers.list_all(env.conn)] == ["a", "b"]
    env.conn.defineXML(f"<domain><name>notours</name><uuid>{uuid.uuid4()}</uuid></domain>")
    with pytest.raises(exception.InstanceNotFound, match="not a vtpm-driver server"):
        servers.find(env.conn, "notours")
    with pytest.raises(exception.InstanceNotFound):
        servers.find(env.conn, "nothing")


def dataclasses_replace(inst: objects.Instance) -> objects.Instance:
    """What a record keeps: everything but the flavor's name and resize bookkeeping."""
    import dataclasses

    return dataclasses.replace(inst, old_flavor=None, new_flavor=None,
                               flavor=dataclasses.replace(inst.flavor, name="standalone"))


# --------------------------------------------------------------------------- G1


def test_g1_no_passphrase_in_logs_errors_xml_or_reprs(env: Env,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    inst = env.spawn(env.instance())
    passphrase = env.km.passphrases[inst.system_metadata["vtpm_secret_uuid"]]
    env.drv.reboot(OWNER, inst, None, "HARD")
    env.drv.suspend(None, inst)
    env.drv.resume(OWNER, inst, None)
    resize_to(env, inst, {"hw:tpm_version": "1.2"}, revert=True)
    errors = []
    env.conn.fail_start = True
    for attempt in (lambda: env.drv.reboot(OWNER, inst, None, "HARD"),
                    lambda: env.spawn(env.instance(name="x"))):
        with pytest.raises(exception.VTPMError) as err:
            attempt()
        errors += [str(err.value), repr(err.value)]
    start = vtpm_ops.StartSecret("u", passphrase, False)
    texts = [r.getMessage() for r in caplog.records] + [repr(r.args) for r in caplog.records]
    texts += [*errors, repr(start), repr(env.drv.ops), repr(env.drv.resize_ops), repr(inst)]
    texts += [d.xml for d in env.conn.domains.values()] + env.conn.defined_xml
    texts += [p.read_text(errors="replace") for p in (env.tmp / "console").glob("*")]
    assert len(caplog.records) > 10
    for text in texts:
        assert passphrase not in text and passphrase[:32] not in text
    assert "***" in repr(start)


def test_start_secret_repr_hides_the_passphrase() -> None:
    value = secrets.token_urlsafe(32)
    shown = repr(vtpm_ops.StartSecret("abc", value, True))
    assert value not in shown and "secret_uuid='abc'" in shown


def test_copy_tree_preserving_keeps_modes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "tpm2").mkdir(parents=True, mode=0o700)
    (src / "tpm2" / "f").write_bytes(b"x")
    (src / "tpm2" / "f").chmod(0o600)
    resize.copy_tree_preserving(src, tmp_path / "dst")
    assert stat.S_IMODE((tmp_path / "dst" / "tpm2").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "dst" / "tpm2" / "f").stat().st_mode) == 0o600
    assert (tmp_path / "dst" / "tpm2" / "f").read_bytes() == b"x"
