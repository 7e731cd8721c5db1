"""Manufacture: what ``swtpm_setup`` costs a vTPM's first boot, part by part.

A vTPM's first start differs from every later one by its manufacture: libvirt
runs ``swtpm_setup`` before QEMU, and the guest waits. The boot section
measures the whole first boot; this one takes the manufacture apart, running
Debian's ``swtpm_setup`` itself as libvirt does (TPM 2.0, state encrypted with
``aes-256-cbc`` under a passphrase given through a file descriptor, ``sha256``
bank) into private scratch directories, in three variants:

* ``state_only``: no endorsement key: swtpm started, its state initialised,
  encrypted and written (the floor of any manufacture);
* ``ek``: ``--createek``: the RSA 2048 and ECC P-384 endorsement keys;
* ``ek_certs``: what libvirt asks for (``--create-ek-cert
  --create-platform-cert --lock-nvram``): the keys, and EK and platform
  certificates signed by ``swtpm_localca`` with a CA of its own in the
  scratch directory (made by an untimed first run), as a deployment's CA
  would sign them.

``swtpm_setup --runas`` is not used: the benchmark runs as root and writes
nothing outside its scratch directories, which are removed afterwards. The
passphrase is random per run, passed through a pipe, never on a command line
or in a file.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench import stats

VARIANTS = {
    "state_only": [],
    "ek": ["--createek"],
    "ek_certs": ["--create-ek-cert", "--create-platform-cert", "--lock-nvram"],
}
SETUP_TIMEOUT = 120.0  # a bound for a hung swtpm_setup, not a speed check


class ManufactureUnavailable(RuntimeError):
    """swtpm_setup or swtpm_localca is missing."""


def check_available() -> tuple[str, str]:
    """The paths of swtpm_setup and swtpm_localca.

    :raises ManufactureUnavailable: one of them is not installed.
    """
    setup, localca = shutil.which("swtpm_setup"), shutil.which("swtpm_localca")
    if not setup or not localca:
        raise ManufactureUnavailable(
            "swtpm_setup and swtpm_localca are needed (Debian's swtpm-tools)")
    return setup, localca


def _config(scratch: Path, localca: str) -> Path:
    """swtpm_setup and swtpm_localca configuration confined to ``scratch``."""
    ca = scratch / "localca"
    ca.mkdir(mode=0o700)
    (scratch / "swtpm-localca.conf").write_text(
        f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\n"
        f"issuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n")
    (scratch / "swtpm-localca.options").write_text(
        "--platform-manufacturer vtpm-driver-bench\n--platform-version 2.1\n"
        "--platform-model QEMU\n")
    setup_conf = scratch / "swtpm_setup.conf"
    setup_conf.write_text(
        f"create_certs_tool = {localca}\n"
        f"create_certs_tool_config = {scratch}/swtpm-localca.conf\n"
        f"create_certs_tool_options = {scratch}/swtpm-localca.options\n")
    return setup_conf


def manufacture(setup: str, config: Path, state: Path, extra: list[str]) -> float:
    """One ``swtpm_setup`` run into the empty directory ``state``; its wall time.

    :raises RuntimeError: swtpm_setup failed (its last output lines in the message).
    """
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, secrets.token_hex(32).encode())
    finally:
        os.close(write_end)
    argv = [setup, "--tpm2", "--tpm-state", str(state), "--config", str(config),
            "--vmid", f"vtpm-bench:{state.name}", "--logfile", str(state / "setup.log"),
            "--pcr-banks", "sha256", "--pwdfile-fd", str(read_end),
            "--cipher", "aes-256-cbc", "--not-overwrite", *extra]
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(argv, pass_fds=(read_end,), capture_output=True, text=True,
                              timeout=SETUP_TIMEOUT, check=False)
        elapsed = time.perf_counter() - t0
    finally:
        os.close(read_end)
    if proc.returncode != 0:
        log = (state / "setup.log").read_text(errors="replace") if (
            state / "setup.log").exists() else ""
        tail = "\n".join((proc.stderr + log).strip().splitlines()[-5:])
        raise RuntimeError(f"swtpm_setup {' '.join(extra) or '(no EK)'} failed: {tail}")
    return elapsed


def run(runs: int) -> dict:
    """The manufacture section: ``runs`` manufactures of each variant, interleaved."""
    setup, localca = check_available()
    section: dict = {"runs": runs, "variants": {k: " ".join(v) or "(no EK)"
                                                for k, v in VARIANTS.items()}}
    samples: dict[str, list[float]] = {k: [] for k in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="vtpm-bench-manufacture-") as tmp:
        scratch = Path(tmp)
        config = _config(scratch, localca)
        # Untimed: swtpm_localca makes its CA (key + self-signed certificate) on first use.
        for n in range(runs + 1):
            for name, extra in VARIANTS.items():
                state = scratch / f"{name}-{n}"
                state.mkdir(mode=0o700)
                elapsed = manufacture(setup, config, state, extra)
                if n:
                    samples[name].append(elapsed)
                shutil.rmtree(state)
    for name in VARIANTS:
        section[name] = stats.summarize(samples[name], digits=3)

    def median(name: str) -> float | None:
        return section[name].get("median")

    parts = {"endorsement_keys": ("ek", "state_only"), "certificates": ("ek_certs", "ek")}
    section["share_s"] = {
        part: round(median(a) - median(b), 3)
        if median(a) is not None and median(b) is not None else None
        for part, (a, b) in parts.items()}
    return section
