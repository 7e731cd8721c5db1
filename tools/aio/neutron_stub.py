"""A stand-in for Neutron that owns no ports, for the all-in-one cloud.

Neutron is not available on these machines and servers are created with
``--nic none``, so Nova never allocates a port. Nova still asks Neutron
about an instance's ports while showing a server (security groups), and
while deleting one (it refreshes the network info and deallocates whatever
ports carry the instance's id). This WSGI app answers those read-only
questions the way an empty Neutron would: every listing is empty. Anything
that would create or change a network resource gets 501, so a test that
needs real networking fails loudly instead of passing on a fake.

Served by gunicorn on 127.0.0.1:9696 (``neutron_stub:application``); Nova
finds it through ``[neutron] endpoint_override``. It checks no token: it
listens on loopback only and holds no data.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

# Collections Nova lists (GET /v2.0/<name>): the empty answer for each.
COLLECTIONS = (
    "ports",
    "networks",
    "subnets",
    "security-groups",
    "floatingips",
    "extensions",
    "trunks",
    "qos/policies",
)
VERSIONS = {
    "versions": [
        {
            "id": "v2.0",
            "status": "CURRENT",
            "links": [{"rel": "self", "href": "http://127.0.0.1:9696/v2.0/"}],
        }
    ]
}

StartResponse = Callable[[str, list[tuple[str, str]]], object]


def _json(start_response: StartResponse, status: str, body: dict) -> Iterable[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


def _error(start_response: StartResponse, status: str, kind: str, msg: str) -> Iterable[bytes]:
    body = {"NeutronError": {"type": kind, "message": msg, "detail": ""}}
    return _json(start_response, status, body)


def route(method: str, path: str) -> tuple[str, dict] | None:
    """(status, body) for a request this stand-in answers, else None."""
    path = path.rstrip("/")
    if path.endswith(".json"):
        path = path[: -len(".json")]
    if method != "GET":
        return None
    if path in ("", "/"):
        return "200 OK", VERSIONS
    if path == "/v2.0":
        return "200 OK", {"resources": []}
    for name in COLLECTIONS:
        if path == f"/v2.0/{name}":
            key = name.split("/")[-1].replace("-", "_")
            return "200 OK", {key: []}
    return None


def application(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
    method = environ.get("REQUEST_METHOD", "GET")
    path = environ.get("PATH_INFO", "/")
    answer = route(method, path)
    if answer is not None:
        return _json(start_response, *answer)
    if method == "GET":
        return _error(start_response, "404 Not Found", "NotFound", f"{path} does not exist here")
    return _error(
        start_response,
        "501 Not Implemented",
        "NotImplemented",
        f"{method} {path}: this cloud has no networking (create servers with --nic none)",
    )
