"""Move a vTPM server to another host, cold or live, in every secret mode (once).

How the TPM moves: through libvirt's own migration stream
(:mod:`vtpm_driver.virt.migrate`). QEMU carries swtpm's state to the
destination, whose swtpm re-encrypts it with the same passphrase, under its own
owner and modes. No file is copied by us and nothing but the two libvirt
connections is needed, as between two real machines (a path-based copy of
``swtpm/<uuid>/`` would need both hosts' directories mounted on one machine,
or ssh between compute hosts, which Nova's remotefs does and we avoid). A cold
migration starts the stopped guest PAUSED on the source (no guest code runs),
moves the paused guest, and resumes it on the destination: a cold boot there
with the same TPM. The source keeps its definition and TPM state until the
move is confirmed, so a revert starts it again with the old state.

The passphrase (the one rule, :func:`vtpm_driver.policy.check_may_migrate`):

* ``host``: read from the source host's persistent libvirt secret (no owner
  needed, as in Nova), defined persistent on the destination BEFORE the move,
  removed from the source AFTER it;
* ``user``: read once from Barbican with the owner's credentials (anyone else:
  ``VTPMSecretForbidden``, nothing moved), handed to the destination as an
  ephemeral private secret, undefined as soon as the incoming guest runs;
* ``deployment``: the same with the service user's credentials.

It is read BEFORE anything is touched. A failed move (destination down, wrong
or missing secret, cancelled) rolls back: the guest runs on the source with its
TPM, and the destination keeps nothing (domain, TPM state, secret).

Layers: the secret steps (:func:`fetch_secret`, :func:`give_destination`,
:func:`incoming_running`, :func:`forget_destination`) use only a
:class:`~vtpm_driver.ops.secrets.SecretStore` and a
:class:`~vtpm_driver.keymgr.KeyManagerAPI`, so Nova's shim can run them around
Nova's own libvirt migration; :class:`HostSide` is one host's domain steps;
:class:`LiveMigration` and :class:`ColdMigration` put both sides together for
the standalone driver.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from oslo_log import log as logging

from vtpm_driver import exception, policy
from vtpm_driver.keymgr import KeyManagerAPI
from vtpm_driver.ops import secrets as ops_secrets
from vtpm_driver.ops.guests import Guests
from vtpm_driver.ops.secrets import SecretStore, StartSecret
from vtpm_driver.policy import SecretSource
from vtpm_driver.spec import VTPMConfig
from vtpm_driver.virt import guest
from vtpm_driver.virt import migrate as virt_migrate

LOG = logging.getLogger(__name__)

#: Reads a host-mode passphrase from the source host's libvirt (None: not there).
HostSecret = Callable[[str], "str | None"]


# --------------------------------------------------------------------------- secret steps


def fetch_secret(context: Any, instance: Any, cfg: VTPMConfig | None, keymgr: KeyManagerAPI,
                 host_secret: HostSecret | None = None, *, live: bool = True
                 ) -> StartSecret | None:
    """The passphrase the destination will need, read once, before anything moves.

    :returns: None without a vTPM.
    :raises VTPMSecretForbidden: ``user`` mode and the caller is not the owner,
        or Barbican refused the caller.
    :raises VTPMSecretNotFound: no secret recorded, or Barbican lost it.
    :raises KeyManagerUnavailable: Barbican is down.
    """
    source = policy.check_may_migrate(cfg, instance, context, live=live)
    if cfg is None or source is SecretSource.NONE:
        return None
    secret_uuid = policy.require_recorded_secret(instance)
    persistent = policy.uses_persistent_secret(cfg.secret_security)
    passphrase = None
    if source is SecretSource.HOST and host_secret is not None:
        passphrase = host_secret(secret_uuid)
    if passphrase is None:
        passphrase = keymgr.get_vtpm_secret(context, instance, cfg.secret_security)
    return StartSecret(secret_uuid, passphrase, persistent)


def give_destination(secrets: SecretStore, instance: Any, start: StartSecret | None) -> None:
    """Define the secret on the destination before the guest arrives (replaces a leftover)."""
    if start is not None:
        ops_secrets.define_for_start(secrets, instance, start)


def incoming_running(secrets: SecretStore, instance: Any, start: StartSecret | None) -> None:
    """The incoming swtpm has the key: undefine an ephemeral secret (E3); idempotent."""
    ops_secrets.after_start(secrets, instance, start)


def forget_destination(secrets: SecretStore, instance: Any) -> None:
    """Rollback: no vTPM secret of the server stays on the destination; idempotent."""
    ops_secrets.remove_libvirt_secrets(secrets, instance)


# --------------------------------------------------------------------------- one host


class HostSide:
    """One host's part in a move: its :class:`Guests`, name and URI."""

    def __init__(self, name: str, uri: str, guests: Guests,
                 host_secret: HostSecret | None = None) -> None:
        self.name = name
        self.uri = uri
        self.guests = guests
        self.host_secret = host_secret

    def __repr__(self) -> str:
        return f"HostSide({self.name!r}, {self.uri!r})"

    @property
    def secrets(self) -> SecretStore:
        return self.guests.secrets

    def check_destination(self, instance: Any, cfg: VTPMConfig | None) -> None:
        """Can the server come here? (Nova: check_can_live_migrate_destination)

        :raises InvalidConfiguration: this host lacks the vTPM's traits.
        :raises InstanceExists: a domain of that UUID or name is here already.
        """
        if cfg is not None:
            self.guests.check_host_offers(cfg, instance)
        self.guests.check_no_domain(
            instance, f"cannot move server {policy.server_label(instance)} to host {self.name!r}")

    def fetch_secret(self, context: Any, instance: Any, cfg: VTPMConfig | None, *,
                     live: bool) -> StartSecret | None:
        """:func:`fetch_secret` with this (source) host's libvirt secret for ``host`` mode."""
        return fetch_secret(context, instance, cfg, self.guests.keymgr, self.host_secret,
                            live=live)

    def rollback_incoming(self, instance: Any, xml: str | None) -> list[str]:
        """Remove whatever a failed incoming move left here; returns what could not be."""
        problems = []
        try:
            forget_destination(self.secrets, instance)
        except exception.VTPMError as exc:
            problems.append(f"libvirt secret on {self.name}: {exc}")
        try:
            dom = self.guests.find(instance)
            if dom is not None:
                guest.destroy(dom)
                guest.undefine(dom, keep_tpm=False)
            elif xml is not None and policy.has_vtpm(instance):
                virt_migrate.remove_tpm_state(self.guests.conn, xml)
        except exception.VTPMError as exc:
            problems.append(f"domain or TPM state on {self.name}: {exc}")
        return problems


@dataclasses.dataclass(repr=False)
class _Move:
    """One move in progress (the passphrase stays inside, never shown)."""

    instance: Any
    cfg: VTPMConfig | None
    secret: StartSecret | None
    xml: str

    def __repr__(self) -> str:
        return f"_Move({getattr(self.instance, 'uuid', '?')}, secret={self.secret!r})"


def _prepare(context: Any, instance: Any, source: HostSide, dest: HostSide, *,
             live: bool) -> tuple[Any, _Move]:
    """Every check and the passphrase read, before anything is touched."""
    cfg = policy.vtpm_of(instance)
    dom = source.guests.lookup(instance)
    if guest.has_managed_save(dom):
        raise exception.VTPMError(
            f"cannot move server {policy.server_label(instance)} while it is suspended: "
            "resume it first")
    dest.check_destination(instance, cfg)
    secret = source.fetch_secret(context, instance, cfg, live=live)
    return dom, _Move(instance, cfg, secret, virt_migrate.domain_xml(dom))


def _wrap(exc: Exception, what: str, problems: list[str]) -> exception.VTPMError:
    outcome = ("the server stays on the source; cleanup incomplete, remove by hand: "
               + "; ".join(problems)) if problems else "the server stays on the source"
    if isinstance(exc, exception.VTPMError):
        return type(exc)(f"{what}: {exc} ({outcome})")
    return exception.VTPMError(f"{what}: unexpected {type(exc).__name__}: {exc} ({outcome})")


# --------------------------------------------------------------------------- live


class LiveMigration:
    """Move a running server, same boot, same TPM (SPEC: issue 14 item 4)."""

    def __init__(self, source: HostSide, dest: HostSide) -> None:
        self.source = source
        self.dest = dest

    def run(self, context: Any, instance: Any, *, bandwidth_mib: int | None = None) -> None:
        """Live-migrate ``instance`` from source to destination.

        :raises VTPMSecretForbidden: the caller cannot hand the passphrase over
            (nothing touched).
        :raises VTPMError: the move failed; the guest runs on the source with
            its TPM and nothing is left on the destination (or the message
            says what could not be removed).
        """
        label = policy.server_label(instance)
        dom, move = _prepare(context, instance, self.source, self.dest, live=True)
        if not guest.is_active(dom):
            raise exception.VTPMError(
                f"cannot live-migrate server {label}: it is not running (use a cold migration)")
        try:
            give_destination(self.dest.secrets, instance, move.secret)
            virt_migrate.migrate(dom, self.dest.uri, live=True, bandwidth_mib=bandwidth_mib)
        except Exception as exc:
            problems = self.dest.rollback_incoming(instance, move.xml)
            problems += _keep_running(dom, label)
            raise _wrap(exc, f"cannot live-migrate server {label} to host {self.dest.name!r}",
                        problems) from exc
        # Nova: post_live_migration_at_destination, then post_live_migration.
        incoming_running(self.dest.secrets, instance, move.secret)
        self._cleanup_source(instance)
        LOG.info("Live-migrated server %s from %s to %s", instance.name, self.source.name,
                 self.dest.name, instance_uuid=instance.uuid)

    def abort(self, instance: Any) -> bool:
        """Cancel a running live migration of ``instance`` (from another thread/process)."""
        return virt_migrate.abort(self.source.guests.lookup(instance))

    def _cleanup_source(self, instance: Any) -> None:
        """Nothing of the server stays on the source (UNDEFINE_SOURCE did the domain)."""
        ops_secrets.remove_libvirt_secrets(self.source.secrets, instance)
        dom = self.source.guests.find(instance)
        if dom is not None:  # e.g. a transient leftover
            guest.destroy(dom)
            guest.undefine(dom, keep_tpm=False)


def _keep_running(dom: Any, label: str) -> list[str]:
    """After a failed move the source guest must run (libvirt resumes it; make sure)."""
    try:
        virt_migrate.resume(dom)
    except exception.VTPMError as exc:
        return [f"resume {label} on the source: {exc}"]
    return []


# --------------------------------------------------------------------------- cold


class ColdMigration:
    """Stop, move, start there; then confirm (drop the source) or revert (back)."""

    def __init__(self, source: HostSide, dest: HostSide) -> None:
        self.source = source
        self.dest = dest

    def migrate(self, context: Any, instance: Any, *, timeout: float = 0,
                power_on: bool | None = None) -> None:
        """Move the stopped (or running: stopped first) server; await confirm or revert.

        ``power_on`` None: start it on the destination if it ran on the source.
        ``timeout`` > 0: ACPI shutdown for that long before pulling the plug.

        :raises VTPMSecretForbidden: nothing touched.
        :raises VTPMError: the move failed; the server is on the source as it was.
        """
        label = policy.server_label(instance)
        dom, move = _prepare(context, instance, self.source, self.dest, live=False)
        was_running = guest.is_active(dom)
        power_on = was_running if power_on is None else power_on
        guest.power_off(dom, graceful=timeout > 0, timeout=float(timeout))
        try:
            with ops_secrets.secret_for_start(self.source.secrets, instance,
                                              self._source_start(instance, move)):
                virt_migrate.start_paused(dom)
            give_destination(self.dest.secrets, instance, move.secret)
            virt_migrate.migrate(dom, self.dest.uri, live=False)
            incoming_running(self.dest.secrets, instance, move.secret)
        except Exception as exc:
            problems = self.dest.rollback_incoming(instance, move.xml)
            problems += self._back_on_source(context, instance, dom, move, was_running)
            raise _wrap(exc, f"cannot migrate server {label} to host {self.dest.name!r}",
                        problems) from exc
        moved = self.dest.guests.lookup(instance)
        instance.system_metadata[policy.MIGRATED_FROM_KEY] = self.source.name
        self.dest.guests.update_record(moved, instance)
        if power_on:
            virt_migrate.resume(moved)
        else:
            guest.destroy(moved)
        source_copy = dict(instance.system_metadata)
        source_copy.pop(policy.MIGRATED_FROM_KEY, None)
        source_copy[policy.MIGRATING_TO_KEY] = self.dest.name
        self._set_sysmeta(self.source.guests, dom, instance, source_copy)
        LOG.info("Migrated server %s from %s to %s; awaiting confirm or revert",
                 instance.name, self.source.name, self.dest.name, instance_uuid=instance.uuid)

    def _back_on_source(self, context: Any, instance: Any, dom: Any, move: _Move,
                        was_running: bool) -> list[str]:
        """After a failed move: the paused source guest goes; restart it if it ran."""
        problems = []
        try:
            guest.destroy(dom)
            if was_running:
                with ops_secrets.secret_for_start(self.source.secrets, instance,
                                                  self._source_start(instance, move)):
                    guest.start(dom)
        except exception.VTPMError as exc:
            problems.append(f"restart on the source: {exc}")
        return problems

    def _source_start(self, instance: Any, move: _Move) -> StartSecret | None:
        """The source's own start: a host-mode secret it holds is used as it is."""
        secret = move.secret
        if secret is not None and secret.persistent and (
                self.source.secrets.find(instance.uuid) == secret.secret_uuid):
            return StartSecret(secret.secret_uuid, None, persistent=True)
        return secret

    @staticmethod
    def _set_sysmeta(guests: Guests, dom: Any, instance: Any, sysmeta: dict[str, str]) -> None:
        saved = instance.system_metadata
        instance.system_metadata = sysmeta
        try:
            guests.update_record(dom, instance)
        finally:
            instance.system_metadata = saved

    def confirm(self, context: Any, instance: Any) -> None:
        """Keep the server on the destination: the source's copy, state and secret go.

        Idempotent: a second confirm finds nothing on the source.
        """
        dom = self.source.guests.find(instance)
        if dom is not None:
            guest.destroy(dom)
            guest.undefine(dom, keep_tpm=False)
        ops_secrets.remove_libvirt_secrets(self.source.secrets, instance)
        instance.system_metadata.pop(policy.MIGRATED_FROM_KEY, None)
        self.dest.guests.update_record(self.dest.guests.lookup(instance), instance)
        LOG.info("Migration to %s confirmed", self.dest.name, instance_uuid=instance.uuid)

    def revert(self, context: Any, instance: Any) -> None:
        """Back to the source with its old TPM state; the destination keeps nothing.

        The passphrase is fetched first (the owner's credentials in ``user``
        mode): a refused revert changes nothing.
        """
        cfg = policy.vtpm_of(instance)
        moved = self.dest.guests.lookup(instance)
        power_on = guest.is_active(moved)
        source_dom = self.source.guests.lookup(instance)
        start = self.source.guests.prepare_start(context, instance, cfg) if power_on else None
        guest.destroy(moved)
        guest.undefine(moved, keep_tpm=False)
        forget_destination(self.dest.secrets, instance)
        instance.system_metadata.pop(policy.MIGRATED_FROM_KEY, None)
        instance.system_metadata.pop(policy.MIGRATING_TO_KEY, None)
        self.source.guests.update_record(source_dom, instance)
        if power_on:
            self.source.guests.launch(source_dom, instance, start)
        LOG.info("Migration to %s reverted", self.dest.name, instance_uuid=instance.uuid)
