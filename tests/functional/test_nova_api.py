"""vtpm-driver's nova-api component (``nova/virt/vtpm/api.py``) on the all-in-one, over HTTP.

The AIO runs two nova-api services on one database: ``nova-api`` (the
catalog's, with the component in its paste pipeline) and ``nova-api-plain``
(:data:`PLAIN_NOVA_API`, Nova's pipeline as shipped). Each test compares what
the two say to the same request, and what Nova then does.

- Without the component, Nova's HTTP 400 for every vTPM operation stands.
- With it, the same 400, word for word, where the server's host lacks
  ``CUSTOM_VTPM_DRIVER`` (the trait the shim reports) or a named destination
  lacks it; and the scheduler never picks a host without it.

The trait is removed from a test host's resource provider for the length of
one test (``without_our_trait``) and put back after: the compute re-sends
its traits only when its own view changes, so it stays away meanwhile.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from keystoneauth1 import exceptions as ks_exc

from tests.functional.fixtures_nova import (
    HOST_ATTR,
    PLAIN_NOVA_API,
    AioCloud,
    ResourceTracker,
    aio_cloud,  # noqa: F401  (fixture)
    aio_resources,  # noqa: F401  (fixture)
    assert_nothing_on,
    assert_runs_on,
    create_on_test_host,
    latest_report,
    nova_fault,
    other,
    wait_migration_over,
)
from vtpm_driver.guestreport import tpm_of

pytestmark = [pytest.mark.functional, pytest.mark.aio, pytest.mark.multihost]

DRIVER_TRAIT = "CUSTOM_VTPM_DRIVER"

#: Each refused operation as nova-api's REST body (what ``openstack`` sends).
ACTIONS = {
    "live-migrate": lambda host: {"os-migrateLive": {"host": host, "block_migration": "auto"}},
    "shelve": lambda host: {"shelve": None},
    "rescue": lambda host: {"rescue": {}},
    "rebuild": lambda host: {"rebuild": {"imageRef": None}},
    "evacuate": lambda host: {"evacuate": {"host": host} if host else {}},
}


def refusal(cloud: AioCloud, server_id: str, action: str, host: str | None = None,
            endpoint: str | None = None) -> tuple[int, str]:
    """The HTTP status and Nova's message for ``action``, which must be refused."""
    body = ACTIONS[action](host)
    if action == "rebuild":
        body["rebuild"]["imageRef"] = cloud.server("admin", server_id)["image"]["id"]
    with pytest.raises(ks_exc.HttpError) as info:
        cloud.compute("admin", "POST", f"/servers/{server_id}/action", body,
                      endpoint=endpoint)
    return info.value.http_status, nova_fault(info.value)


@contextlib.contextmanager
def without_our_trait(cloud: AioCloud, node: str) -> Iterator[None]:
    """``node``'s resource provider without :data:`DRIVER_TRAIT`, then with it again."""
    rp = cloud.compute_provider(node)["uuid"]
    traits = cloud.provider_traits(rp)
    assert DRIVER_TRAIT in traits, f"{node} does not report {DRIVER_TRAIT}: {traits}"
    set_traits(cloud, rp, [t for t in traits if t != DRIVER_TRAIT])
    try:
        yield
    finally:
        set_traits(cloud, rp, sorted({*cloud.provider_traits(rp), DRIVER_TRAIT}))


def set_traits(cloud: AioCloud, rp: str, traits: list[str]) -> None:
    cloud.cli("admin", "--os-placement-api-version", "1.6", "resource", "provider", "trait",
              "set", *[arg for t in traits for arg in ("--trait", t)], rp)


def test_without_the_component_novas_refusals_stand_and_with_it_where_our_shim_is_missing(
        aio_cloud: AioCloud, aio_resources: ResourceTracker  # noqa: F811
        ) -> None:
    """Nova's 400 for each operation, word for word, from Nova's own API and from ours
    wherever the server's host (or the named destination) lacks our trait."""
    server_id, source = create_on_test_host(aio_resources, "deployment")
    before = latest_report(aio_cloud, server_id)
    plain = {action: refusal(aio_cloud, server_id, action, other(source), PLAIN_NOVA_API)
             for action in ACTIONS}
    for action, (status, message) in plain.items():
        assert status == 400, (action, message)
        assert "vTPM" in message, (action, message)

    # A named destination without our trait: refused as Nova refuses it.
    with without_our_trait(aio_cloud, other(source)):
        for action in ("live-migrate", "evacuate"):
            assert refusal(aio_cloud, server_id, action, other(source)) == plain[action]
    # The server's own host without it: every operation refused as Nova refuses it.
    with without_our_trait(aio_cloud, source):
        for action in ACTIONS:
            assert refusal(aio_cloud, server_id, action, other(source)) == plain[action]

    server = aio_cloud.server("admin", server_id)
    assert (server["status"], server[HOST_ATTR]) == ("ACTIVE", source)
    after = latest_report(aio_cloud, server_id, after_seq=int(before["seq"]),
                          boot=before["boot"])
    assert (tpm_of(after), after["boot"]) == (tpm_of(before), before["boot"])  # untouched


def test_the_scheduler_never_picks_a_host_without_our_trait(
        aio_cloud: AioCloud, aio_resources: ResourceTracker  # noqa: F811
        ) -> None:
    """A live migration the API lets through cannot land on a host without the trait
    (the request spec requires it); once the host has it again, it can."""
    server_id, source = create_on_test_host(aio_resources, "deployment")
    dest = other(source)
    before = latest_report(aio_cloud, server_id)

    with without_our_trait(aio_cloud, dest):
        proc = aio_cloud.action("admin", "live-migrate", server_id)  # no host: the scheduler's
    assert proc.returncode != 0
    assert "No valid host" in proc.stderr, proc.stderr
    refused = wait_migration_over(aio_cloud, server_id)
    assert refused["status"] in ("error", "failed")
    server = aio_cloud.wait_server("owner", server_id, "ACTIVE")
    assert aio_cloud.server("admin", server_id)[HOST_ATTR] == source
    assert_runs_on(source, server_id)
    assert_nothing_on(dest, server_id)

    aio_cloud.action_ok("admin", "live-migrate", server_id)
    assert wait_migration_over(aio_cloud, server_id, after=refused["id"])["status"] == "completed"
    server = aio_cloud.wait_server("owner", server_id, "ACTIVE")
    assert server["status"] == "ACTIVE"
    assert aio_cloud.server("admin", server_id)[HOST_ATTR] == dest
    after = latest_report(aio_cloud, server_id, after_seq=int(before["seq"]),
                          boot=before["boot"])
    assert (tpm_of(after), after["boot"]) == (tpm_of(before), before["boot"])
    assert_runs_on(dest, server_id)
    assert_nothing_on(source, server_id)
