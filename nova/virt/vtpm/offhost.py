"""A TPM that outlives its host, through Nova: shelve, unshelve, evacuate, rebuild (issue 15).

Nova's API refuses shelve, rebuild, rescue and evacuate of vTPM servers
(``reject_vtpm_instances``) before any compute is asked; below that check the
compute manager drives the driver as follows, and the shim keeps the TPM:

================  ==========================================  ==========================
operation         what the compute manager calls              what happens to the TPM
================  ==========================================  ==========================
shelve (offload)  ``power_off`` (task SHELVING), ``snapshot``,  owner check first (user
                  ``destroy`` (task SHELVING_OFFLOADING)      mode); the state is copied
                                                              off-host BEFORE Nova's
                                                              destroy removes it
unshelve          ``spawn`` (vm_state SHELVED_OFFLOADED)       owner check, passphrase,
                                                              state restored, then spawn
rebuild           ``rebuild`` (not implemented: Nova's         passphrase read first; the
                  default), ``destroy`` (task REBUILDING),    domain is undefined KEEPING
                  ``spawn``                                   its TPM state: same EK
evacuate          ``rebuild(evacuate=True)``, ``spawn`` on     refused without a copy or
                  the destination; the source's init_host     with a stale one (names the
                  later ``destroy``\\ s what it had             option); else restored
rescue/unrescue   ``rescue`` / ``unrescue``                   passphrase first; the rescue
                                                              boot gets the server's vTPM
================  ==========================================  ==========================

The copies are :class:`vtpm_driver.statestore.DirectoryStateStore` under
``[vtpm] state_backup_dir`` (shared storage every compute sees, as the
standalone path's), made and retired by :class:`vtpm_driver.ops.shelve.OffHostOps`;
the rules are :mod:`vtpm_driver.model.rules`'s. ``[vtpm] state_backup = on-stop``
also copies at every power off (the copy an evacuation needs).

Custody (:mod:`vtpm_driver.model.custody`): shelve offload, unshelve and evacuation
hand the TPM over. The instance's ``system_metadata['vtpm_generation']``
advances (saved first); the copy (``CopyMeta.generation``) or the restored
state (its ``vtpm-generation`` file) gets the new value. A copy whose
generation is not the instance's is never restored (unless ``[vtpm]
allow_stale_tpm_state``, logged), so a copy kept from before, or the state an
evacuated host still holds, can never become the server's TPM again.

Nova's API deletes a shelved-offloaded server without any compute
(``API._local_delete``): neither the copy nor the Barbican secret can be
removed by a driver then (see README.rst beside this file).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from oslo_context import context as oslo_context
from oslo_log import log as logging

from nova.virt.vtpm import translate
from vtpm_driver import exception
from vtpm_driver.model import custody, rules
from vtpm_driver.model.server import server_label
from vtpm_driver.ops import custody as ops_custody
from vtpm_driver.ops.shelve import OffHostOps
from vtpm_driver.statestore import CopyMeta, DirectoryStateStore
from vtpm_driver.virt import state

LOG = logging.getLogger(__name__)


class OffHost:
    """The shim's off-host steps for one nova-compute (``conf`` is Nova's CONF)."""

    def __init__(self, conf: Any, host: str) -> None:
        self.conf = conf
        self.host = host
        # instance uuid -> the copy an evacuation to this host restores at spawn.
        self._evacuating: dict[str, CopyMeta] = {}
        # instance uuid -> the state dir restore_for_spawn created (its spawn running).
        self._created: dict[str, state.CreatedStateDir] = {}

    def __repr__(self) -> str:
        return f"OffHost({self.host!r}, {self.conf.vtpm.state_backup_dir!r})"

    @property
    def ops(self) -> OffHostOps:
        """Copies in ``[vtpm] state_backup_dir`` (read at each use: cheap, follows config)."""
        return OffHostOps(DirectoryStateStore(self.conf.vtpm.state_backup_dir))

    @property
    def state_base(self) -> str:
        """This host's swtpm state directory (``[vtpm] swtpm_state_dir``)."""
        return str(self.conf.vtpm.swtpm_state_dir)

    def state_dir(self, instance_uuid: str) -> Path:
        return state.state_dir(self.state_base, instance_uuid)

    def has_state(self, instance_uuid: str) -> bool:
        """Whether libvirt keeps a TPM state for the server on this host (it has or had a vTPM)."""
        try:
            path = self.state_dir(instance_uuid)
        except exception.VTPMError:
            return False  # not a UUID: no domain, so no swtpm state, has one
        return path.exists()

    # -- checks before anything is touched -----------------------------------------

    @staticmethod
    def check_caller(context: Any, instance: Any, operation: str) -> None:
        """``user`` mode: only the owner may shelve/unshelve (nothing touched otherwise).

        ``context`` None (``power_off`` has no argument for it): the request
        context oslo.context keeps for this thread, the one Nova's RPC layer
        made for the call; without one (a periodic task) there is no caller
        to check.

        :raises nova.exception.Forbidden: the policy's refusal, translated.
        """
        context = context if context is not None else oslo_context.get_current()
        if context is None or not rules.has_vtpm(instance):
            return
        with translate.nova_errors():
            rules.check_may_offload(rules.vtpm_of(instance), instance, context, operation)

    def check_evacuation(self, instance: Any) -> str:
        """The copy an evacuation of ``instance`` to this host restores; its description.

        :raises nova.exception.OperationNotSupportedForVTPM: no copy (names
            ``[vtpm] state_backup``) or a stale one while ``[vtpm]
            allow_stale_tpm_state`` is False.
        :raises nova.exception.NovaException: the copy is not this server's
            (:func:`vtpm_driver.model.rules.check_copy_matches`).
        """
        with translate.nova_errors():
            meta, described = self.ops.evacuation_copy(
                instance.uuid, label=server_label(instance),
                host=getattr(instance, "host", None), mode=self.conf.vtpm.state_backup,
                allow_stale=self.conf.vtpm.allow_stale_tpm_state)
            rules.check_copy_matches(meta, instance, rules.vtpm_of(instance))
            self._check_custody(instance, meta)
        self._evacuating[instance.uuid] = meta
        return described

    def _check_custody(self, instance: Any, meta: CopyMeta) -> None:
        """The copy's generation must be the instance's (:meth:`OffHostOps.check_custody`).

        An older one is refused unless ``[vtpm] allow_stale_tpm_state``; then
        it is restored and logged.

        :raises StaleTPMState: (translated by the caller) names both generations.
        """
        verdict = self.ops.check_custody(instance, meta,
                                         allow_stale=self.conf.vtpm.allow_stale_tpm_state)
        if not verdict.startable:
            LOG.warning("Restoring %s although its TPM generation %s is not the current %s "
                        "([vtpm] allow_stale_tpm_state = True)", self.ops.copy_name(meta),
                        meta.generation, custody.recorded(instance), instance=instance)

    # -- copies --------------------------------------------------------------------

    def store(self, instance: Any, domain_xml: str, *, reason: str, shelved: bool) -> None:
        """Copy the (stopped) server's TPM state off-host; Nova's domain XML is the record.

        Shelve (``shelved``): the copy becomes the server's current TPM, a
        hand-over: the instance's generation advances and is saved BEFORE the
        copy is written with it, so the state left on this host is older from
        then on. A failed copy puts the instance's generation back (no other
        copy exists then). A stop's copy has the current generation.

        :raises nova.exception.NovaException: the copy failed (nothing removed).
        """
        before = custody.recorded(instance)
        generation = custody.advance(instance) if shelved else before
        if shelved:
            instance.save()
        try:
            with translate.nova_errors():
                meta = self.ops.store_state(instance, host=self.host,
                                            state_base=self.state_base, record_text=domain_xml,
                                            reason=reason, running=False, shelved=shelved,
                                            generation=generation)
        except BaseException:
            if shelved:
                self._hand_back(instance, before)
            raise
        LOG.info("TPM state copied off-host (%s, %d bytes)", reason, meta.size,
                 instance=instance)

    def stopped(self, instance: Any, domain_xml: Callable[[], str]) -> None:
        """A clean power off: ``[vtpm] state_backup`` on-stop/periodic refreshes the copy.

        The stop has happened; a failed copy is logged, not raised (the
        previous copy, if any, stays, and is stale).
        """
        if not (rules.has_vtpm(instance)
                and rules.wants_backup(self.conf.vtpm.state_backup, "stop")):
            return
        try:
            self.store(instance, domain_xml(), reason="stop", shelved=False)
        except Exception as exc:  # the power off itself succeeded
            LOG.error("Could not copy the TPM state off-host after the stop: %s", exc,
                      instance=instance)

    def forget(self, instance: Any) -> None:
        """The server is being deleted: its off-host copy goes too. Idempotent."""
        with translate.nova_errors():
            self.ops.store.delete(instance.uuid)

    def left(self, instance: Any) -> None:
        """After Nova's destroy: a server that lives on another host keeps no TPM state here.

        The source of an evacuation, back up, destroys what it had (Nova's
        ``_destroy_evacuated_instances``) but keeps the TPM state when the
        disks are on shared storage, yet swtpm's state is host-local and
        overtaken: the server runs elsewhere with its own.

        No TPM state of the server here (the usual case): nothing read, nothing
        done. Whether the server has (or had) a vTPM is this state itself.
        """
        if not self.has_state(instance.uuid):
            return
        if instance.host not in (None, self.host):
            with translate.nova_errors():
                if state.remove_state(self.state_base, instance.uuid):
                    LOG.info("Removed the overtaken TPM state of a server now on %s",
                             instance.host, instance=instance)

    def remove_overtaken(self, instance: Any) -> None:
        """A TPM state here older than the record goes before a newer copy moves in.

        A move that came back (a reverted resize on shared instance storage)
        leaves its destination's state behind; it is older than the record
        (custody), so it can never start, but it would stop Nova from putting
        the arriving copy in its place on the next move here. Only a state
        whose generation is behind the record's is removed. Idempotent.
        """
        if not self.has_state(instance.uuid):
            return
        record = custody.recorded(instance)
        found = state.read_generation(self.state_base, instance.uuid)
        if record is not None and found is not None and found < record:
            with translate.nova_errors():
                state.remove_state(self.state_base, instance.uuid)
            LOG.info("Removed an overtaken TPM state (generation %d < %d) before the "
                     "current copy moves in", found, record, instance=instance)

    def started(self, instance: Any) -> None:
        """The guest runs again with its vTPM: its copy (if any) is overtaken. Idempotent.

        The caller knows the guest has a vTPM (Nova's own decision at the start).
        """
        with translate.nova_errors():
            self.ops.mark_started(instance.uuid)

    # -- bringing a server's TPM to this host ----------------------------------------

    @contextlib.contextmanager
    def spawning(self, instance: Any, unshelving: bool) -> Iterator[None]:
        """Around Nova's spawn: the copy's state written first, retired once it runs.

        A failed spawn removes the state written here (only the directory
        this spawn created) and puts the instance's generation back (the copy
        is the current one again: a retry restores it); the copy stays.
        """
        before = custody.recorded(instance)
        copy = self.restore_for_spawn(instance, unshelving)
        try:
            yield
        except BaseException:
            if copy is not None:
                self.spawn_failed(instance)
                self._hand_back(instance, before)
            raise
        finally:
            created = self._created.pop(instance.uuid, None)
            if created is not None:
                created.close()
        if copy is not None:
            self.spawned(instance, copy)

    def restore_for_spawn(self, instance: Any, unshelving: bool) -> CopyMeta | None:
        """Write the copy's TPM state here before Nova defines the domain; the copy used.

        Unshelve: the shelved copy. Evacuation: the copy :meth:`check_evacuation`
        chose. Anything else: None, nothing done.

        :raises nova.exception.NovaException: no usable copy, one that is not
            this server's (owner, project, UUID, TPM version or secret mode differ
            from Nova's instance), or this host already has a state for the
            server (never overwritten).
        """
        meta = self._evacuating.pop(instance.uuid, None)
        if meta is None and unshelving and rules.has_vtpm(instance):
            meta = self.ops.store.get(instance.uuid)
            if meta is None or not meta.shelved:
                with translate.nova_errors():
                    raise exception.VTPMError(
                        f"cannot unshelve server {server_label(instance)}: no shelved "
                        f"copy of its TPM state in {self.conf.vtpm.state_backup_dir}")
        if meta is None:
            return None
        with translate.nova_errors():
            rules.check_copy_matches(meta, instance, rules.vtpm_of(instance))
            self._check_custody(instance, meta)
            if not self.ops.store.restore(instance.uuid, self.state_dir(instance.uuid)):
                raise exception.VTPMError(
                    f"the off-host copy of server {server_label(instance)} holds no "
                    "TPM state")
            # The restore created it exclusively: remembered, so only it is cleaned up.
            self._created[instance.uuid] = state.CreatedStateDir(
                self.state_dir(instance.uuid))
        self._hand_over(instance)
        LOG.info("TPM state restored from the off-host copy %s",
                 rules.describe_copy(meta, time.time()), instance=instance)
        return meta

    def _hand_over(self, instance: Any) -> None:
        """The restored state is the server's current TPM here
        (:func:`vtpm_driver.ops.custody.hand_over`: the instance's generation advances
        and is saved, naming this host, then the restored state is stamped with it), so
        the copy it came from, and any state left on the old host, are older from now on.

        :raises nova.exception.NovaException: the generation could not be written.
        """
        with translate.nova_errors():
            ops_custody.hand_over(instance, self.state_base, host=self.host,
                                  save=instance.save)

    @staticmethod
    def _hand_back(instance: Any, before: int | None) -> None:
        """Undo :meth:`_hand_over` after a failed spawn (best effort, logged).

        Safe: the state stamped with the newer generation was removed, and if
        it was not, it is newer than the record and refused.
        """
        if before is None:
            instance.system_metadata.pop(custody.GENERATION_KEY, None)
        else:
            custody.set_recorded(instance, before)
        try:
            instance.save()
        except Exception as exc:  # the spawn's own error is the one to report
            LOG.error("Could not put the TPM generation back to %s: %s", before, exc,
                      instance=instance)

    def spawn_failed(self, instance: Any) -> None:
        """Remove the state :meth:`restore_for_spawn` wrote; the copy stays. Best effort.

        Only the directory that restore created, and only while it is still
        there: one another writer put in its place, or one that existed before
        (the restore refused it), is never removed (issue 20 defect 4).
        """
        created = self._created.pop(instance.uuid, None)
        if created is None:
            return
        try:
            created.remove()
        except exception.VTPMError as exc:
            LOG.error("Could not remove the restored TPM state: %s", exc, instance=instance)

    def spawned(self, instance: Any, meta: CopyMeta) -> None:
        """The server runs here from ``meta``'s copy: retire or keep it (``state_backup``)."""
        with translate.nova_errors():
            self.ops.restored(instance.uuid, meta,
                              keep_copy=self.conf.vtpm.state_backup != "off")
