"""Barbican, Keystone and Nova's server metadata, faked over real HTTP on 127.0.0.1.

The one fake cloud of the unit tests: it keeps the rules that matter here
(Barbican's creator, read ACL with ``project-access`` and users, 401 for
unknown tokens; Keystone's password and application-credential logins and the
owner's application credentials; Nova's server metadata) and lets a test
inject a status, a delay or a dropped connection for one request, so every
mapping of SPEC D5, the ACL rollback and the request counts of D7 are checked
end to end through keystoneauth1 and requests.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import re
import socket
import threading
import time
import urllib.parse
import uuid

from keystoneauth1 import loading as ks_loading

from vtpm_driver import conf as vtpm_conf

OWNER = ("u-owner", "p-a", "tok-owner-0123456789")
MEMBER = ("u-member", "p-a", "tok-member-0123456789")
OTHER = ("u-other", "p-b", "tok-other-0123456789")
SERVICE = ("u-service", "p-service", "tok-service-0123456789")
SERVICE_PASSWORD = "service-pw-0123456789"


@dataclasses.dataclass
class Fault:
    method: str
    path_re: str
    status: int = 500
    delay: float = 0.0
    drop: bool = False  # close the connection without answering
    times: int = 1
    # With ``status``: this body instead of Barbican's error JSON. With status 0:
    # Barbican does the real work, then this body replaces its reply.
    reply: object = None


@dataclasses.dataclass
class FakeSecret:
    name: str
    secret_type: str
    payload: str
    content_type: str
    creator: str
    project: str
    created: str
    acl_users: list[str] = dataclasses.field(default_factory=list)
    project_access: bool = True


class FakeCloud:
    """Barbican (``/v1``) and Keystone (``/v3``) on one loopback port."""

    def __init__(self) -> None:
        self.tokens = {t: (u, p) for u, p, t in (OWNER, MEMBER, OTHER, SERVICE)}
        self.secrets: dict[str, FakeSecret] = {}
        self.app_creds: dict[str, str] = {}  # the owner's application credentials: id -> secret
        self.app_cred_bodies: dict[str, dict] = {}  # id -> what it was created with
        self.servers: dict[str, dict] = {}  # Nova: id -> {"id", "user_id", "metadata"}
        self.requests: list[tuple[str, str]] = []
        self.bodies: list[bytes] = []
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        cloud = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with cloud.lock:
                    cloud.requests.append((self.command, self.path))
                    cloud.bodies.append(body)
                    fault = cloud._take_fault(self.command, self.path)
                if fault is not None:
                    if fault.delay:
                        time.sleep(fault.delay)
                    if fault.drop:
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    if fault.status:
                        self._send(fault.status, fault.reply if fault.reply is not None
                                   else {"title": "Injected", "description": "fault"})
                        return
                    if fault.reply is not None:
                        status, _, _ = cloud.dispatch(
                            self.command, self.path, dict(self.headers), body)
                        self._send(status, fault.reply)
                        return
                status, payload, headers = cloud.dispatch(
                    self.command, self.path, dict(self.headers), body)
                self._send(status, payload, headers)

            def _send(self, status: int, payload: object, headers: dict | None = None) -> None:
                headers = dict(headers or {})
                if isinstance(payload, str | bytes):
                    data = payload.encode() if isinstance(payload, str) else payload
                    headers.setdefault("Content-Type", "text/plain")
                elif payload is None:
                    data = b""
                else:
                    data = json.dumps(payload).encode()
                    headers.setdefault("Content-Type", "application/json")
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)

    def __enter__(self) -> FakeCloud:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- test controls --------------------------------------------------------

    def fail(self, method: str, path_re: str, status: int = 500, **kw: object) -> None:
        self.faults.append(Fault(method, path_re, status, **kw))

    def count(self, method: str | None = None, prefix: str = "") -> int:
        return sum(1 for m, p in self.requests
                   if (method is None or m == method) and p.startswith(prefix))

    def _take_fault(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.method == method and re.search(fault.path_re, path):
                fault.times -= 1
                if fault.times <= 0:
                    self.faults.remove(fault)
                return fault
        return None

    # -- fake services --------------------------------------------------------

    def dispatch(self, method: str, path: str, headers: dict, body: bytes
                 ) -> tuple[int, object, dict]:
        parsed = urllib.parse.urlsplit(path)
        if parsed.path.startswith("/v3"):
            return self._keystone(method, parsed.path, headers, body)
        who = self.tokens.get(headers.get("X-Auth-Token", ""))
        if who is None:
            return 401, {"title": "Unauthorized", "description": "bad token"}, {}
        user, project = who
        if parsed.path.startswith("/compute/"):
            return self._nova(method, parsed.path, user, body)
        parts = parsed.path.strip("/").split("/")
        if parts[:2] != ["v1", "secrets"]:
            return 404, {"title": "Not Found"}, {}
        if len(parts) == 2 and method == "POST":
            return self._create(user, project, json.loads(body))
        if len(parts) == 2 and method == "GET":
            return self._list(project, urllib.parse.parse_qs(parsed.query))
        secret = self.secrets.get(parts[2])
        if secret is None:
            return 404, {"title": "Not Found", "description": "Secret not found."}, {}
        if len(parts) == 4 and parts[3] == "acl" and method == "PUT":
            if user != secret.creator:
                return 403, {"title": "Forbidden"}, {}
            read = json.loads(body)["read"]
            secret.acl_users = list(read.get("users", []))
            secret.project_access = bool(read.get("project-access", True))
            return 200, {"acl_ref": f"{self.url}/v1/secrets/{parts[2]}/acl"}, {}
        if len(parts) == 4 and parts[3] == "payload" and method == "GET":
            if not self._may_read(secret, user, project):
                return 403, {"title": "Forbidden", "description": "not allowed"}, {}
            return 200, secret.payload.encode("latin-1"), {"Content-Type": secret.content_type}
        if len(parts) == 3 and method == "GET":
            if not self._may_read(secret, user, project):
                return 403, {"title": "Forbidden"}, {}
            return 200, {"name": secret.name, "creator_id": secret.creator,
                         "secret_type": secret.secret_type}, {}
        if len(parts) == 3 and method == "DELETE":
            if not self._may_read(secret, user, project):
                return 403, {"title": "Forbidden"}, {}
            del self.secrets[parts[2]]
            return 204, None, {}
        return 405, {"title": "Method Not Allowed"}, {}

    @staticmethod
    def _may_read(secret: FakeSecret, user: str, project: str) -> bool:
        return (user == secret.creator or user in secret.acl_users
                or (secret.project_access and project == secret.project))

    def _create(self, user: str, project: str, body: dict) -> tuple[int, object, dict]:
        sid = str(uuid.uuid4())
        self.secrets[sid] = FakeSecret(
            name=body["name"], secret_type=body["secret_type"], payload=body["payload"],
            content_type=body["payload_content_type"], creator=user, project=project,
            created=f"2026-01-01T00:00:{len(self.secrets) % 60:02d}")
        return 201, {"secret_ref": f"{self.url}/v1/secrets/{sid}"}, {}

    def _list(self, project: str, query: dict) -> tuple[int, object, dict]:
        limit = int(query.get("limit", ["10"])[0])
        offset = int(query.get("offset", ["0"])[0])
        like = query.get("name", [""])[0]
        # Barbican filters names with SQL LIKE: % any run, _ any one character.
        pattern = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c)
                          for c in like)
        mine = [(sid, s) for sid, s in self.secrets.items()
                if s.project == project and (not like or re.fullmatch(pattern, s.name))]
        page = mine[offset:offset + limit]
        body: dict = {
            "total": len(mine),
            "secrets": [{"secret_ref": f"{self.url}/v1/secrets/{sid}", "name": s.name,
                         "created": s.created, "creator_id": s.creator} for sid, s in page],
        }
        if offset + limit < len(mine):
            body["next"] = f"{self.url}/v1/secrets?limit={limit}&offset={offset + limit}"
        return 200, body, {}

    def _nova(self, method: str, path: str, user: str, body: bytes
              ) -> tuple[int, object, dict]:
        """``/compute/v2.1/servers/{id}`` and its ``metadata/{key}``: the owner's view."""
        parts = path.strip("/").split("/")[2:]  # after compute/v2.1
        server = self.servers.get(parts[1]) if len(parts) > 1 else None
        if server is None or server["user_id"] != user:
            return 404, {"itemNotFound": {"code": 404, "message": "not found"}}, {}
        if len(parts) == 2 and method == "GET":
            return 200, {"server": server}, {}
        if len(parts) == 4 and parts[2] == "metadata" and method == "PUT":
            server["metadata"].update(json.loads(body)["meta"])
            return 200, {"meta": json.loads(body)["meta"]}, {}
        if len(parts) == 4 and parts[2] == "metadata" and method == "DELETE":
            if server["metadata"].pop(parts[3], None) is None:
                return 404, {"itemNotFound": {"code": 404, "message": "no such key"}}, {}
            return 204, None, {}
        return 405, {"title": "Method Not Allowed"}, {}

    def _application_credentials(self, method: str, path: str, headers: dict, body: bytes
                                 ) -> tuple[int, object, dict]:
        """The caller's own application credentials (create, delete), as Keystone."""
        who = self.tokens.get(headers.get("X-Auth-Token", ""))
        parts = path.strip("/").split("/")  # v3 users {id} application_credentials [id]
        if who is None or who[0] != parts[2]:
            return 401 if who is None else 403, {"error": {"code": 403}}, {}
        if len(parts) == 4 and method == "POST":
            cred_id, secret = uuid.uuid4().hex, uuid.uuid4().hex + uuid.uuid4().hex
            self.app_creds[cred_id] = secret
            self.app_cred_bodies[cred_id] = json.loads(body)["application_credential"]
            return 201, {"application_credential": {"id": cred_id, "secret": secret}}, {}
        if len(parts) == 5 and method == "DELETE":
            if self.app_creds.pop(parts[4], None) is None:
                return 404, {"error": {"code": 404}}, {}
            return 204, None, {}
        return 405, {"error": {"code": 405}}, {}

    def _keystone(self, method: str, path: str, headers: dict, body: bytes
                  ) -> tuple[int, object, dict]:
        if "/application_credentials" in path:
            return self._application_credentials(method, path, headers, body)
        if method == "GET" and path.rstrip("/") == "/v3":
            return 200, {"version": {"id": "v3.14", "status": "stable", "links": [
                {"rel": "self", "href": f"{self.url}/v3/"}]}}, {}
        if method == "POST" and path == "/v3/auth/tokens":
            identity = json.loads(body)["auth"]["identity"]
            if "application_credential" in identity:
                cred = identity["application_credential"]
                if self.app_creds.get(cred.get("id")) != cred.get("secret"):
                    return 404, {"error": {"code": 404, "title": "Not Found"}}, {}
                user, project, token = OWNER
                name = "owner"
            else:
                ident = identity["password"]["user"]
                if (ident.get("name"), ident.get("password")) != ("svc", SERVICE_PASSWORD):
                    return 401, {"error": {"code": 401, "title": "Unauthorized"}}, {}
                user, project, token = SERVICE
                name = "svc"
            return 201, {"token": {
                "methods": ["password"], "expires_at": "2099-01-01T00:00:00.000000Z",
                "issued_at": "2026-01-01T00:00:00.000000Z",
                "user": {"id": user, "name": name, "domain": {"id": "default",
                                                             "name": "Default"}},
                "project": {"id": project, "name": "service",
                            "domain": {"id": "default", "name": "Default"}},
                "roles": [{"id": "r1", "name": "member"}, {"id": "r2", "name": "service"}],
                "catalog": self.catalog(),
            }}, {"X-Subject-Token": token}
        return 404, {"error": {"code": 404}}, {}

    def catalog(self) -> list[dict]:
        """The service catalog of every token: Barbican, Keystone, Nova, all here."""
        return [{"type": kind, "name": kind, "id": f"s-{kind}", "endpoints": [
            {"interface": "public", "region": "RegionOne", "region_id": "RegionOne",
             "id": f"e-{kind}", "url": url}]}
            for kind, url in (("key-manager", self.url), ("identity", f"{self.url}/v3"),
                              ("compute", f"{self.url}/compute/v2.1"))]


def make_conf(cloud: FakeCloud, *, endpoint: bool = True, acl: bool = True,
              timeout: float = 2.0, service_user: bool = False):
    """A vtpm-driver configuration whose key manager (and ``[service_user]``) is ``cloud``."""
    c = vtpm_conf.new_conf()
    if endpoint:
        c.set_override("barbican_endpoint", cloud.url, group="key_manager")
    c.set_override("timeout", timeout, group="key_manager")
    c.set_override("owner_only_acl", acl, group="vtpm")
    if service_user:
        # v3password: no version discovery GET before the token request.
        c.set_override("auth_type", "v3password", group="service_user")
        c.register_opts(ks_loading.get_auth_plugin_conf_options("v3password"),
                        group="service_user")
        for key, value in (("auth_url", f"{cloud.url}/v3"), ("username", "svc"),
                           ("password", SERVICE_PASSWORD), ("project_name", "service"),
                           ("user_domain_name", "Default"),
                           ("project_domain_name", "Default")):
            c.set_override(key, value, group="service_user")
    return c
