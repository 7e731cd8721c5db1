"""Finish or roll back an interrupted operation found in a server's journal.

The decision is :func:`vtpm_driver.ops.journal.decide` (pure); this module
gathers its facts (domain, backups) and carries it out. The driver calls
:meth:`Recovery.recover` under the server lock before every operation on an
existing server, so a half-done operation never meets a new one.
"""

from __future__ import annotations

import os
from typing import Any

from oslo_log import log as logging

from vtpm_driver import exception
from vtpm_driver.model import rules
from vtpm_driver.model.server import server_label
from vtpm_driver.ops import journal
from vtpm_driver.ops.guests import Guests
from vtpm_driver.ops.resize import ResizeOps
from vtpm_driver.virt import record

LOG = logging.getLogger(__name__)


class Recovery:
    """Carry out :func:`~vtpm_driver.ops.journal.decide` for one server."""

    def __init__(self, guests: Guests, resize: ResizeOps) -> None:
        self.guests = guests
        self.resize = resize

    def __repr__(self) -> str:
        return f"Recovery({self.guests!r})"

    def refresh(self, instance: Any, *, whole: bool = True) -> journal.Intent | None:
        """Bring ``instance`` up to date with its domain's record; its journal entry.

        Called under the server lock: the caller read the server before it had
        the lock, and the operation that held it may have changed it (a resize
        that added a vTPM: a hard reboot with the old copy would define the
        domain without it). ``whole``: flavor, image, system metadata and
        console log come from the record (standalone, where the record is the
        only store); otherwise only the journal entry (Nova-shaped resize steps,
        whose caller sets the flavors on purpose). Without a record (not a
        standalone server) the instance is left as it is.
        """
        sysmeta = instance.system_metadata
        dom = self.guests.find(instance)
        try:
            stored = record.record_from_domain(dom) if dom is not None else None
        except exception.VirtError as exc:
            LOG.warning("Cannot read the server record: %s", exc, instance_uuid=instance.uuid)
            stored = None
        if stored is not None and whole:
            instance.flavor = stored.flavor
            instance.image_meta = stored.image_meta
            sysmeta.clear()
            sysmeta.update(stored.system_metadata)
            instance.console_log = stored.console_log
        elif stored is not None:
            raw = stored.system_metadata.get(journal.KEY)
            if raw:
                sysmeta[journal.KEY] = raw
            else:
                sysmeta.pop(journal.KEY, None)
        return journal.read(sysmeta, server_label(instance))

    def remove_leftovers(self, instance: Any) -> None:
        """On delete: remove the temporary backup an interrupted resize named; the
        rest (domain, state, secrets, backup) goes with the server. Idempotent.

        :raises InvalidJournalEntry: the entry is garbled."""
        intent = journal.read(getattr(instance, "system_metadata", None),
                              server_label(instance))
        if intent is not None and intent.tmp_backup:
            self.resize.backups.remove_tmp(intent.tmp_backup, instance.uuid)

    def facts(self, instance: Any, intent: journal.Intent) -> dict[str, bool]:
        """What :func:`~vtpm_driver.ops.journal.decide` needs to know about the server."""
        return {
            "domain_exists": self.guests.find(instance) is not None,
            "backup_exists": self.resize.has_backup(instance.uuid),
            "tmp_backup_exists": bool(intent.tmp_backup) and os.path.exists(intent.tmp_backup),
        }

    def recover(self, context: Any, instance: Any, *, refresh_whole: bool = True
                ) -> journal.Decision | None:
        """Finish or roll back the operation the server's journal names; None if none.

        Call it holding the server lock (no other operation is running, so an
        entry is from one that was interrupted). ``instance`` is refreshed
        first (:meth:`refresh`, ``whole=refresh_whole``). Idempotent: each action can
        be repeated, and the entry is cleared only when all of them worked.

        :raises InvalidJournalEntry: the entry is garbled (nothing is done: the
            operation is refused until it is fixed; ``vtpm-driver audit`` lists it).
        :raises VTPMError: an action failed (the entry stays; the next
            operation tries again).
        """
        intent = self.refresh(instance, whole=refresh_whole)
        if intent is None:
            return None
        decision = journal.decide(intent, **self.facts(instance, intent))
        LOG.warning("Found an interrupted operation on server %s: %s; %s (%s)",
                    server_label(instance), intent.describe(), decision.action.value,
                    decision.reason, instance_uuid=instance.uuid)
        if decision.remove_tmp_backup:
            self.resize.backups.remove_tmp(decision.remove_tmp_backup, instance.uuid)
        if decision.drop_ephemeral_secret:
            self._drop_ephemeral_secret(instance)
        if decision.revert_resize or decision.redo == journal.RESIZE_REVERT:
            self.resize.finish_revert_migration(context, instance, power_on=False)
        elif decision.redo == journal.RESIZE_CONFIRM:
            self.resize.confirm_migration(context, instance)
        self.guests.journal(self.guests.find(instance), instance, None)
        return decision

    def _drop_ephemeral_secret(self, instance: Any) -> None:
        """Undefine a libvirt secret of the server that only a start should hold.

        ``host`` mode keeps its persistent secret: that one is meant to stay.
        """
        try:
            cfg = rules.vtpm_of(instance)
        except exception.VTPMError:
            cfg = None
        if cfg is not None and rules.uses_persistent_secret(cfg.secret_security):
            return
        leftover = self.guests.secrets.find(instance.uuid)
        if leftover is not None:
            self.guests.secrets.undefine(leftover)
            LOG.warning("Removed libvirt vTPM secret %s left defined by an interrupted start",
                        leftover, instance_uuid=instance.uuid)
