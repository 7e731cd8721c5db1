"""The orchestrator that ``vtpm-driver audit`` asks which servers exist (issue 20).

Where Nova runs (``[vtpm] orchestrator = nova``), what one compute sees is no
proof that a server is gone: a shelved-offloaded server has no domain on any
host, a server on another compute none on this one. Before a repair deletes a
Barbican secret, an off-host copy or a state directory, the audit asks Nova's
compute API, with the admin credentials of ``[nova]``, for the servers of every
project: ``GET /servers/detail?all_tenants=1`` (every server not deleted:
active, stopped, shelved-offloaded, ...) and ``GET
/servers/detail?all_tenants=1&deleted=1`` (deleted and soft-deleted ones, of
which the soft-deleted are kept: Nova may still restore them). The endpoint
comes from the catalog (service type ``compute``) through keystoneauth1.

This module does the I/O only; :func:`vtpm_driver.audit.report.vouch` and
:func:`vtpm_driver.audit.plan.plan` decide from its answer. Every foreign failure
is mapped here, once, to :class:`~vtpm_driver.exception.OrchestratorUnavailable`
(:func:`error_for_status`, :func:`nova_errors`); :func:`ask` turns it into an
answer that says Nova could not be asked. Tokens and passwords never reach a
log record or a message: messages name the URL path, the status and the
exception class.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import loading as ks_loading
from oslo_config import cfg
from oslo_log import log as logging

from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception
from vtpm_driver.audit import report as audit_report
from vtpm_driver.model import consent
from vtpm_driver.model.server import canonical_uuid

LOG = logging.getLogger(__name__)

NONE = "none"
NOVA = "nova"
NAME = "Nova"
COMPUTE_SERVICE_TYPE = "compute"
#: Any microversion shows ``OS-EXT-SRV-ATTR:host`` to an admin; pinned so the shape
#: of the answer never changes under us.
MICROVERSION = "2.1"
HOST_KEY = "OS-EXT-SRV-ATTR:host"
PAGE_SIZE = 1000
#: A server Nova soft-deleted can still be restored: its TPM is kept.
SOFT_DELETED = "SOFT_DELETED"
_WHERE = "Nova's compute API (service type 'compute' in the [nova] user's catalog)"


def error_for_status(status: int, *, path: str) -> exception.OrchestratorUnavailable | None:
    """Map Nova's HTTP status to our exception; None for success. Pure.

    Decided from the status alone, never from message text.
    """
    if status < 400:
        return None
    if status == 401:
        why = "rejected the [nova] credentials (HTTP 401)"
    elif status == 403:
        why = ("refused to list the servers of every project (HTTP 403): the [nova] user "
               "needs the admin role")
    elif status >= 500:
        why = f"failed (HTTP {status}); retry when Nova is healthy again"
    else:
        why = f"refused the request (HTTP {status})"
    return exception.OrchestratorUnavailable(f"{_WHERE} on GET {path} {why}")


@contextlib.contextmanager
def nova_errors(path: str, timeout: float) -> Iterator[None]:
    """Raise :class:`OrchestratorUnavailable` for any keystoneauth1 failure inside.

    A timeout, a connection that cannot be made, a catalog without a compute
    endpoint, Keystone refusing the ``[nova]`` credentials: each is named by
    what failed and the exception's class, never its text (which may quote a
    URL with credentials).
    """
    try:
        yield
    except ks_exc.HttpError as exc:  # Keystone's answer while authenticating
        raise exception.OrchestratorUnavailable(
            f"Keystone refused the [nova] credentials while asking {_WHERE} "
            f"(HTTP {exc.http_status})") from None
    except (ks_exc.ConnectTimeout, ks_exc.ConnectFailure, ks_exc.SSLError) as exc:
        raise exception.OrchestratorUnavailable(
            f"cannot reach {_WHERE} for GET {path} within {timeout:g} s: "
            f"{type(exc).__name__}") from None
    except ks_exc.ConnectionError as exc:
        raise exception.OrchestratorUnavailable(
            f"lost the connection to {_WHERE} on GET {path}: {type(exc).__name__}") from None
    except ks_exc.DiscoveryFailure:
        raise exception.OrchestratorUnavailable(
            "cannot reach Keystone at [nova] auth_url (no identity API found there) to ask "
            f"{_WHERE}") from None
    except ks_exc.EndpointNotFound:
        raise exception.OrchestratorUnavailable(
            "the [nova] user's catalog has no 'compute' endpoint (check [nova] region_name, "
            "valid_interfaces, or set endpoint_override)") from None
    except ks_exc.ClientException as exc:
        raise exception.OrchestratorUnavailable(
            f"cannot authenticate the [nova] user to ask {_WHERE}: {type(exc).__name__}"
        ) from None


def _server(item: object, path: str) -> audit_report.KnownServer:
    """One entry of Nova's list as a KnownServer.

    :raises OrchestratorUnavailable: it is no server as an admin sees it (no
        UUID, or no ``OS-EXT-SRV-ATTR:host``: then the credentials do not see
        every project's servers as an admin, and the list cannot be trusted).
    """
    if not isinstance(item, Mapping) or canonical_uuid(item.get("id")) is None:
        raise exception.OrchestratorUnavailable(
            f"{_WHERE} answered GET {path} with an entry that is no server")
    uuid = str(canonical_uuid(item.get("id")))
    if HOST_KEY not in item:
        raise exception.OrchestratorUnavailable(
            f"{_WHERE} showed server {uuid} without {HOST_KEY}: the [nova] user does not see "
            "servers as an admin, so its list of every project's servers cannot be trusted")
    host = item.get(HOST_KEY)
    owner = item.get("user_id")
    return audit_report.KnownServer(uuid, str(item.get("status") or "UNKNOWN"),
                                    host if isinstance(host, str) and host else None,
                                    owner if isinstance(owner, str) else None,
                                    consent.named_record(item.get("metadata")
                                                         if isinstance(item.get("metadata"),
                                                                       Mapping) else None))


class NovaServers:
    """Nova's servers of every project, as the ``[nova]`` admin sees them.

    ``adapter`` (tests): anything with keystoneauth1 ``Adapter.get``'s shape;
    by default one is loaded from ``[nova]`` on first use. Read-only: asking
    twice is harmless.
    """

    def __init__(self, conf: cfg.ConfigOpts, adapter: Any = None) -> None:
        self._conf = conf
        self._adapter = adapter
        self.timeout = float(getattr(conf[vtpm_conf.NOVA_GROUP], "timeout", None)
                             or vtpm_conf.NOVA_DEFAULT_TIMEOUT)

    def _connect(self) -> Any:
        """A keystoneauth1 Adapter for Nova from ``[nova]``; no request yet.

        :raises OrchestratorUnavailable: ``[nova]`` has no or incomplete credentials.
        """
        if self._adapter is not None:
            return self._adapter
        group = vtpm_conf.NOVA_GROUP
        try:
            auth = ks_loading.load_auth_from_conf_options(self._conf, group)
        except ks_exc.MissingRequiredOptions as exc:
            names = ", ".join(opt.dest for opt in exc.options)
            raise exception.OrchestratorUnavailable(
                f"no credentials to ask Nova: [{group}] lacks {names}") from None
        except ks_exc.NoMatchingPlugin as exc:
            raise exception.OrchestratorUnavailable(
                f"no credentials to ask Nova: [{group}] auth_type {exc.name!r} is not a "
                "keystoneauth1 plugin") from None
        if auth is None:
            raise exception.OrchestratorUnavailable(
                f"no credentials to ask Nova: set [{group}] auth_type (e.g. password), "
                "auth_url, username, password, project_name and domains of an admin")
        session = ks_loading.load_session_from_conf_options(
            self._conf, group, auth=auth, timeout=self.timeout)
        self._adapter = ks_loading.load_adapter_from_conf_options(
            self._conf, group, session=session, auth=auth)
        return self._adapter

    def _list(self, *, deleted: bool) -> list[audit_report.KnownServer]:
        """Every page of ``GET /servers/detail?all_tenants=1[&deleted=1]``.

        :raises OrchestratorUnavailable: any failure; a partial list is never returned.
        """
        adapter = self._connect()
        params: dict[str, str | int] = {"all_tenants": 1, "limit": PAGE_SIZE}
        if deleted:
            params["deleted"] = 1
        path = "/servers/detail?all_tenants=1" + ("&deleted=1" if deleted else "")
        found: list[audit_report.KnownServer] = []
        while True:
            with nova_errors(path, self.timeout):
                resp = adapter.get("/servers/detail", params=dict(params),
                                   microversion=MICROVERSION, raise_exc=False)
            error = error_for_status(int(resp.status_code), path=path)
            if error is not None:
                raise error
            try:
                body = resp.json()
            except ValueError:
                body = None
            items = body.get("servers") if isinstance(body, Mapping) else None
            if not isinstance(items, list):
                raise exception.OrchestratorUnavailable(
                    f"{_WHERE} answered GET {path} with no server list")
            page = [_server(item, path) for item in items]
            found.extend(page)
            links = body.get("servers_links") or []
            more = any(isinstance(link, Mapping) and link.get("rel") == "next"
                       for link in links)
            if not more or not page:
                return found
            params["marker"] = page[-1].uuid

    def known(self) -> dict[str, audit_report.KnownServer]:
        """Every server Nova has not deleted, by canonical UUID: any status
        (``SHELVED_OFFLOADED`` included), any host, every project, and the
        soft-deleted ones (restorable).

        :raises OrchestratorUnavailable: Nova could not be asked, or answered wrongly.
        """
        servers = {s.uuid: s for s in self._list(deleted=False)}
        for server in self._list(deleted=True):
            if server.status == SOFT_DELETED:
                servers.setdefault(server.uuid, server)
        return servers


def ask(conf: cfg.ConfigOpts,
        factory: Callable[[cfg.ConfigOpts], NovaServers] = NovaServers
        ) -> audit_report.OrchestratorAnswer | None:
    """What the configured orchestrator says about which servers exist. Never raises.

    None where ``[vtpm] orchestrator = none`` (this host decides alone).
    Otherwise Nova's servers, or, when Nova could not be asked, an answer with
    no servers that says why (the repair then deletes nothing Nova would have
    to vouch for). Read-only, so idempotent.
    """
    if conf.vtpm.orchestrator != NOVA:
        return None
    try:
        servers = factory(conf).known()
    except exception.OrchestratorUnavailable as exc:
        LOG.warning("Nova could not be asked which servers exist: %s; audit --repair "
                    "deletes no Barbican secret, off-host copy or state directory", exc)
        return audit_report.OrchestratorAnswer(NAME, None, str(exc))
    return audit_report.OrchestratorAnswer(NAME, servers)
