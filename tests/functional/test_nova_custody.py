"""Through Nova: only the current copy of a server's TPM ever starts (issue 20, custody).

(a) A server evacuated from a dead compute runs on the new host; its old copy,
    still on the old host, is never started again: not by a hard reboot, a stop
    and start, ``vtpm-driver audit --repair`` run on the old host, or the old
    host's nova-compute coming back. The server keeps its EK, on the new host only.
(b) An older off-host copy put back on purpose (the store entry of an earlier
    shelve) is refused at unshelve, naming both generations; the current copy,
    put back, unshelves with the latest TPM.

Shelve and evacuate go through nova-api with vtpm-driver's component
(``nova/virt/vtpm/api.py``), as in ``test_nova_offhost.py``. The generation of
a host's live state is ``<host swtpm dir>/<uuid>/vtpm-generation``
(:mod:`vtpm_driver.model.custody`); an off-host copy's is ``generation`` in its
``meta.json``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.functional.fixtures_nova import (
    HOST_ATTR,
    HOSTS_DIR,
    AioCloud,
    ResourceTracker,
    _run_script,
    aio_cloud,  # noqa: F401  (fixture)
    aio_resources,  # noqa: F401  (fixture)
    assert_nothing_on,
    assert_runs_on,
    create_on_test_host,
    latest_report,
    next_boot_report,
    other,
    virsh,
    vtpm_cli_on,
)
from tests.functional.test_nova_offhost import (
    START_TIMEOUT,
    compute_pid,
    copy_meta,
    service_set,
    wait_until,
)
from vtpm_driver.guestreport import tpm_of
from vtpm_driver.virt import state

pytestmark = [pytest.mark.functional, pytest.mark.aio, pytest.mark.multihost]

REFUSAL = re.compile(r"generation is (\d+|none)[^;]*?, the server's record says generation "
                     r"(\d+) is current")


def live_generation(host: str, server_id: str) -> int | None:
    """The generation of ``host``'s live TPM state of the server (None: none or no state)."""
    return state.read_generation(HOSTS_DIR / host / "lib" / "swtpm", server_id)


def assert_not_running_on(host: str, server_id: str) -> None:
    assert server_id not in virsh(host, "list", "--uuid"), f"{server_id} runs on {host}"


def audit_repair_on(cloud: AioCloud, host: str) -> subprocess.CompletedProcess[str]:
    """``vtpm-driver audit --repair`` as the admin, with ``host`` as the command line's host."""
    return vtpm_cli_on(cloud, host, "audit", "--repair", "-f", "json")


def refusal_of(cloud: AioCloud, server_id: str, action: str) -> tuple[str, str]:
    """The two generations named in the refusal of the server's latest ``action``.

    Read from the action's events (details and traceback, admin, 2.84).
    """
    actions = cloud.json("admin", "server", "event", "list", server_id)
    latest = next(a for a in actions if a["Action"] == action)
    shown = cloud.json("admin", "--os-compute-api-version", "2.84", "server", "event", "show",
                       server_id, latest["Request ID"])
    text = repr(shown)
    found = REFUSAL.search(text)
    assert found is not None, f"no custody refusal in the {action} events: {text[-3000:]}"
    return found.group(1), found.group(2)


# ----------------------------------------------------------------------------- (a)


def test_an_evacuated_servers_old_copy_never_starts_again(
        aio_cloud: AioCloud, aio_resources: ResourceTracker  # noqa: F811
        ) -> None:
    server_id, source = create_on_test_host(aio_resources, "deployment")
    first = latest_report(aio_cloud, server_id)
    aio_cloud.cli("owner", "server", "stop", server_id)        # on-stop: a current copy
    aio_cloud.wait_server("owner", server_id, "SHUTOFF")
    old = live_generation(source, server_id)
    assert old is not None and copy_meta(aio_cloud, server_id)["generation"] == old
    dest = other(source)

    os.kill(compute_pid(aio_cloud, source), signal.SIGKILL)   # the compute dies; the
    service_set(aio_cloud, source, "--down")                  # host's libvirt stays up
    try:
        aio_cloud.action_ok("admin", "evacuate", server_id, host=dest)
        aio_cloud.wait_server("owner", server_id, "SHUTOFF")
        assert aio_cloud.server("admin", server_id)[HOST_ATTR] == dest
        aio_cloud.cli("owner", "server", "start", server_id)
        aio_cloud.wait_server("owner", server_id, "ACTIVE")
        now = live_generation(dest, server_id)
        assert now is not None and now > old                  # handed over to dest
        # The old copy is still on the old host, older than the record.
        assert live_generation(source, server_id) == old

        # Hard reboot, stop + start: Nova's instance says dest; only dest runs.
        aio_cloud.cli("owner", "server", "reboot", "--hard", server_id)
        aio_cloud.wait_server("owner", server_id, "ACTIVE")
        aio_cloud.cli("owner", "server", "stop", server_id)
        aio_cloud.wait_server("owner", server_id, "SHUTOFF")
        aio_cloud.cli("owner", "server", "start", server_id)
        aio_cloud.wait_server("owner", server_id, "ACTIVE")
        assert_runs_on(dest, server_id)
        assert_not_running_on(source, server_id)

        # The operator's repair on the old host starts nothing there.
        audit_repair_on(aio_cloud, source)
        assert_not_running_on(source, server_id)
    finally:
        rc, out = _run_script("start", timeout=START_TIMEOUT)  # the old compute comes back
        assert rc == 0, out
        service_set(aio_cloud, source, "--up")

    # Its init_host removed the overtaken copy; the server runs on dest only, same TPM.
    wait_until("the old host forgets the server", lambda: assert_nothing_on(source, server_id))
    aio_cloud.cli("owner", "server", "reboot", "--hard", server_id)
    aio_cloud.wait_server("owner", server_id, "ACTIVE")
    report = latest_report(aio_cloud, server_id)
    assert tpm_of(report) == tpm_of(first)
    assert_runs_on(dest, server_id)
    assert_not_running_on(source, server_id)
    assert live_generation(dest, server_id) == now


# ----------------------------------------------------------------------------- (b)


def test_an_older_off_host_copy_put_back_is_refused(
        aio_cloud: AioCloud, aio_resources: ResourceTracker, tmp_path: Path  # noqa: F811
        ) -> None:
    server_id, _source = create_on_test_host(aio_resources, "deployment")
    first = latest_report(aio_cloud, server_id)
    store = aio_cloud.aio_dir / "state-store"
    entry = store / server_id

    aio_cloud.action_ok("owner", "shelve", server_id)
    aio_cloud.wait_server("owner", server_id, "SHELVED_OFFLOADED")
    older = copy_meta(aio_cloud, server_id)["generation"]
    state.copy_tree(entry, tmp_path / "older")               # the older copy, kept aside

    aio_cloud.cli("owner", "server", "unshelve", server_id)  # hands over: generation + 1
    aio_cloud.wait_server("owner", server_id, "ACTIVE")
    middle = next_boot_report(aio_cloud, server_id, first["boot"])
    aio_cloud.action_ok("owner", "shelve", server_id)    # + 1 again: the current copy
    aio_cloud.wait_server("owner", server_id, "SHELVED_OFFLOADED")
    current = copy_meta(aio_cloud, server_id)["generation"]
    assert current > older

    os.rename(entry, tmp_path / "current")                   # the older one put back
    state.copy_tree(tmp_path / "older", entry)
    try:
        aio_cloud.cli("owner", "server", "unshelve", server_id)
        # Nova leaves it shelved (or in ERROR, by release) once the compute refused.
        wait_until("the refused unshelve ends", lambda: _unshelve_ended(aio_cloud, server_id))
        found, expected = refusal_of(aio_cloud, server_id, "unshelve")
        assert (found, expected) == (str(older), str(current))
        assert copy_meta(aio_cloud, server_id)["generation"] == older
        assert copy_meta(aio_cloud, server_id)["shelved"]
    finally:
        # The current copy back in place (this test's own rename, undone).
        if entry.exists():
            os.rename(entry, tmp_path / "planted")
        os.rename(tmp_path / "current", entry)

    aio_cloud.cli("owner", "server", "unshelve", server_id)
    aio_cloud.wait_server("owner", server_id, "ACTIVE")
    latest = next_boot_report(aio_cloud, server_id, middle["boot"])
    assert tpm_of(latest) == tpm_of(first)                      # the same TPM, latest state


def _unshelve_ended(cloud: AioCloud, server_id: str) -> None:
    """The unshelve is over: no task, and the server did not become ACTIVE (asserts)."""
    server = cloud.server("admin", server_id)
    assert server["status"] in ("SHELVED_OFFLOADED", "ERROR"), server["status"]
    assert server.get("OS-EXT-STS:task_state") is None, server.get("OS-EXT-STS:task_state")
