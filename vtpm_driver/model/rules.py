"""Pure vTPM policy: what a server has, which secret mode, what an operation changes.

:mod:`vtpm_driver.model.request` answers "what does this flavor + image ask for?".
This module answers the questions every operation asks next, once, for the
standalone driver and the Nova shim alike (no I/O, no libvirt, no Barbican):

* :func:`vtpm_of` / :func:`has_vtpm`: the vTPM of a server-like object
  (anything with ``flavor.extra_specs`` and ``image_meta.properties``, Nova's
  objects or ours, read by :mod:`vtpm_driver.model.server`'s readers);
* :func:`secret_security`: the secret mode of a flavor object, by the one
  rule (:func:`vtpm_driver.model.request.secret_security`);
* :func:`resize_change`: what a resize or cold migration does to the TPM
  (:class:`Change`), and :func:`check_mode_change`, Nova's refusal to move a
  secret between the user and the service user;
* :func:`uses_persistent_secret`, :func:`owned_by_service_user`: how the
  libvirt secret and the Barbican secret are handled per mode.

Everything here is idempotent and side-effect free.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any

from vtpm_driver import exception
from vtpm_driver.model import request
from vtpm_driver.model.request import VTPMConfig
from vtpm_driver.model.server import (
    Flavor,
    canonical_uuid,
    flavor_extra_specs,
    image_properties,
    server_label,
)


class Change(enum.Enum):
    """What a resize (or cold migration) does to a server's TPM (SPEC F4)."""

    NONE = "none"        # no vTPM before or after
    KEPT = "kept"        # same version and model: the state moves/stays as it is
    FRESH = "fresh"      # version or model changed: a new TPM, same Barbican secret
    ADDED = "added"      # a vTPM appears: a new Barbican secret
    REMOVED = "removed"  # the vTPM goes: state dropped, secret deleted on confirm

    @property
    def keeps_state(self) -> bool:
        """Whether the old TPM state is still the server's TPM afterwards."""
        return self is Change.KEPT

    @property
    def makes_new_tpm(self) -> bool:
        """Whether the resized server starts with a TPM manufactured for it (no state yet)."""
        return self in (Change.FRESH, Change.ADDED)

    @property
    def drops_old_state(self) -> bool:
        """Whether the state the server had must not be used by the new flavor."""
        return self in (Change.FRESH, Change.REMOVED)


def vtpm_of(instance: Any, flavor: Any = None, image_meta: Any = None) -> VTPMConfig | None:
    """The vTPM a server's flavor (or ``flavor``) and image (or ``image_meta``) ask for.

    :raises InvalidVTPMConfig: the request is invalid (see :mod:`vtpm_driver.model.request`).
    """
    flavor = flavor if flavor is not None else getattr(instance, "flavor", None)
    if image_meta is None:
        image_meta = getattr(instance, "image_meta", None)
    return request.get_vtpm_config(flavor_extra_specs(flavor), image_properties(image_meta))


def has_vtpm(instance: Any, flavor: Any = None, image_meta: Any = None) -> bool:
    """Whether the server asks for a vTPM; an invalid request counts as asking for one.

    Used to refuse operations that would lose a TPM: when in doubt, protect it.
    """
    try:
        return vtpm_of(instance, flavor, image_meta) is not None
    except exception.InvalidVTPMConfig:
        return True


def secret_security(flavor: Any, *, strict: bool = True) -> str:
    """The secret mode of ``flavor`` (a Nova Flavor, ours, a dict or None):
    :func:`vtpm_driver.model.request.secret_security` of its extra specs.

    :raises InvalidVTPMConfig: ``strict`` and the value is not a known mode.
    """
    return request.secret_security(flavor_extra_specs(flavor), strict=strict)


def same_tpm(a: VTPMConfig | None, b: VTPMConfig | None) -> bool:
    """Whether two configs give the same TPM device (Nova compares version and model).

    Other active PCR banks are another TPM too: swtpm sets them when it
    manufactures the TPM, so a change of banks is treated like a change of model
    (a fresh TPM, the old one kept for a revert).
    """
    if a is None or b is None:
        return a is b
    return (a.version, a.model, a.pcr_banks) == (b.version, b.model, b.pcr_banks)


def resize_change(old: VTPMConfig | None, new: VTPMConfig | None) -> Change:
    """What going from ``old`` to ``new`` does to the TPM (SPEC F4)."""
    if old is None:
        return Change.NONE if new is None else Change.ADDED
    if new is None:
        return Change.REMOVED
    return Change.KEPT if same_tpm(old, new) else Change.FRESH


def check_mode_change(old: VTPMConfig | None, new: VTPMConfig | None,
                      label: str = "", operation: str = "resize") -> None:
    """Refuse a change that would move the Barbican secret between user and service user.

    Nova refuses it as well: a ``deployment`` secret belongs to the service
    user, the others to the server's owner.

    :raises OperationNotSupportedForVTPM: one side is ``deployment`` and the other not.
    """
    if old is None or new is None:
        return
    if owned_by_service_user(old.secret_security) != owned_by_service_user(
            new.secret_security):
        target = f" {label}" if label else ""
        raise exception.OperationNotSupportedForVTPM(
            f"operation {operation!r} is not supported for vTPM-enabled server{target} "
            f"from secret security {old.secret_security!r} to {new.secret_security!r}: the "
            "Barbican secret would have to change owner between the user and the service "
            "user (Nova refuses it as well)"
        )


def uses_persistent_secret(mode: str) -> bool:
    """``host`` mode keeps a persistent, non-private libvirt secret (SPEC E1)."""
    return mode == request.SECRET_HOST


def left_after_start(*modes: str | None) -> bool:
    """Whether a server's libvirt vTPM secret is a leftover to undefine, when no start or
    move of the server is in progress on the host (SPEC E3). Pure.

    ``user``/``deployment`` secrets live in libvirt only while a guest starts or
    a move hands the passphrase to the destination (defined ephemeral and
    private, undefined right after); only ``host`` mode keeps a persistent one.
    A ``user``/``deployment`` server's secret found outside such a step is
    what a killed operation left behind, however it was defined.

    ``modes``: the secret mode of every flavor the server may have on the host,
    None for one that gives no vTPM. One mode for a server at rest (the audit);
    nova-compute's start-up also passes an unfinished resize's old and new
    flavor's, since a resize that is not confirmed or reverted may have left a
    ``host`` mode secret here. A leftover when some mode is known and none is
    ``host``; nothing known: kept.
    """
    known = [mode for mode in modes if mode is not None]
    return bool(known) and not any(uses_persistent_secret(mode) for mode in known)


def owned_by_service_user(mode: str) -> bool:
    """Whose credentials reach the Barbican secret: the service user's, or the owner's.

    ``deployment`` secrets belong to the service user (``[service_user]`` in
    the configuration): created, read and deleted with its credentials, so a
    request carrying no token may delete one. ``user``/``host`` secrets belong
    to the server's owner and need the owner's token (or a project admin's).
    """
    return mode == request.SECRET_DEPLOYMENT


def may_live_migrate(cfg: VTPMConfig | None) -> bool:
    """Whether a server may be live-migrated (Nova's rule, kept).

    Without a vTPM: yes. With one, only ``host`` secret security: its libvirt
    secret holds the passphrase on the host, so the destination can be given it
    without the owner; the other modes would need the owner at the destination.
    """
    return cfg is None or uses_persistent_secret(cfg.secret_security)


def secret_created_before_start(change: Change) -> bool:
    """Whether a resize's Barbican secret is made before the guest is touched.

    A vTPM gained by a resize (:attr:`Change.ADDED`) gets its secret when the
    resized server is about to start (with the passphrase-first rule), so the
    step that would create it after the guest exists has nothing to do.
    """
    return change is Change.ADDED


# -- Nova moving a server between hosts (cold and live migration, through the shim) --


class SecretSource(enum.Enum):
    """Where a migration gets the passphrase the destination's swtpm needs."""

    NONE = "none"          # no vTPM: nothing to hand over
    HOST = "host"          # host mode: the source host's persistent libvirt secret
    OWNER = "owner"        # user mode: Barbican, with the owner's credentials
    SERVICE = "service"    # deployment mode: Barbican, with the service user's


def migration_secret_source(cfg: VTPMConfig | None) -> SecretSource:
    """Where the passphrase of a moving server comes from (every mode may move).

    ``host`` mode keeps a libvirt secret on the host, so the host (an operator)
    can hand it over without the owner, as Nova does; ``user`` mode needs the
    owner, who alone may read the Barbican secret; ``deployment`` mode reads it
    with the service user's credentials from the configuration.
    """
    if cfg is None:
        return SecretSource.NONE
    if uses_persistent_secret(cfg.secret_security):
        return SecretSource.HOST
    return SecretSource.SERVICE if owned_by_service_user(cfg.secret_security) else (
        SecretSource.OWNER)


#: Said when someone other than a ``user``-mode server's owner is refused: the owner
#: may consent (:mod:`vtpm_driver.model.consent`).
_NO_CONSENT = " and no consent of the owner's to this is in force"


def check_may_migrate(cfg: VTPMConfig | None, instance: Any, context: Any, *,
                      live: bool) -> SecretSource:
    """Refuse a move the caller cannot hand the passphrase over for; where it comes from.

    Checked before anything is touched, so a refused server does not move.
    The key manager's ACL is the real guard (an owner-only secret cannot be
    read by anyone else); this refuses early with a clear message.

    :raises VTPMSecretForbidden: ``user`` mode and the caller is not the owner.
    """
    source = migration_secret_source(cfg)
    if source is SecretSource.OWNER and getattr(context, "user_id", None) != getattr(
            instance, "user_id", None):
        kind = "live-migrate" if live else "migrate"
        caller = getattr(context, "user_name", None) or getattr(context, "user_id", "?")
        raise exception.VTPMSecretForbidden(
            f"cannot {kind} server {server_label(instance)}: its vTPM secret has 'user' "
            "secret security, so only its owner can hand the passphrase to the destination "
            f"host (caller {caller} is not the owner{_NO_CONSENT})")
    return source


# -- who may act on a server; a resize's new flavor ----------------------------------


def check_project(context: Any, instance: Any, verb: str) -> None:
    """Nova's default policy: members of the server's project, or an admin.

    Operations that need the vTPM passphrase are further limited to the owner
    by Barbican's ACL in ``user`` mode; this check keeps other projects from
    even stopping or rebooting a server they do not own.

    :raises NotAuthorized: the caller is neither.
    """
    if context.project_id == instance.project_id or "admin" in context.roles:
        return
    raise exception.NotAuthorized(
        f"cannot {verb} server {instance.name}: it belongs to project {instance.project_id} "
        f"and {context.user_name or context.user_id} is not a member of it (or an admin)"
    )


def is_owner_or_project_admin(context: Any, instance: Any) -> bool:
    """Whether the caller is the server's owner, or an admin OF THE OWNER'S PROJECT. Pure.

    The same people who can read a ``user`` mode secret under its owner-only
    ACL (Barbican lets the project's admins read it too). An admin role in
    another project is not an admin of the owner's project.
    """
    if getattr(context, "user_id", None) == getattr(instance, "user_id", None):
        return True
    roles = getattr(context, "roles", None) or ()
    return "admin" in roles and getattr(context, "project_id", None) == getattr(
        instance, "project_id", None)


def boots_foreign_files(image_meta: Any, kernel: str | None, initrd: str | None,
                        cmdline: str | None) -> bool:
    """Whether a rescue or rebuild asks for boot files other than the server's own. Pure.

    Any given kernel, initrd or command line that differs from ``image_meta``'s
    counts (``init=/bin/sh`` with the server's own kernel is a shell with its
    TPM). None: the server's own (a default rescue adds only its marker).
    """
    own = (getattr(image_meta, "kernel", None), getattr(image_meta, "initrd", None),
           getattr(image_meta, "cmdline", None))
    return any(given is not None and given != mine
               for given, mine in zip((kernel, initrd, cmdline), own, strict=True))


def check_may_replace_tpm_or_boot(context: Any, instance: Any, operation: str) -> None:
    """Destroying a server's TPM (``rebuild --reset-tpm``) or booting foreign boot files
    against it (a rescue or rebuild with another kernel, initrd, command line or
    image) needs its owner, or an admin of the owner's project, in EVERY secret
    mode. Pure.

    Why: in ``host`` and ``deployment`` mode no Barbican ACL stops anyone else
    (the passphrase comes from the host or the service user), so the project
    check (:func:`check_project`: any member, any project's admin) would let a
    member wipe the owner's TPM, or boot their own kernel and use the owner's
    keys. A server without a vTPM has nothing to protect here.

    :raises VTPMSecretForbidden: names the server, the operation, the owner
        and the caller.
    """
    if not has_vtpm(instance) or is_owner_or_project_admin(context, instance):
        return
    caller = getattr(context, "user_name", None) or getattr(context, "user_id", None) or "?"
    caller_id = getattr(context, "user_id", None)
    who = caller if caller == caller_id or caller_id is None else f"{caller} ({caller_id})"
    raise exception.VTPMSecretForbidden(
        f"cannot {operation} server {server_label(instance)}: that destroys its TPM or boots "
        f"other boot files against it, which only its owner {getattr(instance, 'user_id', '?')}"
        f" or an admin of its project {getattr(instance, 'project_id', '?')} may do, in every "
        f"secret security mode (caller {who} of project "
        f"{getattr(context, 'project_id', '?')} is neither)")


def new_flavor(old: Any, set_specs: Mapping[str, str], unset: Sequence[str],
               vcpus: int | None, memory_mb: int | None) -> Flavor:
    """The flavor a resize moves to: ``old`` with the requested changes.

    :raises InvalidVTPMConfig: ``unset`` names an extra spec the flavor lacks.
    """
    extra_specs = dict(flavor_extra_specs(old))
    unknown = [key for key in unset if key not in extra_specs and key not in set_specs]
    if unknown:
        raise exception.InvalidVTPMConfig(
            f"--unset-flavor-property {', '.join(map(repr, unknown))}: the server's flavor "
            f"has no such extra spec (it has: {', '.join(sorted(extra_specs)) or 'none'})"
        )
    for key in unset:
        extra_specs.pop(key, None)
    extra_specs.update(set_specs)
    return Flavor(
        name=str(getattr(old, "name", "standalone")),
        vcpus=vcpus if vcpus is not None else int(getattr(old, "vcpus", 1)),
        memory_mb=memory_mb if memory_mb is not None else int(getattr(old, "memory_mb", 256)),
        extra_specs=extra_specs,
    )


# -- a TPM that outlives its host: off-host copies (Nova's shelve, evacuation), rescue -----

#: The rescue boot's default marker on the kernel command line.
RESCUE_CMDLINE = "vtpm_rescue=1"
#: Events after which ``[vtpm] state_backup`` takes a copy.
BACKUP_EVENTS = {"off": frozenset(), "on-stop": frozenset({"stop", "suspend"}),
                 "periodic": frozenset({"stop", "suspend", "periodic"})}


def check_may_offload(cfg: VTPMConfig | None, instance: Any, context: Any,
                      operation: str) -> None:
    """Shelve, unshelve and evacuate need whoever can later unlock the TPM state.

    ``user`` mode: only the owner can read the passphrase, so anyone else is
    refused before anything is touched (a shelved server someone else cannot
    unshelve would be stuck). Other modes: the project check is enough.

    :raises VTPMSecretForbidden: ``user`` mode and the caller is not the owner.
    """
    if cfg is None or cfg.secret_security != request.SECRET_USER:
        return
    if getattr(context, "user_id", None) == getattr(instance, "user_id", None):
        return
    caller = getattr(context, "user_name", None) or getattr(context, "user_id", "?")
    raise exception.VTPMSecretForbidden(
        f"cannot {operation} server {server_label(instance)}: its vTPM secret has 'user' "
        f"secret security, so only its owner can unlock its TPM state (caller {caller} is "
        "not the owner)")


def wants_backup(mode: str, event: str) -> bool:
    """Whether ``[vtpm] state_backup = mode`` copies the state after ``event``."""
    return event in BACKUP_EVENTS.get(mode, frozenset())


def backup_due(taken_at: float | None, now: float, interval: float) -> bool:
    """A periodic copy is due: none yet, or older than ``interval`` seconds."""
    return taken_at is None or now - taken_at >= interval


def copy_is_current(meta: Any) -> bool:
    """A copy is the TPM's latest state: taken from a stopped server that has not run since."""
    return not getattr(meta, "server_running", False) and getattr(
        meta, "started_after", None) is None


def describe_age(seconds: float) -> str:
    """``'42 s'``, ``'3 min 5 s'``, ``'2 h 1 min'``, ``'3 d 4 h'``."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def describe_copy(meta: Any, now: float) -> str:
    """How old a copy is and whether it is current, for output and logs."""
    age = describe_age(now - meta.taken_at)
    when = f"taken {age} ago on host {meta.source_host} ({meta.reason})"
    if copy_is_current(meta):
        return f"{when}; current: the server has not run since"
    why = ("it was taken while the server ran" if getattr(meta, "server_running", False)
           else f"the server started {describe_age(now - meta.started_after)} ago, after it")
    return f"{when}; STALE: {why}"


def check_restore(meta: Any, *, allow_stale: bool, now: float, label: str) -> str:
    """Refuse restoring a stale copy unless the operator allows it; describes the copy.

    :raises OperationNotSupportedForVTPM: the copy may be older than the TPM
        the server last ran with and ``[vtpm] allow_stale_tpm_state`` is False.
    """
    described = describe_copy(meta, now)
    if not copy_is_current(meta) and not allow_stale:
        raise exception.OperationNotSupportedForVTPM(
            f"cannot evacuate server {label}: its only off-host TPM state copy was {described}"
            "; restoring it would roll the TPM back (NV counters, lockout, keys made since). "
            "Set [vtpm] allow_stale_tpm_state = True to accept that")
    return described


def check_copy_matches(meta: Any, instance: Any, cfg: VTPMConfig | None) -> None:
    """Refuse restoring ``meta``'s copy for ``instance`` unless the copy is that server's.

    The store's ``meta.json`` is a file anyone with write access to the store
    could plant or swap; the server's own record (Nova's instance, which every
    driver call receives) is the authority. Compared: the instance UUID, the
    owner's project and user (the user only when the copy records one: copies
    taken before it was recorded), and, for a server with a vTPM, its TPM
    version and secret security mode (which passphrase encrypts the state).
    Nothing of the copy's record (boot files, console log) is used: the
    caller boots from the server's own. Pure.

    :raises CopyMismatch: names the server, the field, the copy's and the
        server's values.
    """
    expected: list[tuple[str, Any, Any]] = [
        ("uuid", canonical_uuid(getattr(meta, "uuid", None)),
         canonical_uuid(instance.uuid)),
        ("project_id", getattr(meta, "project_id", None), getattr(instance, "project_id", None)),
    ]
    if getattr(meta, "user_id", None) is not None:
        expected.append(("user_id", meta.user_id, getattr(instance, "user_id", None)))
    if cfg is not None:
        expected += [("tpm_version", getattr(meta, "tpm_version", None), cfg.version),
                     ("secret_security", getattr(meta, "secret_security", None),
                      cfg.secret_security)]
    for field, stored, own in expected:
        if stored != own:
            raise exception.CopyMismatch(
                f"refusing to restore the off-host TPM state copy for server "
                f"{server_label(instance)}: the copy's {field!r} is {stored!r}, the server's "
                f"is {own!r} (the copy is not this server's; check [vtpm] state_backup_dir)",
                field)


def check_copy_exists(meta: Any, label: str, host: str | None, mode: str) -> Any:
    """The copy an evacuation needs.

    :raises OperationNotSupportedForVTPM: none, naming ``[vtpm] state_backup``.
    """
    if meta is None:
        raise exception.OperationNotSupportedForVTPM(
            f"cannot evacuate server {label} from host {host or '?'}: no off-host copy of its "
            f"TPM state exists ([vtpm] state_backup = {mode}); its TPM lives only on that host. "
            "Set [vtpm] state_backup = on-stop or periodic to keep copies")
    return meta


def rescue_boot(image_meta: Any, kernel: str | None, initrd: str | None,
                cmdline: str | None) -> tuple[str | None, str | None, str | None]:
    """The rescue boot: given files, else the server's own with :data:`RESCUE_CMDLINE` added."""
    if kernel is None and initrd is None and cmdline is None:
        base = getattr(image_meta, "cmdline", None) or "console=ttyS0"
        return (getattr(image_meta, "kernel", None), getattr(image_meta, "initrd", None),
                f"{base} {RESCUE_CMDLINE}")
    return (kernel or getattr(image_meta, "kernel", None),
            initrd if initrd is not None else getattr(image_meta, "initrd", None),
            cmdline if cmdline is not None else RESCUE_CMDLINE)


