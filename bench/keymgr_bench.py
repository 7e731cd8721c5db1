"""Key manager: create, unlock (get) and delete a vTPM passphrase, four ways.

* ``ours``: :class:`vtpm_driver.keymgr.KeyManager` (python-barbicanclient on a
  keystoneauth1 session) with the owner's
  :class:`~vtpm_driver.keymgr.context.RequestContext` (token and catalog known).
* ``castellan_nova_context``: castellan's Barbican key manager (what Nova
  calls) with a context whose ``get_auth_plugin()`` hands out the token and
  the catalog's Barbican URL, as ``nova.context.RequestContext`` does.
* ``castellan_token_context``: castellan with a plain ``oslo_context``
  ``RequestContext`` (token + project): castellan re-scopes the token with
  Keystone (``identity.Token``) on every call.
* ``floor``: the raw requests our path needs, on one persistent
  ``requests.Session`` with a known token and URL: nothing to save above it.

Each path does the same job on the same services in the same run: a 512
character ``passphrase`` secret named like Nova's is created, read back and
deleted. ``ours`` and ``floor`` also set the owner-only read ACL (SPEC D3);
castellan cannot, so its create does less work than ours.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import requests
from keystoneauth1 import plugin as ks_plugin

from bench import stats
from bench.services import AccessLogCounter, RequestCounts, load_clouds
from vtpm_driver import conf as vtpm_conf
from vtpm_driver import keymgr
from vtpm_driver.keymgr import barbican
from vtpm_driver.keymgr import context as vtpm_context
from vtpm_driver.model.server import Instance

OPERATIONS = ("create", "unlock", "delete")
PATHS = ("ours", "castellan_nova_context", "castellan_token_context", "floor")
CASTELLAN_PATHS = ("castellan_nova_context", "castellan_token_context")

# One path's three operations on one secret; a "ticket" carries the secret between them.
Create = Callable[[], Any]
Unlock = Callable[[Any], str]
Delete = Callable[[Any], None]


def castellan_available() -> bool:
    """castellan (optional extra ``bench``) and oslo.context can be imported."""
    try:
        return all(importlib.util.find_spec(m) is not None
                   for m in ("castellan", "oslo_context"))
    except (ImportError, ValueError):
        return False


def _passphrase() -> str:
    return base64.b64encode(os.urandom(barbican.PASSPHRASE_BYTES)).decode("ascii")


# --- ours -----------------------------------------------------------------------------------

def _ours(ctx: vtpm_context.RequestContext) -> tuple[Create, Unlock, Delete, Callable]:
    conf = vtpm_conf.new_conf()
    km = keymgr.KeyManager(conf)

    def create() -> Instance:
        inst = Instance(name="bench", user_id=ctx.user_id, project_id=ctx.project_id)
        km.create_vtpm_secret(ctx, inst, "user")
        return inst

    def unlock(inst: Instance) -> str:
        return km.get_vtpm_secret(ctx, inst, "user")

    def delete(inst: Instance) -> None:
        km.delete_vtpm_secret(ctx, inst, "user")

    return create, unlock, delete, lambda: None


# --- floor ----------------------------------------------------------------------------------

def _floor(ctx: vtpm_context.RequestContext) -> tuple[Create, Unlock, Delete, Callable]:
    conf = vtpm_conf.new_conf()
    root = barbican.api_root(vtpm_context.barbican_endpoint(conf, ctx.service_catalog))
    http = requests.Session()
    http.headers["X-Auth-Token"] = str(ctx.auth_token)
    base = f"{root}/v1/secrets"

    def create() -> str:
        body = {"name": barbican.secret_name(str(uuid.uuid4())), "secret_type": "passphrase",
                "payload": _passphrase(), "payload_content_type": "text/plain"}
        resp = http.post(base, json=body, timeout=30)
        resp.raise_for_status()
        secret_uuid = resp.json()["secret_ref"].rsplit("/", 1)[-1]
        acl = {"read": {"project-access": False, "users": [ctx.user_id]}}
        http.put(f"{base}/{secret_uuid}/acl", json=acl, timeout=30).raise_for_status()
        return secret_uuid

    def unlock(secret_uuid: str) -> str:
        resp = http.get(f"{base}/{secret_uuid}/payload", headers={"Accept": "text/plain"},
                        timeout=30)
        resp.raise_for_status()
        return resp.text

    def delete(secret_uuid: str) -> None:
        http.delete(f"{base}/{secret_uuid}", timeout=30).raise_for_status()

    return create, unlock, delete, http.close


# --- castellan --------------------------------------------------------------------------------

class _NovaLikeAuthPlugin(ks_plugin.BaseAuthPlugin):
    """What ``nova.context._ContextAuthPlugin`` does: token and catalog from the context."""

    def __init__(self, token: str, barbican_url: str) -> None:
        super().__init__()
        self._token = token
        self._barbican_url = barbican_url

    def get_token(self, *args: Any, **kwargs: Any) -> str:
        return self._token

    def get_endpoint(self, session: Any, service_type: str | None = None,
                     **kwargs: Any) -> str | None:
        return self._barbican_url if service_type == "key-manager" else None

    def __repr__(self) -> str:
        return "_NovaLikeAuthPlugin()"


def _castellan(ctx: vtpm_context.RequestContext, nova_like: bool
               ) -> tuple[Create, Unlock, Delete, Callable]:
    from castellan import key_manager, options
    from castellan.common.objects import passphrase
    from oslo_config import cfg
    from oslo_context import context as oslo_context

    conf = cfg.ConfigOpts()
    conf([], project="vtpm-bench", default_config_files=[])
    options.set_defaults(conf, backend="barbican", auth_endpoint=ctx_auth_url(ctx))
    km = key_manager.API(conf)
    barbican_url = vtpm_context.barbican_endpoint(vtpm_conf.new_conf(), ctx.service_catalog)

    if nova_like:
        class NovaLikeContext(oslo_context.RequestContext):
            def get_auth_plugin(self) -> _NovaLikeAuthPlugin:
                return _NovaLikeAuthPlugin(str(self.auth_token), barbican_url)

        cctx: Any = NovaLikeContext(auth_token=ctx.auth_token, user_id=ctx.user_id,
                                    project_id=ctx.project_id)
    else:
        cctx = oslo_context.RequestContext(auth_token=ctx.auth_token, user_id=ctx.user_id,
                                           project_id=ctx.project_id)

    def create() -> str:
        secret = passphrase.Passphrase(_passphrase().encode("ascii"),
                                       name=barbican.secret_name(str(uuid.uuid4())))
        return km.store(cctx, secret)

    def unlock(secret_uuid: str) -> str:
        return km.get(cctx, secret_uuid).get_encoded().decode("ascii")

    def delete(secret_uuid: str) -> None:
        km.delete(cctx, secret_uuid)

    return create, unlock, delete, lambda: None


def ctx_auth_url(ctx: vtpm_context.RequestContext) -> str:
    """Keystone's URL from the catalog (castellan's ``[barbican] auth_endpoint``)."""
    return vtpm_context.find_catalog_endpoint(ctx.service_catalog, "identity", "public") or \
        "http://127.0.0.1:5000/v3"


# --- running --------------------------------------------------------------------------------

def owner_context(creds: dict[str, str]) -> vtpm_context.RequestContext:
    """Log the owner in once (one Keystone request), as a Nova API request would have."""
    return vtpm_context.RequestContext.from_credentials(**creds)


def _per_op(counts: dict, runs: int) -> dict:
    out = dict(counts)
    for key in ("keystone", "barbican", "keystone_by_barbican"):
        out[f"{key}_per_op"] = round(counts[key] / runs, 2) if runs else None
    return out


Ops = tuple[Create, Unlock, Delete, Callable]


def _first_call(ops: Ops, counter: AccessLogCounter) -> dict:
    """One untimed create/unlock/delete: connections, token checks and caches warm up."""
    create, unlock, delete, _close = ops
    counter.mark()
    ticket = create()
    try:
        unlock(ticket)
    finally:
        delete(ticket)
    return counter.read().as_dict()


def run_paths(paths: dict[str, Ops], runs: int, counter: AccessLogCounter) -> dict:
    """``runs`` of each operation on every path, interleaved.

    Round ``i`` runs the paths in an order rotated by ``i``, so slow phases of
    a shared machine and any drift of the services (caches, database size)
    fall on every path alike. Each single operation is its own counting
    window, so request counts stay exact per path and operation.
    """
    names = list(paths)
    results: dict[str, dict[str, Any]] = {name: {"path": name} for name in names}
    timings = {name: {op: [] for op in OPERATIONS} for name in names}
    cpu = {name: {op: [] for op in OPERATIONS} for name in names}
    counts = {name: {op: RequestCounts() for op in OPERATIONS} for name in names}
    tickets: dict[str, list[Any]] = {name: [] for name in names}
    try:
        for name in names:
            results[name]["first_call_requests"] = _first_call(paths[name], counter)
        for index, op in enumerate(OPERATIONS):
            counter.mark()
            for i in range(runs):
                shift = i % len(names)
                for name in names[shift:] + names[:shift]:
                    fn = paths[name][index]
                    c0 = time.thread_time()
                    t0 = time.perf_counter()
                    if op == "create":
                        tickets[name].append(fn())
                    elif op == "unlock":
                        value = fn(tickets[name][i])
                    else:
                        fn(tickets[name][i])
                    timings[name][op].append(time.perf_counter() - t0)
                    cpu[name][op].append(time.thread_time() - c0)
                    AccessLogCounter.add(counts[name][op], counter.read(advance=True))
                    if op == "unlock" and len(value) != 4 * barbican.PASSPHRASE_BYTES // 3:
                        raise RuntimeError(f"{name}: unlock returned {len(value)} characters")
            if op == "delete":
                for name in names:
                    tickets[name].clear()
    finally:
        for name in names:  # never leave secrets behind, even after an error
            delete, close = paths[name][2], paths[name][3]
            for ticket in tickets[name]:
                try:
                    delete(ticket)
                except Exception:  # best-effort cleanup, counted
                    results[name]["cleanup_failures"] = \
                        results[name].get("cleanup_failures", 0) + 1
            close()
    for name in names:
        for op in OPERATIONS:
            results[name][op] = {
                "latency_ms": stats.summarize(timings[name][op], scale=1000.0),
                # CPU this process spent on the operation: the client's own cost.
                "client_cpu_ms": stats.summarize(cpu[name][op], scale=1000.0),
                "requests": _per_op(counts[name][op].as_dict(), len(timings[name][op])),
            }
    return results


def run(runs: int, counter: AccessLogCounter) -> dict:
    """The whole key manager section of the report."""
    clouds = load_clouds()
    counter.mark()
    ctx = owner_context(clouds["owner"])
    login = counter.read().as_dict()
    section: dict[str, Any] = {"runs_per_operation": runs, "order": "interleaved",
                               "login_requests": login, "paths": {}, "paths_skipped": {}}
    paths: dict[str, Ops] = {"ours": _ours(ctx)}
    if castellan_available():
        paths["castellan_nova_context"] = _castellan(ctx, nova_like=True)
        paths["castellan_token_context"] = _castellan(ctx, nova_like=False)
    else:
        for name in CASTELLAN_PATHS:
            section["paths_skipped"][name] = ("castellan or oslo.context is not installed "
                                              "(pip install -e '.[bench]')")
    paths["floor"] = _floor(ctx)
    section["paths"] = run_paths(paths, runs, counter)
    section["vs_floor"] = _versus_floor(section["paths"])
    return section


def _versus_floor(paths: dict) -> dict:
    """Median latency of each path divided by the floor's, per operation."""
    floor = paths.get("floor")
    if not floor:
        return {}
    out: dict[str, dict] = {}
    for name, result in paths.items():
        if name == "floor":
            continue
        out[name] = {
            op: stats.ratio(result[op]["latency_ms"].get("median"),
                            floor[op]["latency_ms"].get("median"))
            for op in OPERATIONS
        }
    return out
