"""Moving vTPM servers between the two test hosts (issue 14), on the real daemons.

host-a and host-b are the private libvirt hosts of ``tools/test-hosts.sh``
(each its own libvirtd, swtpm directory and host UUID); Keystone and Barbican
are the local stack. For each secret security mode a server booting the test
guest (``vtpm_test=stay vtpm_report_every=N``: it re-reads its TPM every N
seconds and prints ``VTPM_RESULT ... ek=<sha256> boot=<boot id> seq=<n>``) is:

* cold-migrated A->B and reverted B->A (a new boot each time, same EK);
* live-migrated A->B and back (the SAME boot id keeps counting, same EK);

and after every move libvirt and Barbican are asked that nothing is left
where it should not be. Then the refusals and failures: a non-owner's
``user`` mode live migration, a migration to a stopped host, a wrong secret
on the destination, a cancelled migration: each leaves the guest running on
the source with its TPM and nothing on the destination.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest
from keystoneauth1 import session as ks_session

from tests.functional.fixtures_keymgr import KeymgrStack
from tests.functional.fixtures_libvirt import (
    HOST_URIS,
    HOSTS_SCRIPT,
    TestGuest,
    configure_two_hosts,
    host_swtpm_dir,
    read_console,
)
from tests.functional.fixtures_server import driver_conf
from tests.functional.support import run_tool_script
from vtpm_driver import exception, keymgr
from vtpm_driver.context import RequestContext
from vtpm_driver.guestreport import parse_vtpm_results
from vtpm_driver.hosts import HostSet
from vtpm_driver.ops import migrate as ops_migrate
from vtpm_driver.service import ServerService
from vtpm_driver.virt import migrate as virt_migrate
from vtpm_driver.virt import secret as virt_secret
from vtpm_driver.virt import state as virt_state

pytestmark = pytest.mark.functional

BOOT_TIMEOUT = 240.0  # bounds, not speed checks (2 cores, other helpers' guests)
REPORT_EVERY = 2


def state_dir(host: str, server_uuid: str) -> Path:
    """A host's swtpm state directory of a server, as seen from here."""
    return host_swtpm_dir(host) / server_uuid


@dataclasses.dataclass
class Cloud:
    """The two hosts through the service, plus what checks need."""

    conf: object
    contexts: dict[str, RequestContext]
    guest: TestGuest
    conns: dict[str, libvirt.virConnect]
    stack: KeymgrStack
    admin: ks_session.Session
    created: list[str] = dataclasses.field(default_factory=list)

    def service(self, who: str = "owner", host: str | None = None) -> ServerService:
        return ServerService(self.conf, None, context=lambda: self.contexts[who],
                             hosts=HostSet(self.conf), host=host)

    def call(self, method: str, *args, who: str = "owner", host: str | None = None,
             **kwargs):
        service = self.service(who, host)
        try:
            return getattr(service, method)(*args, **kwargs)
        finally:
            service.close()

    def create(self, mode: str) -> dict:
        name = f"mig-{mode}-{uuid.uuid4().hex[:6]}"
        self.created.append(name)
        return self.call(
            "create", name, host="host-a",
            flavor_extra_specs={"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb",
                                "hw:tpm_secret_security": mode},
            image_properties={}, kernel=str(self.guest.kernel), initrd=str(self.guest.initrd),
            cmdline=f"{self.guest.cmdline} vtpm_test=stay vtpm_report_every={REPORT_EVERY}")

    # -- where things are -----------------------------------------------------------

    def domain(self, host: str, server_uuid: str) -> libvirt.virDomain | None:
        try:
            return self.conns[host].lookupByUUIDString(server_uuid)
        except libvirt.libvirtError:
            return None

    def libvirt_secrets(self, host: str, server_uuid: str) -> list:
        return [s for s in virt_secret.list_vtpm_secrets(self.conns[host])
                if s.usage_id == server_uuid]

    def barbican_status(self, secret_uuid: str) -> int:
        resp = self.admin.get(f"{self.stack.barbican_url}/v1/secrets/{secret_uuid}",
                              raise_exc=False, headers={"Accept": "application/json"})
        return resp.status_code

    def assert_only_on(self, host: str, server: dict, *, running: bool = True,
                       source_copy_on: str | None = None) -> None:
        """The server lives on ``host`` only (a cold migration's stopped copy aside)."""
        sid, mode = server["uuid"], server["secret_security"]
        dom = self.domain(host, sid)
        assert dom is not None, f"{server['name']} is not on {host}"
        assert bool(dom.isActive()) is running
        assert state_dir(host, sid).is_dir()
        assert virt_state.is_encrypted(state_dir(host, sid) / "tpm2" / "tpm2-00.permall")
        assert virt_state.check_permissions(state_dir(host, sid), "tss", "tss") == []
        persistent = [s for s in self.libvirt_secrets(host, sid) if not s.ephemeral]
        ephemeral = [s for s in self.libvirt_secrets(host, sid) if s.ephemeral]
        assert ephemeral == []  # undefined as soon as the guest runs
        if mode == "host":
            assert [(s.uuid, s.private) for s in persistent] == [
                (server["vtpm_secret_uuid"], False)]
        else:
            assert persistent == []
        for other in HOST_URIS:
            if other in (host, source_copy_on):
                continue
            assert self.domain(other, sid) is None, f"{server['name']} left on {other}"
            assert not state_dir(other, sid).exists(), f"TPM state left on {other}"
            assert self.libvirt_secrets(other, sid) == [], f"libvirt secret left on {other}"
        assert self.barbican_status(server["vtpm_secret_uuid"]) == 200

    # -- the guest's reports ----------------------------------------------------------

    def results(self, server: dict) -> list[dict[str, str]]:
        return parse_vtpm_results(read_console(server["console_log"]).replace("\0", ""))

    def wait_report(self, server: dict, accept: Callable[[dict[str, str]], bool],
                    what: str) -> dict[str, str]:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            found = [r for r in self.results(server) if accept(r)]
            if found:
                return max(found, key=lambda r: int(r.get("seq", "0")))
            if time.monotonic() > deadline:
                raise AssertionError(f"{server['name']}: no VTPM_RESULT {what}:\n"
                                     f"{read_console(server['console_log'])[-2000:]}")
            time.sleep(0.5)

    def running_report(self, server: dict) -> dict[str, str]:
        """A periodic report of the running boot (gives its boot id and counter)."""
        return self.wait_report(server, lambda r: "boot" in r, "with a boot id")

    def later_report(self, server: dict, before: dict[str, str]) -> dict[str, str]:
        """A report of the SAME boot printed after ``before`` (no reboot in between)."""
        return self.wait_report(
            server, lambda r: r.get("boot") == before["boot"]
            and int(r["seq"]) > int(before["seq"]) + 1,
            f"of boot {before['boot']} after seq {before['seq']}")

    def boot_report(self, server: dict, not_boot: str) -> dict[str, str]:
        """The first periodic report of a boot other than ``not_boot``."""
        return self.wait_report(server, lambda r: "boot" in r and r["boot"] != not_boot,
                                f"of a new boot (not {not_boot})")

    def sweep(self) -> list[str]:
        leftovers = []
        for name in self.created:
            try:
                self.call("delete", name)
            except exception.InstanceNotFound:
                pass
            except exception.VTPMError as exc:
                leftovers.append(f"{name}: delete failed: {exc}")
            for host, conn in self.conns.items():
                try:
                    dom = conn.lookupByName(name)
                except libvirt.libvirtError:
                    continue
                leftovers.append(f"{name}: domain on {host}")
                sid = dom.UUIDString()
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_TPM)
                for info in self.libvirt_secrets(host, sid):
                    virt_secret.undefine_vtpm_secret(conn, info.uuid)
                shutil.rmtree(state_dir(host, sid), ignore_errors=True)
        return leftovers


@pytest.fixture
def cloud(two_hosts, keymgr_stack: KeymgrStack, clouds: dict[str, dict[str, str]],
          stack_contexts: dict[str, RequestContext], test_guest: TestGuest,
          keystone_session: Callable[..., ks_session.Session],
          tmp_path: Path) -> Iterator[Cloud]:
    """host-a and host-b through the service; off-host copies stored under ``tmp_path``."""
    os.chmod(tmp_path, 0o755)
    conf = driver_conf(keymgr_stack, clouds["service"], tmp_path / "console")
    configure_two_hosts(conf)
    conf.set_override("state_backup_dir", str(tmp_path / "store"), group="vtpm")
    env = Cloud(conf=conf, contexts=stack_contexts, guest=test_guest, conns=two_hosts,
                stack=keymgr_stack, admin=keystone_session("admin", project_name="vtpm-a"))
    try:
        yield env
    finally:
        leftovers = env.sweep()
    if leftovers:
        pytest.fail("cleanup had to sweep: " + "; ".join(leftovers), pytrace=False)


# ----------------------------------------------------------------------------- every mode


@pytest.mark.parametrize("mode", ["user", "host", "deployment"])
def test_cold_and_live_migration_keep_the_tpm(cloud: Cloud, mode: str) -> None:
    server = cloud.create(mode)
    assert server["secret_security"] == mode
    first = cloud.running_report(server)
    ek, secret_uuid = first["ek"], server["vtpm_secret_uuid"]
    assert len(ek) == 64 and first["version"] == "2"
    cloud.assert_only_on("host-a", server)
    assert cloud.call("list")[0]["host"] in HOST_URIS

    # Cold A -> B: stopped, moved, a new boot on B with the same TPM; A keeps a stopped
    # copy (and its state) until the move is confirmed or reverted.
    moved = cloud.call("migrate", server["name"], "host-b", live=False)
    assert moved["host"] == "host-b" and moved["resize_status"] is not None
    on_b = cloud.boot_report(server, first["boot"])
    assert on_b["ek"] == ek
    cloud.assert_only_on("host-b", server, source_copy_on="host-a")
    assert not cloud.domain("host-a", server["uuid"]).isActive()
    rows = {r["uuid"]: r for r in cloud.call("list")}
    assert rows[server["uuid"]]["host"] == "host-b"

    # Revert: back on A with its old state (same EK), nothing on B.
    cloud.call("revert_resize", server["name"])
    back = cloud.boot_report(server, on_b["boot"])
    assert back["ek"] == ek
    cloud.assert_only_on("host-a", server)
    assert cloud.call("show", server["name"])["resize_status"] is None

    # Live A -> B -> A: the same boot keeps running and answering with the same EK.
    before = cloud.running_report(server)
    cloud.call("migrate", server["name"], "host-b", live=True)
    after = cloud.later_report(server, before)
    assert after["ek"] == ek and after["getrandom_rc"] == "0"
    cloud.assert_only_on("host-b", server)
    cloud.call("migrate", server["name"], "host-a", live=True)
    again = cloud.later_report(server, after)
    assert again["ek"] == ek
    cloud.assert_only_on("host-a", server)
    assert cloud.call("show", server["name"])["vtpm_secret_uuid"] == secret_uuid


def test_cold_migration_confirmed_leaves_nothing_on_the_source(cloud: Cloud) -> None:
    server = cloud.create("user")
    first = cloud.running_report(server)
    cloud.call("migrate", server["name"], "host-b", live=False)
    cloud.call("confirm_resize", server["name"])
    cloud.assert_only_on("host-b", server)
    assert cloud.boot_report(server, first["boot"])["ek"] == first["ek"]
    shown = cloud.call("show", server["name"])
    assert shown["host"] == "host-b" and shown["resize_status"] is None


# ----------------------------------------------------------------------------- refusals


def test_non_owner_user_mode_live_migration_is_refused(cloud: Cloud) -> None:
    server = cloud.create("user")
    before = cloud.running_report(server)
    with pytest.raises(exception.VTPMSecretForbidden, match="only its owner"):
        cloud.call("migrate", server["name"], "host-b", live=True, who="member")
    cloud.assert_only_on("host-a", server)
    assert cloud.later_report(server, before)["ek"] == before["ek"]


@pytest.mark.alone  # stops a test host the AIO's computes use
def test_migration_to_a_stopped_host_fails_with_the_guest_running(cloud: Cloud) -> None:
    server = cloud.create("host")
    before = cloud.running_report(server)
    try:
        stopped = subprocess.run(["bash", str(HOSTS_SCRIPT), "stop", "host-b"],
                                 capture_output=True, text=True, timeout=120, check=False)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        for live in (True, False):
            with pytest.raises(exception.HypervisorUnavailable):
                cloud.call("migrate", server["name"], "host-b", live=live)
        assert cloud.domain("host-a", server["uuid"]).isActive()
    finally:
        rc, output = run_tool_script(HOSTS_SCRIPT, "start", timeout=180, env={})
        assert rc == 0, output
        cloud.conns["host-b"] = libvirt.open(HOST_URIS["host-b"])
    cloud.assert_only_on("host-a", server)
    assert cloud.later_report(server, before)["ek"] == before["ek"]


class _WrongValue:
    """A destination secret store that defines a wrong passphrase (a corrupt hand-over)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def find(self, instance_uuid):
        return self.inner.find(instance_uuid)

    def define(self, secret_uuid, instance_uuid, passphrase, *, persistent):
        self.inner.define(secret_uuid, instance_uuid, "not-the-passphrase",
                          persistent=persistent)

    def undefine(self, secret_uuid):
        return self.inner.undefine(secret_uuid)


def _sides(cloud: Cloud, service: ServerService, name: str):
    instance = service.locate(name)
    src = service.backend.driver.migration_side("host-a")
    dest_drv = service._hosts.backend("host-b").driver
    return instance, src, dest_drv


def test_wrong_secret_or_cancel_leaves_the_guest_on_the_source(cloud: Cloud) -> None:
    server = cloud.create("deployment")
    before = cloud.running_report(server)
    owner = cloud.contexts["owner"]
    service = cloud.service(host="host-a")
    try:
        instance, src, dest_drv = _sides(cloud, service, server["name"])
        # Wrong value on the destination: swtpm there cannot decrypt the state.
        wrong = dest_drv.migration_side("host-b")
        wrong.guests.secrets = _WrongValue(wrong.guests.secrets)
        try:
            with pytest.raises(exception.VirtError, match="stays on the source"):
                ops_migrate.LiveMigration(src, wrong).run(owner, instance)
        finally:
            wrong.guests.secrets = wrong.guests.secrets.inner
        cloud.assert_only_on("host-a", server)

        # Cancelled: slowed down to 1 MiB/s, aborted while it runs.
        move = ops_migrate.LiveMigration(src, dest_drv.migration_side("host-b"))
        errors: list[BaseException] = []

        def run() -> None:
            try:
                move.run(owner, instance, bandwidth_mib=1)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        dom = cloud.conns["host-a"].lookupByUUIDString(server["uuid"])
        deadline = time.monotonic() + 60
        while not virt_migrate.job_active(dom):
            assert time.monotonic() < deadline and thread.is_alive(), errors
            time.sleep(0.05)
        assert move.abort(instance)
        thread.join(120)
        assert len(errors) == 1 and "stays on the source" in str(errors[0]), errors
    finally:
        service.close()
    cloud.assert_only_on("host-a", server)
    assert cloud.later_report(server, before)["ek"] == before["ek"]
    assert cloud.call("show", server["name"])["resize_status"] is None
    km = keymgr.KeyManager(cloud.conf)
    assert km.get_vtpm_secret(owner, instance, "deployment")
