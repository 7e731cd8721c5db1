"""Request context: who is asking, and with which token.

The context carries what Nova's ``RequestContext`` carries (user, project,
token, roles, service catalog). :meth:`RequestContext.barbican_auth` turns it
into a keystoneauth1 plugin that sends the caller's token straight to Barbican,
so reaching the key manager costs no Keystone round trip once the token and the
Barbican endpoint are known (SPEC D7). Catalog lookups go through keystoneauth1's
``ServiceCatalogV3``/``ServiceCatalogV2`` (:func:`find_catalog_endpoint`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import session as ks_session
from keystoneauth1 import token_endpoint
from keystoneauth1.access import service_catalog
from keystoneauth1.identity import v3 as ks_v3
from oslo_config import cfg
from oslo_log import log as logging

from vtpm_driver import exception
from vtpm_driver.keymgr.api import KEY_MANAGER_SERVICE_TYPE
from vtpm_driver.keymgr.errors import keystone_errors

LOG = logging.getLogger(__name__)


@dataclasses.dataclass(repr=False)
class RequestContext:
    """The caller of an operation (Nova's RequestContext attribute names)."""

    user_id: str
    project_id: str
    auth_token: str | None = None
    roles: tuple[str, ...] = ()
    service_catalog: list[dict] = dataclasses.field(default_factory=list)
    user_name: str | None = None
    project_name: str | None = None

    def __repr__(self) -> str:  # never show the token
        return (
            f"RequestContext(user_id={self.user_id!r}, project_id={self.project_id!r}, "
            f"roles={self.roles!r}, auth_token={'***' if self.auth_token else None})"
        )

    @classmethod
    def from_session(cls, session: ks_session.Session) -> RequestContext:
        """Build a context from an authenticated keystoneauth1 session.

        Authenticates now (one Keystone request unless the plugin already has
        a token) and captures token, user, project, roles and catalog, so later
        Barbican calls need no Keystone request at all.

        :raises VTPMSecretForbidden: Keystone refused the credentials.
        :raises KeyManagerUnavailable: Keystone could not be reached.
        :raises InvalidConfiguration: the session has no identity plugin.
        """
        auth = session.auth
        get_access = getattr(auth, "get_access", None)
        if get_access is None:
            raise exception.InvalidConfiguration(
                "the keystoneauth1 session has no identity auth plugin "
                f"(got {type(auth).__name__}); cannot find out who the caller is"
            )
        with keystone_errors("the caller", auth_url=getattr(auth, "auth_url", None),
                             hint="check user name, password, project and domains"):
            access = get_access(session)
        catalog = access.service_catalog.catalog if access.has_service_catalog() else []
        return cls(
            user_id=access.user_id,
            project_id=access.project_id,
            auth_token=access.auth_token,
            roles=tuple(access.role_names or ()),
            service_catalog=list(catalog or []),
            user_name=access.username,
            project_name=access.project_name,
        )

    @classmethod
    def from_credentials(
        cls,
        auth_url: str,
        username: str,
        password: str,
        project_name: str,
        user_domain_name: str = "Default",
        project_domain_name: str = "Default",
        *,
        verify: bool | str = True,
        timeout: float | None = None,
    ) -> RequestContext:
        """Log in with keystoneauth1 password auth (what the CLI does).

        :raises InvalidConfiguration: a required credential is empty.
        :raises VTPMSecretForbidden: Keystone refused the credentials.
        :raises KeyManagerUnavailable: Keystone could not be reached.
        """
        required = {
            "auth_url": auth_url,
            "username": username,
            "password": password,
            "project_name": project_name,
        }
        missing = [name for name, value in required.items() if not value]
        if missing:
            raise exception.InvalidConfiguration(
                f"missing credentials: {', '.join(missing)} (set OS_AUTH_URL, OS_USERNAME, "
                "OS_PASSWORD and OS_PROJECT_NAME, or the matching --os-* options)"
            )
        auth = ks_v3.Password(
            auth_url=auth_url,
            username=username,
            password=password,
            project_name=project_name,
            user_domain_name=user_domain_name,
            project_domain_name=project_domain_name,
        )
        session = ks_session.Session(auth=auth, verify=verify, timeout=timeout)
        return cls.from_session(session)

    def barbican_auth(self, conf: cfg.ConfigOpts) -> token_endpoint.Token:
        """A keystoneauth1 plugin that sends this context's token to Barbican.

        No Keystone request is made: the endpoint comes from ``[key_manager]
        barbican_endpoint`` or from this context's service catalog.

        :raises VTPMSecretForbidden: the context carries no token.
        :raises KeyManagerUnavailable: the Barbican endpoint is unknown.
        """
        if not self.auth_token:
            raise exception.VTPMSecretForbidden(
                f"request context of user {self.user_id} carries no token; "
                "authenticate before touching vTPM secrets"
            )
        return token_endpoint.Token(barbican_endpoint(conf, self.service_catalog),
                                    self.auth_token)


def barbican_endpoint(conf: cfg.ConfigOpts, catalog: Iterable[Mapping[str, Any]] | None) -> str:
    """Barbican's URL: the configured override, else the catalog entry.

    :raises KeyManagerUnavailable: neither gives an endpoint.
    """
    configured = conf.key_manager.barbican_endpoint
    if configured:
        return str(configured)
    interface = conf.key_manager.barbican_endpoint_type
    region = conf.key_manager.barbican_region_name
    found = find_catalog_endpoint(catalog, KEY_MANAGER_SERVICE_TYPE, interface, region)
    if found:
        return found
    where = f"interface {interface!r}" + (f", region {region!r}" if region else "")
    raise exception.KeyManagerUnavailable(
        f"Barbican endpoint unknown: no {KEY_MANAGER_SERVICE_TYPE!r} service with {where} "
        "in the request's service catalog; set [key_manager] barbican_endpoint "
        "(or barbican_endpoint_type / barbican_region_name to match the catalog)"
    )


def find_catalog_endpoint(
    catalog: Iterable[Mapping[str, Any]] | None,
    service_type: str,
    interface: str,
    region: str | None = None,
) -> str | None:
    """First URL of ``service_type`` for ``interface`` (and ``region``), or None.

    keystoneauth1's service catalog does the matching: Keystone v3 entries
    (``interface`` + ``url``) through ``ServiceCatalogV3``, the v2 form
    keystonemiddleware passes to services (``publicURL`` ...) through
    ``ServiceCatalogV2``. Malformed entries are dropped first, never fatal.
    """
    v3, v2 = _well_formed(catalog)
    for kind, entries in ((service_catalog.ServiceCatalogV3, v3),
                          (service_catalog.ServiceCatalogV2, v2)):
        if not entries:
            continue
        try:
            url = kind(entries).url_for(service_type=service_type, interface=interface,
                                        region_name=region or None)
        except ks_exc.EndpointNotFound:
            continue
        if url:
            return str(url)
    return None


def _well_formed(catalog: object) -> tuple[list[dict], list[dict]]:
    """The catalog's usable services, split into v3-form and v2-form endpoints."""
    v3: list[dict] = []
    v2: list[dict] = []
    if not _is_list_like(catalog):
        return v3, v2
    for service in catalog:  # type: ignore[union-attr]
        if not isinstance(service, Mapping) or not isinstance(service.get("type"), str):
            continue
        endpoints = service.get("endpoints")
        if not _is_list_like(endpoints):
            continue
        e3, e2 = [], []
        for endpoint in endpoints:  # type: ignore[union-attr]
            if not isinstance(endpoint, Mapping):
                continue
            if isinstance(endpoint.get("interface"), str):
                if isinstance(endpoint.get("url"), str) and endpoint["url"]:
                    e3.append(dict(endpoint))
                continue
            urls = {k: v for k, v in endpoint.items()
                    if isinstance(k, str) and k.endswith("URL") and isinstance(v, str) and v}
            if urls:
                e2.append({k: v for k, v in endpoint.items()
                           if not (isinstance(k, str) and k.endswith("URL"))} | urls)
        base = {k: v for k, v in service.items() if k != "endpoints"}
        if e3:
            v3.append(base | {"endpoints": e3})
        if e2:
            v2.append(base | {"endpoints": e2})
    return v3, v2


def _is_list_like(value: object) -> bool:
    return isinstance(value, Iterable) and not isinstance(value, str | bytes | Mapping)
