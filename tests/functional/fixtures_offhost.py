"""One test host with an off-host state store, for the state backup tests (issue 15).

``cloud`` is the service over host-a of ``tools/test-hosts.sh`` as the command
line manages it: exactly one libvirt host (``[libvirt] connection_uri`` and
``[vtpm] swtpm_state_dir``, that host's directory as seen from here), the
local Keymgr stack, and ``[vtpm] state_backup_dir`` in the test's own
directory. host-a, not the shared system libvirtd: the tests read and change
the state store and the swtpm directory of the host they run on. A test module
uses it with::

    from tests.functional import fixtures_offhost
    cloud = fixtures_offhost.cloud

(pytest looks a fixture up in the requesting module; ``two_hosts``, which
``cloud`` uses to start the test hosts, is fixtures_libvirt's and registered for
every module).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.functional.fixtures_keymgr import KeymgrStack
from tests.functional.fixtures_libvirt import (
    TestGuest,
    configure_test_host,
    host_swtpm_dir,
    read_console,
)
from tests.functional.fixtures_server import driver_conf
from vtpm_driver import exception
from vtpm_driver.guestreport import parse_vtpm_results
from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.standalone.backend import ServerBackend
from vtpm_driver.standalone.service import ServerService
from vtpm_driver.virt import guest as virt_guest
from vtpm_driver.virt import secret as virt_secret

__all__ = ["HOST", "Cloud", "cloud", "store_dir"]

HOST = "host-a"
BOOT_TIMEOUT = 240.0  # bounds, not speed checks (2 cores, other helpers' guests)
REPORT_EVERY = 2


@dataclasses.dataclass
class Cloud:
    """host-a through the service, plus what checks need."""

    conf: object
    contexts: dict[str, RequestContext]
    guest: TestGuest
    conn: libvirt.virConnect
    created: list[str] = dataclasses.field(default_factory=list)

    def service(self, who: str = "owner") -> ServerService:
        return ServerService(self.conf, ServerBackend(self.conf),
                             context=lambda: self.contexts[who])

    def call(self, method: str, *args, who: str = "owner", **kwargs):
        service = self.service(who)
        try:
            return getattr(service, method)(*args, **kwargs)
        finally:
            service.close()

    def create(self, mode: str) -> dict:
        name = f"bak-{mode}-{uuid.uuid4().hex[:6]}"
        self.created.append(name)
        return self.call(
            "create", name,
            flavor_extra_specs={"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb",
                                "hw:tpm_secret_security": mode},
            image_properties={}, kernel=str(self.guest.kernel), initrd=str(self.guest.initrd),
            cmdline=f"{self.guest.cmdline} vtpm_test=stay vtpm_report_every={REPORT_EVERY}")

    def running_report(self, server: dict) -> dict[str, str]:
        """A periodic report of the running boot (gives its boot id and counter)."""
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            text = read_console(server["console_log"]).replace("\0", "")
            found = [r for r in parse_vtpm_results(text) if "boot" in r]
            if found:
                return max(found, key=lambda r: int(r.get("seq", "0")))
            if time.monotonic() > deadline:
                raise AssertionError(f"{server['name']}: no VTPM_RESULT with a boot id:\n"
                                     f"{text[-2000:]}")
            time.sleep(0.5)

    def sweep(self) -> list[str]:
        leftovers = []
        for name in self.created:
            try:
                self.call("delete", name)
            except exception.InstanceNotFound:
                pass
            except exception.VTPMError as exc:
                leftovers.append(f"{name}: delete failed: {exc}")
            try:
                dom = self.conn.lookupByName(name)
            except libvirt.libvirtError:
                continue
            leftovers.append(f"{name}: domain on {HOST}")
            sid = dom.UUIDString()
            virt_guest.remove(dom)
            for info in virt_secret.list_vtpm_secrets(self.conn):
                if info.usage_id == sid:
                    virt_secret.undefine_vtpm_secret(self.conn, info.uuid)
            shutil.rmtree(host_swtpm_dir(HOST) / sid, ignore_errors=True)
        return leftovers


@pytest.fixture
def cloud(two_hosts, keymgr_stack: KeymgrStack, clouds: dict[str, dict[str, str]],
          stack_contexts: dict[str, RequestContext], test_guest: TestGuest,
          tmp_path: Path) -> Iterator[Cloud]:
    """host-a as the command line's one host; off-host copies stored under ``tmp_path``."""
    os.chmod(tmp_path, 0o755)
    conf = driver_conf(keymgr_stack, clouds["service"], tmp_path / "console")
    configure_test_host(conf, HOST)
    conf.set_override("state_backup_dir", str(tmp_path / "store"), group="vtpm")
    env = Cloud(conf=conf, contexts=stack_contexts, guest=test_guest, conn=two_hosts[HOST])
    try:
        yield env
    finally:
        leftovers = env.sweep()
    if leftovers:
        pytest.fail("cleanup had to sweep: " + "; ".join(leftovers), pytrace=False)


def store_dir(cloud: Cloud, server: dict) -> Path:
    """The server's copy in the state store."""
    return Path(cloud.conf.vtpm.state_backup_dir) / server["uuid"]

