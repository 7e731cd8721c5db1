"""Servers, copies and reports as the audit tests build them (pure, no fakes)."""

from __future__ import annotations

import uuid

from vtpm_driver import statestore
from vtpm_driver.audit import report as audit
from vtpm_driver.model.server import Flavor, Instance
from vtpm_driver.ops import journal


def a_uuid() -> str:
    return str(uuid.uuid4())


def a_server(name="vm1", mode="user", secret=None, version="2.0", uid=None) -> Instance:
    """A server as the audit gets it: the model (Instance) read from its record."""
    specs = {"hw:tpm_version": version, "hw:tpm_secret_security": mode} if version else {}
    return Instance(name=name, uuid=uid or a_uuid(), user_id="u", project_id="p",
                            flavor=Flavor(extra_specs=specs),
                            system_metadata={"vtpm_secret_uuid": secret} if secret else {})


NOW = 1_800_000_000.0
OLD = "2020-01-01T00:00:00"


def journalled(server, operation, **fields):
    journal.write(server.system_metadata, journal.begin(operation, **fields))
    return server


HERE = "qemu:///fake"  # FakeBackend.uri: this host as its off-host copies name it


def a_copy(uid, *, shelved=False, source_host=HERE):
    return statestore.CopyMeta(uuid=uid, name="vm", taken_at=NOW - 60, source_host=source_host,
                               reason="shelve" if shelved else "stop", shelved=shelved,
                               tpm_version="2.0")


def lost_report(shelved, moved, dead, unknown):
    """What this host alone sees: ``shelved`` (shelved-offloaded: a leftover state directory
    and its Barbican secret), ``moved`` (on another compute: the copy taken here before it
    left and its Barbican secret), ``dead`` and ``unknown`` (a state directory and a
    Barbican secret each). No domain of any of them here."""
    barbican = [audit.BarbicanSecret(f"{u[:8]}-0000-4000-8000-000000000000", "n", u,
                                     created=OLD) for u in (shelved, moved, dead, unknown)]
    report = audit.audit([], [], [], [shelved, dead, unknown], barbican,
                         state_dir_base="/srv/swtpm")
    return audit.offhost_copies(report, [a_copy(moved)], [], host=HERE, now=NOW,
                                interval=None)
