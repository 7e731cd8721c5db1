"""Fakes under the ``server`` commands: the driver and the libvirt side of the servers.

``FakeBackend`` stands in for :class:`vtpm_driver.standalone.backend.ServerBackend`; the
real :class:`~vtpm_driver.standalone.service.ServerService` runs on top of it, so the
command tests check the commands and the service rules, not libvirt.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import types
import uuid

from vtpm_driver import exception
from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.standalone import servers

OWNER = RequestContext(user_id="u-owner", project_id="p-a", auth_token="tok-SECRET",
                       roles=("member",), user_name="alice", project_name="proj-a")


class FakeDriver:
    """Records the lifecycle calls; ``fail[method] = exc`` makes one raise."""

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        self.calls: list[tuple] = []
        self.fail: dict[str, Exception] = {}
        self.state = 1

    @contextlib.contextmanager
    def server_operation(self, context, instance, operation, *, refresh=True):
        """The real driver's per-server lock + recovery; here nothing to hold or recover."""
        yield None

    def _call(self, name: str, *args: object) -> None:
        self.calls.append((name, *args))
        if name in self.fail:
            raise self.fail[name]

    def spawn(self, context, instance, image_meta, injected_files, admin_password,
              allocations, network_info=None, block_device_info=None, power_on=True,
              vtpm=None):
        self._call("spawn", context, instance.name)
        instance.system_metadata["vtpm_secret_uuid"] = "0b7e7f0c-3c1e-4a8e-9c7d-5b9b1d8e2f11"
        self.backend.instances.append(instance)

    def destroy(self, context, instance, network_info=None, block_device_info=None,
                destroy_disks=True, destroy_secrets=True):
        self._call("destroy", context, instance.name, destroy_disks, destroy_secrets)
        self.backend.instances = [i for i in self.backend.instances if i.uuid != instance.uuid]

    def reboot(self, context, instance, network_info, reboot_type):
        self._call("reboot", context, instance.name, reboot_type)

    def power_off(self, instance, timeout=0, retry_interval=0):
        self._call("power_off", instance.name, timeout, retry_interval)

    def power_on(self, context, instance, network_info):
        self._call("power_on", context, instance.name)

    def suspend(self, context, instance):
        self._call("suspend", context, instance.name)

    def resume(self, context, instance, network_info):
        self._call("resume", context, instance.name)

    def _refuse(self, operation, context, instance):
        self._call("refused", operation, context, instance.name)
        raise exception.OperationNotSupportedForVTPM(
            f"{operation} is not supported for vTPM-enabled server {instance.name}")

    def rebuild(self, context, instance, image_meta, *args):
        self._refuse("rebuild", context, instance)

    def rescue(self, context, instance, network_info, image_meta, *args):
        self._refuse("rescue", context, instance)

    def get_info(self, instance):
        self._call("get_info", instance.name)
        return types.SimpleNamespace(state=self.state)

    def migrate_disk_and_power_off(self, context, instance, dest, flavor, network_info,
                                   block_device_info=None, timeout=0, retry_interval=0):
        self._call("migrate_disk_and_power_off", context, instance.name, dest,
                   dict(instance.flavor.extra_specs), dict(flavor.extra_specs),
                   flavor.vcpus, flavor.memory_mb)
        self.backend.pending.add(instance.uuid)
        return "[]"

    def finish_migration(self, context, migration, instance, disk_info, network_info,
                         image_meta, resize_instance, allocations, block_device_info=None,
                         power_on=True):
        self._call("finish_migration", context, instance.name, disk_info,
                   dict(instance.flavor.extra_specs), dict(instance.old_flavor.extra_specs),
                   instance.new_flavor is instance.flavor, power_on)

    def confirm_migration(self, context, migration, instance, network_info):
        self._call("confirm_migration", context, instance.name)
        self.backend.pending.discard(instance.uuid)

    def finish_revert_migration(self, context, instance, network_info, migration,
                                block_device_info=None, power_on=True):
        self._call("finish_revert_migration", context, instance.name, power_on)
        self.backend.pending.discard(instance.uuid)


class FakeBackend:
    """Servers in a list; the real ``servers.new_instance`` builds new ones.

    For the audit: ``foreign_domains`` (domains that are not our servers),
    ``secrets`` (libvirt vTPM secrets, ``audit.report.LibvirtSecret``); what a repair
    removes is recorded in ``removed``.
    """

    uri = "qemu:///fake"

    def __init__(self) -> None:
        self.instances: list = []
        self.pending: set[str] = set()
        self.driver = FakeDriver(self)
        self.closed = 0
        self.foreign_domains: list[str] = []
        self.secrets: list = []
        self.removed: list[tuple[str, str]] = []
        self.state_base: str | None = None

    def connect(self) -> None:
        pass

    def find(self, name_or_uuid: str):
        for instance in self.instances:
            if name_or_uuid in (instance.name, instance.uuid):
                return instance
        raise exception.InstanceNotFound(
            f"no server with name or UUID {name_or_uuid!r} on this host")

    def list(self):
        return sorted(self.instances, key=lambda i: i.name)

    def new_instance(self, name, context, **kwargs):
        return servers.new_instance(name, context, **kwargs)

    def resize_pending(self, instance) -> bool:
        return instance.uuid in self.pending

    def close(self) -> None:
        self.closed += 1

    def domain_uuids(self) -> list[str]:
        return [i.uuid for i in self.instances] + self.foreign_domains

    def libvirt_vtpm_secrets(self) -> list:
        return list(self.secrets)

    def domain_exists(self, domain_uuid: str) -> bool:
        return domain_uuid in self.domain_uuids()

    def undefine_libvirt_secret(self, secret_uuid: str) -> bool:
        self.removed.append(("libvirt_secret", secret_uuid))
        before = len(self.secrets)
        self.secrets = [s for s in self.secrets if s.uuid != secret_uuid]
        return len(self.secrets) < before

    def remove_state_dir(self, domain_uuid: str) -> bool:
        self.removed.append(("state_dir", domain_uuid))
        path = os.path.join(self.state_base, domain_uuid) if self.state_base else None
        if path and os.path.isdir(path):
            shutil.rmtree(path)
            return True
        return False


def add_server(backend: FakeBackend, name: str = "vm1", **specs: str):
    """A server owned by OWNER (TPM 2.0 unless ``specs`` say otherwise)."""
    instance = servers.new_instance(name, OWNER, flavor_extra_specs=specs or
                                    {"hw:tpm_version": "2.0"}, kernel="/k")
    instance.system_metadata["vtpm_secret_uuid"] = str(uuid.uuid4())
    backend.instances.append(instance)
    return instance
