"""Pytest fixtures for the all-in-one OpenStack cloud (``tools/openstack-aio.sh``).

The tests drive the cloud the way its users do: every call is the
``openstack`` command (python-openstackclient + osc-placement) of the AIO's
own virtualenv, run as a subprocess with the credentials of clouds.yaml.
Nothing here imports Nova: the project's venv does not have it.

``aio_cloud`` makes sure the cloud runs: ``openstack-aio.sh status``, and
``start`` when a service is down or was started from older configuration or
code (``start`` is idempotent; the first one installs everything, a few
minutes). If the cloud cannot be had the tests skip, except under
``CI=true`` where they fail. ``VTPM_AIO_AUTOSTART=0`` only checks ``status``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3

from tests.functional.support import run_tool_script, unavailable
from vtpm_driver.guestreport import parse_vtpm_results, results_since

AIO_DIR = Path(os.environ.get("VTPM_AIO_DIR", "/var/lib/vtpm-driver/aio"))
AIO_SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "openstack-aio.sh"
# Nova's API as shipped, without vtpm-driver's component (tools/openstack-aio.sh).
PLAIN_NOVA_API = "http://127.0.0.1:8764/v2.1"
# The vTPM operations Nova's API refuses without our component: the ``openstack`` command.
SERVER_ACTIONS = {
    "live-migrate": ("server", "migrate", "--live-migration"),
    "shelve": ("server", "shelve"),
    "rescue": ("server", "rescue"),
    "rebuild": ("server", "rebuild"),
    "evacuate": ("server", "evacuate"),
}
# What tools/aio/cloud.py uploads.
GUEST_IMAGE = "vtpm-guest"
GUEST_KERNEL = "vtpm-guest-kernel"
GUEST_RAMDISK = "vtpm-guest-ramdisk"
GUEST_CMDLINE = "console=ttyS0 vtpm_test=stay"
# The same guest re-printing its VTPM_RESULT (boot id, counter) every 3 s.
REPORTING_IMAGE = "vtpm-guest-reporting"
SECURE_BOOT_IMAGE = "vtpm-guest-secure-boot"  # tools/aio/cloud.py uploads it
# The nova-compute services on the libvirt test hosts (tools/test-hosts.sh): host name
# (= Nova node name) -> the host's libvirt URI; their availability zone.
TEST_HOSTS = {
    "host-a": "qemu+tcp://127.0.0.1:16611/system",
    "host-b": "qemu+tcp://127.0.0.1:16612/system",
    "host-c": "qemu+tcp://127.0.0.1:16613/system",
    "host-d": "qemu+tcp://127.0.0.1:16614/system",
}
# Two pairs, each its own zone: a move's only choice is the other host of the pair. The
# Nova fault rows (test_faults.py) have the second pair to themselves, so that they run
# beside the other "multihost" tests (tools/run-tests.sh).
MULTIHOST_ZONE = "vtpm-multihost"
SECOND_PAIR_ZONE = "vtpm-multihost-2"
HOSTS_DIR = Path(os.environ.get("VTPM_HOSTS_DIR", "/var/lib/vtpm-driver/hosts"))
# The project's command line, from the venv running the tests.
VTPM_CLI = Path(sys.executable).with_name("vtpm-driver")
# The first compute, alone in its zone, on the system libvirtd (servers created without a
# zone land there). Tests of one server on one host run there, next to the test hosts'.
AIO_HOST = AIO_ZONE = "vtpm-aio"
COMPUTES = {AIO_HOST: "qemu:///system", **TEST_HOSTS}
ZONE_HOSTS = {AIO_ZONE: {AIO_HOST}, MULTIHOST_ZONE: {"host-a", "host-b"},
              SECOND_PAIR_ZONE: {"host-c", "host-d"}}
# One OSC call is ~3-5 s of Python start-up; a TCG guest boots in a few seconds.
CLI_TIMEOUT = 180
SERVER_TIMEOUT = 300
POLL = 1  # seconds between two REST polls of a server
CONSOLE_TIMEOUT = 180
START_TIMEOUT = 1500


def _run_script(action: str, timeout: float) -> tuple[int, str]:
    return run_tool_script(AIO_SCRIPT, action, timeout, {"VTPM_AIO_DIR": str(AIO_DIR)})


class CommandFailed(AssertionError):
    """An ``openstack`` command exited non-zero."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        command = " ".join(argv)
        super().__init__(
            f"`openstack {command}` exited {returncode}:\n{stderr.strip()}\n{stdout.strip()}"
        )


# (clouds.yaml, cloud) -> session: a token per cloud for the whole run.
_SESSIONS: dict[tuple[str, str], ks_session.Session] = {}


@dataclasses.dataclass(frozen=True)
class AioCloud:
    """The running all-in-one cloud, driven through its ``openstack`` command."""

    aio_dir: Path

    @property
    def openstack_bin(self) -> Path:
        return self.aio_dir / "venv" / "bin" / "openstack"

    @property
    def clouds_file(self) -> Path:
        return self.aio_dir / "clouds.yaml"

    def run(
        self, cloud: str, *args: str, timeout: float = CLI_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """``openstack --os-cloud CLOUD ARGS`` as it ran (any exit code)."""
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("OS_") and k != "PYTHONPATH"
        }
        env.update(OS_CLIENT_CONFIG_FILE=str(self.clouds_file), PYTHONWARNINGS="ignore")
        return subprocess.run(
            [str(self.openstack_bin), "--os-cloud", cloud, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )

    def cli(self, cloud: str, *args: str, timeout: float = CLI_TIMEOUT) -> str:
        """stdout of a command that must succeed (raises CommandFailed)."""
        proc = self.run(cloud, *args, timeout=timeout)
        if proc.returncode != 0:
            raise CommandFailed(args, proc.returncode, proc.stdout, proc.stderr)
        return proc.stdout

    def json(self, cloud: str, *args: str, timeout: float = CLI_TIMEOUT) -> Any:
        """``-f json`` output of a command that must succeed."""
        return json.loads(self.cli(cloud, *args, "-f", "json", timeout=timeout))

    def action(self, cloud: str, action: str, server_id: str,
               host: str | None = None) -> subprocess.CompletedProcess[str]:
        """The ``openstack`` command for ``action`` (:data:`SERVER_ACTIONS`) as ``cloud``,
        through nova-api (any exit code); it returns once Nova accepted the request."""
        return self.run(cloud, *SERVER_ACTIONS[action], *(["--host", host] if host else []),
                        server_id)

    def action_ok(self, cloud: str, action: str, server_id: str,
                  host: str | None = None) -> None:
        """:meth:`action`, which Nova's API must accept."""
        proc = self.action(cloud, action, server_id, host=host)
        assert proc.returncode == 0, (proc.args, proc.stderr)

    # --- servers ------------------------------------------------------------------------

    def auth(self, cloud: str) -> dict[str, Any]:
        """``cloud``'s credentials as clouds.yaml gives them (its ``auth`` mapping)."""
        return dict(yaml.safe_load(self.clouds_file.read_text())["clouds"][cloud]["auth"])

    def nova_admin_env(self) -> dict[str, str]:
        """``[vtpm] orchestrator = nova`` and ``[nova]`` the admin's, as oslo.config reads
        them from the environment (``OS_<GROUP>__<OPT>``): no password in a file."""
        env = {"OS_VTPM__ORCHESTRATOR": "nova", "OS_NOVA__AUTH_TYPE": "password"}
        env.update({f"OS_NOVA__{key.upper()}": str(value)
                    for key, value in self.auth("admin").items()})
        env["OS_NOVA__VALID_INTERFACES"] = "public"
        env["OS_NOVA__TIMEOUT"] = "20"
        return env

    def session(self, cloud: str) -> ks_session.Session:
        """A keystoneauth session of ``cloud`` (clouds.yaml), one per cloud, reused."""
        key = (str(self.clouds_file), cloud)
        if key not in _SESSIONS:
            auth = self.auth(cloud)
            _SESSIONS[key] = ks_session.Session(auth=v3.Password(
                auth_url=auth["auth_url"], username=auth["username"],
                password=auth["password"], project_name=auth["project_name"],
                user_domain_name=auth["user_domain_name"],
                project_domain_name=auth["project_domain_name"]))
        return _SESSIONS[key]

    def compute(self, cloud: str, method: str, path: str, body: Any = None,
                endpoint: str | None = None, poll: bool = False) -> Any:
        """Nova's REST API (latest microversion) as ``cloud``; the reply's JSON body.

        Used for the polls (server status, console log): the same request
        ``openstack server show`` makes, without its seconds of Python start-up
        per call; every action a test is about still goes through ``openstack``.
        ``endpoint``: another nova-api than the catalog's (:data:`PLAIN_NOVA_API`).
        ``poll``: a request that only reads, so it is sent again when the
        connection drops: gunicorn closes an idle keep-alive connection after
        2 s, the polls' own interval, and a request sent at that moment is lost.

        :raises keystoneauth1.exceptions.HttpError: an error reply (its status in
            ``.http_status``, Nova's message by :func:`nova_fault`).
        """
        resp = self.session(cloud).request(
            path, method, json=body, raise_exc=True,
            endpoint_filter={"service_type": "compute", "interface": "public"},
            endpoint_override=endpoint, connect_retries=2 if poll else 0,
            headers={"OpenStack-API-Version": "compute latest"})
        return resp.json() if resp.content else None

    def server(self, cloud: str, server_id: str) -> dict[str, Any]:
        """``GET /servers/{id}``: what ``openstack server show -f json`` shows."""
        return self.compute(cloud, "GET", f"/servers/{server_id}", poll=True)["server"]

    def wait_server(
        self, cloud: str, server_id: str, status: str, timeout: float = SERVER_TIMEOUT
    ) -> dict[str, Any]:
        """Poll until the server has ``status`` and no task; ERROR with no task under way
        ends the wait early (a hard reboot of a server in ERROR shows ERROR until it is
        done)."""
        deadline = time.monotonic() + timeout
        while True:
            server = self.server(cloud, server_id)
            task = server.get("OS-EXT-STS:task_state")
            if server["status"] == status and not task:
                return server
            if server["status"] == "ERROR" and status != "ERROR" and not task:
                raise AssertionError(f"server {server_id} went to ERROR: {server.get('fault')}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"server {server_id} is {server['status']} (task {task}) after "
                    f"{timeout:.0f} s, expected {status}"
                )
            time.sleep(POLL)

    def wait_gone(self, cloud: str, server_id: str, timeout: float = SERVER_TIMEOUT) -> None:
        """Poll until ``GET /servers/{id}`` answers 404 (deleted); a NEW fault (ERROR
        with another fault than at the first poll: the delete failed) ends the wait."""
        deadline = time.monotonic() + timeout
        before: Any = ...
        while True:
            try:
                server = self.server(cloud, server_id)
            except ks_exc.NotFound:
                return
            fault = server.get("fault")
            before = fault if before is ... else before
            if server["status"] == "ERROR" and fault != before:
                raise AssertionError(f"server {server_id} went to ERROR while being deleted: "
                                     f"{fault}")
            if time.monotonic() > deadline:
                raise AssertionError(f"server {server_id} still exists after {timeout:.0f} s "
                                     f"({server['status']})")
            time.sleep(POLL)

    def console_log(self, cloud: str, server_id: str) -> str:
        """``openstack console log show``: the os-getConsoleOutput action."""
        reply = self.compute(cloud, "POST", f"/servers/{server_id}/action",
                             {"os-getConsoleOutput": {"length": None}}, poll=True)
        return reply["output"]

    def wait_vtpm_result(
        self, cloud: str, server_id: str, before: str = "", timeout: float = CONSOLE_TIMEOUT
    ) -> tuple[dict[str, str], str]:
        """The guest's first VTPM_RESULT printed after ``before`` (an earlier read of
        the console log), and the log it was found in."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.console_log(cloud, server_id)
            results = results_since(before, log) if before else parse_vtpm_results(log)
            if results:
                return results[-1], log
            if time.monotonic() > deadline:
                tail = "\n".join(log.splitlines()[-15:])
                raise AssertionError(
                    f"no new VTPM_RESULT on the console of {server_id} after {timeout:.0f} s; "
                    f"log ends with:\n{tail}"
                )
            time.sleep(2)

    def vtpm_secrets(self, cloud: str, server_id: str) -> list[dict[str, Any]]:
        """Barbican secrets named for this server, as ``cloud`` sees them."""
        name = f"vTPM secret for instance {server_id}"
        return self.json(cloud, "secret", "list", "--name", name)

    def compute_provider(self, node: str | None = None) -> dict[str, Any]:
        """The placement resource provider of compute node ``node`` (default: the
        first compute's, on the system libvirtd; not one of the test hosts')."""
        providers = self.json("admin", "resource", "provider", "list")
        if node is None:
            providers = [p for p in providers if p["name"] not in TEST_HOSTS]
        else:
            providers = [p for p in providers if p["name"] == node]
        assert len(providers) == 1, f"expected one resource provider, got {providers}"
        return providers[0]

    def provider_traits(self, provider_uuid: str) -> list[str]:
        rows = self.json(
            "admin",
            "--os-placement-api-version",
            "1.6",
            "resource",
            "provider",
            "trait",
            "list",
            provider_uuid,
        )
        return [row["name"] for row in rows]


@pytest.fixture(scope="session")
def aio_cloud() -> AioCloud:
    """The running all-in-one cloud (started if needed; skip, or fail under CI=true)."""
    rc, out = _run_script("status", timeout=120)
    if rc != 0 and os.environ.get("VTPM_AIO_AUTOSTART", "1") != "0":
        rc, out = _run_script("start", timeout=START_TIMEOUT)
    if rc != 0:
        msg = f"all-in-one OpenStack not usable (tools/openstack-aio.sh start):\n{out[-4000:]}"
        unavailable(msg)
    return AioCloud(aio_dir=AIO_DIR)


class ResourceTracker:
    """Deletes what a test created in the cloud, whatever the test's outcome."""

    def __init__(self, cloud: AioCloud) -> None:
        self.cloud = cloud
        self.servers: list[tuple[str, str]] = []
        self.images: list[str] = []
        self.flavors: list[str] = []

    def unique(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:8]}"

    def flavor(self, extra_specs: dict[str, str], ram: int = 256) -> str:
        name = self.unique("vtpm-aio-test")
        args = ["flavor", "create", "--ram", str(ram), "--disk", "1", "--vcpus", "1"]
        for key, value in extra_specs.items():
            args += ["--property", f"{key}={value}"]
        self.cloud.cli("admin", *args, name)
        self.flavors.append(name)
        return name

    def image(self, properties: dict[str, str]) -> str:
        """A public copy of the guest image with extra properties; returns its name."""
        base = self.cloud.json("admin", "image", "show", GUEST_IMAGE)
        base_props = base.get("properties") or {}
        name = self.unique("vtpm-aio-test")
        root_disk = self.cloud.aio_dir / "data" / "vtpm-guest-root.raw"
        args = ["image", "create", "--public", "--disk-format", "raw"]
        args += ["--container-format", "bare", "--file", str(root_disk)]
        props = {
            "kernel_id": base_props["kernel_id"],
            "ramdisk_id": base_props["ramdisk_id"],
            "os_command_line": GUEST_CMDLINE,
            **properties,
        }
        for key, value in props.items():
            args += ["--property", f"{key}={value}"]
        self.images.append(self.cloud.json("admin", *args, name)["id"])
        return name

    def server_create(
        self,
        cloud: str,
        flavor: str,
        image: str = GUEST_IMAGE,
        wait: bool = False,
        zone: str | None = None,
    ) -> str:
        """``openstack server create --nic none [--availability-zone Z]``;
        returns the server id.

        With ``wait``, polls until ACTIVE (and fails on ERROR).
        """
        name = self.unique("vtpm-aio-test")
        args = ["server", "create", "--flavor", flavor, "--image", image, "--nic", "none"]
        if zone:
            args += ["--availability-zone", zone]
        server = json.loads(self.cloud.cli(cloud, *args, name, "-f", "json",
                                           timeout=SERVER_TIMEOUT))
        self.servers.append((cloud, server["id"]))
        if wait:
            self.cloud.wait_server(cloud, server["id"], "ACTIVE")
        return server["id"]

    def cleanup(self) -> None:
        errors = []
        by_cloud: dict[str, list[str]] = {}
        for cloud, server_id in self.servers:
            by_cloud.setdefault(cloud, []).append(server_id)
        for cloud, ids in by_cloud.items():  # one command per cloud, then wait for each
            proc = self.cloud.run(cloud, "server", "delete", *ids, timeout=300)
            if proc.returncode != 0 and "No Server found" not in proc.stderr:
                errors.append(f"servers {ids}: {proc.stderr.strip()}")
        for cloud, server_id in self.servers:
            try:
                self.cloud.wait_gone(cloud, server_id)
            except AssertionError as exc:
                errors.append(str(exc))
        for image in self.images:
            proc = self.cloud.run("admin", "image", "delete", image)
            if proc.returncode != 0:
                errors.append(f"image {image}: {proc.stderr.strip()}")
        for flavor in self.flavors:
            proc = self.cloud.run("admin", "flavor", "delete", flavor)
            if proc.returncode != 0:
                errors.append(f"flavor {flavor}: {proc.stderr.strip()}")
        assert not errors, "cleanup failed:\n" + "\n".join(errors)


@pytest.fixture
def aio_resources(aio_cloud: AioCloud) -> Iterator[ResourceTracker]:
    """Create servers/images/flavors through this; all are deleted after the test."""
    tracker = ResourceTracker(aio_cloud)
    yield tracker
    tracker.cleanup()


# --- servers on the two test hosts (zone vtpm-multihost), seen from their guests ---------
# The guest of image vtpm-guest-reporting prints ``VTPM_RESULT ... ek=... boot=... seq=``
# every 3 s on its serial console (``console.log`` in the shared ``instances_path``).

HOST_ATTR = "OS-EXT-SRV-ATTR:host"
REPORT_TIMEOUT = 120


def console_file(cloud: AioCloud, server_id: str) -> Path:
    return cloud.aio_dir / "instances" / server_id / "console.log"


def latest_report(cloud: AioCloud, server_id: str, after_seq: int = -1,
                  boot: str | None = None) -> dict[str, str]:
    """The newest VTPM_RESULT (of ``boot`` if given, else any new boot, with seq > after_seq)."""
    deadline = time.monotonic() + REPORT_TIMEOUT
    while True:
        try:
            text = console_file(cloud, server_id).read_text(errors="replace")
            results = parse_vtpm_results(text)
        except FileNotFoundError:
            results = []
        fresh = [r for r in results if r.get("seq") is not None and (
            (boot is None or r.get("boot") == boot) and int(r["seq"]) > after_seq)]
        if fresh:
            return fresh[-1]
        assert time.monotonic() < deadline, (
            f"no new VTPM_RESULT from {server_id} in {REPORT_TIMEOUT} s; last: {results[-1:]}")
        time.sleep(2)


def next_boot_report(cloud: AioCloud, server_id: str, old_boot: str) -> dict[str, str]:
    deadline = time.monotonic() + REPORT_TIMEOUT
    while True:
        report = latest_report(cloud, server_id)
        if report.get("boot") != old_boot:
            return report
        assert time.monotonic() < deadline, f"{server_id} did not boot again"
        time.sleep(2)


def virsh(host: str, *args: str) -> str:
    return subprocess.run(["virsh", "-q", "-c", COMPUTES[host], *args], capture_output=True,
                          text=True, check=True, timeout=60).stdout


def swtpm_dir(host: str) -> Path:
    """Where ``host``'s libvirtd keeps TPM state (the system one's, or a test host's)."""
    if host == AIO_HOST:
        return Path("/var/lib/libvirt/swtpm")
    return HOSTS_DIR / host / "lib" / "swtpm"


def vtpm_cli_on(cloud: AioCloud, host: str, *args: str, who: str = "admin",
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``vtpm-driver --config-file <host's conf> ARGS`` as cloud ``who``'s user
    (``OS_*`` from the AIO's clouds.yaml; ``env`` adds to it), with ``host`` as the
    command line's one host."""
    auth = cloud.auth(who)
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    run_env.update({f"OS_{key.upper()}": str(value) for key, value in auth.items()})
    run_env.update(env or {})
    return subprocess.run(
        [str(VTPM_CLI), "--config-file", str(HOSTS_DIR / host / "vtpm-driver.conf"), *args],
        capture_output=True, text=True, timeout=SERVER_TIMEOUT, env=run_env, check=False)


def assert_nothing_on(host: str, server_id: str) -> None:
    """No domain, no vTPM libvirt secret, no TPM state of the server on ``host``."""
    assert server_id not in virsh(host, "list", "--all", "--uuid")
    assert server_id not in virsh(host, "secret-list")
    assert not (swtpm_dir(host) / server_id).exists()


def assert_runs_on(host: str, server_id: str) -> None:
    assert server_id in virsh(host, "list", "--uuid")
    assert (swtpm_dir(host) / server_id).is_dir()


def nova_fault(error: ks_exc.HttpError) -> str:
    """Nova's message in an error reply (``{"badRequest": {"message": ...}}``, which
    keystoneauth does not parse)."""
    (fault,) = error.response.json().values()
    return str(fault["message"])


#: Migration states in which Nova may still act on the server (a live migration's source
#: gives up on a dead destination only after rpc_response_timeout).
MIGRATION_IN_PROGRESS = {"queued", "preparing", "running", "accepted", "pre-migrating",
                         "migrating", "post-migrating"}


def latest_migration(cloud: AioCloud, server_id: str, after: int = 0,
                     migration_type: str | None = None) -> dict[str, Any] | None:
    """The server's newest migration (of ``migration_type``, with an id above ``after``)."""
    migrations = cloud.compute("admin", "GET", f"/os-migrations?instance_uuid={server_id}")
    return max((m for m in migrations["migrations"] if m["id"] > after and (
        migration_type is None or m.get("migration_type") == migration_type)),
        key=lambda m: m["id"], default=None)


def wait_migration_over(cloud: AioCloud, server_id: str, after: int = 0) -> dict[str, Any]:
    """The server's latest migration (one newer than migration id ``after``) once it is
    no longer in progress."""
    deadline = time.monotonic() + SERVER_TIMEOUT
    while True:
        latest = latest_migration(cloud, server_id, after)
        if latest and latest["status"] not in MIGRATION_IN_PROGRESS:
            return latest
        assert time.monotonic() < deadline, f"migration of {server_id} still {latest}"
        time.sleep(POLL)


def other(host: str) -> str:
    """The other test host of ``host``'s pair (zone)."""
    (name,) = [h for hosts in ZONE_HOSTS.values() if host in hosts for h in hosts if h != host]
    return name


def flavor_for(res: ResourceTracker, mode: str) -> str:
    return res.flavor({"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb",
                       "hw:tpm_secret_security": mode})


def create_on_test_host(res: ResourceTracker, mode: str,
                        zone: str = MULTIHOST_ZONE) -> tuple[str, str]:
    """A reporting server of ``mode`` in ``zone`` (default: on one of the two test hosts,
    for tests that move it); returns its id and host."""
    server_id = res.server_create("owner", flavor_for(res, mode), image=REPORTING_IMAGE,
                                  wait=True, zone=zone)
    host = res.cloud.server("admin", server_id)[HOST_ATTR]
    assert host in ZONE_HOSTS[zone]
    return server_id, host
