"""Call Nova's compute API for a vTPM server with ONE of the API's vTPM checks lifted.

WHAT THIS IS FOR. Nova's compute API refuses, before any conductor, scheduler
or compute is asked (HTTP 400 ``OperationNotSupportedForVTPM``):

* ``live-migrate`` of a server whose ``hw:tpm_secret_security`` is ``user`` or
  ``deployment`` (``nova.compute.api.reject_legacy_vtpm_live_migration``);
* ``shelve``, ``rescue``, ``rebuild`` and ``evacuate`` of any vTPM server
  (``nova.compute.api.reject_vtpm_instances``).

The vtpm-driver shim (``nova/virt/vtpm/migrate.py``, ``offhost.py``) carries
out all of these. This script shows that, through everything below that one
check, on the all-in-one cloud. (``unshelve`` and ``unrescue`` are not refused
by Nova's API: ``openstack server unshelve`` / ``unrescue`` do them.)

WHAT IS PATCHED, AND NOTHING ELSE. For the one API call made here, the name
``hardware`` in the module ``nova.compute.api`` (only the reference that
module's globals hold; ``nova.virt.hardware`` itself is untouched) is replaced
by a proxy forwarding every attribute to ``nova.virt.hardware``, except:

* ``live-migrate``: ``get_tpm_secret_security_constraint`` answers ``"host"``.
  Its only caller in ``nova.compute.api`` is
  ``reject_legacy_vtpm_live_migration``, which then goes on with its other
  check (the minimum nova-compute version).
* the others: ``get_vtpm_constraint`` answers None ("no vTPM") when, and only
  when, its caller is the check function ``reject_vtpm_instances`` wraps
  around the API method (told by the caller's code object). Every other
  caller (e.g. the request spec a rebuild or evacuation builds) gets Nova's
  real answer.

The flavor, the instance and everything sent to the conductor keep the real
values (the computes decide with them). The patch lives in this process
only and is undone when the call returns.

WHAT RUNS FOR REAL. This process does what nova-api's controller does: it
loads the instance (``API().get``) and checks Nova's policy for the action
(``os_compute_api:os-migrate-server:migrate_live[:host]``,
``os-shelve:shelve``, ``os-rescue``, ``servers:rebuild``, ``os-evacuate``)
for a ``RequestContext`` built from a real Keystone token of the chosen cloud
of the AIO's clouds.yaml (user, project, roles, catalog, token: what
keystonemiddleware would put there). Then the ``API()`` method records the
action in the database and calls nova-conductor or nova-compute over
RabbitMQ; the conductor, the scheduler, the nova-computes and the shim run in
their own processes, unchanged, with that request context. Differences from
the REST API: no HTTP/JSON schema layer; live migration is synchronous
(``async_=False``, the API's behaviour before microversion 2.34), so the
conductor's pre-check errors come back here; ``block_migration`` is
``auto``; rebuild uses the server's own image; evacuate asks the scheduler to
validate ``--host`` (``force=False``) and keeps the server's power state.

Usage (AIO virtualenv, as root: it reads nova.conf)::

    /var/lib/vtpm-driver/aio/venv/bin/python tools/aio/below_api.py \\
        --cloud owner {live-migrate,shelve,rescue,rebuild,evacuate} SERVER_ID [--host HOST]

Exit status: 0 when Nova accepted the request (poll the server for the
outcome), 1 with one ``ERROR: <exception>: <message>`` line on stderr when
Nova refused it, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nova import monkey_patch

monkey_patch.patch(backend="threading")  # as nova-api's WSGI app does

# keystonemiddleware's own v3 -> v2 catalog conversion (what nova-api's context gets).
from keystonemiddleware.auth_token._request import _normalize_catalog  # noqa: E402
from nova import config as nova_config  # noqa: E402
from nova import context as nova_context  # noqa: E402
from nova import exception as nova_exception  # noqa: E402
from nova import objects  # noqa: E402
from nova.compute import api as compute_api  # noqa: E402
from nova.policies import evacuate as evacuate_policies  # noqa: E402
from nova.policies import migrate_server as ms_policies  # noqa: E402
from nova.policies import rescue as rescue_policies  # noqa: E402
from nova.policies import servers as servers_policies  # noqa: E402
from nova.policies import shelve as shelve_policies  # noqa: E402
from nova.virt import hardware  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stacklib import cloud_session  # noqa: E402

AIO_DIR = Path(os.environ.get("VTPM_AIO_DIR", "/var/lib/vtpm-driver/aio"))

#: The code of the check ``reject_vtpm_instances`` wraps around an API method
#: (every wrapped method shares it): the one caller whose question is lifted.
_REJECT_CHECK = compute_api.reject_vtpm_instances("probe")(lambda self, c, i: None).__code__


class _HardwareProxy(types.ModuleType):
    """``nova.virt.hardware`` as ``nova.compute.api`` sees it during the one call."""

    def __init__(self, lift_secret_mode: bool) -> None:
        super().__init__(hardware.__name__)
        self._lift_secret_mode = lift_secret_mode

    def __getattr__(self, name: str) -> object:
        return getattr(hardware, name)

    def get_tpm_secret_security_constraint(self, flavor: Any) -> Any:
        if self._lift_secret_mode:
            return "host"
        return hardware.get_tpm_secret_security_constraint(flavor)

    def get_vtpm_constraint(self, flavor: Any, image_meta: Any) -> Any:
        if not self._lift_secret_mode and sys._getframe(1).f_code is _REJECT_CHECK:
            return None
        return hardware.get_vtpm_constraint(flavor, image_meta)


@contextlib.contextmanager
def check_lifted(action: str) -> Iterator[None]:
    """Swap ``nova.compute.api``'s ``hardware`` for the proxy; always restored."""
    original = compute_api.hardware
    compute_api.hardware = _HardwareProxy(lift_secret_mode=action == "live-migrate")
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


# action -> (policy rule, the API call); each as nova-api's controller makes it.
Call = Callable[[compute_api.API, Any, Any, "str | None"], Any]
ACTIONS: dict[str, tuple[Callable[[str | None], str], Call]] = {
    "live-migrate": (
        lambda host: ms_policies.POLICY_ROOT % ("migrate_live:host" if host else "migrate_live"),
        lambda api, ctx, inst, host: api.live_migrate(
            ctx, inst, block_migration=None, disk_over_commit=None, host_name=host,
            force=None, async_=False)),
    "shelve": (
        lambda host: shelve_policies.POLICY_ROOT % "shelve",
        lambda api, ctx, inst, host: api.shelve(ctx, inst)),
    "rescue": (
        lambda host: rescue_policies.BASE_POLICY_NAME,
        lambda api, ctx, inst, host: api.rescue(ctx, inst)),
    "rebuild": (
        lambda host: servers_policies.SERVERS % "rebuild",
        lambda api, ctx, inst, host: api.rebuild(ctx, inst, inst.image_ref, None)),
    "evacuate": (
        lambda host: evacuate_policies.BASE_POLICY_NAME,
        lambda api, ctx, inst, host: api.evacuate(
            ctx, inst, host=host, on_shared_storage=None, force=False if host else None)),
}


def call(cloud: str, action: str, server_id: str, host: str | None) -> None:
    """Policy check, then the ``API()`` method with the one vTPM check lifted.

    :raises nova.exception.NovaException: Nova refused (policy, state, checks).
    """
    context = request_context(cloud)
    api = compute_api.API()
    instance = api.get(context, server_id,
                       expected_attrs=["numa_topology", "system_metadata", "flavor"])
    rule, method = ACTIONS[action]
    context.can(rule(host), target={"project_id": instance.project_id,
                                    "user_id": instance.user_id})
    with check_lifted(action):
        method(api, context, instance, host)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cloud", required=True, help="clouds.yaml cloud that acts")
    parser.add_argument("--host", help="destination host (live-migrate, evacuate)")
    parser.add_argument("action", choices=sorted(ACTIONS))
    parser.add_argument("server_id")
    args = parser.parse_args(argv)
    nova_config.parse_args(["below_api", "--config-file",
                            str(AIO_DIR / "etc" / "nova" / "nova.conf")])
    objects.register_all()
    try:
        call(args.cloud, args.action, args.server_id, args.host)
    except nova_exception.NovaException as exc:
        # A remote error's message ends with the remote traceback: its first line only.
        first = (exc.format_message() or "").splitlines()[:1] or [""]
        print(f"ERROR: {type(exc).__name__}: {first[0]}", file=sys.stderr)
        return 1
    print(f"{args.action} of {args.server_id} accepted (one vTPM check of Nova's API lifted)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
