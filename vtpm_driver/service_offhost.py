"""The service's off-host and rebuild actions (issue 15), mixed into :class:`ServerService`.

What Nova's API and compute manager add around :mod:`vtpm_driver.ops.shelve`
and :mod:`vtpm_driver.ops.rebuild`: find the server (on a host, or shelved in
the state store), check the caller's project, hold the server's lock, pick
the hosts, keep ``[vtpm] state_backup`` copies fresh after stops and starts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

from oslo_log import log as logging

from vtpm_driver import exception, policy, statestore, view
from vtpm_driver.ops import locks
from vtpm_driver.ops import secrets as ops_secrets
from vtpm_driver.ops.rebuild import RebuildOps
from vtpm_driver.ops.shelve import OffHostOps, Site
from vtpm_driver.virt import guest

LOG = logging.getLogger(__name__)


class OffHostActions:
    """Shelve, unshelve, evacuate, reclaim, rescue, unrescue, rebuild, state backups."""

    conf: Any
    _hosts: Any
    _host: str | None

    # -- plumbing ------------------------------------------------------------------

    @property
    def store(self) -> statestore.DirectoryStateStore:
        return statestore.DirectoryStateStore(self.conf.vtpm.state_backup_dir)

    @property
    def offhost(self) -> OffHostOps:
        return OffHostOps(self.store)

    def site(self, name: str | None = None) -> Site:
        """Host ``name`` (default: the one this command acts on), connected, with its
        swtpm directory as its backend says (:attr:`vtpm_driver.hosts.ServerBackend.state_base`).

        :raises InvalidConfiguration: several hosts and ``[vtpm] host_state_dirs``
            does not name this one (nothing touched).
        """
        name = name or self._host
        backend = self._connect(self._hosts.backend(name)) if self._hosts else self.backend
        return Site(name, backend.driver.guests, backend.state_base)

    @contextlib.contextmanager
    def _locked(self, instance: Any, operation: str) -> Iterator[None]:
        with locks.server_lock(self.conf, instance.uuid, operation):
            yield

    def _backup_mode(self) -> str:
        return str(self.conf.vtpm.state_backup)

    def shelved(self, name_or_uuid: str) -> tuple[statestore.CopyMeta, Any] | None:
        """A shelved server's copy and record, by name or UUID; None if none is shelved."""
        for meta in self.store.list():
            if meta.shelved and name_or_uuid in (meta.uuid, meta.name):
                return meta, self.offhost.stored_instance(meta.uuid)
        return None

    def shelved_rows(self, listed: Sequence[str]) -> list[dict[str, Any]]:
        """``server list`` rows of shelved servers (no host) not found on a host."""
        rows = []
        for meta in self.store.list():
            if meta.shelved and meta.uuid not in listed:
                instance = self.offhost.stored_instance(meta.uuid)
                rows.append(view.summary_fields(instance, policy.SHELVED_OFFLOADED, None))
        return rows

    def show_shelved(self, name_or_uuid: str) -> dict[str, Any] | None:
        found = self.shelved(name_or_uuid)
        if found is None:
            return None
        fields = view.server_fields(found[1], policy.SHELVED_OFFLOADED)
        fields["host"] = None
        return fields

    # -- state backups ([vtpm] state_backup) -------------------------------------------

    def after_event(self, instance: Any, event: str) -> None:
        """A copy after a clean stop or suspend when ``[vtpm] state_backup`` wants one.

        Never fails the operation that just succeeded: a failed copy (or a server
        another operation holds past ``[vtpm] lock_timeout``) is logged.
        """
        if not policy.wants_backup(self._backup_mode(), event) or not policy.has_vtpm(instance):
            return
        try:
            with self._locked(instance, f"state backup after {event}"):
                self.offhost.backup(self.site(), instance, event)
        except exception.VTPMError as exc:
            LOG.error("Could not copy the TPM state off the host after %s: %s", event, exc,
                      instance_uuid=instance.uuid)

    def after_start(self, instance: Any) -> None:
        """The server runs: its copy is no longer current (see :mod:`vtpm_driver.statestore`)."""
        try:
            self.offhost.mark_started(instance.uuid)
        except exception.VTPMError as exc:
            LOG.error("Could not mark the off-host copy as overtaken: %s", exc,
                      instance_uuid=instance.uuid)

    def backup_states(self, names: Sequence[str] = (), *, force: bool = False
                      ) -> list[dict[str, Any]]:
        """``vtpm-driver state backup``: refresh copies (run from cron for ``periodic``).

        Named servers are copied now; otherwise every vTPM server on every
        reachable host whose copy is older than ``[vtpm] state_backup_interval``.
        Such a run (from cron) never stops at one server: a server deleted
        meanwhile is skipped, and one whose copy fails (held past ``[vtpm]
        lock_timeout``, its state unreadable) is logged and returned with
        ``error`` set, the others still copied.

        :raises InvalidConfiguration: no server named and ``state_backup`` is not periodic.
        :raises VTPMError: a named server could not be copied.
        """
        mode = self._backup_mode()
        if not names and mode != "periodic" and not force:
            raise exception.InvalidConfiguration(
                f"[vtpm] state_backup is {mode!r}: set it to 'periodic' for a periodic run, "
                "or name the servers to copy now")
        now, interval = time.time(), float(self.conf.vtpm.state_backup_interval)
        rows = []
        hosts = self._hosts.names if self._hosts else [self._host]
        for host in hosts:
            try:
                instances = self._connect(self._hosts.backend(host)).list() if self._hosts \
                    else self.backend.list()
            except exception.HypervisorUnavailable as exc:
                LOG.warning("Host %s is unreachable, its servers are not copied: %s", host, exc)
                continue
            for instance in instances:
                if names and instance.name not in names and instance.uuid not in names:
                    continue
                if not policy.has_vtpm(instance) or policy.migrating_to(instance):
                    continue
                old = self.store.get(instance.uuid)
                if not names and not force and not policy.backup_due(
                        old.taken_at if old else None, now, interval):
                    continue
                row = {"name": instance.name, "uuid": instance.uuid, "host": host,
                       "running": None, "size": None, "error": None}
                try:
                    with self._locked(instance, "state backup"):
                        meta = self.offhost.backup(self.site(host), instance,
                                                   "manual" if names else "periodic")
                except exception.InstanceNotFound:
                    if names:
                        raise
                    continue  # deleted since it was listed
                except exception.VTPMError as exc:
                    if names:
                        raise
                    LOG.error("Could not copy the TPM state of server %s off host %s: %s",
                              instance.name, host, exc, instance_uuid=instance.uuid)
                    rows.append({**row, "error": str(exc)})
                    continue
                rows.append({**row, "running": meta.server_running, "size": meta.size})
        return rows

    # -- shelve / unshelve ----------------------------------------------------------

    def shelve(self, name_or_uuid: str, timeout: int = 0) -> dict[str, Any]:
        """Stop the server, keep its TPM state and record off-host, free its host.

        :raises VTPMSecretForbidden: ``user`` mode and not the owner: nothing changed.
        :raises VTPMError: a resize or move awaits confirm or revert, or this is the
            stale source copy of a move (asked under the lock): nothing changed.
        :raises InstanceNotFound: the server left this host while this command waited.
        """
        context, instance = self._target(name_or_uuid, "shelve")
        with self._held(context, instance, "shelve"):
            with self._progress(f"Shelving server {instance.name} (TPM state off-host)"):
                meta = self.offhost.shelve(context, self.site(), instance, timeout=timeout)
        return {"name": instance.name, "uuid": instance.uuid,
                "status": policy.SHELVED_OFFLOADED, "host": None, "state_bytes": meta.size,
                "tpm_state_encrypted": meta.encrypted}

    def unshelve(self, name_or_uuid: str, host: str | None = None) -> dict[str, Any]:
        """Restore a shelved server on ``host`` (default: this command's host), same TPM.

        :raises InstanceNotFound: no shelved server of that name.
        :raises VTPMSecretForbidden: ``user`` mode and not the owner: nothing changed.
        """
        context = self._context()
        found = self.shelved(name_or_uuid)
        if found is None:
            raise exception.InstanceNotFound(f"no shelved server {name_or_uuid!r}")
        meta, instance = found
        policy.check_project(context, instance, "unshelve")
        dest = self._hosts.check(host) if (host and self._hosts) else self._host
        with self._locked(instance, "unshelve"), self._progress(
                f"Unshelving server {instance.name} on {dest}"):
            instance = self.offhost.unshelve(context, self.site(dest), meta.uuid,
                                             keep_copy=self._backup_mode() != "off")
        self._use(dest)
        return self.describe(instance)

    def delete_shelved(self, name_or_uuid: str) -> bool:
        """Delete a shelved server: Barbican secret first, then its off-host copy.

        :returns: False when no shelved server has that name.
        """
        found = self.shelved(name_or_uuid)
        if found is None:
            return False
        meta, instance = found
        context = self._context()
        policy.check_project(context, instance, "delete")
        with self._locked(instance, "delete"), self._progress(
                f"Deleting shelved server {instance.name}"):
            ops_secrets.delete_barbican_secret(context, instance, instance.flavor,
                                               self.backend.driver.key_manager)
            self.store.delete(meta.uuid)
        return True

    # -- evacuate ----------------------------------------------------------------------

    def evacuate(self, name_or_uuid: str, dest: str) -> dict[str, Any]:
        """Rebuild a server of an unreachable host on ``dest`` from its off-host copy.

        :raises VTPMError: its host answers (migrate instead), or ``dest`` is that host.
        :raises OperationNotSupportedForVTPM: no copy (names ``[vtpm] state_backup``),
            or only a stale one and ``[vtpm] allow_stale_tpm_state`` is False.
        """
        context = self._context()
        if self._hosts is None or not self._hosts.several:
            raise exception.InvalidConfiguration(
                "cannot evacuate: only one host is configured (set [vtpm] hosts)")
        self._hosts.check(dest)
        try:
            instance = self.locate(name_or_uuid)
        except exception.InstanceNotFound:
            instance = None
        if instance is not None:
            raise exception.VTPMError(
                f"cannot evacuate server {instance.name!r}: its host {self._host} answers; "
                "use 'server migrate' (or stop that host first)")
        meta = next((m for m in self.store.list() if not m.shelved
                     and name_or_uuid in (m.uuid, m.name)), None)
        policy.check_copy_exists(meta, repr(name_or_uuid), "its host", self._backup_mode())
        source = meta.source_host
        if source == dest:
            raise exception.VTPMError(f"cannot evacuate server {meta.name!r} to its own host")
        if source in self._hosts.names:
            try:
                self._connect(self._hosts.backend(source))
            except exception.HypervisorUnavailable:
                pass
            else:
                raise exception.VTPMError(
                    f"cannot evacuate server {meta.name!r}: its host {source} answers")
        instance = self.offhost.stored_instance(meta.uuid)
        policy.check_project(context, instance, "evacuate")
        with self._locked(instance, "evacuate"), self._progress(
                f"Evacuating server {meta.name} from {source} to {dest}"):
            instance, described = self.offhost.evacuate(
                context, self.site(dest), meta.uuid,
                allow_stale=bool(self.conf.vtpm.allow_stale_tpm_state),
                mode=self._backup_mode(), label=policy.server_label(instance))
        self._use(dest)
        fields = self.describe(instance)
        fields["restored_tpm_state"] = described
        return fields

    def reclaim(self, host: str) -> list[str]:
        """On a host back from a failure: remove the servers evacuated away from it.

        A domain there whose UUID runs on another host with ``vtpm_evacuated_from``
        naming this host is destroyed and undefined with its TPM state and
        libvirt secrets (Nova does the same when a compute service restarts).
        Barbican is untouched. Returns the names removed. Idempotent.
        """
        self._hosts.check(host)
        elsewhere = {}
        for other in self._hosts.names:
            if other == host:
                continue
            try:
                for inst in self._connect(self._hosts.backend(other)).list():
                    if inst.system_metadata.get(policy.EVACUATED_FROM_KEY) == host:
                        elsewhere[inst.uuid] = (other, inst)
            except exception.HypervisorUnavailable as exc:
                LOG.warning("Host %s is unreachable: %s", other, exc)
        removed = []
        site = self.site(host)
        for inst in self._connect(self._hosts.backend(host)).list():
            if inst.uuid not in elsewhere:
                continue
            with self._locked(inst, "reclaim"):
                dom = site.guests.find(inst)
                if dom is not None:
                    guest.destroy(dom)
                    guest.undefine(dom, keep_tpm=False)
                ops_secrets.remove_libvirt_secrets(site.guests.secrets, inst)
                other, moved = elsewhere[inst.uuid]
                moved.system_metadata.pop(policy.EVACUATED_FROM_KEY, None)
                guests = self._hosts.backend(other).driver.guests
                guests.update_record(guests.lookup(moved), moved)
            removed.append(inst.name)
        return removed

    # -- rescue / rebuild -------------------------------------------------------------
    # Each holds the server's lock through :meth:`ServerService._held` (the record
    # re-read there: a resize confirmed while the command waited changed the flavor,
    # the image and the secret) and makes every check under it
    # (:meth:`ServerService._check_nothing_pending`, made by ``_held``), as shelve and
# the moves do.

    def _rebuild_ops(self) -> RebuildOps:
        site = self.site()
        return RebuildOps(site.guests, site.state_base)

    def rescue(self, name_or_uuid: str, *, kernel: str | None = None,
               initrd: str | None = None, cmdline: str | None = None) -> None:
        """Boot the rescue image with the server's own vTPM.

        :raises VTPMError: already rescued, suspended, a resize or move awaits
            confirm or revert, or this is the stale source copy of a move.
        """
        context, instance = self._target(name_or_uuid, "rescue")
        with self._held(context, instance, "rescue"):
            with self._progress(f"Rescuing server {instance.name} (same vTPM)"):
                self._rebuild_ops().rescue(context, instance, kernel=kernel, initrd=initrd,
                                           cmdline=cmdline)
        self.after_start(instance)

    def unrescue(self, name_or_uuid: str) -> None:
        """Back to the normal boot, TPM state kept.

        :raises VTPMError: not rescued, a resize or move awaits confirm or revert,
            or this is the stale source copy of a move.
        """
        context, instance = self._target(name_or_uuid, "unrescue")
        with self._held(context, instance, "unrescue"):
            with self._progress(f"Unrescuing server {instance.name}"):
                self._rebuild_ops().unrescue(context, instance)
        self.after_start(instance)

    def rebuild(self, name_or_uuid: str, *, kernel: str | None = None,
                initrd: str | None = None, cmdline: str | None = None,
                reset_tpm: bool = False) -> dict[str, Any]:
        """Boot a new image, TPM kept (``reset_tpm``: a fresh TPM, new EK); describes it.

        :raises VTPMError: rescued, suspended, a resize or move awaits confirm or
            revert, or this is the stale source copy of a move.
        """
        context, instance = self._target(name_or_uuid, "rebuild")
        with self._held(context, instance, "rebuild"):
            with self._progress(f"Rebuilding server {instance.name}"):
                reset = self._rebuild_ops().rebuild(context, instance, kernel=kernel,
                                                    initrd=initrd, cmdline=cmdline,
                                                    reset_tpm=reset_tpm)
        self.after_start(instance)
        fields = self.describe(instance)
        fields["tpm"] = ("reset: a new TPM (new endorsement key)" if reset
                         else "kept" if policy.has_vtpm(instance) else None)
        return fields
