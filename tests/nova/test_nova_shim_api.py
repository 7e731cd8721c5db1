"""The nova-api component (``nova.virt.vtpm.api``) against the real nova 34 wheel.

The checks it replaces are Nova's own decorators; a stand-in API class is
decorated with them (and with an outer decorator, as Nova's methods are), so
that installing into it never changes the ``compute_api.API`` other tests
use. One test installs into Nova's real class, in a child interpreter.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from nova import exception as nova_exception
from nova import objects
from nova.compute import api as compute_api

from nova.virt.vtpm import api, release
from tests.nova.nova_fakes import make_flavor, make_image, make_instance, nova_ctx

REPO = Path(__file__).resolve().parents[2]


def outer(f: Any) -> Any:
    """An unrelated check above Nova's vTPM one (Nova stacks several)."""

    @functools.wraps(f)
    def inner(self: Any, context: Any, instance: Any, *args: Any, **kw: Any) -> Any:
        self.calls.append(("outer", f.__name__))
        return f(self, context, instance, *args, **kw)

    return inner


def make_stand_in() -> type:
    """A fresh class (fresh decorator chains) with the five API methods, each with
    Nova's vTPM check where Nova has it."""

    class StandIn:

        def __init__(self) -> None:
            self.calls: list[tuple[str, ...]] = []

        @outer
        @compute_api.reject_legacy_vtpm_live_migration
        def live_migrate(self, context, instance, block_migration, disk_over_commit, host_name,
                         force=None, async_=False):
            self.calls.append(("live_migrate", host_name))

        @outer
        @compute_api.reject_vtpm_instances("evacuate")
        def evacuate(self, context, instance, host, on_shared_storage, admin_password=None,
                     force=None, target_state=None):
            self.calls.append(("evacuate", host))

        @compute_api.reject_vtpm_instances("shelve")
        @outer
        def shelve(self, context, instance, clean_shutdown=True):
            self.calls.append(("shelve",))

        @outer
        @compute_api.reject_vtpm_instances("rescue")
        def rescue(self, context, instance, rescue_password=None):
            self.calls.append(("rescue",))

        @outer
        @compute_api.reject_vtpm_instances("rebuild")
        def rebuild(self, context, instance, image_href, admin_password, **kwargs):
            self.calls.append(("rebuild",))

    return StandIn


class Placement:
    """Which hosts carry our trait, and the request specs the component saved."""

    def __init__(self, ours: set[str]) -> None:
        self.ours = ours
        self.specs: dict[str, objects.RequestSpec] = {}
        self.saves = 0
        self.down = False

    def nodes(self, context: Any, host: str) -> list[Any]:
        if host == "gone":
            raise nova_exception.ComputeHostNotFound(host=host)
        return [objects.ComputeNode(uuid=str(uuid.uuid5(uuid.NAMESPACE_DNS, host)), host=host)]

    def get_provider_traits(self, context: Any, rp_uuid: str) -> Any:
        if self.down:
            raise nova_exception.ResourceProviderTraitRetrievalFailed(uuid=rp_uuid)
        host = next(h for h in (*self.ours, "host-c")
                    if str(uuid.uuid5(uuid.NAMESPACE_DNS, h)) == rp_uuid)
        traits = {"COMPUTE_SECURITY_TPM_2_0"} | (
            {release.DRIVER_TRAIT} if host in self.ours else set())
        return type("TraitInfo", (), {"traits": traits})()

    def spec(self, context: Any, instance_uuid: str) -> objects.RequestSpec:
        if instance_uuid not in self.specs:
            spec = objects.RequestSpec(
                instance_uuid=instance_uuid,
                image=make_image(**{"trait:CUSTOM_OTHER": "required"}))
            placement = self

            def save() -> None:
                placement.saves += 1

            spec.save = save
            self.specs[instance_uuid] = spec
        return self.specs[instance_uuid]


@pytest.fixture
def placement(monkeypatch: pytest.MonkeyPatch) -> Placement:
    fake = Placement(ours={"host-a", "host-b"})
    monkeypatch.setattr(objects.ComputeNodeList, "get_all_by_host", fake.nodes)
    monkeypatch.setattr(api.report, "report_client_singleton", lambda: fake)
    monkeypatch.setattr(objects.RequestSpec, "get_by_instance_uuid", fake.spec)
    return fake


@pytest.fixture
def stand_in() -> type:
    """A fresh class per test, with the component installed."""
    cls = make_stand_in()
    api.install(cls)
    return cls


def vtpm_server(mode: str = "deployment", host: str = "host-a") -> objects.Instance:
    inst = make_instance(make_flavor(**{"hw:tpm_version": "2.0",
                                        "hw:tpm_secret_security": mode}))
    inst.host = host
    return inst


CALLS = {
    "live_migrate": lambda a, ctx, inst, dest: a.live_migrate(ctx, inst, None, None, dest),
    "evacuate": lambda a, ctx, inst, dest: a.evacuate(ctx, inst, host=dest,
                                                      on_shared_storage=None),
    "shelve": lambda a, ctx, inst, dest: a.shelve(ctx, inst),
    "rescue": lambda a, ctx, inst, dest: a.rescue(ctx, inst),
    "rebuild": lambda a, ctx, inst, dest: a.rebuild(ctx, inst, "image", None),
}


@pytest.mark.parametrize("name", sorted(api.LIFTED))
def test_a_vtpm_server_on_our_hosts_goes_through_and_must_stay_on_them(
        stand_in, placement, name):
    inst = vtpm_server()
    dest = "host-b" if api.LIFTED[name] else None
    inst_api = stand_in()
    CALLS[name](inst_api, nova_ctx(), inst, dest)
    assert inst_api.calls[-1][0] == name
    assert ("outer", name) in inst_api.calls  # the other checks still run
    required = placement.specs[inst.uuid].image.properties.traits_required
    assert required == ["CUSTOM_OTHER", release.DRIVER_TRAIT]
    CALLS[name](inst_api, nova_ctx(), inst, dest)  # again: the spec is saved once
    assert placement.saves == 1


def nova_refusal(name: str, inst: objects.Instance, dest: str | None) -> str:
    """What Nova's own check says, without the component."""
    with pytest.raises(nova_exception.OperationNotSupportedForVTPM) as info:
        CALLS[name](make_stand_in()(), nova_ctx(), inst, dest)
    return str(info.value)


@pytest.mark.parametrize("name", sorted(api.LIFTED))
@pytest.mark.parametrize("where", ["source", "destination", "unknown", "placement down"])
def test_without_our_trait_novas_refusal_stands_word_for_word(
        stand_in, placement, name, where):
    inst = vtpm_server(host="host-c" if where == "source" else "host-a")
    dest = {"destination": "host-c", "unknown": "gone"}.get(where)
    if where in ("destination", "unknown") and not api.LIFTED[name]:
        inst.host = dest  # no destination to name: the server's own host lacks it
    placement.down = where == "placement down"
    expected = nova_refusal(name, inst, dest)
    inst_api = stand_in()
    with pytest.raises(nova_exception.OperationNotSupportedForVTPM) as info:
        CALLS[name](inst_api, nova_ctx(), inst, dest)
    assert str(info.value) == expected
    assert inst_api.calls in ([], [("outer", name)])  # the method itself never ran
    assert placement.specs == {}


def test_host_mode_live_migration_and_servers_without_vtpm_are_novas_business(
        stand_in, placement):
    inst_api = stand_in()
    plain = make_instance(make_flavor())
    plain.host = "host-c"
    for name in sorted(api.LIFTED):
        CALLS[name](inst_api, nova_ctx(), plain, None)
    assert [c[0] for c in inst_api.calls if c[0] != "outer"] == sorted(api.LIFTED)
    assert placement.specs == {}  # nothing asked of the scheduler


def test_install_is_idempotent(stand_in):
    before = {name: stand_in.__dict__[name] for name in api.LIFTED}
    api.install(stand_in)
    assert {name: stand_in.__dict__[name] for name in api.LIFTED} == before


def test_a_method_without_novas_check_is_refused_naming_the_release():
    class Changed:
        @outer
        def shelve(self, context, instance):
            pass

    with pytest.raises(release.UnsupportedNovaRelease) as info:
        api._replace_check(Changed, "shelve", None)
    assert "API.shelve has no vTPM check" in str(info.value)
    assert "nova 34.x" in str(info.value)


def test_another_nova_release_is_refused_naming_the_component_and_both_releases():
    with pytest.raises(release.UnsupportedNovaRelease) as info:
        release.check_nova_release("35.0.0", component=release.API_COMPONENT)
    message = str(info.value)
    assert "nova-api component" in message and "'35.0.0'" in message
    assert "nova 34.x" in message and "api-paste.ini" in message


def test_novas_real_api_class_has_each_check_replaced_in_place():
    """In a child interpreter: installing into ``compute_api.API`` itself."""
    script = textwrap.dedent("""
        import nova.virt
        nova.virt.__path__.insert(0, %r)
        from nova.compute import api as compute_api
        from nova.virt.vtpm import api

        def chain(f):
            while f is not None:
                yield f
                f = getattr(f, "__wrapped__", None)

        before = {n: [g.__qualname__ for g in chain(compute_api.API.__dict__[n])]
                  for n in api.LIFTED}
        api.filter_factory({})
        for n in api.LIFTED:
            after = list(chain(compute_api.API.__dict__[n]))
            ours = [i for i, g in enumerate(after) if getattr(g, "_vtpm_driver_check", 0)]
            assert len(ours) == 1, (n, ours)
            # Ours stands right above Nova's check (its __wrapped__), the rest unchanged.
            assert after[ours[0] + 1].__code__ in api._NOVA_CHECKS, n
            del after[ours[0]]
            assert [g.__qualname__ for g in after] == before[n], (n, before[n])
            print(n, ours[0], len(after))
    """) % str(REPO / "nova" / "virt")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == len(api.LIFTED)
