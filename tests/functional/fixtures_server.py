"""Fixtures for driving :class:`vtpm_driver.driver.VTPMDriver` on the real stack.

Real libvirtd (qemu:///system, TCG), real swtpm, the local Keystone + Barbican
(``tools/keymgr-stack.sh``). Loaded by tests/conftest.py through ``pytest_plugins``;
the plain helpers can be imported too.

``servers_on_stack`` gives a driver configured for this host (``virt_type = qemu``,
``swtpm_enabled``, Barbican endpoint, ``[service_user]`` for deployment mode, a
private console log directory), request contexts of the ``owner``, ``member`` and
``other`` users, and ``new_server()``, which builds a server booting the test guest
and registers it for removal after the test. Teardown deletes through the driver
and then sweeps whatever a failed test may have left (domain, swtpm state,
libvirt secrets, Barbican secrets), failing the test if the sweep found anything.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest
from keystoneauth1 import loading as ks_loading
from keystoneauth1 import session as ks_session
from oslo_config import cfg

from tests.functional.fixtures_keymgr import KeymgrStack
from tests.functional.fixtures_libvirt import (
    SWTPM_STATE_ROOT,
    TestGuest,
    parse_vtpm_results,
    read_console,
)
from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception, keymgr
from vtpm_driver.driver import VTPMDriver
from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.model.server import Instance
from vtpm_driver.standalone import servers
from vtpm_driver.virt import guest as virt_guest
from vtpm_driver.virt import secret as virt_secret

BOOT_TIMEOUT = 180.0  # a bound, not a speed check
STAY = "vtpm_test=stay"
READY = "vtpm-guest: staying up"
NVRAM_DIR = "/var/lib/libvirt/qemu/nvram"  # a UEFI domain's own variable store
_SERVICE_KEYS = ("auth_url", "username", "password", "project_name", "user_domain_name",
                 "project_domain_name")


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def driver_conf(stack: KeymgrStack, service: dict[str, str], console_dir: Path,
                barbican_endpoint: str | None = None) -> cfg.ConfigOpts:
    """A configuration for this host and the local stack."""
    conf = vtpm_conf.new_conf()
    conf.set_override("virt_type", "qemu", group="libvirt")
    conf.set_override("swtpm_enabled", True, group="libvirt")
    conf.set_override("barbican_endpoint", barbican_endpoint or stack.barbican_url,
                      group="key_manager")
    conf.set_override("timeout", 5.0, group="key_manager")
    conf.set_override("console_log_dir", str(console_dir), group="vtpm")
    conf.set_override("guest_start_timeout", 120, group="vtpm")
    group = vtpm_conf.SERVICE_USER_GROUP
    conf.register_opts(ks_loading.get_auth_plugin_conf_options("password"), group=group)
    conf.set_override("auth_type", "password", group=group)
    for key in _SERVICE_KEYS:
        conf.set_override(key, service[key], group=group)
    return conf


class Console:
    """Waits for the test guest's next ``VTPM_RESULT`` line on a console log.

    Call :meth:`mark` before the operation that boots the guest, then
    :meth:`wait_new`. Only complete lines count. libvirt appends to the file on
    a soft reboot and the driver empties it before a fresh boot; both are handled.
    With ``stay`` it also waits until the guest listens to the ACPI power button
    (soft reboot and graceful power-off need that).
    """

    def __init__(self, path: str, stay: bool = False) -> None:
        self.path = path
        self.stay = stay
        self._before = ""

    def _complete_text(self) -> str:
        text = read_console(self.path)
        return text[: text.rfind("\n") + 1]

    def mark(self) -> None:
        self._before = self._complete_text()

    def results(self) -> list[dict[str, str]]:
        return parse_vtpm_results(self._complete_text())

    def wait_new(self, timeout: float = BOOT_TIMEOUT) -> dict[str, str]:
        """The first result printed since :meth:`mark` (AssertionError after ``timeout``)."""
        before = parse_vtpm_results(self._before)
        deadline = time.monotonic() + timeout
        while True:
            text = self._complete_text()
            results = parse_vtpm_results(text)
            if text.startswith(self._before):
                fresh = results[len(before):]
            else:  # the file was emptied (new boot) or replaced
                fresh = results
            # A guest that stays up listens to the power button only once it says so.
            ready = not self.stay or READY in text[text.rfind("VTPM_RESULT"):]
            if fresh and ready:
                self._before = text
                return fresh[0]
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no new VTPM_RESULT in {self.path} within {timeout:g} s; it ends with:\n"
                    f"{read_console(self.path)[-3000:]}")
            time.sleep(0.2)


@dataclasses.dataclass
class ServersOnStack:
    """A driver on the real stack plus what tests need around it."""

    driver: VTPMDriver
    conf: cfg.ConfigOpts
    contexts: dict[str, RequestContext]
    guest: TestGuest
    conn: libvirt.virConnect
    stack: KeymgrStack
    admin: ks_session.Session
    service: ks_session.Session
    created: list[Instance] = dataclasses.field(default_factory=list)

    @property
    def owner(self) -> RequestContext:
        return self.contexts["owner"]

    def new_server(self, flavor_extra_specs: dict[str, str] | None = None,
                   image_properties: dict[str, str] | None = None, *, stay: bool = False,
                   context: RequestContext | None = None,
                   kernel: str | None = None, disk: str | None = None) -> Instance:
        """A server booting the test guest (``stay``: it keeps running), not yet spawned.

        ``disk``: boot that disk instead of the kernel (a copy of one of the guest's
        UEFI disks, which always stay up).
        """
        boot = (dict(disk=disk) if disk else dict(
            kernel=kernel or str(self.guest.kernel), initrd=str(self.guest.initrd),
            cmdline=f"{self.guest.cmdline} {STAY}" if stay else self.guest.cmdline))
        inst = servers.new_instance(
            f"lifecycle-{uuid.uuid4().hex[:8]}", context or self.owner,
            flavor_extra_specs=flavor_extra_specs, image_properties=image_properties,
            memory_mb=512 if disk else 256, **boot)
        self.created.append(inst)
        return inst

    def spawn(self, inst: Instance, context: RequestContext | None = None,
              driver: VTPMDriver | None = None) -> Console:
        """Spawn ``inst`` and return its console (marked before the boot)."""
        self.driver.guests.ensure_console_log(inst)
        console = Console(inst.console_log, stay=STAY in (inst.image_meta.cmdline or "")
                          or inst.image_meta.disk is not None)
        console.mark()
        (driver or self.driver).spawn(context or self.owner, inst, inst.image_meta, [], None, {})
        return console

    def domain(self, inst: Instance) -> libvirt.virDomain:
        return self.conn.lookupByUUIDString(inst.uuid)

    def wait_shutoff(self, inst: Instance, timeout: float = BOOT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while self.driver.get_info(inst) != "shutdown":
            if time.monotonic() > deadline:
                raise AssertionError(f"{inst.name} still {self.driver.get_info(inst)}")
            time.sleep(0.2)

    def libvirt_secrets_of(self, inst: Instance) -> list[virt_secret.VTPMSecretInfo]:
        return [s for s in virt_secret.list_vtpm_secrets(self.conn) if s.usage_id == inst.uuid]

    def barbican_status(self, secret_uuid: str) -> int:
        """HTTP status of the secret's metadata as the admin sees it (200 or 404)."""
        resp = self.admin.get(f"{self.stack.barbican_url}/v1/secrets/{secret_uuid}",
                              raise_exc=False, headers={"Accept": "application/json"})
        return resp.status_code

    def barbican_secrets_of(self, inst: Instance) -> list[str]:
        """UUIDs of Barbican secrets named for this server (owner's project + service user)."""
        km = keymgr.KeyManager(self.conf)
        found = []
        for mode in ("user", "deployment"):
            found += [entry["uuid"] for entry in km.list_vtpm_secrets(self.owner, mode)
                      if entry["instance_uuid"] == inst.uuid]
        return found

    def assert_nothing_left(self, inst: Instance, secret_uuid: str | None) -> None:
        """F3 / G3: no domain, TPM state, libvirt secret, Barbican secret or console log."""
        with pytest.raises(libvirt.libvirtError):
            self.domain(inst)
        assert not (SWTPM_STATE_ROOT / inst.uuid).exists()
        assert self.libvirt_secrets_of(inst) == []
        assert self.barbican_secrets_of(inst) == []
        if secret_uuid:
            assert self.barbican_status(secret_uuid) == 404
        assert inst.console_log is None or not Path(inst.console_log).exists()
        assert not Path("/var/lib/vtpm-driver/resize", inst.uuid).exists()
        assert not Path(NVRAM_DIR, f"{inst.name}_VARS.fd").exists()

    def sweep(self) -> list[str]:
        """Delete what the test created; return what had to be swept by force."""
        leftovers = []
        for inst in self.created:
            try:
                self.driver.destroy(self.owner, inst)
            except exception.VTPMError as exc:
                leftovers.append(f"{inst.name}: destroy failed: {exc}")
            try:
                dom = self.conn.lookupByUUIDString(inst.uuid)
            except libvirt.libvirtError:
                dom = None
            if dom is not None:
                leftovers.append(f"{inst.name}: domain")
                virt_guest.remove(dom)
            for info in self.libvirt_secrets_of(inst):
                leftovers.append(f"{inst.name}: libvirt secret {info.uuid}")
                virt_secret.undefine_vtpm_secret(self.conn, info.uuid)
            state_dir = SWTPM_STATE_ROOT / inst.uuid
            if state_dir.exists():
                leftovers.append(f"{inst.name}: {state_dir}")
                shutil.rmtree(state_dir, ignore_errors=True)
            for secret_uuid in self.barbican_secrets_of(inst):
                leftovers.append(f"{inst.name}: Barbican secret {secret_uuid}")
                self.admin.delete(f"{self.stack.barbican_url}/v1/secrets/{secret_uuid}",
                                  raise_exc=False)
            self.driver.resize_ops.discard_backup(inst.uuid)
        return leftovers


@pytest.fixture(scope="session")
def stack_contexts(keystone_session: Callable[..., ks_session.Session]
                   ) -> dict[str, RequestContext]:
    """Logged-in contexts (token + catalog) of owner, member (same project) and other."""
    return {name: RequestContext.from_session(keystone_session(name))
            for name in ("owner", "member", "other")}


@pytest.fixture
def servers_on_stack(keymgr_stack: KeymgrStack, clouds: dict[str, dict[str, str]],
                     stack_contexts: dict[str, RequestContext], test_guest: TestGuest,
                     libvirt_conn: libvirt.virConnect,
                     keystone_session: Callable[..., ks_session.Session],
                     tmp_path: Path) -> Iterator[ServersOnStack]:
    """A VTPMDriver on the real stack; every server made with ``new_server`` is removed."""
    console_dir = tmp_path / "console"
    conf = driver_conf(keymgr_stack, clouds["service"], console_dir)
    drv = VTPMDriver(conf)
    env = ServersOnStack(driver=drv, conf=conf, contexts=stack_contexts, guest=test_guest,
                         conn=libvirt_conn, stack=keymgr_stack,
                         admin=keystone_session("admin", project_name="vtpm-a"),
                         service=keystone_session("service"))
    try:
        yield env
    finally:
        leftovers = env.sweep()
        drv.hypervisor.close()
    if leftovers:
        pytest.fail("cleanup had to sweep: " + "; ".join(leftovers), pytrace=False)
