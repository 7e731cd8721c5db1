"""Through Nova: an admin moves a user-mode server only with its owner's consent (issue 21).

The owner consents with the ecosystem's own tools, as README shows: an
application credential limited to reading that server's passphrase, a
consent record in Barbican readable by the owner and Nova's service user,
and the record named in the server's metadata. The admin's live migration
then works (same EK, same boot); with a consent to another operation it is
refused, the server untouched.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3

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
    wait_migration_over,
)
from vtpm_driver.model import consent

pytestmark = [pytest.mark.functional, pytest.mark.aio, pytest.mark.multihost]

KEY_MANAGER = {"service_type": "key-manager", "interface": "public"}
IDENTITY = {"service_type": "identity", "interface": "public"}


def owner_session(cloud: AioCloud) -> ks_session.Session:
    auth = yaml.safe_load(cloud.clouds_file.read_text())["clouds"]["owner"]["auth"]
    return ks_session.Session(auth=v3.Password(
        auth_url=auth["auth_url"], username=auth["username"], password=auth["password"],
        project_name=auth["project_name"], user_domain_name=auth["user_domain_name"],
        project_domain_name=auth["project_domain_name"]))


def grant(cloud: AioCloud, server_id: str, *operations: str) -> tuple[str, str]:
    """What the owner does with the ecosystem's tools; (record id, credential id)."""
    owner = owner_session(cloud)
    user_id = owner.get_user_id()
    (vtpm_secret,) = cloud.vtpm_secrets("owner", server_id)
    secret_uuid = vtpm_secret["Secret href"].rstrip("/").rsplit("/", 1)[-1]
    expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    cred = owner.post(f"/users/{user_id}/application_credentials", endpoint_filter=IDENTITY,
                      json={"application_credential": {
                          "name": f"{consent.NAME_PREFIX}{server_id}-{uuid.uuid4().hex[:8]}",
                          "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%S.000000Z"),
                          "access_rules": consent.access_rules(secret_uuid),
                      }}).json()["application_credential"]
    payload = consent.record(server_id, frozenset(operations), expires, cred["id"],
                             cred["secret"])
    ref = owner.post("/v1/secrets", endpoint_filter=KEY_MANAGER, json={
        "name": f"{consent.NAME_PREFIX}{server_id}", "payload": payload,
        "payload_content_type": "text/plain", "secret_type": "opaque"}).json()["secret_ref"]
    record_id = ref.rstrip("/").rsplit("/", 1)[-1]
    nova_user = cloud.json("admin", "user", "show", "nova")["id"]
    owner.put(f"/v1/secrets/{record_id}/acl", endpoint_filter=KEY_MANAGER, json={
        "read": {"project-access": False, "users": [user_id, nova_user]}})
    cloud.cli("owner", "server", "set", "--property",
              f"{consent.METADATA_KEY}={record_id}", server_id)
    return record_id, cred["id"]


def test_an_admins_live_migration_of_a_user_mode_server_needs_the_owners_consent(
        aio_cloud: AioCloud, aio_resources: ResourceTracker  # noqa: F811
        ) -> None:
    server_id, source = create_on_test_host(aio_resources, "user")
    before = latest_report(aio_cloud, server_id)

    grant(aio_cloud, server_id, consent.EVACUATION)           # not what the admin does
    proc = aio_cloud.action("admin", "live-migrate", server_id, host=other(source))
    assert proc.returncode != 0 and "No valid host" in proc.stderr, proc.stderr
    refused = wait_migration_over(aio_cloud, server_id)
    assert aio_cloud.server("admin", server_id)[HOST_ATTR] == source

    record_id, _cred = grant(aio_cloud, server_id, consent.LIVE_MIGRATION)
    aio_cloud.action_ok("admin", "live-migrate", server_id, host=other(source))
    assert wait_migration_over(aio_cloud, server_id, after=refused["id"])["status"] == \
        "completed"
    aio_cloud.wait_server("owner", server_id, "ACTIVE")
    dest = aio_cloud.server("admin", server_id)[HOST_ATTR]
    assert dest == other(source)
    after = latest_report(aio_cloud, server_id, after_seq=int(before["seq"]),
                          boot=before["boot"])
    assert (after["ek"], after["boot"]) == (before["ek"], before["boot"])
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


def test_a_user_mode_server_comes_back_after_a_host_reboot_only_with_consent(
        aio_cloud: AioCloud, aio_resources: ResourceTracker  # noqa: F811
        ) -> None:
    server_id, host = create_on_test_host(aio_resources, "user")
    before = latest_report(aio_cloud, server_id)
    grant(aio_cloud, server_id, consent.RESTART_ON_HOST_BOOT)

    host_reboot(aio_cloud, host)
    aio_cloud.wait_server("owner", server_id, "ACTIVE")
    after = next_boot_report(aio_cloud, server_id, before["boot"])
    assert after["ek"] == before["ek"]                          # the same TPM, back
    assert_runs_on(host, server_id)

    # The owner withdraws it: the next host reboot leaves the server down, TPM kept.
    aio_cloud.cli("owner", "server", "unset", "--property", consent.METADATA_KEY, server_id)
    host_reboot(aio_cloud, host)
    server = aio_cloud.wait_server("admin", server_id, "ERROR")
    fault = (server.get("fault") or {}).get("message", "")
    assert consent.RESTART_ON_HOST_BOOT in fault and "TPM untouched" in fault, fault
    assert server_id not in virsh(host, "list", "--uuid")       # not started
    assert (swtpm_dir(host) / server_id).is_dir()               # its TPM untouched
    aio_cloud.cli("admin", "server", "set", "--state", "active", "--auto-approve", server_id)
    aio_cloud.cli("owner", "server", "reboot", "--hard", server_id)   # the owner can
    aio_cloud.wait_server("owner", server_id, "ACTIVE")
    assert next_boot_report(aio_cloud, server_id, after["boot"])["ek"] == before["ek"]
