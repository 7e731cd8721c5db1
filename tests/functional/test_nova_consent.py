"""Through Nova: the cloud acts on a user-mode server only with its owner's consent (issue 21).

The owner consents in either of the two ways README shows: with the
ecosystem's own tools (``openstack application credential create`` limited to
reading that server's passphrase, ``openstack secret store`` of the record,
``openstack acl user add`` for the owner and Nova's service user, ``openstack
server set --property``), or with ``vtpm-driver server grant`` (and withdraws
with ``vtpm-driver server revoke``).

- An admin's live migration works with a consent to it (same EK, same boot)
  and is refused, the server ACTIVE where it was, with a consent to another
  operation or an expired one.
- After a host reboot Nova's ``resume_guests_state_on_host_boot`` brings the
  server back with the same EK under a consent to ``restart-on-host-boot``;
  withdrawn or expired, the server is left stopped with a clear fault and its
  TPM untouched, and the owner can start it.
"""

from __future__ import annotations

import configparser
import datetime
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.functional.fixtures_nova import (
    HOST_ATTR,
    AioCloud,
    ResourceTracker,
    aio_cloud,  # noqa: F401  (fixture)
    aio_resources,  # noqa: F401  (fixture)
    assert_nothing_on,
    assert_runs_on,
    create_on_test_host,
    latest_report,
    next_boot_report,
    other,
    swtpm_dir,
    virsh,
    vtpm_cli_on,
    wait_migration_over,
)
from vtpm_driver.guestreport import tpm_of
from vtpm_driver.model import consent

pytestmark = [pytest.mark.functional, pytest.mark.aio, pytest.mark.multihost]

def cloud_user(cloud: AioCloud) -> str:
    """The user nova-compute's [service_user] logs in as (what the operator publishes)."""
    return str(cloud.json("admin", "user", "show", "nova")["id"])


def grant_with_openstack(cloud: AioCloud, server_id: str, *operations: str) -> str:
    """What the owner does with the ecosystem's tools (README); the record's id."""
    (vtpm_secret,) = cloud.vtpm_secrets("owner", server_id)
    secret_uuid = vtpm_secret["Secret href"].rstrip("/").rsplit("/", 1)[-1]
    expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    cred = cloud.json("owner", "application", "credential", "create", "--restricted",
                      "--expiration", expires.strftime("%Y-%m-%dT%H:%M:%S"),
                      "--access-rules", json.dumps(consent.access_rules(secret_uuid)),
                      f"{consent.NAME_PREFIX}{server_id}-{uuid.uuid4().hex[:8]}")
    payload = consent.record(server_id, frozenset(operations), expires, cred["ID"],
                             cred["Secret"])
    ref = cloud.json("owner", "secret", "store", "--name", f"{consent.NAME_PREFIX}{server_id}",
                     "--secret-type", "opaque", "--payload-content-type", "text/plain",
                     "--payload", payload)["Secret href"]
    owner = cloud.json("owner", "token", "issue")["user_id"]
    cloud.cli("owner", "acl", "user", "add", "--no-project-access", "--operation-type",
              "read", "--user", owner, "--user", cloud_user(cloud), ref)
    record_id = ref.rstrip("/").rsplit("/", 1)[-1]
    cloud.cli("owner", "server", "set", "--property",
              f"{consent.METADATA_KEY}={record_id}", server_id)
    return record_id


def vtpm_driver(cloud: AioCloud, host: str, *args: str) -> dict[str, Any]:
    """``vtpm-driver ARGS -f json`` as the owner, on ``host`` (the consent's server's)."""
    proc = vtpm_cli_on(cloud, host, *args, "-f", "json", who="owner",
                       env={"VTPM_CLOUD_USER": cloud_user(cloud)})
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def consents_in_audit(cloud: AioCloud, host: str) -> dict[str, tuple[str, str]]:
    """What ``vtpm-driver audit`` on ``host`` says of the consents Nova's servers name:
    server -> (state, detail). It asks Nova as the admin (``[nova]``) and reads the
    records as Nova's service user (``[service_user]``, nova.conf's), as the shim does."""
    nova_conf = configparser.ConfigParser(interpolation=None)
    nova_conf.read(cloud.aio_dir / "etc" / "nova" / "nova.conf")
    env = cloud.nova_admin_env()
    env.update({f"OS_SERVICE_USER__{key.upper()}": value
                for key, value in nova_conf["service_user"].items()
                if key in ("auth_url", "auth_type", "username", "password", "project_name",
                           "user_domain_name", "project_domain_name")})
    proc = vtpm_cli_on(cloud, host, "audit", "--no-barbican", "-f", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert str(cloud.auth("admin")["password"]) not in proc.stdout + proc.stderr
    return {c["server"]: (c["state"], c["detail"]) for c in json.loads(proc.stdout)["consents"]}


def expired_grant(cloud: AioCloud, host: str, server_id: str, operation: str
                  ) -> dict[str, Any]:
    """A consent of ``operation`` granted with our command line, then left to expire."""
    granted = vtpm_driver(cloud, host, "server", "grant", server_id, operation,
                          "--hours", "0.005")
    ends = datetime.datetime.fromisoformat(granted["expires_at"].replace("Z", "+00:00"))
    time.sleep(max(0.0, (ends - datetime.datetime.now(datetime.UTC)).total_seconds()) + 2)
    return granted


def test_an_admins_live_migration_of_a_user_mode_server_needs_the_owners_consent(
        aio_cloud: AioCloud, aio_resources: ResourceTracker  # noqa: F811
        ) -> None:
    server_id, source = create_on_test_host(aio_resources, "user")
    before = latest_report(aio_cloud, server_id)

    refused = None
    for granted in (lambda: grant_with_openstack(aio_cloud, server_id, consent.EVACUATION),
                    lambda: expired_grant(aio_cloud, source, server_id,
                                          consent.LIVE_MIGRATION)):
        granted()                                    # not what the admin does, or too late
        proc = aio_cloud.action("admin", "live-migrate", server_id, host=other(source))
        assert proc.returncode != 0 and "No valid host" in proc.stderr, proc.stderr
        refused = wait_migration_over(aio_cloud, server_id,
                                      after=refused["id"] if refused else 0)
        server = aio_cloud.wait_server("admin", server_id, "ACTIVE")
        assert server[HOST_ATTR] == source
    assert latest_report(aio_cloud, server_id)["boot"] == before["boot"]   # untouched
    assert consents_in_audit(aio_cloud, source)[server_id][0] == consent.EXPIRED

    record_id = vtpm_driver(aio_cloud, source, "server", "grant", server_id,
                            consent.LIVE_MIGRATION, "--hours", "1")["consent_record"]
    state, detail = consents_in_audit(aio_cloud, source)[server_id]
    assert (state, detail.split(" until ")[0]) == (consent.IN_FORCE, consent.LIVE_MIGRATION)
    aio_cloud.action_ok("admin", "live-migrate", server_id, host=other(source))
    assert wait_migration_over(aio_cloud, server_id, after=refused["id"])["status"] == \
        "completed"
    aio_cloud.wait_server("owner", server_id, "ACTIVE")
    dest = aio_cloud.server("admin", server_id)[HOST_ATTR]
    assert dest == other(source)
    after = latest_report(aio_cloud, server_id, after_seq=int(before["seq"]),
                          boot=before["boot"])
    assert (tpm_of(after), after["boot"]) == (tpm_of(before), before["boot"])
    assert_runs_on(dest, server_id)
    assert_nothing_on(source, server_id)
    log = (aio_cloud.aio_dir / "logs" / f"nova-compute-{source}.log").read_text(
        errors="replace")
    assert any(server_id in line and record_id in line and "consent" in line
               for line in log.splitlines())


def host_reboot(cloud: AioCloud, host: str) -> float:
    """Power loss of a test host and its compute, then both back, the compute with
    ``resume_guests_state_on_host_boot = True``; returns when it was started."""
    tools = Path(__file__).resolve().parents[2] / "tools"
    os.kill(int((cloud.aio_dir / "run" / f"nova-compute-{host}.pid").read_text()),
            signal.SIGKILL)
    for args in (["test-hosts.sh", "stop", host], ["test-hosts.sh", "start"]):
        proc = subprocess.run(["bash", str(tools / args[0]), *args[1:]], capture_output=True,
                              text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    since = time.time()
    env = {**os.environ, "VTPM_AIO_DIR": str(cloud.aio_dir),
           "OS_DEFAULT__RESUME_GUESTS_STATE_ON_HOST_BOOT": "True"}
    proc = subprocess.run(["bash", str(tools / "openstack-aio.sh"), "restart-compute", host],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return since


def left_down(cloud: AioCloud, server_id: str, host: str, ek: str, boot: str) -> str:
    """After a host reboot without a usable consent: ERROR with the fault saying why, not
    started, its TPM untouched; then the owner starts it (same EK). The new boot's id."""
    server = cloud.wait_server("admin", server_id, "ERROR")
    fault = (server.get("fault") or {}).get("message", "")
    assert consent.RESTART_ON_HOST_BOOT in fault and "TPM untouched" in fault, fault
    assert server_id not in virsh(host, "list", "--uuid")       # not started
    assert (swtpm_dir(host) / server_id).is_dir()               # its TPM untouched
    cloud.cli("admin", "server", "set", "--state", "active", "--auto-approve", server_id)
    cloud.cli("owner", "server", "reboot", "--hard", server_id)   # the owner can
    cloud.wait_server("owner", server_id, "ACTIVE")
    report = next_boot_report(cloud, server_id, boot)
    assert tpm_of(report) == ek
    return str(report["boot"])


def test_a_user_mode_server_comes_back_after_a_host_reboot_only_with_consent(
        aio_cloud: AioCloud, aio_resources: ResourceTracker  # noqa: F811
        ) -> None:
    server_id, host = create_on_test_host(aio_resources, "user")
    before = latest_report(aio_cloud, server_id)
    granted = vtpm_driver(aio_cloud, host, "server", "grant", server_id,
                          consent.RESTART_ON_HOST_BOOT, "--hours", "1")

    host_reboot(aio_cloud, host)
    aio_cloud.wait_server("owner", server_id, "ACTIVE")
    after = next_boot_report(aio_cloud, server_id, before["boot"])
    assert tpm_of(after) == tpm_of(before)                          # the same TPM, back
    assert_runs_on(host, server_id)

    # The owner withdraws it: the next host reboot leaves the server down, TPM kept.
    withdrawn = vtpm_driver(aio_cloud, host, "server", "revoke", server_id)
    assert withdrawn["consent_record"] == granted["consent_record"]
    assert withdrawn["application_credential_deleted"] is True
    assert consent.METADATA_KEY not in aio_cloud.server("owner", server_id)["metadata"]
    host_reboot(aio_cloud, host)
    boot = left_down(aio_cloud, server_id, host, tpm_of(before), after["boot"])

    # A consent that expired is none.
    expired_grant(aio_cloud, host, server_id, consent.RESTART_ON_HOST_BOOT)
    host_reboot(aio_cloud, host)
    left_down(aio_cloud, server_id, host, tpm_of(before), boot)
