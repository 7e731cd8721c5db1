"""python-barbicanclient wired for the request floor, quiet logs and status-based errors.

Two small adaptations, both through public keystoneauth1 seams or a one-method
override, let :mod:`vtpm_driver.keymgr.barbican` use python-barbicanclient at the
minimum number of round trips (SPEC D7) without leaking secrets:

* :class:`BarbicanSession` (a keystoneauth1 ``Session``): request/response
  logging off for every request (bodies carry the passphrase; this module logs
  method, path, status and latency itself), no connect retries, and HTTP
  errors raised as keystoneauth1 ``HttpError`` (with ``http_status``) *before*
  python-barbicanclient parses the body, which it cannot always do: 7.x turns
  a 401 whose JSON has no ``title`` (keystonemiddleware's) into
  ``KeyError('title')``.
* :class:`Client` (python-barbicanclient's v1 client): no version discovery.
  Its constructor sends ``GET /`` to learn the microversions even when the
  endpoint is given; we pin microversion 1.0, which every v1 Barbican serves
  and which is all the vTPM needs.
"""

from __future__ import annotations

import dataclasses
import time
import urllib.parse
from typing import Any

from barbicanclient.v1 import client as barbican_v1
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import loading as ks_loading
from keystoneauth1 import plugin as ks_plugin
from keystoneauth1 import session as ks_session
from oslo_config import cfg
from oslo_log import log as logging

from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception
from vtpm_driver.keymgr.api import KEY_MANAGER_SERVICE_TYPE
from vtpm_driver.keymgr.errors import barbican_errors
from vtpm_driver.model import request

LOG = logging.getLogger(__name__)

API_VERSION = "v1"
MICROVERSION = "1.0"
APP_NAME = "vtpm-driver"


class BarbicanSession(ks_session.Session):
    """A keystoneauth1 session that never logs bodies and raises on HTTP errors.

    ``barbican_timeout`` bounds each Barbican request (``[key_manager]
    timeout``); the session's own ``timeout`` still applies to Keystone.
    """

    def __init__(self, *args: Any, barbican_timeout: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.barbican_timeout = barbican_timeout

    def request(self, url: str, method: str, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["log"] = False  # bodies hold the passphrase, headers the token
        kwargs["raise_exc"] = True  # status -> HttpError before barbicanclient reads it
        if kwargs.get("connect_retries") is None:
            kwargs["connect_retries"] = 0
        if kwargs.get("endpoint_override") and self.barbican_timeout:
            kwargs.setdefault("timeout", self.barbican_timeout)
        started = time.monotonic()
        status: object = "no answer"
        final_url = url
        try:
            resp = super().request(url, method, **kwargs)
            status, final_url = resp.status_code, resp.url or url
            return resp
        except ks_exc.HttpError as exc:
            status, final_url = exc.http_status, exc.url or url
            raise
        finally:
            LOG.debug("%s %s -> %s in %.1f ms", method,
                      urllib.parse.urlsplit(final_url).path or final_url, status,
                      (time.monotonic() - started) * 1000.0)


class _SessionLoader(ks_loading.session.Session):
    """keystoneauth1's conf-option session loader, building a :class:`BarbicanSession`."""

    @property
    def plugin_class(self) -> type[BarbicanSession]:
        return BarbicanSession


def service_session(conf: cfg.ConfigOpts, barbican_timeout: float) -> BarbicanSession:
    """The ``[service_user]`` session: its auth plugin and TLS options; no request yet.

    Keystone requests use ``[service_user] timeout`` (else ``barbican_timeout``).

    :raises InvalidConfiguration: the service user is missing or incomplete.
    """
    group = vtpm_conf.SERVICE_USER_GROUP
    try:
        auth = ks_loading.load_auth_from_conf_options(conf, group)
    except ks_exc.MissingRequiredOptions as exc:
        names = ", ".join(opt.dest for opt in exc.options)
        raise exception.InvalidConfiguration(
            f"deployment secret security needs [{group}] {names}"
        ) from None
    except ks_exc.NoMatchingPlugin as exc:
        raise exception.InvalidConfiguration(
            f"[{group}] auth_type={request.show(exc.name)} is not a keystoneauth1 plugin"
        ) from None
    if auth is None:
        raise exception.InvalidConfiguration(
            f"deployment secret security needs a service user: set [{group}] auth_type "
            "(e.g. password), auth_url, username, password, project_name and domains"
        )
    timeout = getattr(conf[group], "timeout", None) or barbican_timeout
    return _SessionLoader().load_from_conf_options(
        conf, group, auth=auth, timeout=timeout, barbican_timeout=barbican_timeout,
        app_name=APP_NAME)


def catalog_endpoint(session: ks_session.Session, conf: cfg.ConfigOpts) -> str:
    """Barbican's URL from the session user's catalog (authenticates if needed).

    :raises KeyManagerUnavailable: the catalog has no matching endpoint.
    :raises keystoneauth1.exceptions.ClientException: Keystone failures, for
        :func:`~vtpm_driver.keymgr.errors.keystone_errors` to map.
    """
    km = conf.key_manager
    endpoint = session.get_endpoint(service_type=KEY_MANAGER_SERVICE_TYPE,
                                    interface=km.barbican_endpoint_type,
                                    region_name=km.barbican_region_name)
    if not endpoint:
        raise exception.KeyManagerUnavailable(
            f"Barbican endpoint unknown: the service user's catalog has no "
            f"{KEY_MANAGER_SERVICE_TYPE!r} endpoint for interface "
            f"{km.barbican_endpoint_type!r}; set [key_manager] barbican_endpoint"
        )
    return str(endpoint)


class Client(barbican_v1.Client):
    """python-barbicanclient's v1 client at microversion 1.0, without discovery."""

    def _get_max_supported_version(self, *args: Any, **kwargs: Any) -> str:
        # Replaces the GET / the parent sends from its constructor; see module doc.
        return MICROVERSION


def new_client(session: ks_session.Session, root: str,
               auth: ks_plugin.BaseAuthPlugin | None) -> Client:
    """A client for Barbican at ``root`` (unversioned URL); no request is sent.

    ``auth`` None uses the session's own plugin (the service user). The client
    is given the endpoint, so requests go to ``<root>/v1/...`` with no catalog
    lookup; and it is built directly (not through ``barbicanclient.client.Client``,
    which would store ``auth`` on the shared session).
    """
    return Client(session=session, endpoint=root, auth=auth, version=API_VERSION,
                  service_type=KEY_MANAGER_SERVICE_TYPE, connect_retries=0)


def http(client: Client) -> Any:
    """The client's keystoneauth1 adapter (endpoint, auth and microversion set).

    For the two calls whose reply python-barbicanclient does not hand back
    whole: the payload GET (its ``Content-Type`` is checked) and the secret
    listing (``total`` and ``next`` drive the paging).
    """
    return client.client


@dataclasses.dataclass(frozen=True)
class Target:
    """One Barbican client: where Barbican is, as whom, in which mode.

    :meth:`errors` wraps each call so failures are mapped in one place.
    """

    client: Client
    session: ks_session.Session
    root: str
    mode: str
    user_id: str | None  # the creator of the secrets made through this target
    timeout: float

    def __repr__(self) -> str:  # the client's auth plugin holds a token
        return f"Target(root={self.root!r}, mode={self.mode!r})"

    def errors(self, operation: str, secret_uuid: str | None = None,
               instance_uuid: str | None = None) -> Any:
        """:func:`~vtpm_driver.keymgr.errors.barbican_errors` for this target."""
        return barbican_errors(endpoint=self.root, mode=self.mode, operation=operation,
                               timeout=self.timeout, secret_uuid=secret_uuid,
                               instance_uuid=instance_uuid)
