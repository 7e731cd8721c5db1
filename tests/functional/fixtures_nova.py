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
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.functional.support import run_tool_script, unavailable
from vtpm_driver.guestreport import parse_vtpm_results, results_since

AIO_DIR = Path(os.environ.get("VTPM_AIO_DIR", "/var/lib/vtpm-driver/aio"))
AIO_SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "openstack-aio.sh"
# Live migration through Nova below its API's vTPM secret-mode check (see that script).
BELOW_API_SCRIPT = AIO_SCRIPT.parent / "aio" / "live_migrate_below_api.py"
# What tools/aio/cloud.py uploads.
GUEST_IMAGE = "vtpm-guest"
GUEST_KERNEL = "vtpm-guest-kernel"
GUEST_RAMDISK = "vtpm-guest-ramdisk"
GUEST_CMDLINE = "console=ttyS0 vtpm_test=stay"
# The same guest re-printing its VTPM_RESULT (boot id, counter) every 3 s.
REPORTING_IMAGE = "vtpm-guest-reporting"
# The nova-compute services on the libvirt test hosts (tools/test-hosts.sh): host name
# (= Nova node name) -> the host's libvirt URI; their availability zone.
TEST_HOSTS = {
    "host-a": "qemu+tcp://127.0.0.1:16611/system",
    "host-b": "qemu+tcp://127.0.0.1:16612/system",
}
MULTIHOST_ZONE = "vtpm-multihost"
HOSTS_DIR = Path(os.environ.get("VTPM_HOSTS_DIR", "/var/lib/vtpm-driver/hosts"))
# One OSC call is ~3-5 s of Python start-up; a TCG guest boots in a few seconds.
CLI_TIMEOUT = 180
SERVER_TIMEOUT = 300
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

    def live_migrate_below_api(
        self, cloud: str, server_id: str, host: str | None = None,
        timeout: float = SERVER_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """``tools/aio/live_migrate_below_api.py`` as ``cloud`` (any exit code): Nova's
        ``API().live_migrate`` with only the vTPM secret-mode check of Nova's API lifted;
        returns once the conductor has started the migration (or refused it)."""
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("OS_") and k != "PYTHONPATH"
        }
        env.update(VTPM_AIO_DIR=str(self.aio_dir), PYTHONWARNINGS="ignore")
        args = [str(self.aio_dir / "venv" / "bin" / "python"), str(BELOW_API_SCRIPT),
                "--cloud", cloud, *(["--host", host] if host else []), server_id]
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env,
                              check=False)

    # --- servers ------------------------------------------------------------------------

    def server(self, cloud: str, server_id: str) -> dict[str, Any]:
        return self.json(cloud, "server", "show", server_id)

    def wait_server(
        self, cloud: str, server_id: str, status: str, timeout: float = SERVER_TIMEOUT
    ) -> dict[str, Any]:
        """Poll until the server has ``status`` and no task; ERROR ends the wait early."""
        deadline = time.monotonic() + timeout
        while True:
            server = self.server(cloud, server_id)
            task = server.get("OS-EXT-STS:task_state")
            if server["status"] == status and not task:
                return server
            if server["status"] == "ERROR" and status != "ERROR":
                raise AssertionError(f"server {server_id} went to ERROR: {server.get('fault')}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"server {server_id} is {server['status']} (task {task}) after "
                    f"{timeout:.0f} s, expected {status}"
                )
            time.sleep(2)

    def console_log(self, cloud: str, server_id: str) -> str:
        return self.cli(cloud, "console", "log", "show", server_id)

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
        """``openstack server create --nic none [--wait] [--availability-zone Z]``;
        returns the server id.

        With ``wait`` the command itself polls until ACTIVE (and fails on ERROR).
        """
        name = self.unique("vtpm-aio-test")
        args = ["server", "create", "--flavor", flavor, "--image", image, "--nic", "none"]
        if zone:
            args += ["--availability-zone", zone]
        if wait:
            args.append("--wait")
        proc = self.cloud.run(cloud, *args, name, "-f", "json", timeout=SERVER_TIMEOUT)
        if proc.returncode != 0:
            # Track it even so: --wait fails after the server exists.
            found = self.cloud.run(cloud, "server", "show", name, "-f", "value", "-c", "id")
            if found.returncode == 0 and found.stdout.strip():
                self.servers.append((cloud, found.stdout.strip()))
            raise CommandFailed(args, proc.returncode, proc.stdout, proc.stderr)
        server = json.loads(proc.stdout)
        self.servers.append((cloud, server["id"]))
        return server["id"]

    def cleanup(self) -> None:
        errors = []
        for cloud, server_id in reversed(self.servers):
            proc = self.cloud.run(cloud, "server", "delete", "--wait", server_id, timeout=300)
            if proc.returncode != 0 and "No Server found" not in proc.stderr:
                errors.append(f"server {server_id}: {proc.stderr.strip()}")
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
