"""Steps of ``tools/openstack-aio.sh`` that talk to the running cloud's APIs.

Run with the AIO virtualenv (keystoneauth1 + PyYAML), with the admin cloud of
the AIO's clouds.yaml:

    cloud.py wait-compute [--host HOST] [--timeout S] [--traits]
        wait until HOST's nova-compute is up, its hypervisor is listed and (with
        --traits) its placement resource provider carries the TPM traits
    cloud.py zones
        host aggregates and availability zones: "vtpm-aio" (the first compute,
        the default zone), "vtpm-multihost" (host-a, host-b) and
        "vtpm-multihost-2" (host-c, host-d); idempotent
    cloud.py images
        upload the test guest (kernel as aki, initramfs as ari, a tiny raw
        root disk that points at both) as public images, the same guest
        re-reporting its TPM every few seconds (vtpm-guest-reporting), and its
        UEFI Secure Boot disk (vtpm-guest-secure-boot); idempotent
    cloud.py status
        one line per compute service and the compute node's TPM traits
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import sys
import time
from pathlib import Path

from keystoneauth1 import adapter
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import session as ks_session
from render import DEFAULT_ZONE, MULTIHOST, PAIR_ZONES, aio_dir
from stacklib import cloud_session

GUEST_KERNEL = "vtpm-guest-kernel"
GUEST_RAMDISK = "vtpm-guest-ramdisk"
GUEST_IMAGE = "vtpm-guest"
# The guest prints its VTPM_RESULT line on ttyS0 and then stays up (so tests
# can reboot it); Nova's libvirt driver passes this as the kernel command line.
GUEST_CMDLINE = "console=ttyS0 vtpm_test=stay"
# The same guest re-printing VTPM_RESULT (with boot id and counter) every few seconds,
# so migration tests see the TPM after a live migration without a reboot.
REPORTING_IMAGE = "vtpm-guest-reporting"
REPORTING_CMDLINE = "console=ttyS0 vtpm_test=stay vtpm_report_every=3"
# The guest on a GPT disk booting shim -> GRUB -> kernel, with Nova's image properties
# for UEFI firmware with Secure Boot enforced (tools/build-guest.sh: uefi.img).
SECURE_BOOT_IMAGE = "vtpm-guest-secure-boot"
SECURE_BOOT_PROPERTIES = {"hw_firmware_type": "uefi", "os_secure_boot": "required",
                          "hw_machine_type": "q35"}
ROOT_DISK_BYTES = 1024 * 1024
TPM_TRAITS = ("COMPUTE_SECURITY_TPM_2_0", "COMPUTE_SECURITY_TPM_CRB", "COMPUTE_SECURITY_TPM_TIS")


class CloudError(Exception):
    """The cloud did not reach the expected state."""


def session(cloud: str = "admin") -> ks_session.Session:
    return cloud_session(aio_dir() / "clouds.yaml", cloud)


def api(sess: ks_session.Session, service_type: str, microversion: str | None = None):
    return adapter.Adapter(
        sess,
        service_type=service_type,
        interface="public",
        region_name="RegionOne",
        default_microversion=microversion,
    )


def compute_state(
    sess: ks_session.Session, host: str | None = None
) -> tuple[list[dict], list[dict]]:
    """nova-compute services and hypervisors (of ``host`` only, when given)."""
    compute = api(sess, "compute", "2.53")
    params = {"binary": "nova-compute", **({"host": host} if host else {})}
    services = compute.get("/os-services", params=params).json()["services"]
    hypervisors = compute.get("/os-hypervisors/detail").json()["hypervisors"]
    if host:
        hypervisors = [h for h in hypervisors if h.get("service", {}).get("host") == host]
    return services, hypervisors


def provider_traits(sess: ks_session.Session, hypervisor_id: str) -> list[str]:
    placement = api(sess, "placement", "1.6")
    return placement.get(f"/resource_providers/{hypervisor_id}/traits").json()["traits"]


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def heartbeat_after(service: dict, since: datetime.datetime | None) -> bool:
    """Whether the service reported after ``since`` (its ``updated_at`` is UTC)."""
    if since is None:
        return True
    updated = service.get("updated_at")
    if not updated:
        return False
    stamp = datetime.datetime.fromisoformat(updated.replace("Z", "")).replace(tzinfo=datetime.UTC)
    return stamp > since


def wait_compute(
    timeout: float,
    want_traits: bool,
    pid: int | None = None,
    since: float | None = None,
    host: str | None = None,
) -> None:
    """Wait for an enabled, up nova-compute (with a heartbeat newer than ``since``, from
    the process ``pid`` that must stay alive), its hypervisor and, with ``want_traits``,
    the TPM traits on its resource provider."""
    sess = session()
    deadline = time.monotonic() + timeout
    after = datetime.datetime.fromtimestamp(since, datetime.UTC) if since else None
    last = "no answer yet"
    while True:
        if pid is not None and not alive(pid):
            raise CloudError(f"nova-compute (pid {pid}) exited")
        try:
            services, hypervisors = compute_state(sess, host)
            # A service an operator forced down (evacuation) reports "down" whatever
            # its heartbeat; with a fresh heartbeat its process runs and is ready.
            up = [
                s
                for s in services
                if (s["state"] == "up" or (s.get("forced_down") and after is not None))
                and s["status"] == "enabled" and heartbeat_after(s, after)
            ]
            if not up:
                seen = [(s["host"], s["state"], s.get("updated_at")) for s in services]
                last = f"no fresh heartbeat from nova-compute; services: {seen}"
            elif not hypervisors:
                last = "nova-compute is up but no hypervisor is listed (host not discovered)"
            else:
                hyp = hypervisors[0]
                if not want_traits:
                    print(f"[openstack-aio] compute node {hyp['hypervisor_hostname']} is up")
                    return
                traits = provider_traits(sess, hyp["id"])
                missing = [t for t in TPM_TRAITS if t not in traits]
                if not missing:
                    tpm = sorted(t for t in traits if "TPM" in t)
                    print(
                        f"[openstack-aio] compute node {hyp['hypervisor_hostname']} is up; "
                        f"placement traits: {' '.join(tpm)}"
                    )
                    return
                last = f"resource provider {hyp['id']} lacks traits {missing}"
        except (ks_exc.ClientException, KeyError, ValueError) as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() > deadline:
            raise CloudError(f"compute node not ready after {timeout:.0f} s: {last}")
        time.sleep(2)


def sha512(path: Path) -> str:
    h = hashlib.sha512()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_images(glance: adapter.Adapter, name: str) -> list[dict]:
    return glance.get("/v2/images", params={"name": name}).json()["images"]


def ensure_image(
    glance: adapter.Adapter,
    name: str,
    data: Path,
    disk_format: str,
    container_format: str,
    properties: dict[str, str],
) -> str:
    """The id of an active public image ``name`` with exactly this content and these
    properties; replaces an older one (deleted after the new one is active)."""
    digest = sha512(data)
    existing = find_images(glance, name)
    for image in existing:
        if (
            image["status"] == "active"
            and image.get("os_hash_value") == digest
            and all(image.get(k) == v for k, v in properties.items())
        ):
            return image["id"]
    body = {
        "name": name,
        "disk_format": disk_format,
        "container_format": container_format,
        "visibility": "public",
        **properties,
    }
    image = glance.post("/v2/images", json=body).json()
    with open(data, "rb") as f:
        glance.put(
            f"/v2/images/{image['id']}/file",
            data=f,
            headers={"Content-Type": "application/octet-stream"},
        )
    status = glance.get(f"/v2/images/{image['id']}").json()["status"]
    if status != "active":
        raise CloudError(f"image {name} ({image['id']}) is {status} after upload")
    print(f"[openstack-aio] uploaded image {name} ({image['id']})")
    for old in existing:
        glance.delete(f"/v2/images/{old['id']}")
        print(f"[openstack-aio] deleted the outdated image {name} ({old['id']})")
    return image["id"]


def ensure_zone(compute: adapter.Adapter, name: str, hosts: list[str]) -> None:
    """Host aggregate ``name`` whose availability zone is ``name``, holding ``hosts``."""
    aggregates = compute.get("/os-aggregates").json()["aggregates"]
    agg = next((a for a in aggregates if a["name"] == name), None)
    if agg is None:
        body = {"aggregate": {"name": name, "availability_zone": name}}
        agg = compute.post("/os-aggregates", json=body).json()["aggregate"]
        print(f"[openstack-aio] created host aggregate and availability zone {name}")
    for host in hosts:
        if host not in (agg.get("hosts") or []):
            action = {"add_host": {"host": host}}
            agg = compute.post(f"/os-aggregates/{agg['id']}/action", json=action).json()[
                "aggregate"
            ]
            print(f"[openstack-aio] added {host} to availability zone {name}")


def setup_zones() -> None:
    """Servers created without a zone land on vtpm-aio (nova.conf default_schedule_zone);
    each pair of test hosts forms its own zone, so a migration's only choice is the other
    host of the pair."""
    compute = api(session(), "compute", "2.53")
    ensure_zone(compute, DEFAULT_ZONE, ["vtpm-aio"])
    for zone, hosts in PAIR_ZONES.items():
        ensure_zone(compute, zone, list(hosts))


def upload_images(guest_dir: Path) -> None:
    kernel, initrd = guest_dir / "vmlinuz", guest_dir / "initrd.img"
    uefi = guest_dir / "uefi.img"
    for f in (kernel, initrd, uefi):
        if not f.is_file():
            raise CloudError(f"test guest file {f} is missing: run tools/build-guest.sh")
    root_disk = aio_dir() / "data" / "vtpm-guest-root.raw"
    if not root_disk.exists() or root_disk.stat().st_size != ROOT_DISK_BYTES:
        root_disk.write_bytes(bytes(ROOT_DISK_BYTES))
    glance = api(session(), "image")
    kernel_id = ensure_image(glance, GUEST_KERNEL, kernel, "aki", "aki", {})
    ramdisk_id = ensure_image(glance, GUEST_RAMDISK, initrd, "ari", "ari", {})
    image_id = ensure_image(
        glance,
        GUEST_IMAGE,
        root_disk,
        "raw",
        "bare",
        {"kernel_id": kernel_id, "ramdisk_id": ramdisk_id, "os_command_line": GUEST_CMDLINE},
    )
    print(f"[openstack-aio] guest image {GUEST_IMAGE} = {image_id}")
    image_id = ensure_image(
        glance,
        REPORTING_IMAGE,
        root_disk,
        "raw",
        "bare",
        {"kernel_id": kernel_id, "ramdisk_id": ramdisk_id, "os_command_line": REPORTING_CMDLINE},
    )
    print(f"[openstack-aio] guest image {REPORTING_IMAGE} = {image_id}")
    image_id = ensure_image(glance, SECURE_BOOT_IMAGE, uefi, "raw", "bare",
                            SECURE_BOOT_PROPERTIES)
    print(f"[openstack-aio] guest image {SECURE_BOOT_IMAGE} = {image_id}")


def status() -> int:
    sess = session()
    services, hypervisors = compute_state(sess)
    for s in services:
        print(f"[openstack-aio] {s['binary']} on {s['host']}: {s['status']}, {s['state']}")
    # A compute that lost its libvirtd (a test restarted it) is disabled by Nova until it
    # reconnects: not ready either.
    up = {s["host"] for s in services if s["state"] == "up" and s["status"] == "enabled"}
    rc = 0 if {"vtpm-aio", *MULTIHOST} <= up else 3
    for hyp in hypervisors:
        traits = sorted(t for t in provider_traits(sess, hyp["id"]) if "TPM" in t)
        print(f"[openstack-aio] compute node {hyp['hypervisor_hostname']}: {' '.join(traits)}")
    if not hypervisors:
        print("[openstack-aio] no compute node is listed")
        rc = 3
    return rc


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    wait = sub.add_parser("wait-compute")
    wait.add_argument("--timeout", type=float, default=180)
    wait.add_argument("--traits", action="store_true")
    wait.add_argument("--pid", type=int, help="nova-compute's pid: fail as soon as it exits")
    wait.add_argument("--since", type=float, help="epoch seconds: a heartbeat must be newer")
    wait.add_argument("--host", help="this compute host only (default: any)")
    sub.add_parser("zones")
    images = sub.add_parser("images")
    images.add_argument("--guest-dir", type=Path, required=True)
    sub.add_parser("status")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "wait-compute":
            wait_compute(args.timeout, args.traits, args.pid, args.since, args.host)
        elif args.cmd == "zones":
            setup_zones()
        elif args.cmd == "images":
            upload_images(args.guest_dir)
        else:
            return status()
    except (CloudError, ks_exc.ClientException, OSError, KeyError) as e:
        print(f"[openstack-aio] ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
