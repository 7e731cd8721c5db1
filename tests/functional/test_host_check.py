"""`vtpm-driver host check` against the real libvirtd (SPEC C2, C3).

Runs the installed console script in a subprocess, as an operator would. The
expected traits are derived from `virsh domcapabilities` independently of the
code under test. Never stops or reconfigures libvirtd.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
from lxml import etree

pytestmark = pytest.mark.functional

URI = "qemu:///system"
DEAD_URI = "qemu+unix:///system?socket=/nonexistent"
ALL_TRAITS = (
    "COMPUTE_SECURITY_TPM_1_2",
    "COMPUTE_SECURITY_TPM_2_0",
    "COMPUTE_SECURITY_TPM_TIS",
    "COMPUTE_SECURITY_TPM_CRB",
    "COMPUTE_SECURITY_TPM_SECRET_SECURITY_USER",
    "COMPUTE_SECURITY_TPM_SECRET_SECURITY_HOST",
    "COMPUTE_SECURITY_TPM_SECRET_SECURITY_DEPLOYMENT",
    # Ours: libvirt 9.0 can set every bank Debian's swtpm implements.
    "CUSTOM_VTPM_PCR_BANK_SHA1",
    "CUSTOM_VTPM_PCR_BANK_SHA256",
    "CUSTOM_VTPM_PCR_BANK_SHA384",
    "CUSTOM_VTPM_PCR_BANK_SHA512",
)
# Bounds a hung libvirt, not a performance check.
HANG_GUARD = 180


def _unavailable(reason: str) -> None:
    """Under CI a missing service is a failure, elsewhere a skip."""
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def script() -> str:
    path = pathlib.Path(sys.executable).parent / "vtpm-driver"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `{sys.executable} -m pip install -e . --no-deps`")
    return str(path)


@pytest.fixture(scope="module")
def domcaps() -> etree._Element:
    if not shutil.which("virsh"):
        _unavailable("virsh is not installed (run tools/setup-host.sh)")
    proc = subprocess.run(
        ["virsh", "-c", URI, "domcapabilities", "--virttype", "qemu"],
        capture_output=True, text=True, timeout=HANG_GUARD, check=False,
    )
    if proc.returncode != 0:
        _unavailable(f"libvirtd at {URI} is not reachable: {proc.stderr.strip()}")
    return etree.fromstring(proc.stdout.encode())


def _values(domcaps: etree._Element, enum: str) -> set[str]:
    return {v.strip() for v in domcaps.xpath(f"devices/tpm/enum[@name='{enum}']/value/text()")}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def swtpm_banks(tmp_path: pathlib.Path) -> set[str]:
    """The banks a fresh swtpm implements, by Debian's tpm2-tools over its swtpm TCTI
    (loopback TCP): an answer found apart from the driver's own raw probe."""
    port = _free_port()
    state = tmp_path / "banks-tpm"
    state.mkdir()
    proc = subprocess.Popen(
        ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
         "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
         "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
         "--flags", "not-need-init,startup-clear"])
    try:
        for _ in range(100):
            out = subprocess.run(["tpm2", "getcap", "pcrs", "-T",
                                  f"swtpm:host=127.0.0.1,port={port}"],
                                 capture_output=True, text=True, check=False,
                                 timeout=HANG_GUARD)
            if out.returncode == 0:
                return set(re.findall(r"^\s*-\s*(sha\d+):", out.stdout, re.MULTILINE))
            time.sleep(0.1)
        raise AssertionError(f"tpm2 getcap pcrs never answered: {out.stderr}")
    finally:
        proc.kill()
        proc.wait()


def expected_traits(domcaps: etree._Element, banks: set[str]) -> dict[str, bool]:
    """What SPEC C3 says the host must report, computed straight from virsh's XML,
    and the PCR banks swtpm implements (libvirt 9.0 here can activate each)."""
    models = _values(domcaps, "model")
    versions = _values(domcaps, "backendVersion") or {"1.2", "2.0"}
    return {
        "COMPUTE_SECURITY_TPM_1_2": "1.2" in versions,
        "COMPUTE_SECURITY_TPM_2_0": "2.0" in versions,
        "COMPUTE_SECURITY_TPM_TIS": "tpm-tis" in models,
        "COMPUTE_SECURITY_TPM_CRB": "tpm-crb" in models,
        "COMPUTE_SECURITY_TPM_SECRET_SECURITY_USER": True,
        "COMPUTE_SECURITY_TPM_SECRET_SECURITY_HOST": True,
        "COMPUTE_SECURITY_TPM_SECRET_SECURITY_DEPLOYMENT": True,
        **{f"CUSTOM_VTPM_PCR_BANK_{bank.upper()}": bank in banks
           for bank in ("sha1", "sha256", "sha384", "sha512")},
    }


def run_host_check(script: str, config: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [script, "--config-file", str(config), "host", "check", "-f", "json"],
        capture_output=True, text=True, timeout=HANG_GUARD, check=False,
    )


def write_config(tmp_path: pathlib.Path, *extra: str) -> pathlib.Path:
    path = tmp_path / "vtpm-driver.conf"
    path.write_text("\n".join(["[libvirt]", "swtpm_enabled = True", "virt_type = qemu", *extra])
                    + "\n")
    return path


def test_host_check_reports_what_libvirt_offers(script, domcaps, tmp_path):
    tpm = domcaps.find("devices/tpm")
    assert tpm is not None and tpm.get("supported") == "yes", "this host must support vTPM"
    assert "emulator" in _values(domcaps, "backendModel")

    proc = run_host_check(script, write_config(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    report = json.loads(proc.stdout)  # stdout holds the JSON and nothing else
    assert list(report) == ["supported", "traits", "problems", "versions", "secure_boot",
                            "windows11", "windows11_missing"]
    assert report["problems"] == []
    assert report["supported"] is True
    assert report["traits"] == expected_traits(domcaps, swtpm_banks(tmp_path))
    # setup-host.sh installs Debian's ovmf: virsh lists a Secure Boot loader for q35.
    q35 = subprocess.run(["virsh", "-c", URI, "domcapabilities", "--virttype", "qemu",
                          "--machine", "q35"], capture_output=True, text=True,
                         timeout=HANG_GUARD, check=True).stdout
    assert "<value>efi</value>" in q35
    assert (report["secure_boot"], report["windows11"], report["windows11_missing"]) == (
        True, True, [])
    # On the project's dev/CI host libvirt 9.0 + QEMU 7.2 offer everything.
    assert report["traits"] == dict.fromkeys(ALL_TRAITS, True)
    swtpm = subprocess.run(["swtpm", "--version"], capture_output=True, text=True,
                           check=False, timeout=HANG_GUARD).stdout
    assert report["versions"]["swtpm"] in swtpm
    assert set(report["versions"]) >= {"libvirt", "qemu", "swtpm"}


def test_host_check_honours_the_config_file(script, domcaps, tmp_path):
    config = write_config(tmp_path, "supported_tpm_secret_security = host",
                          "swtpm_user = vtpm-no-such-user")
    proc = run_host_check(script, config)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["supported"] is False
    assert report["traits"] == dict.fromkeys(ALL_TRAITS, False)
    assert len(report["problems"]) == 1
    assert "swtpm_user 'vtpm-no-such-user' does not exist" in report["problems"][0]


def test_host_check_unreachable_libvirt_is_one_line(script, tmp_path):
    proc = run_host_check(script, write_config(tmp_path, f"connection_uri = {DEAD_URI}"))
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"vtpm-driver: error: cannot connect to libvirt at {DEAD_URI}: ")
    assert "/nonexistent" in lines[0]
    assert "Traceback" not in proc.stderr
