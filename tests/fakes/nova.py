"""A fake of Nova's compute API as :class:`vtpm_driver.audit.orchestrator.NovaServers` asks it.

``FakeNovaAdapter`` has the shape of the keystoneauth1 ``Adapter.get`` the
orchestrator calls: ``GET /servers/detail`` with ``all_tenants``, ``deleted``,
``limit`` and ``marker``, answering as Nova does (deleted=1: only deleted and
soft-deleted servers; a ``servers_links`` next link while a page is full).
"""

from __future__ import annotations

import types
from collections.abc import Iterable

HOST_KEY = "OS-EXT-SRV-ATTR:host"


def server(uuid: str, status: str = "ACTIVE", host: str | None = "compute-1") -> dict:
    """One entry of ``/servers/detail`` as an admin sees it (with the host)."""
    return {"id": uuid, "status": status, HOST_KEY: host, "tenant_id": "proj-a"}


class FakeNovaAdapter:
    """``live``: servers Nova has not deleted (any status but SOFT_DELETED);
    ``deleted``: what ``deleted=1`` lists (DELETED and SOFT_DELETED ones).

    ``fail``: an exception every ``get`` raises; ``status``: an HTTP status every
    ``get`` answers with; ``page_size``: Nova's ``[api] max_limit``.
    """

    def __init__(self, live: Iterable[dict] = (), deleted: Iterable[dict] = (), *,
                 fail: Exception | None = None, status: int = 200,
                 page_size: int = 1000) -> None:
        self.live = list(live)
        self.deleted = list(deleted)
        self.fail = fail
        self.status = status
        self.page_size = page_size
        self.calls: list[tuple[str, dict, str | None]] = []

    def get(self, url: str, *, params: dict, microversion: str | None = None,
            raise_exc: bool = True) -> types.SimpleNamespace:
        self.calls.append((url, dict(params), microversion))
        if self.fail is not None:
            raise self.fail
        if self.status >= 400:
            return types.SimpleNamespace(status_code=self.status,
                                         json=lambda: {"forbidden": {"message": "no"}})
        servers = self.deleted if params.get("deleted") else self.live
        start = 0
        if "marker" in params:
            start = [s["id"] for s in servers].index(params["marker"]) + 1
        limit = min(int(params.get("limit", self.page_size)), self.page_size)
        page = servers[start:start + limit]
        body: dict = {"servers": page}
        if len(page) == limit:
            body["servers_links"] = [{"rel": "next", "href": f"/servers/detail?marker="
                                                              f"{page[-1]['id']}"}]
        return types.SimpleNamespace(status_code=200, json=lambda: body)
