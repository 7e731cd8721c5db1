"""Create the test projects, users, roles and catalog entry; write credentials.

Run by ``tools/keymgr-stack.sh`` (stack virtualenv) once Keystone answers.
Idempotent: what exists is kept, what is missing is created, role grants are
PUTs. A user whose stored password no longer logs in gets it set again.
Writes ``clouds.yaml`` and ``openrc-<cloud>`` (0600) into the stack directory.

``provision.py --verify`` checks that Barbican accepts a project member's
token (one authenticated list call), i.e. that its auth_token setup works.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import yaml
from keystoneauth1 import exceptions as ks_exc
from render import BARBICAN_URL, load_passwords
from stacklib import (
    DOMAIN,
    DOMAIN_ID,
    KEYSTONE_URL,
    REGION,
    Keystone,
    ProvisionError,
    logs_in,
    password_session,
    stack_dir,
    write_private,
)

ROLES = ("member", "reader", "admin", "service")
PROJECTS = {
    "admin": "Bootstrap admin project",
    "vtpm-a": "vtpm-driver tests: project A (owner and a second member)",
    "vtpm-b": "vtpm-driver tests: project B (another tenant)",
    "service": "Service users",
}
# user -> (default project, [(project, role), ...])
USERS = {
    "vtpm-owner": ("vtpm-a", [("vtpm-a", "member")]),
    "vtpm-member": ("vtpm-a", [("vtpm-a", "member")]),
    "vtpm-other": ("vtpm-b", [("vtpm-b", "member")]),
    "vtpm-admin": ("admin", [("admin", "admin"), ("vtpm-a", "admin")]),
    "vtpm-service": ("service", [("service", "member"), ("service", "service")]),
    "barbican": ("service", [("service", "service")]),
}
# cloud name in clouds.yaml -> (user, project)
CLOUDS = {
    "owner": ("vtpm-owner", "vtpm-a"),
    "member": ("vtpm-member", "vtpm-a"),
    "other": ("vtpm-other", "vtpm-b"),
    "admin": ("vtpm-admin", "admin"),
    "service": ("vtpm-service", "service"),
}


def provision(passwords: dict[str, str]) -> None:
    """Make Keystone hold exactly what the tests expect (never deletes anything)."""
    admin = password_session("admin", passwords["admin"], "admin")
    try:
        admin.get_token()
    except ks_exc.Unauthorized:
        raise ProvisionError(
            "the bootstrap admin's stored password (secrets/passwords.json) does not log in: "
            "the stored secrets and Keystone's database disagree; stop the stack and remove "
            "its data/ and secrets/ directories to start afresh"
        ) from None
    ks = Keystone(admin)
    if ks.find("domains", name=DOMAIN) is None:
        raise ProvisionError("domain Default is missing: keystone-manage bootstrap did not run")

    roles = {}
    for name in ROLES:
        roles[name], created = ks.ensure("roles", {"name": name}, name=name)
        if created:
            print(f"  created role {name}")

    projects = {}
    for name, description in PROJECTS.items():
        body = {"name": name, "domain_id": DOMAIN_ID, "description": description}
        projects[name], created = ks.ensure("projects", body, name=name, domain_id=DOMAIN_ID)
        if created:
            print(f"  created project {name}")

    for name, (default_project, grants) in USERS.items():
        body = {
            "name": name,
            "domain_id": DOMAIN_ID,
            "password": passwords[name],
            "default_project_id": projects[default_project]["id"],
            "enabled": True,
        }
        user, created = ks.ensure("users", body, name=name, domain_id=DOMAIN_ID)
        if created:
            print(f"  created user {name}")
        elif not logs_in(name, passwords[name]):
            print(f"  reset the password of user {name} to the stored one")
            ks.set_password(user["id"], passwords[name])
        for project, role in grants:
            ks.grant(projects[project]["id"], user["id"], roles[role]["id"])

    service, created = ks.ensure(
        "services",
        {"name": "barbican", "type": "key-manager", "description": "Key manager"},
        type="key-manager",
    )
    if created:
        print("  created service barbican (key-manager)")
    ks.ensure_endpoints(service, BARBICAN_URL)


def cloud_auth(cloud: str, passwords: dict[str, str]) -> dict[str, str]:
    user, project = CLOUDS[cloud]
    return {
        "auth_url": KEYSTONE_URL,
        "username": user,
        "password": passwords[user],
        "project_name": project,
        "user_domain_name": DOMAIN,
        "project_domain_name": DOMAIN,
    }


def write_credentials(root: Path, passwords: dict[str, str]) -> None:
    """clouds.yaml (openstacksdk/keystoneauth layout) and one openrc per cloud."""
    clouds = {
        name: {
            "auth": cloud_auth(name, passwords),
            "auth_type": "password",
            "region_name": REGION,
            "interface": "public",
            "identity_api_version": 3,
        }
        for name in CLOUDS
    }
    header = "# Written by tools/keymgr-stack.sh: local test stack, do not edit.\n"
    write_private(root / "clouds.yaml", header + yaml.safe_dump({"clouds": clouds}))
    for name in CLOUDS:
        auth = cloud_auth(name, passwords)
        lines = [
            f"# Credentials for cloud '{name}' of the local vtpm-driver test stack.",
            f"export OS_AUTH_URL={auth['auth_url']}",
            f"export OS_USERNAME={auth['username']}",
            f"export OS_PASSWORD='{auth['password']}'",
            f"export OS_PROJECT_NAME={auth['project_name']}",
            f"export OS_USER_DOMAIN_NAME={DOMAIN}",
            f"export OS_PROJECT_DOMAIN_NAME={DOMAIN}",
            "export OS_IDENTITY_API_VERSION=3",
            f"export OS_REGION_NAME={REGION}",
            "export OS_INTERFACE=public",
        ]
        write_private(root / f"openrc-{name}", "\n".join(lines) + "\n")


def verify(passwords: dict[str, str], attempts: int = 10) -> None:
    """Barbican answers a member's authenticated call through the catalog."""
    auth = cloud_auth("owner", passwords)
    sess = password_session(auth["username"], auth["password"], auth["project_name"])
    last = ""
    for _ in range(attempts):
        try:
            resp = sess.get(
                "/v1/secrets",
                params={"limit": 1},
                endpoint_filter={"service_type": "key-manager", "interface": "public"},
                raise_exc=False,
            )
        except ks_exc.ConnectFailure as e:
            last = f"cannot connect: {e}"
        else:
            if resp.status_code == 200:
                return
            last = f"HTTP {resp.status_code}: {resp.text[:200]}"
        time.sleep(1)
    raise ProvisionError(f"Barbican refused the owner's token: {last}")


def main(argv: list[str]) -> int:
    root = stack_dir()
    passwords = load_passwords(root)
    try:
        if argv == ["--verify"]:
            verify(passwords)
            print("[keymgr-stack] barbican accepts keystone tokens (owner listed secrets)")
            return 0
        if argv:
            print("usage: provision.py [--verify]", file=sys.stderr)
            return 2
        provision(passwords)
        write_credentials(root, passwords)
    except (ProvisionError, ks_exc.ClientException) as e:
        print(f"[keymgr-stack] ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
