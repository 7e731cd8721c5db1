"""Where standalone servers live: the one libvirt host of ``[libvirt] connection_uri``.

:class:`ServerBackend` is that host: the :class:`~vtpm_driver.standalone.driver.VTPMDriver`
and the server records of :mod:`vtpm_driver.standalone.servers` (kept in each domain's
``<metadata>``) over one libvirt connection, opened on first use. The command
line manages exactly this host; moving a server to another host is Nova's job
(through the shim in ``nova/virt/vtpm/``).

The host's swtpm state directory is ``[vtpm] swtpm_state_dir``
(:attr:`ServerBackend.state_base`); the driver, the audit and its repair all
take it from there.

The backend's host probe (what its libvirt offers for a vTPM: domain
capabilities, versions) borrows the backend's own connection and keeps the
answers for the life of the process (:class:`CachedHostProbe`): they are facts
of the host's libvirt and QEMU, so asking again costs no new connection and,
after the first, no libvirt call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, ClassVar

from oslo_config import cfg

from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception
from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.model.server import Instance
from vtpm_driver.standalone import servers
from vtpm_driver.standalone.driver import VTPMDriver
from vtpm_driver.virt import domains, guest, secret, state
from vtpm_driver.virt.connection import Hypervisor
from vtpm_driver.virt.probe import LibvirtHostProbe


class _BorrowedConnection:
    """The backend's libvirt connection lent to its probe; the backend closes it."""

    def __init__(self, hypervisor: Hypervisor) -> None:
        self._hypervisor = hypervisor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hypervisor.conn, name)

    def close(self) -> None:
        """Not the probe's to close (:meth:`ServerBackend.close` does)."""


class CachedHostProbe:
    """A :class:`~vtpm_driver.model.hostcheck.HostProbe` whose libvirt answers are kept per URI
    for the process (domain capabilities, versions: static while it runs).

    Only successful answers are kept (an unreachable host is asked again); the
    decision (:func:`vtpm_driver.model.hostcheck.check_host`) is still made by each driver
    with its own configuration. ``PATH`` and user lookups are local and cheap,
    so they are passed through. Thread-safe.
    """

    _facts: ClassVar[dict[tuple[str, ...], Any]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, uri: str, probe: Any) -> None:
        self.uri = uri
        self._probe = probe

    def __repr__(self) -> str:
        return f"CachedHostProbe({self.uri!r})"

    @classmethod
    def forget(cls) -> None:
        """Drop every kept answer (tests; a host whose libvirt was upgraded)."""
        with cls._lock:
            cls._facts.clear()

    def _kept(self, key: tuple[str, ...], fetch: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._facts:
                return self._facts[key]
        value = fetch()  # outside the lock: a slow host must not block the others
        with self._lock:
            return self._facts.setdefault(key, value)

    def domain_capabilities(self, virt_type: str, machine: str | None = None) -> str:
        """:raises HypervisorUnavailable, VirtError: as the wrapped probe (nothing kept)."""
        return self._kept((self.uri, "domcaps", virt_type, machine or ""),
                          lambda: self._probe.domain_capabilities(virt_type, machine))

    def versions(self) -> dict[str, str]:
        """:raises HypervisorUnavailable: as the wrapped probe (nothing kept)."""
        return dict(self._kept((self.uri, "versions"), self._probe.versions))

    def pcr_banks(self) -> frozenset[str]:
        """The wrapped probe's answer, kept like the versions (the same swtpm all along)."""
        return self._kept((self.uri, "pcr_banks"), self._probe.pcr_banks)

    def which(self, name: str) -> str | None:
        return self._probe.which(name)

    def read_file(self, path: str) -> bytes:
        return self._probe.read_file(path)

    def user_exists(self, name: str) -> bool:
        return self._probe.user_exists(name)

    def group_exists(self, name: str) -> bool:
        return self._probe.group_exists(name)

    def close(self) -> None:
        self._probe.close()


class ServerBackend:
    """The driver and the record store, over one libvirt connection (opened on first use)."""

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        self.conf = conf
        self.hypervisor = Hypervisor(vtpm_conf.libvirt_uri(conf))
        self._driver: VTPMDriver | None = None

    @property
    def uri(self) -> str:
        return self.hypervisor.uri

    def connect(self) -> None:
        """Open the libvirt connection now (the first one can take seconds).

        :raises HypervisorUnavailable: libvirt cannot be reached.
        """
        self.hypervisor.conn  # noqa: B018 - opening the connection is the point

    @property
    def state_base(self) -> str:
        """This host's swtpm state directory (``[vtpm] swtpm_state_dir``), asked each
        time (the configuration may be reloaded)."""
        return str(self.conf.vtpm.swtpm_state_dir)

    @property
    def driver(self) -> VTPMDriver:
        if self._driver is None:
            probe = LibvirtHostProbe(
                self.uri, open_connection=lambda _uri: _BorrowedConnection(self.hypervisor))
            self._driver = VTPMDriver(self.conf, probe=CachedHostProbe(self.uri, probe),
                                      hypervisor=self.hypervisor)
        return self._driver

    def find(self, name_or_uuid: str) -> Instance:
        """:raises InstanceNotFound: no server has this name or UUID."""
        return servers.find(self.hypervisor.conn, name_or_uuid)

    def list(self) -> list[Instance]:
        return list(servers.list_all(self.hypervisor.conn))

    def new_instance(self, name: str, context: RequestContext, **kwargs: Any) -> Instance:
        return servers.new_instance(name, context, **kwargs)

    def resize_pending(self, instance: Any) -> bool:
        """True while a resize of ``instance`` awaits confirm or revert.

        Adapter: the driver has no public "resize pending?" question yet, so
        this asks its resize operations whether they keep a backup.
        """
        return bool(self.driver.resize_ops.has_backup(instance.uuid))

    def domain_uuids(self) -> list[str]:
        """UUIDs of every libvirt domain, ours or not (for the audit)."""
        return domains.domain_uuids(self.hypervisor.conn)

    def domain_exists(self, domain_uuid: str) -> bool:
        """Whether this host has a domain of that UUID now (a repair checks again)."""
        try:
            guest.lookup(self.hypervisor.conn, domain_uuid)
        except exception.InstanceNotFound:
            return False
        return True

    def undefine_libvirt_secret(self, secret_uuid: str) -> bool:
        return secret.undefine_vtpm_secret(self.hypervisor.conn, secret_uuid)

    def remove_state_dir(self, domain_uuid: str) -> bool:
        """Remove this host's state directory of ``domain_uuid`` (under :attr:`state_base`)."""
        return state.remove_state(self.state_base, domain_uuid)

    def libvirt_vtpm_secrets(self) -> list[secret.VTPMSecretInfo]:
        """Every libvirt vTPM secret (for the audit)."""
        return secret.list_vtpm_secrets(self.hypervisor.conn)

    def close(self) -> None:
        self.hypervisor.close()
