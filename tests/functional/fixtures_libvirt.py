"""Fixtures and helpers for functional tests against the real libvirtd (qemu:///system).

Loaded by tests/conftest.py through ``pytest_plugins``; the plain helpers can
also be imported (``from tests.functional.fixtures_libvirt import wait_for_shutoff``).

``two_hosts`` starts the two private test hosts of tools/test-hosts.sh (host-a,
host-b: the all-in-one cloud's computes) and :func:`configure_test_host` points a
configuration at one of them as the command line's one host.

The test guest (tools/build-guest.sh) prints one line per boot on its serial console::

    VTPM_RESULT version=<1.2|2|none> driver=<tpm_tis|tpm_crb|none> getrandom_rc=<0|...>
                ek=<sha256 hex|none>

see tools/guest/README.md.  Under ``CI=true`` a missing libvirtd or guest fails the test
instead of skipping it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests.functional.support import run_tool_script, unavailable
from vtpm_driver.guestreport import parse_vtpm_results  # the guest's one-line protocol

LIBVIRT_URI = os.environ.get("VTPM_LIBVIRT_URI", "qemu:///system")
REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_GUEST = REPO_ROOT / "tools" / "build-guest.sh"
GUEST_DIR = Path(os.environ.get("VTPM_GUEST_DIR", "/var/cache/vtpm-driver/guest"))
SWTPM_STATE_ROOT = Path("/var/lib/libvirt/swtpm")
GUEST_CMDLINE = "console=ttyS0"
# Generous: a guest boots in a few seconds under TCG, but CI machines are shared.
SHUTOFF_TIMEOUT = 180.0

# swtpm's state blob header (swtpm_nvstore.c): version u8, min_version u8, hdrsize be16,
# flags be16, totlen be32.
SWTPM_BLOB_HEADER_LEN = 10
SWTPM_BLOB_FLAG_ENCRYPTED = 0x01

# The two private libvirt hosts of tools/test-hosts.sh (loopback only).
HOSTS_SCRIPT = REPO_ROOT / "tools" / "test-hosts.sh"
HOSTS_DIR = Path(os.environ.get("VTPM_HOSTS_DIR", "/var/lib/vtpm-driver/hosts"))
HOST_URIS = {
    "host-a": "qemu+tcp://127.0.0.1:16611/system",
    "host-b": "qemu+tcp://127.0.0.1:16612/system",
}


@dataclasses.dataclass(frozen=True)
class TestGuest:
    """Paths of the direct-kernel-boot test guest."""

    __test__ = False  # not a test class, despite the name

    kernel: Path
    initrd: Path
    cmdline: str = GUEST_CMDLINE
    #: The same guest on a GPT disk booting shim -> GRUB -> kernel under UEFI Secure
    #: Boot, staying up (``vtpm_test=stay`` is in its GRUB entry); and the same disk with
    #: the kernel's signature removed, which Secure Boot must refuse. Copy them per server:
    #: a running domain holds its disk's write lock.
    uefi_disk: Path | None = None
    unsigned_disk: Path | None = None


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default, even ones we expect."""


@pytest.fixture(scope="session")
def libvirt_conn() -> Iterator[libvirt.virConnect]:
    """A connection to the real system libvirtd."""
    libvirt.registerErrorHandler(_ignore_libvirt_error, None)
    try:
        conn = libvirt.open(LIBVIRT_URI)
    except libvirt.libvirtError as exc:
        unavailable(f"libvirt at {LIBVIRT_URI} is unreachable: {exc} "
                    "(run tools/setup-host.sh)")
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture(scope="session")
def test_guest() -> TestGuest:
    """Kernel + initramfs of the test guest, (re)built by tools/build-guest.sh.

    The script is idempotent and returns in well under a second when the guest is up to
    date, so it runs every session: an edited tools/guest/init is picked up.
    """
    kernel, initrd = GUEST_DIR / "vmlinuz", GUEST_DIR / "initrd.img"
    env = dict(os.environ, VTPM_GUEST_DIR=str(GUEST_DIR))
    try:
        proc = subprocess.run(["bash", str(BUILD_GUEST)], env=env, capture_output=True,
                              text=True, timeout=900, check=False)
        ok, output = proc.returncode == 0, proc.stdout + proc.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        ok, output = False, str(exc)
    if not ok:
        if kernel.is_file() and initrd.is_file():
            # Keep testing with what is there (e.g. apt offline); say so in the log.
            print(f"tools/build-guest.sh failed, using the existing guest:\n{output}")
        else:
            unavailable(f"cannot build the test guest in {GUEST_DIR}:\n{output[-2000:]}")
    uefi, unsigned = GUEST_DIR / "uefi.img", GUEST_DIR / "uefi-unsigned.img"
    return TestGuest(kernel=kernel, initrd=initrd,
                     uefi_disk=uefi if uefi.is_file() else None,
                     unsigned_disk=unsigned if unsigned.is_file() else None)


def host_swtpm_dir(host: str) -> Path:
    """A test host's swtpm state directory as seen from here: its own
    ``/var/lib/libvirt/swtpm``, bind-mounted from ``HOSTS_DIR/<host>/lib/swtpm``."""
    return HOSTS_DIR / host / "lib" / "swtpm"


def configure_test_host(conf: Any, host: str) -> None:
    """Point ``conf`` at test host ``host`` as the command line's one host: ``[libvirt]
    connection_uri`` and ``[vtpm] swtpm_state_dir`` (its directory as seen from here).
    The same as tools/test-hosts.sh writes into ``HOSTS_DIR/<host>/vtpm-driver.conf``."""
    conf.set_override("connection_uri", HOST_URIS[host], group="libvirt")
    conf.set_override("swtpm_state_dir", str(host_swtpm_dir(host)), group="vtpm")


@pytest.fixture(scope="module")
def two_hosts() -> Iterator[dict[str, libvirt.virConnect]]:
    """Both test hosts started (idempotently: tools/test-hosts.sh start) and a
    connection to each, by name."""
    rc, output = run_tool_script(HOSTS_SCRIPT, "start", timeout=180, env={})
    if rc != 0:
        unavailable(f"tools/test-hosts.sh start failed ({rc}):\n{output[-2000:]}")
    conns = {name: libvirt.open(uri) for name, uri in HOST_URIS.items()}
    try:
        yield conns
    finally:
        for conn in conns.values():
            try:
                conn.close()
            except libvirt.libvirtError:
                pass


def wait_for_shutoff(dom: libvirt.virDomain, timeout: float = SHUTOFF_TIMEOUT) -> None:
    """Wait until the domain is shut off; raise TimeoutError after ``timeout`` seconds.

    A bounded wait, not a speed check: the guest powers itself off after printing.
    """
    deadline = time.monotonic() + timeout
    while True:
        state = dom.state()[0]
        if state == libvirt.VIR_DOMAIN_SHUTOFF:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"domain {dom.name()} still in state {state} after {timeout} s")
        time.sleep(0.2)


def read_console(path: str | os.PathLike[str]) -> str:
    """Text of a serial console log ('' if QEMU has not created it yet)."""
    try:
        return Path(path).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def last_vtpm_result(path: str | os.PathLike[str]) -> dict[str, str]:
    """The LAST VTPM_RESULT of a console log; AssertionError (with the log tail) if none."""
    text = read_console(path)
    results = parse_vtpm_results(text)
    if not results:
        raise AssertionError(f"no VTPM_RESULT line in {path}; console ends with:\n"
                             f"{text[-3000:]}")
    return results[-1]


def swtpm_state_dir(domain_uuid: str) -> Path:
    """Where libvirt keeps a domain's swtpm state."""
    return SWTPM_STATE_ROOT / domain_uuid


def swtpm_state_file(domain_uuid: str, version: str) -> Path:
    """The permanent-state blob of a domain's vTPM (layout of libvirt 9 + swtpm 0.7)."""
    if version == "1.2":
        return swtpm_state_dir(domain_uuid) / "tpm1.2" / "tpm-00.permall"
    return swtpm_state_dir(domain_uuid) / "tpm2" / "tpm2-00.permall"


def swtpm_blob_flags(path: str | os.PathLike[str]) -> int:
    """The flags of a swtpm state blob header; checks the header's total length too."""
    data = Path(path).read_bytes()
    if len(data) < SWTPM_BLOB_HEADER_LEN:
        raise AssertionError(f"{path}: {len(data)} bytes, shorter than a swtpm blob header")
    hdrsize = int.from_bytes(data[2:4], "big")
    totlen = int.from_bytes(data[6:10], "big")
    if hdrsize < SWTPM_BLOB_HEADER_LEN or totlen != len(data):
        raise AssertionError(f"{path}: not a swtpm blob (hdrsize={hdrsize}, "
                             f"totlen={totlen}, size={len(data)})")
    return int.from_bytes(data[4:6], "big")


def define_vtpm_secret(conn: libvirt.virConnect, secret_uuid: str, usage_name: str,
                       value: bytes) -> libvirt.virSecret:
    """An ephemeral private vtpm secret; the value goes through setValue, never XML."""
    xml = (
        "<secret ephemeral='yes' private='yes'>"
        f"<uuid>{uuid.UUID(secret_uuid)}</uuid>"
        f"<usage type='vtpm'><name>{uuid.UUID(usage_name)}</name></usage>"
        "</secret>"
    )
    secret = conn.secretDefineXML(xml)
    try:
        secret.setValue(value)
    except libvirt.libvirtError:
        secret.undefine()
        raise
    return secret


_UNDEFINE_ALL = (libvirt.VIR_DOMAIN_UNDEFINE_TPM | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                 | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                 | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                 | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)


def _is_error(exc: libvirt.libvirtError, *codes: int) -> bool:
    return exc.get_error_code() in codes


class Cleanup:
    """Domains and libvirt secrets a test made; all removed when the test ends.

    Register a UUID *before* creating the object, so a half-done step is cleaned too.
    """

    def __init__(self, conn: libvirt.virConnect) -> None:
        self._conn = conn
        self._domains: list[str] = []
        self._secrets: list[str] = []

    def domain(self, domain_uuid: str) -> str:
        """Destroy + undefine this domain (and its TPM state) at teardown."""
        if domain_uuid not in self._domains:
            self._domains.append(domain_uuid)
        return domain_uuid

    def secret(self, secret_uuid: str) -> str:
        """Undefine this libvirt secret at teardown."""
        if secret_uuid not in self._secrets:
            self._secrets.append(secret_uuid)
        return secret_uuid

    def run(self) -> list[str]:
        """Remove everything registered; return what could not be removed."""
        problems = []
        for domain_uuid in reversed(self._domains):
            problems.extend(self._remove_domain(domain_uuid))
        for secret_uuid in reversed(self._secrets):
            try:
                self._conn.secretLookupByUUIDString(secret_uuid).undefine()
            except libvirt.libvirtError as exc:
                if not _is_error(exc, libvirt.VIR_ERR_NO_SECRET):
                    problems.append(f"secret {secret_uuid}: {exc}")
        return problems

    def _remove_domain(self, domain_uuid: str) -> list[str]:
        problems = []
        undefined = False
        try:
            dom = self._conn.lookupByUUIDString(domain_uuid)
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                # Without VIR_DOMAIN_UNDEFINE_KEEP_TPM, so libvirt deletes the swtpm state.
                dom.undefineFlags(_UNDEFINE_ALL)
            undefined = True
        except libvirt.libvirtError as exc:
            if not _is_error(exc, libvirt.VIR_ERR_NO_DOMAIN):
                problems.append(f"domain {domain_uuid}: {exc}")
        state_dir = swtpm_state_dir(domain_uuid)
        if state_dir.exists():
            # Expected when a test undefined the domain itself with KEEP_TPM; a libvirt
            # bug if our own undefine left it.
            if undefined:
                problems.append(f"domain {domain_uuid}: undefine left {state_dir}")
            shutil.rmtree(state_dir, ignore_errors=True)
        return problems


@pytest.fixture
def cleanup(libvirt_conn: libvirt.virConnect) -> Iterator[Cleanup]:
    """Register domains/secrets here; they are destroyed and undefined after the test."""
    registry = Cleanup(libvirt_conn)
    yield registry
    problems = registry.run()
    if problems:
        pytest.fail("cleanup: " + "; ".join(problems), pytrace=False)
