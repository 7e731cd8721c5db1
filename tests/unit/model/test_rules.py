"""policy: the pure rules of handing a passphrase over when Nova moves a server (issue 14),
and who may act on a server."""

from __future__ import annotations

import types

import pytest

from vtpm_driver import exception
from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.model import request, rules
from vtpm_driver.model.rules import SecretSource
from vtpm_driver.model.server import Flavor, Instance


def cfg(mode: str) -> request.VTPMConfig:
    return request.get_vtpm_config({"hw:tpm_version": "2.0", "hw:tpm_secret_security": mode}, {})


OWNER = types.SimpleNamespace(user_id="u-owner", user_name="alice")
MEMBER = types.SimpleNamespace(user_id="u-member", user_name="bob")
SERVER = types.SimpleNamespace(name="vm1", uuid="c0ffee00-0000-4000-8000-000000000001",
                               user_id="u-owner")


@pytest.mark.parametrize(("mode", "source"), [
    ("host", SecretSource.HOST), ("user", SecretSource.OWNER),
    ("deployment", SecretSource.SERVICE)])
def test_every_mode_may_move_with_its_own_credentials(mode, source):
    assert rules.migration_secret_source(cfg(mode)) is source
    assert rules.check_may_migrate(cfg(mode), SERVER, OWNER, live=True) is source


def test_no_vtpm_needs_no_secret():
    assert rules.migration_secret_source(None) is SecretSource.NONE
    assert rules.check_may_migrate(None, SERVER, MEMBER, live=True) is SecretSource.NONE


@pytest.mark.parametrize("live", [True, False])
def test_user_mode_moves_only_with_the_owner(live):
    with pytest.raises(exception.VTPMSecretForbidden, match="only its owner") as err:
        rules.check_may_migrate(cfg("user"), SERVER, MEMBER, live=live)
    assert ("live-migrate" if live else "cannot migrate") in str(err.value)
    assert "bob" in str(err.value)


@pytest.mark.parametrize("mode", ["host", "deployment"])
def test_host_and_deployment_modes_do_not_need_the_owner(mode):
    assert rules.check_may_migrate(cfg(mode), SERVER, MEMBER, live=True) is not None


# -- who may act on a server (Nova's owner-project-or-admin rule) ---------------


def _ctx(project_id: str, roles: tuple[str, ...] = ("member",)):
    return RequestContext(user_id="u-1", project_id=project_id, auth_token="t",
                          roles=roles, user_name="alice")


def test_check_project_allows_project_members_and_admins():

    inst = Instance(name="vm", user_id="owner", project_id="proj-a")
    rules.check_project(_ctx("proj-a"), inst, "reboot")
    rules.check_project(_ctx("proj-x", roles=("admin",)), inst, "reboot")


def test_check_project_refuses_other_projects_naming_server_and_project():

    inst = Instance(name="vm", user_id="owner", project_id="proj-a")
    with pytest.raises(exception.NotAuthorized,
                       match=r"cannot stop server vm: it belongs to project proj-a and alice"):
        rules.check_project(_ctx("proj-b"), inst, "stop")




def test_new_flavor_sets_unsets_and_resizes():
    old = Flavor(vcpus=1, memory_mb=256, extra_specs={"hw:tpm_version": "2.0", "x": "1"})
    new = rules.new_flavor(old, {"hw:tpm_model": "tpm-crb"}, ["x"], None, 512)
    assert new.extra_specs == {"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}
    assert (new.vcpus, new.memory_mb) == (1, 512)
    assert old.extra_specs == {"hw:tpm_version": "2.0", "x": "1"}  # the old one is untouched


def test_new_flavor_refuses_to_unset_what_is_not_there():
    old = Flavor(vcpus=1, memory_mb=256, extra_specs={"hw:tpm_version": "2.0"})
    with pytest.raises(exception.InvalidVTPMConfig,
                       match=r"'hw:nope': the server's flavor has no such extra spec "
                             r"\(it has: hw:tpm_version\)"):
        rules.new_flavor(old, {}, ["hw:nope"], None, None)


# -- destroying a TPM or booting foreign boot files against it (issue 20 defect 9) ------


def _vtpm_server(mode: str) -> Instance:
    return Instance(name="vm", uuid="c0ffee00-0000-4000-8000-000000000001", user_id="owner",
                    project_id="proj-a",
                    flavor=Flavor(extra_specs={"hw:tpm_version": "2.0",
                                               "hw:tpm_secret_security": mode}))


@pytest.mark.parametrize("mode", ["user", "host", "deployment"])
@pytest.mark.parametrize(("caller", "allowed"), [
    (RequestContext(user_id="owner", project_id="proj-a", roles=("member",)), True),
    (RequestContext(user_id="boss", project_id="proj-a", roles=("admin",)), True),
    (RequestContext(user_id="bob", project_id="proj-a", roles=("member",)), False),
    (RequestContext(user_id="root", project_id="proj-x", roles=("admin",)), False),
], ids=["owner", "owners-project-admin", "project-member", "admin-of-another-project"])
def test_only_the_owner_or_its_project_admin_may_reset_or_boot_foreign_files(
        mode, caller, allowed):
    server = _vtpm_server(mode)
    if allowed:
        rules.check_may_replace_tpm_or_boot(caller, server, "rebuild --reset-tpm")
        return
    with pytest.raises(exception.VTPMSecretForbidden,
                       match=r"cannot rebuild --reset-tpm server 'vm' \(c0ffee00.*owner") as err:
        rules.check_may_replace_tpm_or_boot(caller, server, "rebuild --reset-tpm")
    assert caller.user_id in str(err.value)


def test_a_server_without_a_vtpm_needs_only_the_project_check():
    server = Instance(name="vm", user_id="owner", project_id="proj-a")
    member = RequestContext(user_id="bob", project_id="proj-a")
    rules.check_may_replace_tpm_or_boot(member, server, "rescue")


def test_foreign_boot_files_are_any_other_than_the_servers_own():
    own = types.SimpleNamespace(kernel="/k", initrd="/i", cmdline="console=ttyS0")
    assert not rules.boots_foreign_files(own, None, None, None)
    assert not rules.boots_foreign_files(own, "/k", "/i", "console=ttyS0")
    assert rules.boots_foreign_files(own, "/mine", None, None)
    assert rules.boots_foreign_files(own, None, "/mine.img", None)
    assert rules.boots_foreign_files(own, None, None, "init=/bin/sh")


@pytest.mark.parametrize(("modes", "leftover"), [
    # one mode: a server at rest (the audit)
    ((request.SECRET_USER,), True),
    ((request.SECRET_DEPLOYMENT,), True),
    ((request.SECRET_HOST,), False),
    # an unfinished resize (nova-compute's start-up): any host mode keeps it
    ((request.SECRET_USER, request.SECRET_HOST), False),
    ((request.SECRET_HOST, None), False),
    ((None, request.SECRET_DEPLOYMENT), True),
    ((request.SECRET_USER, request.SECRET_DEPLOYMENT), True),
    # nothing known (no vTPM in any flavor): kept
    ((None,), False),
    ((), False),
])
def test_left_after_start(modes, leftover):
    assert rules.left_after_start(*modes) is leftover


def test_other_pcr_banks_are_another_tpm():
    """swtpm sets the banks when it manufactures the TPM: a resize to other banks gives a
    fresh TPM, as a change of model does (issue 22)."""
    def cfg(*banks):
        return request.VTPMConfig(version="2.0", pcr_banks=banks)
    assert rules.resize_change(cfg("sha256"), cfg("sha256")) is rules.Change.KEPT
    assert rules.resize_change(cfg("sha256"), cfg("sha256", "sha384")) is rules.Change.FRESH
    assert rules.resize_change(cfg(), cfg("sha256")) is rules.Change.FRESH
