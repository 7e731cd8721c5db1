"""Through Nova: shelve/unshelve, rescue/unrescue, rebuild and evacuate keep the TPM (issue 15).

Nova's API refuses shelve, rescue, rebuild and evacuate of vTPM servers
(``reject_vtpm_instances``, HTTP 400) before any compute is asked; the AIO's
nova-api runs vtpm-driver's component (``nova/virt/vtpm/api.py``), which lets
them through where the server's hosts run our shim. Every request is the
owner's (or an admin's) ``openstack`` command over HTTP; nova-api, the
conductor, the scheduler, the nova-computes ``host-a`` and ``host-b`` (one per
libvirt test host) and the shim (``nova/virt/vtpm/offhost.py``) run unpatched.
A test that keeps its server on one host runs it on the first compute (zone
``vtpm-aio``); one that moves it, or stops a compute, is marked ``multihost``
and uses the test hosts.

The AIO's computes run with ``[vtpm] state_backup = on-stop`` and
``state_backup_dir = <aio>/state-store`` (tools/aio/render.py). Every TPM is
compared from inside the guest (its EK on the serial console).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pytest

from tests.functional.fixtures_nova import (
    AIO_ZONE,
    HOST_ATTR,
    MULTIHOST_ZONE,
    REPORT_TIMEOUT,
    REPORTING_IMAGE,
    SERVER_TIMEOUT,
    AioCloud,
    ResourceTracker,
    _run_script,
    aio_cloud,  # noqa: F401  (fixture)
    aio_resources,  # noqa: F401  (fixture)
    assert_nothing_on,
    assert_runs_on,
    console_file,
    create_on_test_host,
    flavor_for,
    latest_report,
    next_boot_report,
    other,
)
from vtpm_driver.guestreport import results_since, tpm_of

pytestmark = [pytest.mark.functional, pytest.mark.aio]

START_TIMEOUT = 600


def copy_meta(cloud: AioCloud, server_id: str) -> dict[str, Any] | None:
    """The off-host copy's ``meta.json`` in the AIO's state store, or None."""
    path = cloud.aio_dir / "state-store" / server_id / "meta.json"
    return json.loads(path.read_text()) if path.exists() else None


# ----------------------------------------------------------------------------- shelve


@pytest.mark.parametrize(("mode", "unshelver", "zone"), [
    ("user", "owner", AIO_ZONE),
    ("host", "owner", AIO_ZONE),
    pytest.param("deployment", "admin", MULTIHOST_ZONE, marks=pytest.mark.multihost),
])
def test_shelve_offload_and_unshelve_keep_the_tpm(aio_cloud: AioCloud,  # noqa: F811
                                                  aio_resources: ResourceTracker,  # noqa: F811
                                                  mode: str, unshelver: str, zone: str) -> None:
    """Shelve frees the host; unshelve (to the other host, when an admin may say so)
    brings the same TPM back from the off-host copy. The owner's unshelve lands where the
    scheduler likes: in a zone of one compute, the same host, from the copy all the same."""
    server_id, source = create_on_test_host(aio_resources, mode, zone)
    before = latest_report(aio_cloud, server_id)

    aio_cloud.action_ok("owner", "shelve", server_id)
    aio_cloud.wait_server("owner", server_id, "SHELVED_OFFLOADED")
    assert_nothing_on(source, server_id)
    meta = copy_meta(aio_cloud, server_id)
    assert meta is not None and meta["shelved"] and meta["encrypted"], meta
    assert meta["source_host"] == source and meta["secret_security"] == mode

    host_args = ["--host", other(source)] if unshelver == "admin" else []
    aio_cloud.cli(unshelver, "--os-compute-api-version", "2.91", "server", "unshelve",
                  *host_args, server_id)
    aio_cloud.wait_server("owner", server_id, "ACTIVE")
    dest = aio_cloud.server("admin", server_id)[HOST_ATTR]
    if unshelver == "admin":
        assert dest == other(source)
    after = next_boot_report(aio_cloud, server_id, before["boot"])
    assert tpm_of(after) == tpm_of(before)                 # the same TPM
    assert_runs_on(dest, server_id)
    meta = copy_meta(aio_cloud, server_id)            # on-stop: kept as the backup
    assert meta is not None and not meta["shelved"] and meta["started_after"], meta


def test_a_non_owner_shelve_of_a_user_mode_server_changes_nothing(
        aio_cloud: AioCloud, aio_resources: ResourceTracker  # noqa: F811
        ) -> None:
    """An admin's shelve reaches the compute, which refuses it before the power off."""
    server_id, source = create_on_test_host(aio_resources, "user", AIO_ZONE)
    before = latest_report(aio_cloud, server_id)

    aio_cloud.action_ok("admin", "shelve", server_id)
    server = aio_cloud.wait_server("owner", server_id, "ACTIVE")

    assert server["status"] == "ACTIVE"
    after = latest_report(aio_cloud, server_id, after_seq=int(before["seq"]),
                          boot=before["boot"])                  # the same boot runs on
    assert tpm_of(after) == tpm_of(before)
    assert_runs_on(source, server_id)
    assert copy_meta(aio_cloud, server_id) is None
    actions = aio_cloud.json("admin", "server", "event", "list", server_id)
    assert any(a["Action"] == "shelve" for a in actions), actions


def test_deleting_a_stopped_server_removes_its_copy(aio_cloud: AioCloud,  # noqa: F811
                                                    aio_resources: ResourceTracker  # noqa: F811
                                                    ) -> None:
    server_id, source = create_on_test_host(aio_resources, "deployment", AIO_ZONE)
    latest_report(aio_cloud, server_id)
    aio_cloud.cli("owner", "server", "stop", server_id)
    aio_cloud.wait_server("owner", server_id, "SHUTOFF")
    meta = copy_meta(aio_cloud, server_id)
    assert meta is not None and meta["reason"] == "stop" and not meta["server_running"]

    aio_cloud.cli("owner", "server", "delete", server_id)
    aio_cloud.wait_gone("owner", server_id)
    assert copy_meta(aio_cloud, server_id) is None
    assert aio_cloud.vtpm_secrets("owner", server_id) == []
    assert_nothing_on(source, server_id)


# ----------------------------------------------------------------------------- rescue, rebuild


def report_since(cloud: AioCloud, server_id: str, before: str) -> dict[str, str]:
    """The first VTPM_RESULT the guest printed after ``before`` (console.log read then)."""
    found: list[dict[str, str]] = []

    def check() -> None:
        now = console_file(cloud, server_id).read_text(errors="replace")
        found[:] = results_since(before, now)
        assert found, f"no new VTPM_RESULT from {server_id}"

    wait_until("the rescue boot's report", check, timeout=REPORT_TIMEOUT)
    return found[0]


@pytest.mark.parametrize("mode", ["user", "host", "deployment"])
def test_rescue_unrescue_and_rebuild_keep_the_tpm(aio_cloud: AioCloud,  # noqa: F811
                                                  aio_resources: ResourceTracker,  # noqa: F811
                                                  mode: str) -> None:
    """The rescue boot gets the server's own vTPM; unrescue and rebuild keep it.

    Nova boots a rescue with its own command line (``root=... console=...``):
    the guest prints its VTPM_RESULT once there (no boot id) and powers off.
    """
    server_id, source = create_on_test_host(aio_resources, mode, AIO_ZONE)
    first = latest_report(aio_cloud, server_id)
    log = console_file(aio_cloud, server_id).read_text(errors="replace")

    aio_cloud.action_ok("owner", "rescue", server_id)
    aio_cloud.wait_server("owner", server_id, "RESCUE")
    rescued = report_since(aio_cloud, server_id, log)
    assert "boot" not in rescued                      # the rescue boot's line
    assert tpm_of(rescued) == tpm_of(first)

    aio_cloud.cli("owner", "server", "unrescue", server_id)
    aio_cloud.wait_server("owner", server_id, "ACTIVE")
    normal = next_boot_report(aio_cloud, server_id, first["boot"])
    assert tpm_of(normal) == tpm_of(first)

    aio_cloud.action_ok("owner", "rebuild", server_id)
    aio_cloud.wait_server("owner", server_id, "ACTIVE")
    rebuilt = next_boot_report(aio_cloud, server_id, normal["boot"])
    assert tpm_of(rebuilt) == tpm_of(first)               # a new image keeps the TPM
    assert_runs_on(source, server_id)
    # Still one passphrase; a deployment-mode one is the service user's, not the owner's.
    assert len(aio_cloud.vtpm_secrets("owner", server_id)) == (mode != "deployment")


# ----------------------------------------------------------------------------- evacuate


def compute_pid(cloud: AioCloud, host: str) -> int:
    return int((cloud.aio_dir / "run" / f"nova-compute-{host}.pid").read_text())


def service_set(cloud: AioCloud, host: str, state: str) -> None:
    cloud.cli("admin", "--os-compute-api-version", "2.11", "compute", "service", "set",
              state, host, "nova-compute")


def wait_until(what: str, check: Any, timeout: float = SERVER_TIMEOUT) -> None:
    """Retry ``check`` (which asserts) until it passes or ``timeout`` runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout:.0f} s") from None
        time.sleep(2)


@pytest.mark.multihost
def test_evacuate_from_a_dead_compute_uses_the_on_stop_copy(
        aio_cloud: AioCloud, aio_resources: ResourceTracker  # noqa: F811
        ) -> None:
    """A stopped server of a dead compute comes back elsewhere with its TPM; a server
    with no copy is refused, naming ``[vtpm] state_backup``, and nothing moves."""
    kept, source = create_on_test_host(aio_resources, "deployment")
    ek = tpm_of(latest_report(aio_cloud, kept))
    lost = aio_resources.server_create("admin", flavor_for(aio_resources, "deployment"),
                                       image=REPORTING_IMAGE, wait=True,
                                       zone=f"{MULTIHOST_ZONE}:{source}")
    aio_cloud.cli("owner", "server", "stop", kept)          # on-stop: a current copy
    aio_cloud.wait_server("owner", kept, "SHUTOFF")
    assert copy_meta(aio_cloud, kept)["reason"] == "stop"
    assert copy_meta(aio_cloud, lost) is None               # running: never copied
    dest = other(source)

    os.kill(compute_pid(aio_cloud, source), signal.SIGKILL)  # the host's compute dies
    service_set(aio_cloud, source, "--down")
    try:
        aio_cloud.action_ok("admin", "evacuate", lost, host=dest)
        refused = aio_cloud.wait_server("admin", lost, "ERROR")
        assert "[vtpm] state_backup" in (refused.get("fault") or {}).get("message", ""), refused
        assert_nothing_on(dest, lost)

        aio_cloud.action_ok("admin", "evacuate", kept, host=dest)
        aio_cloud.wait_server("owner", kept, "SHUTOFF")     # evacuated as it was: stopped
        assert aio_cloud.server("admin", kept)[HOST_ATTR] == dest
        aio_cloud.cli("owner", "server", "start", kept)
        aio_cloud.wait_server("owner", kept, "ACTIVE")
        assert tpm_of(latest_report(aio_cloud, kept)) == ek
        assert_runs_on(dest, kept)
        assert copy_meta(aio_cloud, kept)["started_after"]  # the copy is overtaken now
    finally:
        # The compute comes back (forced down still: Nova lets an operator lift that
        # only once the restarted compute has finished the evacuations from its host).
        rc, out = _run_script("start", timeout=START_TIMEOUT)
        assert rc == 0, out
        service_set(aio_cloud, source, "--up")
    # The compute back on the old host removed what it had of the evacuated server.
    assert_nothing_on(source, kept)
