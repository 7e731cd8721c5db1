"""Where standalone servers live: one backend per configured host.

:class:`ServerBackend` is one host: the :class:`~vtpm_driver.driver.VTPMDriver`
and the server records of :mod:`vtpm_driver.servers` (kept in each domain's
``<metadata>``) over one libvirt connection, opened on first use.
:class:`HostSet` holds the hosts of ``[vtpm] hosts`` (or the one host of
``[libvirt] connection_uri``), one backend each, made on first use; a driver
reaches the other hosts through it for migrations.

Where a host keeps its swtpm state, as seen from here, is decided in one
place: :attr:`ServerBackend.state_base` (``[vtpm] host_state_dirs``, or
``swtpm_state_dir`` for the one host). The backend's driver (every operation,
resize backups, rebuild, shelve), the audit and its repair all take it from
there, so nothing acting on host-a ever reads, writes or removes another
machine's swtpm directories.

A backend's host probe (what its libvirt offers for a vTPM: domain
capabilities, versions) borrows the backend's own connection and keeps the
answers for the life of the process (:class:`CachedHostProbe`): they are facts
of the host's libvirt and QEMU, so a migration's destination check costs no
new connection and, after the first, no libvirt call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, ClassVar

from oslo_config import cfg
from oslo_log import log as logging

from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception, servers, statestore
from vtpm_driver.context import RequestContext
from vtpm_driver.driver import VTPMDriver
from vtpm_driver.host import LibvirtHostProbe
from vtpm_driver.objects import Instance
from vtpm_driver.virt import domains, guest, secret, state
from vtpm_driver.virt.connection import Hypervisor

LOG = logging.getLogger(__name__)


class _BorrowedConnection:
    """The backend's libvirt connection lent to its probe; the backend closes it."""

    def __init__(self, hypervisor: Hypervisor) -> None:
        self._hypervisor = hypervisor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hypervisor.conn, name)

    def close(self) -> None:
        """Not the probe's to close (:meth:`ServerBackend.close` does)."""


class CachedHostProbe:
    """A :class:`~vtpm_driver.host.HostProbe` whose libvirt answers are kept per URI
    for the process (domain capabilities, versions: static while it runs).

    Only successful answers are kept (an unreachable host is asked again); the
    decision (:func:`vtpm_driver.host.check_host`) is still made by each driver
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

    def domain_capabilities(self, virt_type: str) -> str:
        """:raises HypervisorUnavailable, VirtError: as the wrapped probe (nothing kept)."""
        return self._kept((self.uri, "domcaps", virt_type),
                          lambda: self._probe.domain_capabilities(virt_type))

    def versions(self) -> dict[str, str]:
        """:raises HypervisorUnavailable: as the wrapped probe (nothing kept)."""
        return dict(self._kept((self.uri, "versions"), self._probe.versions))

    def which(self, name: str) -> str | None:
        return self._probe.which(name)

    def user_exists(self, name: str) -> bool:
        return self._probe.user_exists(name)

    def group_exists(self, name: str) -> bool:
        return self._probe.group_exists(name)

    def close(self) -> None:
        self._probe.close()


class ServerBackend:
    """The driver and the record store, over one libvirt connection (opened on first use)."""

    def __init__(self, conf: cfg.ConfigOpts, uri: str | None = None,
                 name: str = vtpm_conf.DEFAULT_HOST,
                 peers: Callable[[str], Any] | None = None) -> None:
        self.conf = conf
        self.name = name
        self.hypervisor = Hypervisor(uri or vtpm_conf.libvirt_uri(conf))
        self._peers = peers
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
        """This host's swtpm state directory as seen from here: THE place it is decided
        (:func:`vtpm_driver.statestore.host_state_dir`); the driver, the audit and
        the repair of this host take it from here. Asked each time (the
        configuration may be reloaded), so a command that never touches the
        state directory still works without it.

        :raises InvalidConfiguration: several hosts are configured and ``[vtpm]
            host_state_dirs`` does not name this one (nothing was touched).
        """
        return statestore.host_state_dir(self.conf, self.name, several_hosts(self.conf))

    @property
    def driver(self) -> VTPMDriver:
        if self._driver is None:
            probe = LibvirtHostProbe(
                self.uri, open_connection=lambda _uri: _BorrowedConnection(self.hypervisor))
            self._driver = VTPMDriver(self.conf, probe=CachedHostProbe(self.uri, probe),
                                      hypervisor=self.hypervisor,
                                      state_base=lambda: self.state_base)
            self._driver.host_name = self.name
            self._driver.peers = self._peers
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

    def other_host_domains(self) -> tuple[list[str], list[str]]:
        """Domain UUIDs of the other configured hosts (``[vtpm] hosts``) and the hosts
        that could not be listed; a server moved there keeps its Barbican secret."""
        found: list[str] = []
        unchecked: list[str] = []
        hosts = vtpm_conf.host_uris(self.conf) if self.conf.vtpm.hosts else {}
        for name, uri in hosts.items():
            if uri == self.uri:
                continue
            other = Hypervisor(uri)
            try:
                found.extend(domains.domain_uuids(other.conn))
            except exception.VTPMError as exc:
                LOG.warning("Cannot list the servers of host %s: %s", name, exc)
                unchecked.append(name)
            finally:
                other.close()
        return found, unchecked

    def undefine_libvirt_secret(self, secret_uuid: str) -> bool:
        return secret.undefine_vtpm_secret(self.hypervisor.conn, secret_uuid)

    def remove_state_dir(self, domain_uuid: str) -> bool:
        """Remove this host's state directory of ``domain_uuid`` (under :attr:`state_base`).

        :raises InvalidConfiguration: see :attr:`state_base` (nothing removed).
        """
        return state.remove_state(self.state_base, domain_uuid)

    def libvirt_vtpm_secrets(self) -> list[secret.VTPMSecretInfo]:
        """Every libvirt vTPM secret (for the audit)."""
        return secret.list_vtpm_secrets(self.hypervisor.conn)

    def close(self) -> None:
        self.hypervisor.close()


def several_hosts(conf: cfg.ConfigOpts) -> bool:
    """Whether ``[vtpm] hosts`` names more than one host.

    :raises InvalidConfiguration: a host without a URI.
    """
    return len(vtpm_conf.host_uris(conf)) > 1


class HostSet:
    """The hosts of ``[vtpm] hosts`` (or the one host), one backend each, made on first use.

    ``factory(conf)`` makes the backend of the single default host;
    ``factory(conf, uri=..., name=..., peers=...)`` one of several named hosts,
    whose driver reaches the others through ``peers(name)`` (for migrations).
    """

    def __init__(self, conf: cfg.ConfigOpts, factory: Callable[..., Any] = ServerBackend
                 ) -> None:
        self.conf = conf
        self.uris = vtpm_conf.host_uris(conf)
        self._factory = factory
        self._backends: dict[str, Any] = {}

    @property
    def names(self) -> list[str]:
        return list(self.uris)

    @property
    def default(self) -> str:
        return self.names[0]

    @property
    def several(self) -> bool:
        return several_hosts(self.conf)

    def check(self, name: str) -> str:
        """:raises InvalidConfiguration: ``name`` is not a configured host."""
        if name not in self.uris:
            raise exception.InvalidConfiguration(
                f"unknown host {name!r}: [vtpm] hosts names {', '.join(self.names)}")
        return name

    def backend(self, name: str) -> Any:
        """The backend of host ``name`` (not connected yet)."""
        self.check(name)
        if name not in self._backends:
            if self.several or name != vtpm_conf.DEFAULT_HOST:
                self._backends[name] = self._factory(self.conf, uri=self.uris[name],
                                                     name=name, peers=self.side)
            else:
                self._backends[name] = self._factory(self.conf)
        return self._backends[name]

    def side(self, name: str) -> Any:
        """Host ``name`` as one side of a move (what a driver's ``peers`` returns)."""
        return self.backend(name).driver.migration_side(name)

    def close(self) -> None:
        for backend in self._backends.values():
            backend.close()
