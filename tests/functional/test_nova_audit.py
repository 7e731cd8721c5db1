"""Through Nova: ``vtpm-driver audit --repair`` asks Nova before it calls a server gone (issue 20).

One compute sees only its own domains. A server that runs on another compute
(or was shelved-offloaded) has none here, yet its Barbican secret is its TPM's
passphrase. The command line's audit on ``host-a`` about a server running on
``host-b``, as the server's owner (whose secrets Barbican lists):

* ``[vtpm] orchestrator = none`` (a standalone host): the secret looks orphaned
  and the repair plans to delete it: the danger this test guards against;
* ``orchestrator = nova``: the audit asks Nova's API (admin credentials in
  ``[nova]``, every project) and keeps what belongs to a server Nova knows; a
  real repair deletes nothing of it, and the server still boots its own TPM;
* ``orchestrator = nova`` with Nova out of reach: nothing of the kinds only Nova
  can vouch for is deleted, and the answer says Nova could not be asked.

Options come from the environment (oslo.config's ``OS_<GROUP>__<OPT>``), so no
password is written to a file. ``--instance`` keeps every repair to this test's
server (other tests' servers are on the same hosts).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.functional.fixtures_nova import (
    AioCloud,
    ResourceTracker,
    aio_cloud,  # noqa: F401  (fixture)
    aio_resources,  # noqa: F401  (fixture)
    create_on_test_host,
    latest_report,
    next_boot_report,
    other,
    vtpm_cli_on,
)
from vtpm_driver.audit.plan import DELETE_BARBICAN
from vtpm_driver.guestreport import tpm_of

pytestmark = [pytest.mark.functional, pytest.mark.aio, pytest.mark.multihost]

UNREACHABLE = "http://127.0.0.1:9/v3"  # discard port: nothing answers


def audit(cloud: AioCloud, host: str, server_id: str, orchestrator: str, *args: str,
          nova_auth_url: str | None = None) -> dict[str, Any]:
    """``vtpm-driver audit --repair --instance SERVER --min-age 0 ARGS -f json`` on
    ``host``, as the owner, with ``[vtpm] orchestrator`` (and ``[nova]`` the admin's)."""
    env = {"OS_VTPM__ORCHESTRATOR": orchestrator}
    if orchestrator == "nova":
        env = cloud.nova_admin_env()
        if nova_auth_url is not None:
            env["OS_NOVA__AUTH_URL"] = nova_auth_url
    proc = vtpm_cli_on(cloud, host, "audit", "--repair", "--instance", server_id,
                       "--min-age", "0", *args, "-f", "json", who="owner", env=env)
    assert proc.stdout.strip(), f"audit printed nothing (exit {proc.returncode}): {proc.stderr}"
    assert admin_password_absent(cloud, proc.stdout + proc.stderr)
    return json.loads(proc.stdout)


def admin_password_absent(cloud: AioCloud, text: str) -> bool:
    return str(cloud.auth("admin")["password"]) not in text


def deletes_secret_of(result: dict[str, Any], server_id: str) -> bool:
    """Whether the repair (done or planned) deletes a Barbican secret of the server."""
    return any(r["instance_uuid"] == server_id and r["action"] == DELETE_BARBICAN
               for r in result.get("repair") or [])


def test_audit_asks_nova_before_calling_a_server_gone(
        aio_cloud: AioCloud, aio_resources: ResourceTracker  # noqa: F811
        ) -> None:
    server_id, host = create_on_test_host(aio_resources, "user")
    first = latest_report(aio_cloud, server_id)
    elsewhere = other(host)
    (secret,) = aio_cloud.vtpm_secrets("owner", server_id)

    alone = audit(aio_cloud, elsewhere, server_id, "none", "--dry-run")
    assert alone["dry_run"] is True
    assert deletes_secret_of(alone, server_id), alone         # what Nova must prevent

    asked = audit(aio_cloud, elsewhere, server_id, "nova")
    assert asked["orchestrator"] == "nova" and asked["orchestrator_asked"] is True, asked
    assert not asked["orchestrator_error"], asked
    assert not deletes_secret_of(asked, server_id), asked
    assert [s["Secret href"] for s in aio_cloud.vtpm_secrets("owner", server_id)] == [
        secret["Secret href"]]

    unreachable = audit(aio_cloud, elsewhere, server_id, "nova", "--dry-run",
                        nova_auth_url=UNREACHABLE)
    assert unreachable["orchestrator_asked"] is False, unreachable
    assert unreachable["orchestrator_error"], unreachable
    assert not deletes_secret_of(unreachable, server_id), unreachable

    aio_cloud.cli("owner", "server", "reboot", "--hard", server_id)
    aio_cloud.wait_server("owner", server_id, "ACTIVE")
    again = next_boot_report(aio_cloud, server_id, first["boot"])
    assert tpm_of(again) == tpm_of(first)                            # the same TPM, intact
