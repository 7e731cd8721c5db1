"""libvirt for the vTPM core, through Nova's ``Host`` object (never a connection of our own).

Two adapters of the core's interfaces:

* :class:`NovaSecretStore` (:class:`vtpm_driver.ops.secrets.SecretStore`)
  over ``Host.find_secret`` / ``create_secret`` and the secret object's
  ``undefine``: by usage (the instance UUID), never a listing of libvirt's
  secrets (which servers may have one here is Nova's record:
  ``VTPMLibvirtDriver.init_host``);
* :class:`StartedSecret`: what Nova's ``_create_guest`` undefines after a start;
* :class:`NovaHostProbe` (:class:`vtpm_driver.model.hostcheck.HostProbe`): libvirt's
  domain capabilities and versions through ``Host`` (so Nova's fakelibvirt
  answers in Nova's tests), and the host's swtpm binaries and accounts from
  :class:`OSFacts` (the operating system's, :class:`vtpm_driver.virt.probe.LibvirtHostProbe`).

libvirt errors are mapped once, here, to :mod:`vtpm_driver.exception`; the
``libvirt`` module is the one Nova's ``host`` module uses, looked up at call
time (Nova's tests replace it with fakelibvirt).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

from nova import exception as nova_exception
from nova.virt.libvirt import host as nova_host

from nova.virt.vtpm import translate
from vtpm_driver import exception
from vtpm_driver.ops import secrets as ops_secrets

USAGE_TYPE = "vtpm"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


@contextlib.contextmanager
def libvirt_errors(what: str) -> Iterator[None]:
    """Map libvirt's and Nova's ``Host`` errors to ours.

    :raises vtpm_driver.exception.HypervisorUnavailable: libvirt cannot be reached.
    :raises vtpm_driver.exception.VirtError: libvirt refused ``what``.
    """
    libvirt_error = nova_host.libvirt.libvirtError
    try:
        yield
    except nova_exception.HypervisorUnavailable as exc:
        raise exception.HypervisorUnavailable(
            f"cannot reach libvirt to {what}: {_one_line(exc)}") from None
    except libvirt_error as exc:
        raise exception.VirtError(
            f"libvirt refused to {what}: {_one_line(exc.get_error_message())}") from None


class NovaSecretStore:
    """The host's libvirt ``vtpm`` secrets through Nova's ``Host`` (usage = instance UUID).

    ``Host`` finds secrets by usage only; the store remembers which instance
    each secret it found or defined serves, so :meth:`undefine` (by secret
    UUID, the core's interface) can find it again, and the object
    ``Host`` returned, which :meth:`libvirt_secret` hands to Nova. Secrets are defined exactly as
    Nova's driver defines them (``Host.create_secret``: private and ephemeral
    by default for ``vtpm``, neither when ``persistent``); values never leave
    :meth:`define` (``Host.create_secret`` sets them with ``setValue``).
    """

    def __init__(self, nova_host_obj: Any) -> None:
        self._host = nova_host_obj
        self._known: dict[str, tuple[str, Any]] = {}  # secret UUID -> (instance, object)

    def __repr__(self) -> str:
        return f"NovaSecretStore(known={len(self._known)})"

    def find(self, instance_uuid: str) -> str | None:
        """UUID of the libvirt secret serving ``instance_uuid``, or None."""
        with libvirt_errors(f"look up the vTPM secret of server {instance_uuid}"):
            found = self._host.find_secret(USAGE_TYPE, instance_uuid)
            if found is None:
                return None
            secret_uuid = str(found.UUIDString())
        self._known[secret_uuid] = (instance_uuid, found)
        return secret_uuid

    def define(self, secret_uuid: str, instance_uuid: str, passphrase: str, *,
               persistent: bool) -> None:
        """Define it (private + ephemeral unless ``persistent``) with its value set.

        The passphrase goes to ``Host.create_secret`` as bytes, as Nova passes it
        (``nova.crypto``'s passphrase, ``vtpm_secret_value_bytes``) and as libvirt
        hands it back; our key managers give text.
        """
        kwargs = {"ephemeral": False, "private": False} if persistent else {}
        password = passphrase.encode("ascii") if isinstance(passphrase, str) else passphrase
        with libvirt_errors(f"define the vTPM secret of server {instance_uuid}"):
            created = self._host.create_secret(
                USAGE_TYPE, instance_uuid, password=password, uuid=secret_uuid, **kwargs)
        self._known[secret_uuid] = (instance_uuid, created)

    def libvirt_secret(self, secret_uuid: str) -> Any:
        """The libvirt secret object last found or defined under ``secret_uuid``, or None."""
        known = self._known.get(secret_uuid)
        return None if known is None else known[1]

    def undefine(self, secret_uuid: str) -> bool:
        """Undefine it; True if it existed. Idempotent.

        Looked up again by usage first (a remembered object may be stale: Nova
        or another host's service may have undefined or replaced it).
        """
        known = self._known.pop(secret_uuid, None)
        if known is None:
            return False
        with libvirt_errors(f"undefine vTPM secret {secret_uuid}"):
            found = self._host.find_secret(USAGE_TYPE, known[0])
            if found is None or str(found.UUIDString()) != secret_uuid:
                return False
            found.undefine()
        return True


class OSFacts(Protocol):
    """The host facts :func:`vtpm_driver.model.hostcheck.check_host` reads besides libvirt."""

    def which(self, name: str) -> str | None: ...

    def user_exists(self, name: str) -> bool: ...

    def group_exists(self, name: str) -> bool: ...

    def swtpm_version(self) -> str | None: ...

    def pcr_banks(self) -> frozenset[str]: ...

    def read_file(self, path: str) -> bytes: ...


class NovaHostProbe:
    """:class:`vtpm_driver.model.hostcheck.HostProbe` reading libvirt through Nova's ``Host``."""

    def __init__(self, nova_host_obj: Any, os_facts: OSFacts) -> None:
        self._host = nova_host_obj
        self.os_facts = os_facts

    def domain_capabilities(self, virt_type: str, machine: str | None = None) -> str:
        """Domain capabilities XML for the host's architecture (as ``Host`` asks for it)."""
        with libvirt_errors("report domain capabilities"):
            arch = self._host.get_capabilities().host.cpu.arch
            return str(self._host.get_connection().getDomainCapabilities(
                None, arch, machine, virt_type, 0))

    def which(self, name: str) -> str | None:
        return self.os_facts.which(name)

    def user_exists(self, name: str) -> bool:
        return self.os_facts.user_exists(name)

    def group_exists(self, name: str) -> bool:
        return self.os_facts.group_exists(name)

    def pcr_banks(self) -> frozenset[str]:
        return self.os_facts.pcr_banks()

    def read_file(self, path: str) -> bytes:
        return self.os_facts.read_file(path)

    def versions(self) -> dict[str, str]:
        """libvirt and hypervisor versions from ``Host``; swtpm's from the OS facts."""
        with libvirt_errors("report its version"):
            conn = self._host.get_connection()
            versions = {"libvirt": _version_string(conn.getLibVersion())}
            hv_version = self._host.get_version()
            if hv_version:
                versions[str(self._host.get_driver_type()).lower()] = _version_string(
                    hv_version)
        swtpm = self.os_facts.swtpm_version()
        if swtpm:
            versions["swtpm"] = swtpm
        return versions


def _version_string(number: int) -> str:
    """libvirt's packed version (major * 1e6 + minor * 1e3 + micro) as text."""
    number = int(number)
    return f"{number // 1_000_000}.{number // 1_000 % 1_000}.{number % 1_000}"


class StartedSecret:
    """What Nova's ``_create_guest`` gets back: it calls ``undefine()`` after the start.

    That is :func:`vtpm_driver.ops.secrets.after_start` (SPEC E3).
    """

    def __init__(self, store: ops_secrets.SecretStore, instance: Any,
                 start: ops_secrets.StartSecret) -> None:
        self._store = store
        self._instance = instance
        self._start = start

    def __repr__(self) -> str:
        return f"StartedSecret({self._start.secret_uuid!r})"

    def UUIDString(self) -> str:
        return self._start.secret_uuid

    def undefine(self) -> None:
        with translate.nova_errors():
            ops_secrets.after_start(self._store, self._instance, self._start)
