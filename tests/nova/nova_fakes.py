"""Fakes and builders shared by the Nova shim tests (no test functions here).

Importing this module prepares Nova's global CONF the way nova-compute does
before it loads a driver: objects registered, dynamic options registered,
command line parsed (empty).
"""

from __future__ import annotations

import dataclasses
import pathlib
import uuid
from typing import Any

import libvirt
import nova.conf
import nova.conf.neutron
from nova import context as nova_context
from nova import objects
from nova.compute import vm_states
from nova.virt.libvirt import config as vconfig

from tests.fakes.libvirt import FakeConn
from vtpm_driver import exception
from vtpm_driver.keymgr import context as vtpm_context

CONF = nova.conf.CONF
DATA = pathlib.Path(__file__).parent.parent / "unit" / "data"
PASSPHRASE = "cGFzc3BocmFzZQ==" * 32  # what the fake Barbican hands out
TOKEN = "gAAAA-owner-token"

objects.register_all()
nova.conf.neutron.register_dynamic_opts(CONF)
CONF([], project="nova", default_config_files=[])


class Flags:
    """Overrides on Nova's CONF for one test (oslo's Config fixture would reset CONF)."""

    def __init__(self) -> None:
        self._set: list[tuple[str, str | None]] = []

    def config(self, group: str | None = None, **values: Any) -> None:
        for name, value in values.items():
            CONF.set_override(name, value, group)
            self._set.append((name, group))

    def clear(self) -> None:
        for name, group in reversed(self._set):
            CONF.clear_override(name, group)


class FakeKeyManager:
    """vtpm_driver.keymgr.KeyManager's API; records (operation, context, mode) in order."""

    def __init__(self, log: list) -> None:
        self.log = log
        self.fail: Exception | None = None
        self.secrets: dict[str, str] = {}
        self.consents: dict[str, Any] = {}  # record id -> vtpm_driver.model.consent.Consent
        self.owner_only = False  # True: user-mode reads by anyone but the owner get 403

    def _call(self, operation: str, context: Any, instance: Any, mode: Any) -> None:
        self.log.append((operation, context, instance.uuid, mode))
        if self.fail is not None:
            raise self.fail

    def create_vtpm_secret(self, context, instance, secret_security):
        self._call("create", context, instance, secret_security)
        secret_uuid = str(uuid.uuid4())
        self.secrets[secret_uuid] = PASSPHRASE
        instance.system_metadata["vtpm_secret_uuid"] = secret_uuid
        return secret_uuid, PASSPHRASE

    def get_vtpm_secret(self, context, instance, secret_security=None):
        self._call("get", context, instance, secret_security)
        if self.owner_only and (secret_security or "user") == "user" and (
                getattr(context, "user_id", None) != instance.user_id):
            raise exception.VTPMSecretForbidden(
                "Barbican refused to read the secret (HTTP 403): owner-only ACL")
        return self.secrets[instance.system_metadata["vtpm_secret_uuid"]]

    def ensure_vtpm_secret(self, context, instance, secret_security):
        if instance.system_metadata.get("vtpm_secret_uuid"):
            secret_uuid = instance.system_metadata["vtpm_secret_uuid"]
            return secret_uuid, self.get_vtpm_secret(context, instance, secret_security)
        return self.create_vtpm_secret(context, instance, secret_security)

    def delete_vtpm_secret(self, context, instance, secret_security=None):
        self._call("delete", context, instance, secret_security)
        secret_uuid = instance.system_metadata.pop("vtpm_secret_uuid", None)
        self.secrets.pop(secret_uuid, None)

    # An owner's consent (vtpm_driver.keymgr.KeyManager.get_consent / consent_context).
    def get_consent(self, record_id):
        if record_id not in self.consents:
            raise exception.VTPMSecretNotFound(f"no consent record {record_id}")
        return self.consents[record_id]

    def consent_context(self, granted):
        self.log.append(("consent", None, granted.server, granted.record_id))
        return vtpm_context.RequestContext(user_id=granted.owner, project_id="proj-a",
                                           auth_token="tok-by-consent")


@dataclasses.dataclass
class FakeProbe:
    """vtpm_driver.model.hostcheck.HostProbe answering from captured domain capabilities."""

    domcaps: str = "domcaps-qemu-host.xml"
    binaries: tuple = ("swtpm", "swtpm_setup", "swtpm_ioctl")

    def domain_capabilities(self, virt_type: str, machine: str | None = None) -> str:
        return (DATA / self.domcaps).read_text()

    def which(self, name: str) -> str | None:
        return f"/usr/bin/{name}" if name in self.binaries else None

    def user_exists(self, name: str) -> bool:
        return name == "tss"

    def group_exists(self, name: str) -> bool:
        return name == "tss"

    def versions(self) -> dict[str, str]:
        return {"libvirt": "9.0.0", "qemu": "7.2.0"}

    def pcr_banks(self) -> frozenset[str]:
        return frozenset({"sha1", "sha256", "sha384", "sha512"})

    def read_file(self, path: str) -> bytes:
        raise FileNotFoundError(2, "No such file or directory", path)


class FakeDomain:
    """What Nova's Guest.create/launch use; records the secrets libvirt held at start."""

    def __init__(self, conn: FakeLibvirt, xml: str) -> None:
        self.conn = conn
        self.xml = xml

    def createWithFlags(self, flags: int = 0) -> int:
        self.conn.secrets_at_start = {
            s.uuid: (s.stored, s.private) for s in self.conn.secrets.values()}
        if self.conn.fail_start:
            raise libvirt.libvirtError("guest failed to start")
        return 0

    def XMLDesc(self, flags: int = 0) -> str:
        return self.xml


class FakeLibvirt(FakeConn):
    """FakeConn (libvirt's secret rules) plus defineXML for Nova's _create_guest and
    the hypervisor's hostname (the compute node's name, Nova's ``get_available_nodes``)."""

    hostname = "node-a"

    def __init__(self) -> None:
        super().__init__()
        self.secrets_at_start: dict | None = None
        self.fail_start = False

    def defineXML(self, xml: str) -> FakeDomain:
        return FakeDomain(self, xml)

    def getHostname(self) -> str:
        return self.hostname


def make_flavor(**extra_specs: str) -> objects.Flavor:
    return objects.Flavor(memory_mb=256, swap=0, vcpu_weight=None, root_gb=1, id=2,
                          name="tpm", ephemeral_gb=0, rxtx_factor=1.0, flavorid="1",
                          vcpus=1, extra_specs=dict(extra_specs))


def make_image(**properties: str) -> objects.ImageMeta:
    return objects.ImageMeta.from_dict({"name": "cirros", "disk_format": "raw",
                                        "properties": properties})


def make_instance(flavor: objects.Flavor | None = None, secret_uuid: str | None = None,
                  task_state: str | None = None, vm_state: str = vm_states.ACTIVE,
                  **image_properties: str) -> objects.Instance:
    flavor = flavor if flavor is not None else make_flavor(**{"hw:tpm_version": "2.0"})
    sysmeta = {"image_disk_format": "raw"}
    sysmeta.update({f"image_{k}": v for k, v in image_properties.items()})
    if secret_uuid:
        sysmeta["vtpm_secret_uuid"] = secret_uuid
    instance = objects.Instance(
        id=1, uuid=str(uuid.uuid4()), display_name="vm1", vcpus=1, memory_mb=256,
        project_id="proj-a", user_id="owner", root_gb=1, ephemeral_gb=0,
        image_ref="155d900f-4e14-4e4c-a73d-069cbf4541e6", system_metadata=sysmeta,
        instance_type_id=2, flavor=flavor, old_flavor=None, new_flavor=None,
        pci_devices=objects.PciDeviceList(), numa_topology=None, config_drive=None,
        vm_mode=None, kernel_id=None, ramdisk_id=None, os_type="linux",
        ephemeral_key_uuid=None, vcpu_model=None, host="h", node="n", task_state=task_state,
        vm_state=vm_state, trusted_certs=None, resources=None, migration_context=None,
        info_cache=None, cleaned=False, deleted=False, metadata={})
    instance.saved = 0

    def save(*args: Any, **kwargs: Any) -> None:
        instance.saved += 1

    instance.save = save
    return instance


def nova_ctx(token: str | None = TOKEN) -> nova_context.RequestContext:
    """The owner's Nova request context, as the API hands it to nova-compute."""
    return nova_context.RequestContext(
        user_id="owner", project_id="proj-a", auth_token=token, roles=["member", "reader"],
        user_name="alice", project_name="A",
        service_catalog=[{"type": "key-manager", "name": "barbican",
                          "endpoints": [{"interface": "public",
                                         "url": "http://127.0.0.1:9311"}]}])


def minimal_guest() -> vconfig.LibvirtConfigGuest:
    """The smallest guest config Nova's LibvirtConfigGuest can serialise."""
    guest = vconfig.LibvirtConfigGuest()
    guest.virt_type = "qemu"
    guest.name = "instance-00000001"
    guest.uuid = str(uuid.uuid4())
    guest.memory = 262144
    guest.vcpus = 1
    guest.os_type = "hvm"
    return guest
