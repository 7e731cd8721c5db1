"""A TPM that outlives its host (issue 15), on the two real test hosts and the local stack.

Every check of "the same TPM" reads the EK from inside the guest (``vtpm_test=stay
vtpm_report_every=N``): shelve on host-a and unshelve on host-b in every secret
mode; evacuate from a stopped host-a with an on-stop copy (same EK) and the
refusal without a copy; rescue/unrescue and rebuild keep the EK, rebuild
``--reset-tpm`` changes it; a non-owner's shelve/unshelve in ``user`` mode is
refused and changes nothing; deleting a shelved server leaves nothing in
Barbican, in the state store or on any host.
"""

from __future__ import annotations

import json
import subprocess

import libvirt
import pytest

from tests.functional import fixtures_offhost
from tests.functional.fixtures_libvirt import HOST_URIS, HOSTS_SCRIPT, host_swtpm_dir
from tests.functional.fixtures_offhost import store_dir
from tests.functional.support import run_tool_script
from tests.functional.test_migrate import Cloud
from vtpm_driver import exception, policy
from vtpm_driver.virt import state as virt_state

pytestmark = pytest.mark.functional

cloud = fixtures_offhost.cloud


def assert_nowhere(cloud: Cloud, server: dict) -> None:
    """No domain, TPM state or libvirt secret of the server on any host."""
    for host in HOST_URIS:
        assert cloud.domain(host, server["uuid"]) is None, f"domain left on {host}"
        assert not (host_swtpm_dir(host) / server["uuid"]).exists(), f"TPM state left on {host}"
        assert cloud.libvirt_secrets(host, server["uuid"]) == [], f"secret left on {host}"


def assert_shelved(cloud: Cloud, server: dict) -> None:
    assert_nowhere(cloud, server)
    copy = store_dir(cloud, server)
    meta = json.loads((copy / "meta.json").read_text())
    assert meta["shelved"] is True and meta["source_host"] == "host-a"
    assert meta["encrypted"] is True and meta["header_flags"] & 0x01
    assert virt_state.is_encrypted(copy / "swtpm" / "tpm2" / "tpm2-00.permall")
    assert oct(copy.stat().st_mode & 0o777) == "0o700"
    assert oct(copy.parent.stat().st_mode & 0o777) == "0o700"
    assert oct((copy / "meta.json").stat().st_mode & 0o777) == "0o600"
    rows = {r["uuid"]: r for r in cloud.call("list")}
    assert rows[server["uuid"]]["power_state"] == policy.SHELVED_OFFLOADED
    assert rows[server["uuid"]]["host"] is None
    assert cloud.barbican_status(server["vtpm_secret_uuid"]) == 200


# ----------------------------------------------------------------------------- shelve


@pytest.mark.parametrize("mode", ["user", "host", "deployment"])
def test_shelve_on_a_unshelve_on_b_keeps_the_tpm(cloud: Cloud, mode: str) -> None:
    server = cloud.create(mode)
    first = cloud.running_report(server)
    shelved = cloud.call("shelve", server["name"], timeout=0)
    assert shelved["status"] == policy.SHELVED_OFFLOADED and shelved["state_bytes"] > 0
    assert_shelved(cloud, server)

    back = cloud.call("unshelve", server["name"], "host-b")
    assert back["host"] == "host-b"
    assert cloud.boot_report(server, first["boot"])["ek"] == first["ek"]
    cloud.assert_only_on("host-b", server)
    assert not store_dir(cloud, server).exists()  # state_backup = off: no copy kept


def test_non_owner_is_refused_and_deleting_a_shelved_server_leaves_nothing(
        cloud: Cloud) -> None:
    server = cloud.create("user")
    before = cloud.running_report(server)
    with pytest.raises(exception.VTPMSecretForbidden, match="only its owner"):
        cloud.call("shelve", server["name"], who="member")
    cloud.assert_only_on("host-a", server)
    assert not store_dir(cloud, server).exists()
    assert cloud.later_report(server, before)["ek"] == before["ek"]

    cloud.call("shelve", server["name"])
    with pytest.raises(exception.VTPMSecretForbidden, match="only its owner"):
        cloud.call("unshelve", server["name"], "host-b", who="member")
    assert_shelved(cloud, server)

    cloud.call("delete", server["name"])
    assert cloud.barbican_status(server["vtpm_secret_uuid"]) == 404
    assert not store_dir(cloud, server).exists()
    assert_nowhere(cloud, server)
    with pytest.raises(exception.InstanceNotFound):
        cloud.call("show", server["name"])


# ----------------------------------------------------------------------------- evacuate


@pytest.mark.alone  # stops a test host the AIO's computes use
def test_evacuate_from_a_stopped_host_uses_the_on_stop_copy(cloud: Cloud) -> None:
    kept = cloud.create("deployment")
    lost = cloud.create("deployment")
    ek = cloud.running_report(kept)["ek"]
    cloud.running_report(lost)
    cloud.conf.set_override("state_backup", "on-stop", group="vtpm")
    cloud.call("stop", kept["name"], timeout=0)  # a clean stop: a current copy
    cloud.conf.set_override("state_backup", "off", group="vtpm")
    cloud.call("stop", lost["name"], timeout=0)  # no copy
    assert (store_dir(cloud, kept) / "meta.json").exists()
    assert not store_dir(cloud, lost).exists()
    try:
        stopped = subprocess.run(["bash", str(HOSTS_SCRIPT), "stop", "host-a"],
                                 capture_output=True, text=True, timeout=120, check=False)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        with pytest.raises(exception.OperationNotSupportedForVTPM,
                           match=r"\[vtpm\] state_backup"):
            cloud.call("evacuate", lost["name"], "host-b")
        assert cloud.domain("host-b", lost["uuid"]) is None

        moved = cloud.call("evacuate", kept["name"], "host-b")
        assert moved["host"] == "host-b"
        assert "current" in moved["restored_tpm_state"]
        assert "taken" in moved["restored_tpm_state"]
        assert cloud.running_report(kept)["ek"] == ek
    finally:
        rc, output = run_tool_script(HOSTS_SCRIPT, "start", timeout=180, env={})
        assert rc == 0, output
        cloud.conns["host-a"] = libvirt.open(HOST_URIS["host-a"])
    # host-a is back with its stale definition of the evacuated server: reclaimed.
    assert cloud.domain("host-a", kept["uuid"]) is not None
    assert cloud.call("reclaim", "host-a") == [kept["name"]]
    cloud.assert_only_on("host-b", kept)
    assert cloud.domain("host-a", lost["uuid"]) is not None  # not evacuated: kept


# ----------------------------------------------------------------------------- rescue, rebuild


def test_rescue_unrescue_and_rebuild(cloud: Cloud) -> None:
    server = cloud.create("user")
    first = cloud.running_report(server)
    ek = first["ek"]

    cloud.call("rescue", server["name"])
    rescued = cloud.boot_report(server, first["boot"])
    assert rescued["ek"] == ek
    xml = cloud.domain("host-a", server["uuid"]).XMLDesc(0)
    assert policy.RESCUE_CMDLINE in xml
    with pytest.raises(exception.VTPMSecretForbidden):
        cloud.call("unrescue", server["name"], who="member")

    cloud.call("unrescue", server["name"])
    normal = cloud.boot_report(server, rescued["boot"])
    assert normal["ek"] == ek
    assert policy.RESCUE_CMDLINE not in cloud.domain("host-a", server["uuid"]).XMLDesc(0)

    shown = cloud.call("rebuild", server["name"], cmdline=server["cmdline"] + " rebuilt=1")
    assert shown["tpm"] == "kept" and shown["cmdline"].endswith("rebuilt=1")
    rebuilt = cloud.boot_report(server, normal["boot"])
    assert rebuilt["ek"] == ek

    reset = cloud.call("rebuild", server["name"], reset_tpm=True)
    assert reset["tpm"].startswith("reset")
    fresh = cloud.boot_report(server, rebuilt["boot"])
    assert fresh["ek"] != ek and len(fresh["ek"]) == 64
    cloud.assert_only_on("host-a", server)
