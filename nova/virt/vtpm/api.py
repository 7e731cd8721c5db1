"""The nova-api side of vtpm-driver: Nova's API lets through what our computes can do.

Nova's compute API refuses, before any conductor, scheduler or compute is
asked (HTTP 400, ``OperationNotSupportedForVTPM``), the live migration of a
``user`` or ``deployment`` mode vTPM server
(``nova.compute.api.reject_legacy_vtpm_live_migration``) and the shelve,
rescue, rebuild and evacuation of any vTPM server
(``nova.compute.api.reject_vtpm_instances``). Nova's own libvirt driver cannot
do them; the vtpm-driver shim (``compute_driver = vtpm.VTPMLibvirtDriver``)
can, and says so with the placement trait :data:`release.DRIVER_TRAIT` on
every compute node it runs.

This component decides nothing about TPMs. For each of those API methods it
replaces Nova's one vTPM check, in place in the method's decorator chain (the
checks above and below it stay, in their order), by this rule:

* the server has no vTPM, or its host (or a destination host the caller
  names) does not carry the trait: Nova's own check runs, so its refusal
  stands word for word;
* otherwise the call goes on without that check, and the server's request
  spec is made to require the trait (``traits_required`` of its image, as
  an image property would), so that every host the scheduler may choose for
  it (live or cold migration, unshelve, evacuation) runs our shim.

Nothing else of Nova changes; no file of Nova is edited. It is enabled by
configuration only, as a filter in nova-api's paste pipeline (see
README.rst beside this file); without it, Nova's refusals stand everywhere.
It is written against one Nova release and refuses to load on any other.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from oslo_log import log as logging

from nova.virt.vtpm import release

release.check_nova_release(component=release.API_COMPONENT)

from nova import exception as nova_exception  # noqa: E402
from nova import objects  # noqa: E402
from nova.compute import api as compute_api  # noqa: E402
from nova.scheduler.client import report  # noqa: E402
from nova.virt import hardware  # noqa: E402

LOG = logging.getLogger(__name__)

#: Each API method whose vTPM check is replaced -> the argument that names a
#: destination host (None: the server stays on its host, or the scheduler picks).
LIFTED: dict[str, str | None] = {
    "live_migrate": "host_name",
    "evacuate": "host",
    "shelve": None,
    "rescue": None,
    "rebuild": None,
}


def _probe(self: Any, context: Any, instance: Any) -> None:
    """Stand-in method, only decorated to learn the checks' code objects."""


#: The code objects of Nova's two vTPM checks (every decorated method shares them).
_NOVA_CHECKS = (
    compute_api.reject_vtpm_instances("probe")(_probe).__code__,
    compute_api.reject_legacy_vtpm_live_migration(_probe).__code__,
)


def filter_factory(global_conf: dict[str, str], **local_conf: str) -> Callable[[Any], Any]:
    """paste.deploy entry point (``[filter:vtpm]``): install, then pass requests on.

    :raises release.UnsupportedNovaRelease: (at import) another Nova release.
    :raises release.UnsupportedNovaRelease: a method no longer has the check.
    """
    install()
    return lambda app: app


def install(api_class: type = compute_api.API) -> None:
    """Replace the vTPM check of every :data:`LIFTED` method of ``api_class``.

    Idempotent: a method already handled is left as it is.

    :raises release.UnsupportedNovaRelease: a method has no vTPM check (Nova changed).
    """
    for name, host_arg in LIFTED.items():
        _replace_check(api_class, name, host_arg)


def _replace_check(api_class: type, name: str, host_arg: str | None) -> None:
    """Find Nova's check in the method's chain of ``__wrapped__`` decorators and put
    :func:`_check` in its place: the decorator above it calls ours (its closure cell),
    ours calls Nova's or what Nova's wraps."""
    parent, layer = None, api_class.__dict__[name]
    while getattr(layer, "__code__", None) not in _NOVA_CHECKS:
        if getattr(layer, "_vtpm_driver_check", False):
            return
        parent, layer = layer, getattr(layer, "__wrapped__", None)
        if layer is None:
            raise release.UnsupportedNovaRelease(
                f"nova.compute.api.API.{name} has no vTPM check to replace: "
                f"{release.API_COMPONENT} supports {release.SUPPORTED} only, "
                f"found nova {release.installed_release()!r}")
    check = _check(layer, _signature(layer), host_arg)
    if parent is None:
        setattr(api_class, name, check)
        return
    for cell in parent.__closure__ or ():
        if cell.cell_contents is layer:
            cell.cell_contents = check  # what the decorator above calls
            parent.__wrapped__ = check  # what it says it wraps (functools.wraps)
            return
    raise release.UnsupportedNovaRelease(
        f"nova.compute.api.API.{name}: cannot find its vTPM check in the decorator chain")


def _signature(function: Any) -> inspect.Signature:
    """The signature of the undecorated API method (the innermost ``__wrapped__``)."""
    return inspect.signature(inspect.unwrap(function))


def _check(nova_check: Any, signature: inspect.Signature,
           host_arg: str | None) -> Callable[..., Any]:
    """Nova's check, except where the server's host and destination run our shim."""

    @functools.wraps(nova_check)
    def check(self: Any, context: Any, instance: Any, *args: Any, **kwargs: Any) -> Any:
        if hardware.get_vtpm_constraint(instance.flavor, instance.image_meta) is None:
            return nova_check(self, context, instance, *args, **kwargs)
        hosts = [instance.host]
        if host_arg:
            named = signature.bind(self, context, instance, *args, **kwargs).arguments
            if named.get(host_arg):
                hosts.append(named[host_arg])
        if not all(runs_our_shim(context, host) for host in hosts):
            return nova_check(self, context, instance, *args, **kwargs)
        require_our_shim(context, instance.uuid)
        LOG.info("vtpm-driver: %s of vTPM server %s goes on: the shim runs on %s",
                 nova_check.__name__, instance.uuid, ", ".join(hosts))
        return nova_check.__wrapped__(self, context, instance, *args, **kwargs)

    check._vtpm_driver_check = True  # type: ignore[attr-defined]
    return check


def runs_our_shim(context: Any, host: str | None) -> bool:
    """True if every compute node of ``host`` carries :data:`release.DRIVER_TRAIT`.

    False (so Nova's check decides) for an unknown host, a host without
    compute nodes, or when placement cannot be asked (logged).
    """
    if not host:
        return False
    try:
        nodes = objects.ComputeNodeList.get_all_by_host(context, host)
    except nova_exception.ComputeHostNotFound:
        return False
    client = report.report_client_singleton()
    try:
        return bool(nodes) and all(
            release.DRIVER_TRAIT in client.get_provider_traits(context, node.uuid).traits
            for node in nodes)
    except nova_exception.ResourceProviderTraitRetrievalFailed as exc:
        LOG.warning("vtpm-driver: cannot read the traits of host %s (%s); Nova's vTPM "
                    "check decides", host, exc)
        return False


def require_our_shim(context: Any, instance_uuid: str) -> None:
    """Make the server's request spec require :data:`release.DRIVER_TRAIT`.

    Stored as ``traits_required`` of the spec's image (its copy in the spec,
    not Glance's), which Nova's scheduler adds to every placement query for
    the server. Idempotent.
    """
    spec = objects.RequestSpec.get_by_instance_uuid(context, instance_uuid)
    if spec.image is None:
        spec.image = objects.ImageMeta.from_dict({})
    required = list(spec.image.properties.get("traits_required", []))
    if release.DRIVER_TRAIT in required:
        return
    spec.image.properties.traits_required = [*required, release.DRIVER_TRAIT]
    spec.save()
