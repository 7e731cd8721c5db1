"""End to end through a real Nova: the all-in-one cloud of tools/openstack-aio.sh.

Keystone, Placement, Glance, Nova (API, conductor, scheduler, compute with
``compute_driver = vtpm.VTPMLibvirtDriver`` on libvirt + QEMU TCG + swtpm)
and Barbican, driven only through python-openstackclient as the project's
users: an admin makes flavors and images, the owner (member of project
vtpm-a) makes and uses servers.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from keystoneauth1 import exceptions as ks_exc

from tests.functional.fixtures_nova import (
    PLAIN_NOVA_API,
    SECURE_BOOT_IMAGE,
    AioCloud,
    CommandFailed,
    ResourceTracker,
    nova_fault,
)
from vtpm_driver.guestreport import tpm_of

pytestmark = [pytest.mark.functional, pytest.mark.aio]

REPO = Path(__file__).resolve().parents[2]
SWTPM_STATE_ROOT = Path("/var/lib/libvirt/swtpm")
TPM_2_CRB = {"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}
EK_RE = re.compile(r"^[0-9a-f]{64}$")


def assert_tpm_2_crb(result: dict[str, str]) -> None:
    assert result.get("version") == "2", result
    assert result.get("driver") == "tpm_crb", result
    assert result.get("getrandom_rc") == "0", result
    assert EK_RE.match(result.get("ek", "")), result


def test_compute_runs_the_vtpm_driver(aio_cloud: AioCloud) -> None:
    """nova-compute loads this checkout's shim (tools/openstack-aio.sh picks it whenever
    the checkout ships nova/virt/vtpm), so these tests exercise our driver, not Nova's."""
    if not (REPO / "nova" / "virt" / "vtpm" / "__init__.py").is_file():
        pytest.fail("this checkout has no nova/virt/vtpm shim")
    conf = (aio_cloud.aio_dir / "etc" / "nova" / "nova.conf").read_text()
    assert "\ncompute_driver = vtpm.VTPMLibvirtDriver\n" in conf
    log = (aio_cloud.aio_dir / "logs" / "nova-compute.log").read_text()
    loads = re.findall(r"Loading compute driver '([^']+)'", log)
    assert loads and loads[-1] == "vtpm.VTPMLibvirtDriver", loads[-3:]


def test_compute_node_reports_tpm_traits(aio_cloud: AioCloud) -> None:
    """The compute node's resource provider carries the TPM traits the scheduler needs."""
    provider = aio_cloud.compute_provider()
    traits = set(aio_cloud.provider_traits(provider["uuid"]))
    for trait in (
        "COMPUTE_SECURITY_TPM_2_0",
        "COMPUTE_SECURITY_TPM_CRB",
        "COMPUTE_SECURITY_TPM_TIS",
        "COMPUTE_SECURITY_TPM_SECRET_SECURITY_USER",
    ):
        assert trait in traits, f"{trait} missing from {sorted(traits)}"


def test_tpm_server_create_reboot_delete(
    aio_cloud: AioCloud, aio_resources: ResourceTracker
) -> None:
    """openstack server create with a TPM flavor: ACTIVE, the guest sees a TPM 2.0 CRB,
    a hard reboot keeps the TPM's identity, delete removes the secret and the state."""
    flavor = aio_resources.flavor(TPM_2_CRB)
    server_id = aio_resources.server_create("owner", flavor, wait=True)
    server = aio_cloud.wait_server("owner", server_id, "ACTIVE")
    assert server["flavor"]["extra_specs"] == TPM_2_CRB

    first, log = aio_cloud.wait_vtpm_result("owner", server_id)
    assert_tpm_2_crb(first)

    # The passphrase is the owner's Barbican secret, readable by the owner only (SPEC D3:
    # Nova would leave it readable by every member of the project); the encrypted state
    # is on the host.
    secrets = aio_cloud.vtpm_secrets("owner", server_id)
    assert len(secrets) == 1, secrets
    href = secrets[0]["Secret href"]
    acls = {row["Operation Type"]: row for row in aio_cloud.json("owner", "acl", "get", href)}
    assert acls["read"]["Project Access"] is False, acls
    assert acls["read"]["Users"] == [server["user_id"]], acls
    refused = aio_cloud.run("member", "secret", "get", href, "--payload")
    # Never show stdout here: it would hold the passphrase if the read went through.
    assert refused.returncode != 0, "another member of the project read the vTPM passphrase"
    assert "Forbidden" in refused.stderr, refused.stderr
    assert (SWTPM_STATE_ROOT / server_id).is_dir()

    aio_cloud.cli("owner", "server", "reboot", "--hard", server_id)
    aio_cloud.wait_server("owner", server_id, "ACTIVE")
    second, _ = aio_cloud.wait_vtpm_result("owner", server_id, before=log)
    assert_tpm_2_crb(second)
    assert tpm_of(second) == tpm_of(first), "hard reboot gave the guest a new TPM"
    assert len(aio_cloud.vtpm_secrets("owner", server_id)) == 1

    aio_cloud.cli("owner", "server", "delete", server_id)
    aio_cloud.wait_gone("owner", server_id)
    gone = aio_cloud.run("owner", "server", "show", server_id)
    assert gone.returncode != 0 and "No Server found" in gone.stderr, gone.stderr
    assert aio_cloud.vtpm_secrets("owner", server_id) == []
    assert not (SWTPM_STATE_ROOT / server_id).exists()


def test_secure_boot_server_with_pcr_banks_keeps_its_tpm(
    aio_cloud: AioCloud, aio_resources: ResourceTracker
) -> None:
    """Issue 22 through Nova: the Glance image vtpm-guest-secure-boot (Nova's
    hw_firmware_type=uefi, os_secure_boot=required) boots shim -> GRUB -> kernel with
    Secure Boot on and our vTPM; the flavor's hw:tpm_pcr_banks (accepted by nova-api
    through our extra-spec validator) are the guest's active banks; a hard reboot
    keeps the sealed value, hence PCR 7."""
    provider = aio_cloud.compute_provider()
    traits = set(aio_cloud.provider_traits(provider["uuid"]))
    for trait in ("COMPUTE_SECURITY_UEFI_SECURE_BOOT", "CUSTOM_VTPM_PCR_BANK_SHA256",
                  "CUSTOM_VTPM_PCR_BANK_SHA384"):
        assert trait in traits, f"{trait} missing from {sorted(traits)}"
    flavor = aio_resources.flavor({**TPM_2_CRB, "hw:tpm_pcr_banks": "sha384,sha256"},
                                  ram=512)
    server_id = aio_resources.server_create("owner", flavor, image=SECURE_BOOT_IMAGE,
                                            wait=True)
    first, log = aio_cloud.wait_vtpm_result("owner", server_id)
    assert_tpm_2_crb(first)
    assert (first["secureboot"], first["banks"], first["sealed_at"]) == (
        "on", "sha256,sha384", "new"), first
    assert int(first["eventlog"]) > 0, first

    aio_cloud.cli("owner", "server", "reboot", "--hard", server_id)
    aio_cloud.wait_server("owner", server_id, "ACTIVE")
    second, _ = aio_cloud.wait_vtpm_result("owner", server_id, before=log)
    assert (second["secureboot"], second["sealed_at"]) == ("on", "kept"), second
    assert tpm_of(second) == tpm_of(first), "hard reboot gave the guest a new TPM or PCR 7"


def test_nova_api_refuses_pcr_banks_it_cannot_read(aio_resources: ResourceTracker) -> None:
    """nova-api validates hw:tpm_pcr_banks with our validator (its extra-spec plugin
    point): a value that names no bank is refused when the flavor is given it."""
    flavor = aio_resources.flavor(TPM_2_CRB)
    with pytest.raises(CommandFailed) as info:
        aio_resources.cloud.cli("admin", "--os-compute-api-version", "2.86", "flavor", "set",
                                "--property", "hw:tpm_pcr_banks=md5", flavor)
    # Nova's own words around our validator's pattern.
    assert "Validation failed; 'md5' is not of the format" in info.value.stderr
    assert "sha1|sha256|sha384|sha512" in info.value.stderr, info.value.stderr


def test_a_windows_11_image_without_uefi_and_secure_boot_is_refused_naming_them(
    aio_cloud: AioCloud, aio_resources: ResourceTracker
) -> None:
    """Issue 22: an image that says it is Windows 11 (Glance's os_distro/os_version), on a
    TPM 2.0 flavor but BIOS firmware: the shim refuses it at the first moment Nova lets
    a driver see the request, as an unacceptable image (no reschedule), naming what is
    missing; nothing is created for it."""
    flavor = aio_resources.flavor(TPM_2_CRB)
    image = aio_resources.image({"os_distro": "windows", "os_version": "11"})
    server_id = aio_resources.server_create("owner", flavor, image)
    server = aio_cloud.wait_server("owner", server_id, "ERROR")
    owner_sees = (server.get("fault") or {}).get("message", "")
    assert "is unacceptable: the image is Windows 11" in owner_sees, owner_sees
    # Nova cuts a fault's message at 255 characters; its details (an admin's) keep it all.
    fault = aio_cloud.server("admin", server_id).get("fault") or {}
    message = fault.get("message", "") + fault.get("details", "")
    for part in ("os_version='11'", "UEFI firmware (image hw_firmware_type=uefi)",
                 "Secure Boot (flavor os:secure_boot=required or image os_secure_boot=required)"):
        assert part in message, f"{part!r} not in {message!r}"
    assert "a TPM 2.0" not in message  # the flavor gives one
    assert aio_cloud.vtpm_secrets("owner", server_id) == []
    assert not (SWTPM_STATE_ROOT / server_id).exists()


def test_flavor_image_tpm_version_conflict(
    aio_cloud: AioCloud, aio_resources: ResourceTracker
) -> None:
    """SPEC A2: flavor hw:tpm_version=2.0 with image hw_tpm_version=1.2 is refused with a
    message naming both keys and both values; nothing is created for it."""
    flavor = aio_resources.flavor(TPM_2_CRB)
    image = aio_resources.image({"hw_tpm_version": "1.2"})
    try:
        server_id = aio_resources.server_create("owner", flavor, image)
    except CommandFailed as e:
        message = e.stderr
    else:
        # Nova 34 finds the conflict while scheduling: the server ends in ERROR.
        server = aio_cloud.wait_server("owner", server_id, "ERROR")
        message = (server.get("fault") or {}).get("message", "")
        assert server.get("OS-EXT-STS:power_state") in (None, "NOSTATE", 0, "N/A"), server
        assert aio_cloud.vtpm_secrets("owner", server_id) == []
        assert not (SWTPM_STATE_ROOT / server_id).exists()
    for part in ("hw:tpm_version", "2.0", "hw_tpm_version", "1.2"):
        assert part in message, f"{part!r} not in {message!r}"


def test_shelve_refused_for_vtpm_server(
    aio_cloud: AioCloud, aio_resources: ResourceTracker
) -> None:
    """SPEC F6: Nova's API as shipped (without our nova-api component) refuses shelve of a
    vTPM server (HTTP 400) and the server stays as it was."""
    flavor = aio_resources.flavor(TPM_2_CRB)
    server_id = aio_resources.server_create("owner", flavor, wait=True)

    with pytest.raises(ks_exc.BadRequest) as info:
        aio_cloud.compute("owner", "POST", f"/servers/{server_id}/action", {"shelve": None},
                          endpoint=PLAIN_NOVA_API)
    message = nova_fault(info.value)
    assert "shelve" in message and "vTPM" in message, message

    server = aio_cloud.wait_server("owner", server_id, "ACTIVE")
    assert server["OS-EXT-STS:vm_state"] == "active"
    assert len(aio_cloud.vtpm_secrets("owner", server_id)) == 1
