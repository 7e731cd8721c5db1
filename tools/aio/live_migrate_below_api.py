"""Live-migrate a vTPM server through Nova with ONE API check lifted: the vTPM secret mode.

WHAT THIS IS FOR. Nova's compute API refuses to live-migrate a vTPM server
whose ``hw:tpm_secret_security`` is ``user`` or ``deployment``
(``nova.compute.api.reject_legacy_vtpm_live_migration``, which wraps
``API.live_migrate``: HTTP 400 ``OperationNotSupportedForVTPM``) before any
conductor, scheduler or compute is asked. The vtpm-driver shim
(``nova/virt/vtpm/migrate.py``) moves those servers too. This script shows
that, through everything below that one check, on the all-in-one cloud.

WHAT IS PATCHED, AND NOTHING ELSE. For the one ``API().live_migrate`` call
made here, the name ``hardware`` in the module ``nova.compute.api`` (only the
reference that module's globals hold; ``nova.virt.hardware`` itself is
untouched) is replaced by a proxy that forwards every attribute to
``nova.virt.hardware`` except ``get_tpm_secret_security_constraint``, which
answers ``"host"``. The only caller of that function in ``nova.compute.api`` is
``reject_legacy_vtpm_live_migration``: it then takes the server for a
``host`` mode one and goes on with its other check (the minimum nova-compute
version). Nothing else on the path reads the secret mode through that name;
the flavor, the instance and everything sent to the conductor keep the real
mode (the computes decide with it). The patch lives in this process only and
is undone when the call returns.

WHAT RUNS FOR REAL. This process does what nova-api's
``MigrateServerController._migrate_live`` does: it loads the instance
(``API().get``, with ``numa_topology`` and ``system_metadata``) and checks
Nova's policy (``os_compute_api:os-migrate-server:migrate_live``, or
``...:migrate_live:host`` with ``--host``) for a ``RequestContext`` built from a
real Keystone token of the chosen cloud of the AIO's clouds.yaml (user,
project, roles, catalog, token: what keystonemiddleware would put there).
Then ``API().live_migrate`` records the action and the migration in the
database and calls nova-conductor over RabbitMQ; the conductor, the
scheduler, both nova-computes (``check_can_live_migrate_*``,
``pre_live_migration``, libvirt's migration, ``post_live_migration*``) and
the shim run in their own processes, unchanged, with that request context.
Differences from the REST API: no HTTP/JSON schema layer, and the call is
synchronous (``async_=False``, the API's behaviour before microversion 2.34):
errors of the conductor's pre-checks come back here instead of only into the
server's instance actions. ``block_migration`` is ``auto`` (None, 2.25+).

Usage (AIO virtualenv, as root: it reads nova.conf)::

    /var/lib/vtpm-driver/aio/venv/bin/python tools/aio/live_migrate_below_api.py \\
        --cloud owner SERVER_ID [--host HOST]

Exit status: 0 when the conductor accepted and started the migration (poll the
server for the outcome), 1 with one ``ERROR: <exception>: <message>`` line on
stderr when Nova refused it, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

from nova import monkey_patch

monkey_patch.patch(backend="threading")  # as nova-api's WSGI app does

# keystonemiddleware's own v3 -> v2 catalog conversion (what nova-api's context gets).
from keystonemiddleware.auth_token._request import _normalize_catalog  # noqa: E402
from nova import config as nova_config  # noqa: E402
from nova import context as nova_context  # noqa: E402
from nova import exception as nova_exception  # noqa: E402
from nova import objects  # noqa: E402
from nova.compute import api as compute_api  # noqa: E402
from nova.policies import migrate_server as ms_policies  # noqa: E402
from nova.virt import hardware  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stacklib import cloud_session  # noqa: E402

AIO_DIR = Path(os.environ.get("VTPM_AIO_DIR", "/var/lib/vtpm-driver/aio"))
PATCHED = "nova.compute.api.hardware.get_tpm_secret_security_constraint"


class _HardwareWithHostSecretMode(types.ModuleType):
    """``nova.virt.hardware`` as ``nova.compute.api`` sees it during the one call:
    every attribute forwarded, except the secret mode, which reads ``host``."""

    def __init__(self) -> None:
        super().__init__(hardware.__name__)

    def __getattr__(self, name: str) -> object:
        return getattr(hardware, name)

    @staticmethod
    def get_tpm_secret_security_constraint(flavor: object) -> str:
        return "host"


@contextlib.contextmanager
def secret_mode_check_lifted() -> Iterator[None]:
    """Swap ``nova.compute.api``'s ``hardware`` for the proxy; always restored."""
    original = compute_api.hardware
    compute_api.hardware = _HardwareWithHostSecretMode()
    try:
        yield
    finally:
        compute_api.hardware = original


def request_context(cloud: str) -> nova_context.RequestContext:
    """Nova's request context for a fresh Keystone token of ``cloud`` (clouds.yaml)."""
    sess = cloud_session(AIO_DIR / "clouds.yaml", cloud)
    access = sess.auth.get_access(sess)
    return nova_context.RequestContext(
        user_id=access.user_id,
        project_id=access.project_id,
        user_name=access.username,
        project_name=access.project_name,
        roles=list(access.role_names),
        auth_token=access.auth_token,
        service_catalog=_normalize_catalog(access.service_catalog.catalog),
    )


def live_migrate(cloud: str, server_id: str, host: str | None) -> None:
    """Policy check, then ``API().live_migrate`` with the secret-mode check lifted.

    :raises nova.exception.NovaException: Nova refused (policy, state, pre-checks).
    """
    context = request_context(cloud)
    api = compute_api.API()
    instance = api.get(context, server_id, expected_attrs=["numa_topology", "system_metadata"])
    rule = "migrate_live:host" if host else "migrate_live"
    context.can(ms_policies.POLICY_ROOT % rule, target={"project_id": instance.project_id})
    with secret_mode_check_lifted():
        api.live_migrate(context, instance, block_migration=None, disk_over_commit=None,
                         host_name=host, force=None, async_=False)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cloud", required=True, help="clouds.yaml cloud that acts")
    parser.add_argument("--host", help="destination host (default: the scheduler's choice)")
    parser.add_argument("server_id")
    args = parser.parse_args(argv)
    nova_config.parse_args(["live_migrate_below_api", "--config-file",
                            str(AIO_DIR / "etc" / "nova" / "nova.conf")])
    objects.register_all()
    try:
        live_migrate(args.cloud, args.server_id, args.host)
    except nova_exception.NovaException as exc:
        # A remote error's message ends with the remote traceback: its first line only.
        first = (exc.format_message() or "").splitlines()[:1] or [""]
        print(f"ERROR: {type(exc).__name__}: {first[0]}", file=sys.stderr)
        return 1
    print(f"live migration of {args.server_id} started ({PATCHED} read as 'host' for it)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
