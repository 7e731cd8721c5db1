"""The real :class:`~vtpm_driver.model.hostcheck.HostProbe`: libvirt, ``PATH``, the user database.

:func:`vtpm_driver.model.hostcheck.check_host` decides what a host supports from the facts
a probe reports; this is the probe of a standalone host (the Nova shim has its
own over Nova's ``Host``). libvirt errors are classified by
:func:`vtpm_driver.virt.connection.is_connection_error`, the one rule for the
whole driver: libvirtd unreachable -> ``HypervisorUnavailable`` (and the
connection is dropped so the next call reconnects), anything else
-> ``VirtError``.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import libvirt
from oslo_config import cfg
from oslo_log import log as logging

from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception
from vtpm_driver.virt import connection

LOG = logging.getLogger(__name__)

_SWTPM_VERSION_TIMEOUT = 10  # seconds; `swtpm --version` answers at once
_SWTPM_PROBE_TIMEOUT = 10  # seconds for a scratch swtpm to listen and answer one command
#: TPM2_GetCapability(TPM_CAP_PCRS, 0, 1): every bank the TPM implements, active or not.
_GET_CAP_PCRS = bytes.fromhex(
    "8001" "00000016" "0000017a" "00000005" "00000000" "00000001")
_HASH_ALGS = {0x0004: "sha1", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512"}
_VERSION_RE = re.compile(r"\b(\d+(?:\.\d+)+)\b")


class LibvirtHostProbe:
    """The real host: one lazily opened libvirt connection, ``PATH``, passwd/group.

    ``open_connection`` is a seam for tests and for sharing a connection
    factory (the Nova shim passes Nova's ``Host.get_connection``); it
    defaults to ``libvirt.open``.
    """

    def __init__(self, uri: str,
                 open_connection: Callable[[str], Any] | None = None) -> None:
        self.uri = uri
        self._open = open_connection or libvirt.open
        self._conn: Any = None

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> LibvirtHostProbe:
        """A probe for the URI ``conf`` points at."""
        return cls(vtpm_conf.libvirt_uri(conf))

    def __enter__(self) -> LibvirtHostProbe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the libvirt connection, if one was opened (idempotent)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except libvirt.libvirtError as exc:
                LOG.debug("closing libvirt connection to %s: %s", self.uri, exc)

    def _unavailable(self, exc: libvirt.libvirtError) -> exception.HypervisorUnavailable:
        return exception.HypervisorUnavailable(
            f"cannot connect to libvirt at {self.uri}: {connection.message(exc)}"
        )

    def _connection(self) -> Any:
        if self._conn is None:
            connection.silence_libvirt_errors()
            try:
                self._conn = self._open(self.uri)
            except libvirt.libvirtError as exc:
                raise self._unavailable(exc) from None
        return self._conn

    def _call(self, what: str, func: Callable[..., Any], *args: Any) -> Any:
        conn = self._connection()
        try:
            return func(conn, *args)
        except libvirt.libvirtError as exc:
            if connection.is_connection_error(exc):
                self.close()
                raise self._unavailable(exc) from None
            raise exception.VirtError(
                f"libvirt at {self.uri} refused {what}: {connection.message(exc)}"
            ) from None

    def domain_capabilities(self, virt_type: str, machine: str | None = None) -> str:
        """``virsh domcapabilities --virttype <virt_type> [--machine <machine>]`` for the
        host's default emulator.

        :raises HypervisorUnavailable: libvirt cannot be reached.
        :raises VirtError: libvirt refused the query.
        """
        return self._call(
            "to report domain capabilities",
            lambda conn: conn.getDomainCapabilities(None, None, machine, virt_type),
        )

    def which(self, name: str) -> str | None:
        """``shutil.which``: the binaries libvirt will run must be on ``PATH``."""
        return shutil.which(name)

    def user_exists(self, name: str) -> bool:
        """Whether ``pwd`` knows ``name``."""
        try:
            pwd.getpwnam(name)
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def group_exists(self, name: str) -> bool:
        """Whether ``grp`` knows ``name``."""
        try:
            grp.getgrnam(name)
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def versions(self) -> dict[str, str]:
        """libvirt, hypervisor (e.g. QEMU) and swtpm versions, for the report.

        :raises HypervisorUnavailable: libvirt cannot be reached.
        """
        versions = {"libvirt": connection.version_string(
            self._call("getLibVersion", lambda c: c.getLibVersion()))}
        hv_type = self._call("getType", lambda c: c.getType())
        hv_version = self._call("getVersion", lambda c: c.getVersion())
        if hv_version:
            versions[str(hv_type).lower()] = connection.version_string(hv_version)
        swtpm = self.swtpm_version()
        if swtpm:
            versions["swtpm"] = swtpm
        return versions

    def swtpm_version(self) -> str | None:
        """``swtpm --version`` (e.g. ``0.7.1``), or None when it is absent or mute."""
        path = self.which("swtpm")
        if not path:
            return None
        try:
            out = subprocess.run(
                [path, "--version"], capture_output=True, text=True, check=False,
                timeout=_SWTPM_VERSION_TIMEOUT,
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            LOG.debug("cannot run %s --version: %s", path, exc)
            return None
        match = _VERSION_RE.search(out)
        return match.group(1) if match else None

    def pcr_banks(self) -> frozenset[str]:
        """The PCR banks this host's swtpm implements (see :func:`swtpm_pcr_banks`)."""
        return swtpm_pcr_banks(self.which("swtpm"))

    def read_file(self, path: str) -> bytes:
        """:raises OSError: it cannot be read."""
        with open(path, "rb") as f:
            return f.read()


def swtpm_pcr_banks(swtpm: str | None) -> frozenset[str]:
    """The PCR banks a TPM 2.0 from ``swtpm`` implements, asked of a scratch instance.

    libtpms decides which banks exist and swtpm reports none of them, so the
    only true answer is the TPM's own: a throw-away swtpm in a private temporary
    directory (no EK is made, so this takes well under a second) answers
    ``TPM2_GetCapability(TPM_CAP_PCRS)``, which lists every implemented bank,
    active or not. Empty when swtpm is absent, does not start or answers
    nothing we can read (the reason is logged): no bank trait is then claimed.
    Idempotent; the directory and the process are gone when it returns.
    """
    if not swtpm:
        return frozenset()
    with tempfile.TemporaryDirectory(prefix="vtpm-banks-") as scratch:
        sock = os.path.join(scratch, "server")
        proc = None
        try:
            proc = subprocess.Popen(
                [swtpm, "socket", "--tpm2", "--tpmstate", f"dir={scratch}",
                 "--server", f"type=unixio,path={sock}",
                 "--ctrl", f"type=unixio,path={os.path.join(scratch, 'ctrl')}",
                 "--flags", "not-need-init,startup-clear"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE)
            return _banks_in(_ask(sock, proc, _GET_CAP_PCRS))
        except (OSError, ValueError, struct.error) as exc:
            LOG.warning("cannot ask %s which PCR banks it implements: %s", swtpm, exc)
            return frozenset()
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()


def _ask(path: str, proc: subprocess.Popen, command: bytes) -> bytes:
    """Send one TPM command to swtpm's server socket at ``path``; its whole response."""
    deadline = time.monotonic() + _SWTPM_PROBE_TIMEOUT
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise OSError(f"swtpm exited with status {proc.returncode}: "
                          f"{proc.stderr.read().decode(errors='replace').strip()[:200]}")
        if time.monotonic() > deadline:
            raise OSError(f"swtpm did not listen on {path} within {_SWTPM_PROBE_TIMEOUT} s")
        time.sleep(0.01)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(_SWTPM_PROBE_TIMEOUT)
        conn.connect(path)
        conn.sendall(command)
        response = conn.recv(10)
        if len(response) < 10:
            raise ValueError("short TPM response header")
        size = struct.unpack(">I", response[2:6])[0]
        while len(response) < size:
            chunk = conn.recv(size - len(response))
            if not chunk:
                raise ValueError("TPM response cut short")
            response += chunk
    return response


def _banks_in(response: bytes) -> frozenset[str]:
    """The banks in a ``TPM2_GetCapability(TPM_CAP_PCRS)`` response (unknown hashes left out).

    :raises ValueError: an error code or a malformed ``TPML_PCR_SELECTION``.
    :raises struct.error: a response too short for what it says it holds.
    """
    rc = struct.unpack(">I", response[6:10])[0]
    if rc:
        raise ValueError(f"TPM2_GetCapability failed with 0x{rc:x}")
    # header (10), moreData (1), capability (4), then TPML_PCR_SELECTION.
    (count,) = struct.unpack(">I", response[15:19])
    banks, offset = set(), 19
    for _ in range(count):
        alg, size = struct.unpack(">HB", response[offset:offset + 3])
        offset += 3 + size
        if offset > len(response):
            raise ValueError("TPML_PCR_SELECTION runs past the response")
        if alg in _HASH_ALGS:
            banks.add(_HASH_ALGS[alg])
    return frozenset(banks)
