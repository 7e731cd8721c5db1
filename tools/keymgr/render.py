"""Write the local Keystone/Barbican configuration into the stack directory.

Run by ``tools/keymgr-stack.sh`` with the stack's own virtualenv. Secrets
(service passwords, the Barbican KEK) are generated on the first run and then
only read: the KEK must never change once Barbican holds secrets, and the
passwords are already stored in Keystone. Everything else is rewritten on each
run from this file, so the configuration always matches the script.

``render.py --print-password NAME`` prints one stored password on stdout, so
the shell can hand it to ``keystone-manage bootstrap`` through the environment
instead of the command line.
"""

from __future__ import annotations

import base64
import secrets
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stacklib import KEYSTONE_URL, REGION, stack_dir, write_private
from stacklib import load_passwords as _load_passwords

BARBICAN_URL = "http://127.0.0.1:9311"

# Keystone users whose passwords this stack owns ("admin" is the bootstrap user).
PASSWORD_NAMES = (
    "admin",
    "vtpm-owner",
    "vtpm-member",
    "vtpm-other",
    "vtpm-admin",
    "vtpm-service",
    "barbican",
)


def load_passwords(root: Path) -> dict[str, str]:
    """This stack's stored passwords; missing ones are generated once and saved."""
    return _load_passwords(root, PASSWORD_NAMES)


def load_kek(root: Path) -> str:
    """Barbican's simple_crypto KEK: created once, then kept for good."""
    path = root / "secrets" / "barbican-kek"
    if path.exists():
        return path.read_text().strip()
    kek = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    (root / "secrets").mkdir(mode=0o700, exist_ok=True)
    write_private(path, kek + "\n")
    return kek


def keystone_conf(root: Path) -> str:
    """keystone.conf: sqlite, fernet, in-process cache, cheap password hashing."""
    return f"""\
# Written by tools/keymgr/render.py; edits are overwritten on the next start.
[DEFAULT]
log_file = {root}/logs/keystone.log
use_stderr = false

[database]
connection = sqlite:///{root}/data/keystone.db

[token]
provider = fernet

[fernet_tokens]
key_repository = {root}/keystone/fernet-keys

[fernet_receipts]
key_repository = {root}/keystone/fernet-keys

[credential]
key_repository = {root}/keystone/credential-keys

[identity]
# Test stack: fast logins (bcrypt's minimum cost).
password_hash_rounds = 4

[cache]
# Without a cache each token validation costs about 0.5 s.
enabled = true
backend = dogpile.cache.memory
"""


def barbican_conf(root: Path, passwords: dict[str, str], kek: str) -> str:
    """barbican.conf: sqlite, no queue, simple_crypto, Keystone auth_token."""
    return f"""\
# Written by tools/keymgr/render.py; edits are overwritten on the next start.
[DEFAULT]
host_href = {BARBICAN_URL}
log_file = {root}/logs/barbican.log
use_stderr = false
db_auto_create = true

[database]
connection = sqlite:///{root}/data/barbican.db

[queue]
enable = false

[secretstore]
enabled_secretstore_plugins = store_crypto

[crypto]
enabled_crypto_plugins = simple_crypto

[simple_crypto_plugin]
# Never change this once secrets exist: they could not be decrypted any more.
kek = {kek}

[keystone_authtoken]
www_authenticate_uri = {KEYSTONE_URL}
auth_url = {KEYSTONE_URL}
auth_type = password
username = barbican
password = {passwords["barbican"]}
project_name = service
user_domain_name = Default
project_domain_name = Default
region_name = {REGION}
service_type = key-manager
"""


def barbican_paste() -> str:
    """Barbican's API pipeline with Keystone auth (its helper hard-codes /etc)."""
    return """\
# Written by tools/keymgr/render.py; loaded by tools/keymgr/barbican_wsgi.py.
[composite:main]
use = egg:Paste#urlmap
/: barbican_version
/v1: barbican-api-keystone

[pipeline:barbican_version]
pipeline = cors request_id http_proxy_to_wsgi microversion versionapp

[pipeline:barbican-api-keystone]
pipeline = cors request_id http_proxy_to_wsgi authtoken context microversion apiapp

[app:apiapp]
paste.app_factory = barbican.api.app:create_main_app

[app:versionapp]
paste.app_factory = barbican.api.app:create_version_app

[filter:context]
paste.filter_factory = barbican.api.middleware.context:ContextMiddleware.factory

[filter:microversion]
paste.filter_factory = barbican.api.middleware.microversion:MicroversionMiddleware.factory

[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory

[filter:cors]
paste.filter_factory = oslo_middleware.cors:filter_factory
oslo_config_project = barbican

[filter:request_id]
paste.filter_factory = oslo_middleware.request_id:RequestId.factory

[filter:http_proxy_to_wsgi]
paste.filter_factory = oslo_middleware:HTTPProxyToWSGI.factory
"""


def render(root: Path) -> None:
    """Create the directory layout and (re)write every configuration file."""
    for sub in ("etc", "data", "logs", "run", "keystone", "barbican-home/.barbican"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    passwords = load_passwords(root)
    kek = load_kek(root)
    write_private(root / "etc" / "keystone.conf", keystone_conf(root))
    write_private(root / "etc" / "barbican.conf", barbican_conf(root, passwords, kek))
    write_private(root / "etc" / "barbican-api-paste.ini", barbican_paste())
    # Barbican only searches ~/.barbican/, ~/, /etc/barbican/ and /etc/.
    link = root / "barbican-home" / ".barbican" / "barbican.conf"
    if not link.is_symlink():
        link.unlink(missing_ok=True)
        link.symlink_to(root / "etc" / "barbican.conf")


def main(argv: list[str]) -> int:
    root = stack_dir()
    if len(argv) == 2 and argv[0] == "--print-password":
        passwords = load_passwords(root)
        if argv[1] not in passwords:
            print(f"render.py: no stored password for user {argv[1]!r}", file=sys.stderr)
            return 1
        sys.stdout.write(passwords[argv[1]])
        return 0
    if argv:
        print("usage: render.py [--print-password NAME]", file=sys.stderr)
        return 2
    render(root)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
