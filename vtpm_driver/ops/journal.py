"""The intent journal: what a multi-step operation is about to do, written down first.

Before a multi-step operation changes anything it records an :class:`Intent`
in the server's ``system_metadata`` under :data:`KEY` (so in the domain's
server record, :mod:`vtpm_driver.virt.record`): the operation, the step it is
at, the temporary backup directory it is about to create, the Barbican secret
it created. It clears the entry when it is done. An entry found later means
the operation was interrupted (``kill -9``, a crash, a lost host): the next
operation on that server (under the server lock) or ``vtpm-driver audit``
asks :func:`decide` what to do about it and carries that out.

Everything above :func:`decide` (included) is pure: it reads and writes a
mapping and returns a :class:`Decision`; the I/O that carries a decision out
lives in the operations (:mod:`vtpm_driver.standalone.driver`, ``recover``).

Operations and what an interrupted one needs (see :func:`decide`):

``start`` (every start that defines a libvirt secret: create, hard reboot,
power on, resume, resize)
    The start may not have finished: the server exists; an ephemeral libvirt
    secret may still hold the passphrase. FINISH: undefine that secret, keep
    the server in whatever state libvirt has it (``server show`` tells the
    truth, e.g. ``paused``). A create killed before its domain was defined
    leaves no record to journal in: its Barbican secret is an orphan that
    ``vtpm-driver audit`` reports.
``resize_prepare`` (``migrate_disk_and_power_off``)
    The guest may be stopped, the backup half-written in its temporary
    directory. Backup in place: FINISH (the resize awaits its next step).
    Otherwise ROLL_BACK: remove the temporary directory this operation
    created (named in the entry) and nothing else.
``resize_finish`` (``finish_migration``)
    Before step :data:`STARTING`: the domain may be half-way to the new
    flavor, a new secret may exist, no guest has run on the state. ROLL_BACK:
    a revert (old flavor, state from the backup, the new secret deleted).
    Without a backup (should not happen) only CLEAR. At step
    :data:`STARTING` (the domain has the new flavor and its guest is being
    started) the guest may have run and written its TPM state: restoring the
    backup would roll that back behind the user's back (issue 20 defect 1), so
    FINISH forward: drop the passphrase the start may have left in libvirt,
    keep the new state, and leave the resize awaiting confirm or revert as a
    finished one does. Only the user's revert restores the backup.
``resize_revert`` / ``resize_confirm``
    FINISH: run the same step again (both are idempotent).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

from vtpm_driver import exception

KEY = "vtpm_intent"

START = "start"
RESIZE_PREPARE = "resize_prepare"
RESIZE_FINISH = "resize_finish"
RESIZE_REVERT = "resize_revert"
RESIZE_CONFIRM = "resize_confirm"
OPERATIONS = (START, RESIZE_PREPARE, RESIZE_FINISH, RESIZE_REVERT, RESIZE_CONFIRM)

#: The step of ``resize_finish`` written just before the guest is started: from
#: here on the guest may have run on the TPM state (:func:`decide`).
STARTING = "starting"
#: The step of ``resize_revert`` stored with the redefined domain: the backup was
#: copied back and the TPM handed over (custody); only the start and the discard
#: of the backup remain, and copying it back again would roll the TPM back.
RESTORED = "restored"


@dataclasses.dataclass(frozen=True)
class Intent:
    """One journal entry. ``tmp_backup``: a directory this operation creates
    (and only it may remove); ``new_secret``: a Barbican secret it created."""

    operation: str
    step: str = "begin"
    tmp_backup: str | None = None
    new_secret: str | None = None
    pid: int = 0
    started: float = 0.0

    def with_step(self, step: str, **changes: Any) -> Intent:
        """The same entry, one step further (pure)."""
        return dataclasses.replace(self, step=step, **changes)

    def describe(self) -> str:
        """``resize_finish at step 'define' (pid 123)`` for messages and the audit."""
        return f"{self.operation} at step {self.step!r} (pid {self.pid})"


def begin(operation: str, **fields: Any) -> Intent:
    """A new entry for ``operation`` by this process."""
    return Intent(operation, pid=os.getpid(), started=time.time(), **fields)


#: Each field's accepted types (``bool`` is never a number here).
_TYPES: dict[str, tuple[type, ...]] = {
    "operation": (str,), "step": (str,), "tmp_backup": (str, type(None)),
    "new_secret": (str, type(None)), "pid": (int,), "started": (int, float),
}


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def read(system_metadata: Mapping[str, str] | None, server: str = "?") -> Intent | None:
    """The entry in ``system_metadata``, or None. Pure.

    An entry of an operation this version does not know reads as such (and
    :func:`decide` clears it). A garbled one (not a JSON object, no
    ``operation``, a field of the wrong type) is refused: deciding from it
    could remove or restore the wrong thing, and reading it on would crash.

    :raises InvalidJournalEntry: the entry is garbled; names ``server``
        (``'name' (uuid)``), the field, what it holds and what is expected.
    """
    raw = (system_metadata or {}).get(KEY)
    if not raw:
        return None

    def refuse(field: str, why: str) -> exception.InvalidJournalEntry:
        return exception.InvalidJournalEntry(
            f"server {server}: its journal entry {KEY!r} is garbled ({why}); no operation "
            f"can tell what the interrupted one did: check the server and remove or fix "
            f"the entry in its record by hand", field)

    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        raise refuse(KEY, "not JSON") from None
    if not isinstance(data, dict):
        raise refuse(KEY, f"a JSON {_type_name(data)}, expected an object")
    if "operation" not in data:
        raise refuse("operation", "field 'operation' is missing")
    for field, types in _TYPES.items():
        if field not in data:
            continue
        value = data[field]
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise refuse(field, f"field {field!r} is a {_type_name(value)}, expected "
                                f"{expected}")
    return Intent(**{k: v for k, v in data.items() if k in _TYPES})


def write(system_metadata: MutableMapping[str, str], intent: Intent) -> None:
    """Put ``intent`` in ``system_metadata`` (the caller stores the record). Pure."""
    data = {k: v for k, v in dataclasses.asdict(intent).items() if v is not None}
    system_metadata[KEY] = json.dumps(data, sort_keys=True)


def clear(system_metadata: MutableMapping[str, str]) -> bool:
    """Remove the entry; True if there was one. Pure."""
    return system_metadata.pop(KEY, None) is not None


class Action(enum.Enum):
    """What to do about an interrupted operation."""

    CLEAR = "clear"  # nothing to undo or finish: drop the entry
    FINISH = "finish"  # carry the operation to its end
    ROLL_BACK = "roll back"  # undo what it did


@dataclasses.dataclass(frozen=True)
class Decision:
    """:func:`decide`'s answer: the action and what it involves."""

    action: Action
    reason: str
    remove_tmp_backup: str | None = None  # a directory the interrupted operation created
    drop_ephemeral_secret: bool = False  # a start may have left the passphrase in libvirt
    revert_resize: bool = False  # ROLL_BACK of resize_finish
    redo: str | None = None  # FINISH by running this step again (resize_revert/confirm)


def decide(intent: Intent, *, domain_exists: bool, backup_exists: bool,
           tmp_backup_exists: bool) -> Decision:
    """What to do about ``intent``, found on a server with these facts. Pure.

    ``backup_exists``: the server's resize backup is in place (renamed from
    its temporary directory); ``tmp_backup_exists``: the entry's temporary
    directory is still there.
    """
    op = intent.operation
    tmp = intent.tmp_backup if tmp_backup_exists else None
    if op == START:
        if not domain_exists:
            return Decision(Action.CLEAR, f"interrupted {op}: the server is gone")
        return Decision(Action.FINISH,
                        f"interrupted {op}: the server exists; remove a libvirt secret the "
                        "start may have left defined", drop_ephemeral_secret=True)
    if op == RESIZE_PREPARE:
        if backup_exists:
            return Decision(Action.FINISH, "interrupted resize: the backup is in place, "
                            "the resize awaits confirm or revert", remove_tmp_backup=tmp)
        return Decision(Action.ROLL_BACK, "interrupted resize before its backup was in "
                        "place: remove the half-made backup; the server keeps its flavor",
                        remove_tmp_backup=tmp)
    if op == RESIZE_FINISH:
        if intent.step == STARTING and domain_exists:
            return Decision(Action.FINISH, "interrupted resize after its guest was started: "
                            "the guest may have run on the new TPM state, which is kept; "
                            "the resize awaits confirm or revert", drop_ephemeral_secret=True,
                            remove_tmp_backup=tmp)
        if backup_exists and domain_exists:
            return Decision(Action.ROLL_BACK, "interrupted resize: revert to the old flavor "
                            "and TPM state", revert_resize=True, drop_ephemeral_secret=True,
                            remove_tmp_backup=tmp)
        return Decision(Action.CLEAR, "interrupted resize with nothing to revert to",
                        remove_tmp_backup=tmp)
    if op in (RESIZE_REVERT, RESIZE_CONFIRM):
        if backup_exists and domain_exists:
            return Decision(Action.FINISH, f"interrupted {op}: run it again", redo=op,
                            drop_ephemeral_secret=True, remove_tmp_backup=tmp)
        return Decision(Action.CLEAR, f"interrupted {op}: already complete",
                        remove_tmp_backup=tmp)
    return Decision(Action.CLEAR, f"unknown journal entry {intent.describe()}",
                    remove_tmp_backup=tmp)
