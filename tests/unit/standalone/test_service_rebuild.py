"""ServerService's rescue, unrescue and rebuild decide under the server's lock, on its
record re-read there (issue 13)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.unit.conftest import INITRD, KERNEL, MEMBER, OWNER, Env
from tests.unit.standalone import test_service_locks as locks_tests
from vtpm_driver import exception
from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.model import rules
from vtpm_driver.model.server import Instance, is_rescued, recorded_secret
from vtpm_driver.standalone import servers
from vtpm_driver.standalone.service import ServerService

# (issue 13) Each command read the server, then waited for its lock while other
# workers changed it; under the lock it must act on the record re-read there, or
# refuse what is pending then. The interleaving hook is test_service_locks.meanwhile.

ADD_A_VTPM = {"hw:tpm_version": "2.0", "hw:tpm_secret_security": "user"}


def _without_vtpm(env: Env) -> Instance:
    return env.spawn(servers.new_instance("vm1", OWNER, flavor_extra_specs={},
                                          kernel=KERNEL, initrd=INITRD))


def _call(service: ServerService, operation: str, name: str) -> Callable[[], Any]:
    return {"rescue": lambda: service.rescue(name),
            "unrescue": lambda: service.unrescue(name),
            "rebuild": lambda: service.rebuild(name, cmdline="console=ttyS0 rebuilt")}[operation]


@pytest.mark.parametrize("operation", ["rescue", "unrescue", "rebuild"])
def test_restarts_act_on_a_resize_confirmed_while_they_waited(
        env: Env, monkeypatch: pytest.MonkeyPatch, operation: str) -> None:
    """While A's rescue, unrescue or rebuild waits for the lock, B resizes the server to
    a flavor with a vTPM (and 2 vCPUs) and C confirms it. A restarts the guest: with the
    flavor it read before (no vTPM) the domain would be defined without its TPM and
    the record would forget the secret (the TPM lost). It must use the re-read record."""
    service = locks_tests.record_service(env)
    inst = _without_vtpm(env)
    if operation == "unrescue":
        service.rescue(inst.name)

    def resize_and_confirm() -> None:
        other = locks_tests.other_worker(env, service)
        other.resize(inst.name, set_specs=ADD_A_VTPM, vcpus=2)
        other.confirm_resize(inst.name)

    landed = locks_tests.meanwhile(monkeypatch, resize_and_confirm)
    _call(service, operation, inst.name)()
    assert landed == [operation]
    found = servers.find(env.conn, inst.uuid)
    secret = recorded_secret(found)
    assert rules.has_vtpm(found) and found.flavor.vcpus == 2
    assert secret is not None and list(env.km.passphrases) == [secret]
    assert "<tpm" in env.dom(inst).xml and secret in env.dom(inst).xml
    assert env.dom(inst).active
    assert is_rescued(found) == (operation == "rescue")


@pytest.mark.parametrize("operation", ["rescue", "unrescue", "rebuild"])
def test_a_resize_ended_while_waiting_is_refused_under_the_lock(
        env: Env, monkeypatch: pytest.MonkeyPatch, operation: str) -> None:
    """B's resize ends (awaiting confirm or revert) while A waits for the lock: A is
    refused, naming the command that decides the resize, and changes nothing."""
    service = locks_tests.record_service(env)
    inst = env.spawn(env.instance("user"))
    if operation == "unrescue":
        service.rescue(inst.name)
    resized: list[str] = []

    def resize() -> None:
        locks_tests.other_worker(env, service).resize(inst.name, set_specs={}, vcpus=2)
        resized.append(env.dom(inst).xml)

    landed = locks_tests.meanwhile(monkeypatch, resize)
    with pytest.raises(exception.VTPMError,
                       match=rf"cannot {operation} server 'vm1': a resize is awaiting "
                             r"confirm or revert; run 'vtpm-driver server resize "
                             r"confirm\|revert vm1' first"):
        _call(service, operation, inst.name)()
    assert landed == [operation]
    assert service.backend.resize_pending(inst)  # B's resize, untouched
    found = servers.find(env.conn, inst.uuid)
    assert found.flavor.vcpus == 2 and recorded_secret(found) in env.km.passphrases
    assert env.dom(inst).active and [env.dom(inst).xml] == resized
    assert service.store.list() == []


# (issue 20 defect 9) Destroying a TPM or booting foreign boot files against it needs the
# owner (or an admin of the owner's project) in every mode: in host and deployment mode no
# Barbican ACL stops a project member or another project's admin.

ADMIN_ELSEWHERE = RequestContext(user_id="root-id", project_id="proj-x",
                                 auth_token="tok-root", roles=("admin",))
PROJECT_ADMIN = RequestContext(user_id="boss-id", project_id="proj-a",
                               auth_token="tok-boss", roles=("admin",))


def _as(env: Env, context: RequestContext) -> ServerService:
    locks_tests.record_service(env)  # its configuration
    return ServerService(env.drv.conf, locks_tests.RecordBackend(env), lambda: context)


@pytest.mark.parametrize("mode", ["host", "deployment"])
@pytest.mark.parametrize("caller", [MEMBER, ADMIN_ELSEWHERE], ids=["member", "other-admin"])
@pytest.mark.parametrize("operation", ["reset", "rescue-own-kernel", "rebuild-own-kernel"])
def test_a_non_owner_cannot_destroy_the_tpm_or_boot_foreign_files(
        env: Env, mode: str, caller: RequestContext, operation: str) -> None:
    inst = env.spawn(env.instance(mode))
    ek = env.state_file(inst).read_bytes()
    xml = env.dom(inst).xml
    service = _as(env, caller)
    call = {"reset": lambda: service.rebuild(inst.name, reset_tpm=True),
            "rescue-own-kernel": lambda: service.rescue(inst.name, kernel="/tmp/evil-vmlinuz"),
            "rebuild-own-kernel": lambda: service.rebuild(inst.name,
                                                          kernel="/tmp/evil-vmlinuz")}
    with pytest.raises(exception.VTPMSecretForbidden, match="owner"):
        call[operation]()
    assert env.state_file(inst).read_bytes() == ek, "the TPM is untouched"
    assert env.dom(inst).xml == xml and env.dom(inst).active


@pytest.mark.parametrize("mode", ["host", "deployment"])
def test_the_owner_and_its_project_admin_may_reset_and_a_member_may_rescue_plainly(
        env: Env, mode: str) -> None:
    inst = env.spawn(env.instance(mode))
    ek = env.state_file(inst).read_bytes()
    _as(env, MEMBER).rescue(inst.name)  # the server's own boot files: nothing foreign
    _as(env, MEMBER).unrescue(inst.name)
    assert env.state_file(inst).read_bytes() == ek
    _as(env, PROJECT_ADMIN).rebuild(inst.name, reset_tpm=True)
    assert env.state_file(inst).read_bytes() != ek
    _as(env, OWNER).rescue(inst.name, kernel=KERNEL, cmdline="console=ttyS0 single")
    assert env.dom(inst).active
