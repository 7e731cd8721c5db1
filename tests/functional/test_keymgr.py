"""vtpm_driver.keymgr against the real local Keystone + Barbican (issue 4 acceptance).

SPEC D1-D7 on real services: the owner creates, reads and deletes; the
owner-only ACL shuts out the owner's project colleague and other projects;
deployment mode acts as the service user; lost secrets are reported, deletes
are idempotent; a hung Barbican gives ``KeyManagerUnavailable`` and the same
call works once it answers again; the access logs prove the request counts;
DEBUG logs and error texts never show a passphrase or a token.

Barbican is "stopped" by freezing its gunicorn master and worker with
SIGSTOP (and always thawed with SIGCONT): ``tools/keymgr-stack.sh`` has no
per-service stop, and a frozen process also looks like a hang, the harder case.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from keystoneauth1 import loading as ks_loading
from keystoneauth1 import session as ks_session
from oslo_config import cfg

from tests.functional.fixtures_keymgr import AccessLogCounter, KeymgrStack
from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception, keymgr
from vtpm_driver.keymgr import barbican
from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.model.server import Flavor, Instance

# Counts the shared Keystone/Barbican's requests or lists every secret: run alone.
pytestmark = [pytest.mark.functional, pytest.mark.alone]

# Everything secret this module sees; every test checks its logs against all of it.
SEEN_SECRETS: set[str] = set()


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
def debug_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """DEBUG logs of everything (ours, keystoneauth1, urllib3), checked after the test."""
    caplog.set_level(logging.DEBUG)
    yield caplog
    texts = log_texts(caplog)
    assert texts, "nothing was captured: the leak check would be vacuous"
    assert_not_leaked(texts)


def log_texts(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every record of the test's setup, call and (so far) teardown."""
    records = [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]
    texts = []
    for rec in records:
        texts += [rec.getMessage(), repr(rec.args), repr(rec.__dict__)]
    return texts


def assert_not_leaked(texts: list[str], extra: tuple[str, ...] = ()) -> None:
    """No passphrase (as base64, raw bytes or hex), token or password in ``texts``."""
    probes: set[str] = set()
    for secret in (*SEEN_SECRETS, *extra):
        probes |= {secret, secret[:32], secret[-32:]}
        with contextlib.suppress(ValueError):
            raw = base64.b64decode(secret, validate=True)
            if len(raw) == barbican.PASSPHRASE_BYTES:
                probes |= {raw.hex()[:32], repr(raw)[2:34]}
    for text in texts:
        for probe in probes:
            assert probe not in text, "secret material in a log record or error text"


def err_text(exc_info: pytest.ExceptionInfo) -> list[str]:
    return [str(exc_info.value), repr(exc_info.value), repr(exc_info.value.args)]


def mark_settled(counter: AccessLogCounter) -> None:
    """mark() once earlier requests are in the logs (gunicorn logs after answering)."""
    for service in counter.SERVICES:
        counter.entries(service)  # waits for a marker request to show up
    counter.mark()


def make_conf(stack: KeymgrStack, *, acl: bool = True, timeout: float = 10.0,
              endpoint: bool = True, service: dict[str, str] | None = None,
              auth_type: str = "password") -> cfg.ConfigOpts:
    conf = vtpm_conf.new_conf()
    if endpoint:
        conf.set_override("barbican_endpoint", stack.barbican_url, group="key_manager")
    conf.set_override("timeout", timeout, group="key_manager")
    conf.set_override("owner_only_acl", acl, group="vtpm")
    if service:
        group = vtpm_conf.SERVICE_USER_GROUP
        conf.register_opts(ks_loading.get_auth_plugin_conf_options(auth_type), group=group)
        conf.set_override("auth_type", auth_type, group=group)
        for key in ("auth_url", "username", "password", "project_name", "user_domain_name",
                    "project_domain_name"):
            conf.set_override(key, service[key], group=group)
    return conf


def new_server(owner: RequestContext, mode: str = "user") -> Instance:
    return Instance(
        name=f"keymgr-ft-{uuid.uuid4().hex[:8]}", user_id=owner.user_id,
        project_id=owner.project_id,
        flavor=Flavor(extra_specs={"hw:tpm_version": "2.0",
                                           "hw:tpm_secret_security": mode}))


def barbican_get(session: ks_session.Session, stack: KeymgrStack, path: str):
    """Raw Barbican GET (metadata / ACL) to check what keymgr stored."""
    return session.get(f"{stack.barbican_url}/v1/{path}", raise_exc=False,
                       headers={"Accept": "application/json"})


@pytest.fixture(scope="module")
def contexts(keystone_session: Callable[..., ks_session.Session]) -> dict[str, RequestContext]:
    """Logged-in contexts (token + catalog) for owner, member, other."""
    result = {name: RequestContext.from_session(keystone_session(name))
              for name in ("owner", "member", "other")}
    SEEN_SECRETS.update(c.auth_token for c in result.values())
    return result


@pytest.fixture
def cleanup() -> Iterator[Callable[[keymgr.KeyManager, RequestContext, Instance], None]]:
    """Register (key manager, context, server) to delete its secret after the test."""
    todo: list[tuple[keymgr.KeyManager, RequestContext, Instance]] = []
    yield lambda km, ctx, inst: todo.append((km, ctx, inst))
    for km, ctx, inst in todo:
        with contextlib.suppress(exception.VTPMError):
            km.delete_vtpm_secret(ctx, inst)


def created(km: keymgr.KeyManager, ctx: RequestContext, inst: Instance,
            cleanup: Callable, mode: str = "user") -> tuple[str, str]:
    cleanup(km, ctx, inst)
    sid, passphrase = km.create_vtpm_secret(ctx, inst, mode)
    SEEN_SECRETS.add(passphrase)
    return sid, passphrase


# -- Barbican freeze ------------------------------------------------------------------------


def _barbican_pids(stack: KeymgrStack) -> list[int]:
    """The Barbican gunicorn master (from the stack's pid file) and its workers."""
    master = int((stack.stack_dir / "run" / "barbican.pid").read_text().strip())
    children: list[int] = []
    for task in Path(f"/proc/{master}/task").iterdir():
        children += [int(p) for p in (task / "children").read_text().split()]
    pids = [master, *children]
    for pid in pids:  # same identity check as tools/keymgr-stack.sh, never a stranger
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        assert b"[vtpm-barbican]" in cmdline or b"barbican_wsgi:" in cmdline, (
            f"pid {pid} from run/barbican.pid is not the stack's Barbican")
    return pids


@contextlib.contextmanager
def barbican_frozen(stack: KeymgrStack) -> Iterator[None]:
    """SIGSTOP Barbican's master and workers; SIGCONT them whatever happens."""
    pids = _barbican_pids(stack)
    stopped: list[int] = []
    try:
        for pid in pids:  # master first, so it never sees a silent worker
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        yield
    finally:
        for pid in reversed(stopped):  # workers first, then the master
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


# -- tests ----------------------------------------------------------------------------------


def test_owner_create_read_delete(keymgr_stack, contexts, keystone_session, debug_log,
                                  cleanup):
    owner = contexts["owner"]
    km = keymgr.KeyManager(make_conf(keymgr_stack))
    inst = new_server(owner)
    sid, passphrase = created(km, owner, inst, cleanup)

    assert inst.system_metadata["vtpm_secret_uuid"] == sid
    assert len(passphrase) == 512
    assert len(base64.b64decode(passphrase, validate=True)) == 384
    meta = barbican_get(keystone_session("owner"), keymgr_stack, f"secrets/{sid}").json()
    assert meta["name"] == f"vTPM secret for instance {inst.uuid}"
    assert meta["secret_type"] == "passphrase"
    assert meta["content_types"] == {"default": "text/plain"}
    assert meta["creator_id"] == owner.user_id

    assert km.get_vtpm_secret(owner, inst) == passphrase
    km.delete_vtpm_secret(owner, inst)
    assert "vtpm_secret_uuid" not in inst.system_metadata
    assert barbican_get(keystone_session("owner"), keymgr_stack,
                        f"secrets/{sid}").status_code == 404


def test_owner_only_acl(keymgr_stack, contexts, keystone_session, debug_log, cleanup):
    owner = contexts["owner"]
    km = keymgr.KeyManager(make_conf(keymgr_stack))
    inst = new_server(owner)
    sid, passphrase = created(km, owner, inst, cleanup)

    acl = barbican_get(keystone_session("owner"), keymgr_stack, f"secrets/{sid}/acl").json()
    assert acl["read"]["project-access"] is False
    assert acl["read"]["users"] == [owner.user_id]

    texts = []
    for name in ("member", "other"):
        with pytest.raises(exception.VTPMSecretForbidden,
                           match="server owner's credentials") as ei:
            km.get_vtpm_secret(contexts[name], inst)
        texts += err_text(ei)
        with pytest.raises(exception.VTPMSecretForbidden) as ei:
            km.delete_vtpm_secret(contexts[name], inst)
        texts += err_text(ei)
        assert inst.system_metadata["vtpm_secret_uuid"] == sid
    assert_not_leaked(texts)
    # Refusals changed nothing: the owner still reads the same passphrase.
    assert km.get_vtpm_secret(owner, inst) == passphrase


def test_acl_off_member_can_read(keymgr_stack, contexts, debug_log, cleanup):
    owner, member = contexts["owner"], contexts["member"]
    km = keymgr.KeyManager(make_conf(keymgr_stack, acl=False))
    inst = new_server(owner)
    _, passphrase = created(km, owner, inst, cleanup)
    assert km.get_vtpm_secret(member, inst) == passphrase  # Nova's behaviour
    with pytest.raises(exception.VTPMSecretForbidden):
        km.get_vtpm_secret(contexts["other"], inst)  # other projects never


def test_deployment_mode_uses_service_user(keymgr_stack, contexts, clouds, keystone_session,
                                           access_log_counter, debug_log, cleanup):
    service = clouds["service"]
    SEEN_SECRETS.add(service["password"])
    owner = contexts["owner"]
    km = keymgr.KeyManager(make_conf(keymgr_stack, service=service))
    bogus = RequestContext(user_id=owner.user_id, project_id=owner.project_id,
                           auth_token="gAAAAA-bogus-token-" + uuid.uuid4().hex)
    SEEN_SECRETS.add(bogus.auth_token)
    inst = new_server(owner, "deployment")

    mark_settled(access_log_counter)
    sid, passphrase = created(km, bogus, inst, cleanup, "deployment")
    first_keystone = access_log_counter.entries("keystone")
    mark_settled(access_log_counter)
    assert km.get_vtpm_secret(bogus, inst) == passphrase
    km.delete_vtpm_secret(RequestContext(user_id="nobody", project_id="none"), inst)
    assert "vtpm_secret_uuid" not in inst.system_metadata

    # Keystone: the service user logged in once (generic 'password' plugin:
    # version discovery + token); its token is reused afterwards.
    assert [e.method for e in first_keystone if e.path.startswith("/v3/auth/tokens")
            and e.method == "POST"] == ["POST"]
    assert access_log_counter.keystone("POST") == 0
    assert access_log_counter.barbican() == 2

    # The secret belonged to the service user, and the owner cannot read it.
    inst2 = new_server(owner, "deployment")
    sid2, _ = created(km, bogus, inst2, cleanup, "deployment")
    service_session = keystone_session("service")
    meta = barbican_get(service_session, keymgr_stack, f"secrets/{sid2}").json()
    service_user_id = service_session.get_user_id()
    assert meta["creator_id"] == service_user_id
    assert meta["creator_id"] != owner.user_id
    with pytest.raises(exception.VTPMSecretForbidden):
        km.get_vtpm_secret(owner, inst2, secret_security="user")
    assert sid != sid2


def test_deployment_mode_v3password_costs_one_keystone_request(
        keymgr_stack, contexts, clouds, access_log_counter, debug_log, cleanup):
    SEEN_SECRETS.add(clouds["service"]["password"])
    km = keymgr.KeyManager(make_conf(keymgr_stack, service=clouds["service"],
                                     auth_type="v3password"))
    inst = new_server(contexts["owner"], "deployment")
    mark_settled(access_log_counter)
    created(km, contexts["owner"], inst, cleanup, "deployment")
    keystone = access_log_counter.entries("keystone")
    assert [(e.method, e.path) for e in keystone if e.method == "POST"] == [
        ("POST", "/v3/auth/tokens")]
    # No version discovery: everything else is Barbican validating the new token.
    assert all(e.path == "/v3/auth/tokens" for e in keystone), keystone


def test_lost_secret_and_idempotent_delete(keymgr_stack, contexts, keystone_session,
                                           debug_log, cleanup):
    owner = contexts["owner"]
    km = keymgr.KeyManager(make_conf(keymgr_stack))
    inst = new_server(owner)
    sid, _ = created(km, owner, inst, cleanup)
    # Deleted behind our back (e.g. by hand): unrecoverable, never silently replaced.
    keystone_session("owner").delete(f"{keymgr_stack.barbican_url}/v1/secrets/{sid}")
    with pytest.raises(exception.VTPMSecretNotFound, match="unrecoverable") as ei:
        km.get_vtpm_secret(owner, inst)
    assert sid in str(ei.value)
    with pytest.raises(exception.VTPMSecretNotFound):
        km.ensure_vtpm_secret(owner, inst, "user")
    assert inst.system_metadata["vtpm_secret_uuid"] == sid
    km.delete_vtpm_secret(owner, inst)  # 404 -> no-op, key removed
    assert "vtpm_secret_uuid" not in inst.system_metadata
    km.delete_vtpm_secret(owner, inst)  # nothing recorded -> no-op


def test_request_counts(keymgr_stack, contexts, access_log_counter, debug_log, cleanup,
                        record_property):
    """D7 from Barbican's and Keystone's own access logs."""
    owner = contexts["owner"]
    km = keymgr.KeyManager(make_conf(keymgr_stack))
    km.list_vtpm_secrets(owner)  # Barbican has now validated (and cached) this token
    inst = new_server(owner)
    cleanup(km, owner, inst)
    timings = {}

    mark_settled(access_log_counter)
    t0 = time.perf_counter()
    _, passphrase = km.create_vtpm_secret(owner, inst, "user")
    timings["create_ms"] = (time.perf_counter() - t0) * 1000
    SEEN_SECRETS.add(passphrase)
    assert [(e.method, e.status) for e in access_log_counter.entries("barbican")] == [
        ("POST", 201), ("PUT", 200)]
    assert access_log_counter.keystone() == 0

    mark_settled(access_log_counter)
    t0 = time.perf_counter()
    assert km.get_vtpm_secret(owner, inst) == passphrase
    timings["get_ms"] = (time.perf_counter() - t0) * 1000
    entries = access_log_counter.entries("barbican")
    assert [(e.method, e.path.endswith("/payload")) for e in entries] == [("GET", True)]
    assert access_log_counter.keystone() == 0

    mark_settled(access_log_counter)
    t0 = time.perf_counter()
    km.delete_vtpm_secret(owner, inst)
    timings["delete_ms"] = (time.perf_counter() - t0) * 1000
    assert [(e.method, e.status) for e in access_log_counter.entries("barbican")] == [
        ("DELETE", 204)]
    assert access_log_counter.keystone() == 0
    for key, value in timings.items():
        record_property(key, round(value, 1))


def test_endpoint_from_catalog_costs_no_keystone_request(
        keymgr_stack, contexts, access_log_counter, debug_log, cleanup):
    owner = contexts["owner"]
    km = keymgr.KeyManager(make_conf(keymgr_stack, endpoint=False))
    inst = new_server(owner)
    mark_settled(access_log_counter)
    created(km, owner, inst, cleanup)
    # Barbican may validate the token with Keystone (GET); we never log in (POST).
    assert access_log_counter.keystone("POST") == 0
    assert access_log_counter.barbican() == 2


def test_fresh_token_client_makes_no_keystone_request(
        keymgr_stack, keystone_session, access_log_counter, debug_log, cleanup):
    owner = RequestContext.from_session(keystone_session("owner"))  # a never-seen token
    SEEN_SECRETS.add(owner.auth_token)
    km = keymgr.KeyManager(make_conf(keymgr_stack))
    inst = new_server(owner)
    mark_settled(access_log_counter)
    created(km, owner, inst, cleanup)
    keystone = access_log_counter.entries("keystone")
    # Only keystonemiddleware in Barbican checking the new token, nothing from us.
    assert all((e.method, e.path) == ("GET", "/v3/auth/tokens") for e in keystone), keystone
    assert len(keystone) <= 1
    assert access_log_counter.barbican() == 2


def test_list_vtpm_secrets(keymgr_stack, contexts, debug_log, cleanup):
    owner = contexts["owner"]
    km = keymgr.KeyManager(make_conf(keymgr_stack))
    inst = new_server(owner)
    sid, _ = created(km, owner, inst, cleanup)
    listed = {e["uuid"]: e for e in km.list_vtpm_secrets(owner)}
    assert listed[sid]["instance_uuid"] == inst.uuid
    assert listed[sid]["creator"] == owner.user_id
    assert listed[sid]["name"] == f"vTPM secret for instance {inst.uuid}"
    assert listed[sid]["created"]
    assert all(e["name"].startswith("vTPM secret for instance ") for e in listed.values())
    assert sid not in {e["uuid"] for e in km.list_vtpm_secrets(contexts["other"])}


def test_bad_token_is_forbidden(keymgr_stack, contexts, debug_log):
    owner = contexts["owner"]
    bad = RequestContext(user_id=owner.user_id, project_id=owner.project_id,
                         auth_token="gAAAAA-not-a-token-" + uuid.uuid4().hex)
    SEEN_SECRETS.add(bad.auth_token)
    inst = new_server(owner)
    with pytest.raises(exception.VTPMSecretForbidden, match="invalid or expired") as ei:
        keymgr.KeyManager(make_conf(keymgr_stack)).create_vtpm_secret(bad, inst, "user")
    assert_not_leaked(err_text(ei))
    assert "vtpm_secret_uuid" not in inst.system_metadata


def test_barbican_hung_then_back(keymgr_stack, contexts, debug_log, cleanup, record_property):
    owner = contexts["owner"]
    timeout = 1.0
    km = keymgr.KeyManager(make_conf(keymgr_stack, timeout=timeout))
    inst = new_server(owner)
    _, passphrase = created(km, owner, inst, cleanup)

    with barbican_frozen(keymgr_stack):
        t0 = time.perf_counter()
        with pytest.raises(exception.KeyManagerUnavailable) as ei:
            km.get_vtpm_secret(owner, inst)
        record_property("unavailable_after_s", round(time.perf_counter() - t0, 2))
    assert keymgr_stack.barbican_url in str(ei.value)
    assert "did not answer within 1 s" in str(ei.value)
    assert_not_leaked(err_text(ei))
    # Thawed: the very same call succeeds, nothing was lost.
    assert km.get_vtpm_secret(owner, inst) == passphrase


def test_barbican_refusing_connections(keymgr_stack, contexts, debug_log):
    """Nothing listening at the endpoint: KeyManagerUnavailable naming it, no state."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    conf = make_conf(keymgr_stack)
    conf.set_override("barbican_endpoint", dead, group="key_manager")
    inst = new_server(contexts["owner"])
    with pytest.raises(exception.KeyManagerUnavailable, match=dead):
        keymgr.KeyManager(conf).create_vtpm_secret(contexts["owner"], inst, "user")
    assert "vtpm_secret_uuid" not in inst.system_metadata


def test_no_secret_in_any_captured_text(contexts):
    """The module saw passphrases and tokens; sanity check the probe itself works."""
    assert SEEN_SECRETS
    with pytest.raises(AssertionError):
        assert_not_leaked([f"oops {next(iter(SEEN_SECRETS))} oops"])
    assert_not_leaked([repr(c) for c in contexts.values()])
