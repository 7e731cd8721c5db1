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
import pwd
import re
import shutil
import subprocess
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

    def domain_capabilities(self, virt_type: str) -> str:
        """``virsh domcapabilities --virttype <virt_type>`` for the host's default emulator.

        :raises HypervisorUnavailable: libvirt cannot be reached.
        :raises VirtError: libvirt refused the query.
        """
        return self._call(
            "to report domain capabilities",
            lambda conn: conn.getDomainCapabilities(None, None, None, virt_type),
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
