"""Moving vTPM servers between two nova-compute services through Nova (issue 14 item 5).

The all-in-one cloud (``tools/openstack-aio.sh``) runs nova-compute ``host-a``
and ``host-b``, one per libvirt test host (``tools/test-hosts.sh``), in the
availability zone ``vtpm-multihost``: a migration without a target host can
only go to the other one. The servers' owner (a project manager, which Nova's
default policy lets migrate) runs ``openstack server migrate [--live-migration]``.
The TPM is compared from inside the guest: its serial console (``console.log``
in the shared ``instances_path``) shows ``VTPM_RESULT ... ek=... boot=... seq=``
every 3 s (image ``vtpm-guest-reporting``); a live migration keeps the boot id,
a cold one boots again. The source keeps nothing: no libvirt secret, no
``swtpm/<uuid>`` state directory.

Live migration of ``user`` and ``deployment`` mode servers: Nova's own API
refuses it (``reject_legacy_vtpm_live_migration``, HTTP 400); the AIO's
nova-api runs vtpm-driver's component (``nova/virt/vtpm/api.py``), which lets
it through between hosts that run our shim. Nothing is patched.
"""

from __future__ import annotations

import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.functional.fixtures_nova import (
    HOST_ATTR,
    MULTIHOST_ZONE,
    SERVER_TIMEOUT,
    AioCloud,
    ResourceTracker,
    aio_cloud,  # noqa: F401  (fixture)
    aio_resources,  # noqa: F401  (fixture)
    assert_nothing_on,
    assert_runs_on,
    create_on_test_host,
    flavor_for,
    latest_report,
    next_boot_report,
    other,
    virsh,
    wait_migration_over,
)
from vtpm_driver.guestreport import tpm_of

pytestmark = [pytest.mark.functional, pytest.mark.aio, pytest.mark.multihost]

OWNER_PROJECT = "vtpm-a"  # the keymgr stack's project of cloud "owner"

def test_live_migration_host_mode_keeps_the_running_tpm(aio_cloud: AioCloud,  # noqa: F811
                                                        aio_resources: ResourceTracker  # noqa: F811
                                                        ) -> None:
    server_id, source = create_on_test_host(aio_resources, "host")
    before = latest_report(aio_cloud, server_id)
    assert_runs_on(source, server_id)

    aio_cloud.cli("owner", "server", "migrate", "--live-migration", server_id)

    server = aio_cloud.wait_server("owner", server_id, "ACTIVE")
    dest = server.get(HOST_ATTR) or aio_cloud.server("admin", server_id)[HOST_ATTR]
    assert dest == other(source)
    after = latest_report(aio_cloud, server_id, after_seq=int(before["seq"]),
                          boot=before["boot"])
    assert tpm_of(after) == tpm_of(before)          # same TPM
    assert after["boot"] == before["boot"]      # same boot: no reboot
    assert_runs_on(dest, server_id)
    assert_nothing_on(source, server_id)
    # host mode: the persistent secret moved with the server.
    assert server_id in virsh(dest, "secret-list")


@pytest.mark.parametrize("mode", ["host", "user", "deployment"])
def test_cold_migration_and_confirm_keep_the_tpm(aio_cloud: AioCloud,  # noqa: F811
                                                 aio_resources: ResourceTracker,  # noqa: F811
                                                 mode: str) -> None:
    server_id, source = create_on_test_host(aio_resources, mode)
    before = latest_report(aio_cloud, server_id)

    aio_cloud.cli("owner", "server", "migrate", server_id)
    aio_cloud.wait_server("owner", server_id, "VERIFY_RESIZE")
    aio_cloud.cli("owner", "server", "resize", "confirm", server_id)
    aio_cloud.wait_server("owner", server_id, "ACTIVE")

    dest = aio_cloud.server("admin", server_id)[HOST_ATTR]
    assert dest == other(source)
    after = next_boot_report(aio_cloud, server_id, before["boot"])
    assert tpm_of(after) == tpm_of(before)
    assert_runs_on(dest, server_id)
    assert_nothing_on(source, server_id)
    secrets_on_dest = virsh(dest, "secret-list")
    assert (server_id in secrets_on_dest) == (mode == "host")  # ephemeral unless host


def test_ten_overlapping_creates_and_deletes(aio_cloud: AioCloud,  # noqa: F811
                                             aio_resources: ResourceTracker  # noqa: F811
                                             ) -> None:
    """Ten creates at once on both hosts, half deleted while others still build."""
    flavor = flavor_for(aio_resources, "host")
    # Room for ten more next to other tests' servers (Nova's default quota is 10).
    aio_cloud.cli("admin", "quota", "set", "--instances", "100", "--cores", "100",
                  "--ram", "102400", OWNER_PROJECT)
    ids: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def create() -> None:
        try:
            server_id = aio_resources.server_create("owner", flavor, zone=MULTIHOST_ZONE)
            with lock:
                ids.append(server_id)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=SERVER_TIMEOUT)
    assert not errors, errors
    doomed = ids[::2]
    for server_id in doomed:  # while the others are still building
        aio_cloud.cli("owner", "server", "delete", server_id)
    for server_id in ids:
        if server_id in doomed:
            aio_cloud.wait_gone("owner", server_id)
        else:
            server = aio_cloud.wait_server("owner", server_id, "ACTIVE")
            assert server["status"] == "ACTIVE"


@pytest.mark.parametrize("mode", ["user", "deployment"])
def test_live_migration_through_novas_api_keeps_the_running_tpm(
        aio_cloud: AioCloud, aio_resources: ResourceTracker,  # noqa: F811
        mode: str) -> None:
    """The owner live-migrates a user/deployment-mode server with ``openstack``.

    The destination reads the passphrase from Barbican (owner's token in user
    mode, Nova's service user in deployment mode), gives swtpm an ephemeral
    secret and removes it once the guest runs: no libvirt secret on either host.
    """
    server_id, source = create_on_test_host(aio_resources, mode)
    before = latest_report(aio_cloud, server_id)

    aio_cloud.action_ok("owner", "live-migrate", server_id)

    aio_cloud.wait_server("owner", server_id, "ACTIVE")
    wait_migration_over(aio_cloud, server_id)
    dest = aio_cloud.server("admin", server_id)[HOST_ATTR]
    assert dest == other(source)
    after = latest_report(aio_cloud, server_id, after_seq=int(before["seq"]),
                          boot=before["boot"])
    assert tpm_of(after) == tpm_of(before)          # same TPM
    assert after["boot"] == before["boot"]      # same boot: no reboot
    assert_runs_on(dest, server_id)
    assert_nothing_on(source, server_id)
    assert server_id not in virsh(dest, "secret-list")  # the ephemeral secret is gone


def test_live_migration_of_a_user_mode_server_by_a_non_owner_is_refused(
        aio_cloud: AioCloud, aio_resources: ResourceTracker  # noqa: F811
        ) -> None:
    """An admin (allowed by Nova's policy, not the owner) cannot move a user-mode server.

    Nova's API lets it through (the hosts run our shim); the source's pre-check
    refuses it (only the owner can hand over the passphrase), which Nova's
    conductor reports as "No valid host" for the one host asked (the reason is
    in the source compute's log): the server stays ACTIVE on its host, the
    guest keeps running the same boot, nothing reaches the destination.
    """
    server_id, source = create_on_test_host(aio_resources, "user")
    before = latest_report(aio_cloud, server_id)

    proc = aio_cloud.action("admin", "live-migrate", server_id, host=other(source))

    assert proc.returncode != 0 and "No valid host" in proc.stderr, proc.stderr
    assert wait_migration_over(aio_cloud, server_id)["status"] in ("error", "failed")
    log = (aio_cloud.aio_dir / "logs" / f"nova-compute-{source}.log").read_text(errors="replace")
    assert any(server_id in line and "only its owner" in line for line in log.splitlines())
    server = aio_cloud.wait_server("owner", server_id, "ACTIVE")
    assert server["status"] == "ACTIVE"
    assert aio_cloud.server("admin", server_id)[HOST_ATTR] == source
    after = latest_report(aio_cloud, server_id, after_seq=int(before["seq"]),
                          boot=before["boot"])
    assert tpm_of(after) == tpm_of(before)
    assert_runs_on(source, server_id)
    assert_nothing_on(other(source), server_id)


def test_ek_certificate_is_the_owners_and_the_guests_before_and_after_a_live_migration(
        aio_cloud: AioCloud, aio_resources: ResourceTracker) -> None:  # noqa: F811
    """host-a and host-b manufacture each new TPM with the AIO's deployment EK CA
    (tools/aio/render.py, ``[vtpm] ek_ca_*``). The owner reads the EK certificate and
    its chain from Barbican with their own credentials (``openstack secret get``); it is
    the certificate the guest reads from its TPM's NV index and it verifies against the
    CA, before the live migration, after it, and after a reboot on the new host."""
    server_id, source = create_on_test_host(aio_resources, "host")
    before = latest_report(aio_cloud, server_id)
    name = f"vTPM EK certificate for instance {server_id}"
    (listed,) = aio_cloud.json("owner", "secret", "list", "--name", name)
    href = listed["Secret href"]
    bundle = aio_cloud.cli("owner", "secret", "get", href, "--payload", "-f", "value",
                           "-c", "Payload")
    ek, chain = x509.load_pem_x509_certificates(bundle.encode())
    deployment_ca = x509.load_pem_x509_certificate(
        (aio_cloud.aio_dir / "data" / "ek-ca" / "ca.pem").read_bytes())
    assert chain == deployment_ca
    ek.verify_directly_issued_by(deployment_ca)
    fingerprint = ek.fingerprint(hashes.SHA256()).hex()
    assert before["ekcert"] == fingerprint, (before, fingerprint)
    assert server_id in ek.subject.rfc4514_string()

    aio_cloud.cli("owner", "server", "migrate", "--live-migration", server_id)
    aio_cloud.wait_server("owner", server_id, "ACTIVE")
    dest = aio_cloud.server("admin", server_id)[HOST_ATTR]
    assert dest == other(source)
    after = latest_report(aio_cloud, server_id, after_seq=int(before["seq"]),
                          boot=before["boot"])
    assert tpm_of(after) == tpm_of(before) and after["ekcert"] == fingerprint
    # A new boot on the destination reads the NV index again.
    aio_cloud.cli("owner", "server", "reboot", "--hard", server_id)
    aio_cloud.wait_server("owner", server_id, "ACTIVE")
    rebooted = next_boot_report(aio_cloud, server_id, before["boot"])
    assert rebooted["ekcert"] == fingerprint and tpm_of(rebooted) == tpm_of(before)
    assert aio_cloud.cli("owner", "secret", "get", href, "--payload", "-f", "value",
                         "-c", "Payload") == bundle

    aio_cloud.cli("owner", "server", "delete", server_id)
    aio_cloud.wait_gone("owner", server_id)
    assert aio_cloud.json("owner", "secret", "list", "--name", name) == []
