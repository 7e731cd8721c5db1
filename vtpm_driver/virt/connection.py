"""Open libvirt and turn its errors into :mod:`vtpm_driver.exception` types.

Every ``libvirt.libvirtError`` the ``virt`` modules see goes through
:func:`to_vtpm_error`, so callers only ever handle our hierarchy:
``HypervisorUnavailable`` (libvirtd unreachable), ``InstanceNotFound`` (no such
domain) or ``VirtError`` (anything else). The original error stays reachable as
``__cause__`` (``raise ... from exc``) and :func:`libvirt_error_code` digs its
code out, so callers can branch on ``VIR_ERR_*`` codes without parsing text.

libvirt's default error handler prints every error on stderr, even the ones we
handle (a missing secret on an idempotent delete). :func:`silence_libvirt_errors`
replaces it with one that drops them: errors still raise, and we log them
ourselves where they matter.
"""

from __future__ import annotations

import threading
from types import TracebackType

import libvirt
from oslo_log import log as logging

from vtpm_driver import exception

LOG = logging.getLogger(__name__)

# Error codes that mean "libvirtd cannot be talked to", whatever the driver.
_CONNECTION_CODES = frozenset({libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN})
# Transport failures (socket gone, daemon restarted): Nova's _test_connection rule.
_TRANSPORT_DOMAINS = frozenset({libvirt.VIR_FROM_REMOTE, libvirt.VIR_FROM_RPC})
_TRANSPORT_CODES = frozenset(
    {libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_ERR_RPC}
)
# VIR_ERR_NONE/WARNING/ERROR are error *levels* that share values with codes.
_LEVEL_NAMES = frozenset({"VIR_ERR_NONE", "VIR_ERR_WARNING", "VIR_ERR_ERROR"})


def _error_names() -> dict[int, str]:
    names: dict[int, str] = {}
    for attr in sorted(dir(libvirt)):
        value = getattr(libvirt, attr)
        if attr.startswith("VIR_ERR_") and attr not in _LEVEL_NAMES and isinstance(value, int):
            names.setdefault(value, attr)
    return names


_ERROR_NAMES = _error_names()


def _ignore_error(_ctx: object, _error: object) -> None:
    """libvirt error callback that prints nothing (errors still raise)."""


def version_string(number: int) -> str:
    """libvirt's packed version (major * 1e6 + minor * 1e3 + micro) as text."""
    return f"{number // 1_000_000}.{number // 1_000 % 1_000}.{number % 1_000}"


def silence_libvirt_errors() -> None:
    """Stop libvirt from printing its errors on stderr (idempotent)."""
    libvirt.registerErrorHandler(_ignore_error, None)


def error_name(code: int | None) -> str:
    """``VIR_ERR_NO_SECRET`` for 66; ``code N`` for a code this binding does not know."""
    if code is None:
        return "unknown error"
    return _ERROR_NAMES.get(code, f"code {code}")


def libvirt_error_code(exc: BaseException | None) -> int | None:
    """The ``VIR_ERR_*`` code of ``exc`` or of the libvirt error it was raised from.

    Follows ``__cause__`` so it works both on a raw ``libvirtError`` and on the
    :class:`~vtpm_driver.exception.VTPMError` that :func:`to_vtpm_error` made of it.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, libvirt.libvirtError):
            return exc.get_error_code()
        exc = exc.__cause__
    return None


def message(exc: libvirt.libvirtError) -> str:
    """libvirt's message on one line (it may span several)."""
    return " ".join((exc.get_error_message() or str(exc) or "no message").split())


def describe(exc: libvirt.libvirtError) -> str:
    """libvirt's message plus the symbolic code, on one line."""
    return f"{message(exc)} ({error_name(exc.get_error_code())})"


def is_connection_error(exc: libvirt.libvirtError) -> bool:
    """True when the error says libvirtd itself is unreachable, not the operation.

    The one rule for every caller (Nova's ``_test_connection`` rule): no or an
    invalid connection, or a transport failure reported by the remote/RPC layer.
    """
    code = exc.get_error_code()
    if code in _CONNECTION_CODES:
        return True
    return exc.get_error_domain() in _TRANSPORT_DOMAINS and code in _TRANSPORT_CODES


def to_vtpm_error(exc: libvirt.libvirtError, action: str) -> exception.VTPMError:
    """Map a libvirt error raised while doing ``action`` to our hierarchy.

    ``action`` names what was attempted and on what, e.g. ``"start domain
    'vm1'"``; the result reads ``"start domain 'vm1' failed: <libvirt's message>
    (VIR_ERR_...)"``. Use as ``raise to_vtpm_error(exc, ...) from exc``.
    """
    text = f"{action} failed: {describe(exc)}"
    code = exc.get_error_code()
    if is_connection_error(exc):
        return exception.HypervisorUnavailable(text)
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return exception.InstanceNotFound(text)
    return exception.VirtError(text)


def connect(uri: str) -> libvirt.virConnect:
    """Open a read-write connection to ``uri``.

    :raises HypervisorUnavailable: one line naming the URI and libvirt's reason.
    """
    silence_libvirt_errors()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise exception.HypervisorUnavailable(
            f"cannot connect to libvirt at {uri!r}: {describe(exc)}"
        ) from exc
    if conn is None:  # very old bindings returned None instead of raising
        raise exception.HypervisorUnavailable(f"cannot connect to libvirt at {uri!r}")
    LOG.debug("Connected to libvirt at %s", uri)
    return conn


class Hypervisor:
    """One lazily opened libvirt connection, reused for every call.

    The connection is opened on first use of :attr:`conn` and opened again if
    libvirtd went away in between (a restarted daemon drops its clients). Use
    as a context manager to close it at the end::

        with Hypervisor("qemu:///system") as hv:
            hv.conn.listAllDomains()
    """

    def __init__(self, uri: str) -> None:
        self._uri = uri
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.Lock()

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def conn(self) -> libvirt.virConnect:
        """The open connection (connects on first use)."""
        with self._lock:
            if self._conn is not None and not self._alive(self._conn):
                LOG.warning("Connection to libvirt at %s was lost; reconnecting", self._uri)
                self._drop()
            if self._conn is None:
                self._conn = connect(self._uri)
            return self._conn

    @staticmethod
    def _alive(conn: libvirt.virConnect) -> bool:
        try:
            return bool(conn.isAlive())
        except libvirt.libvirtError:
            return False

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except libvirt.libvirtError as exc:
                LOG.debug("Ignoring error while closing libvirt connection: %s", describe(exc))

    def close(self) -> None:
        """Close the connection if open; the next use of :attr:`conn` reopens it."""
        with self._lock:
            self._drop()

    def __enter__(self) -> Hypervisor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self._conn is not None else "closed"
        return f"Hypervisor(uri={self._uri!r}, {state})"
