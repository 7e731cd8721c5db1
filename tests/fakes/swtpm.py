"""swtpm's on-disk TPM state, as libvirt leaves it, for tests that copy or inspect it.

The one builder of swtpm state files in the tests: :func:`blob` (a state file with
swtpm's blob header) and :func:`make_state` (a whole ``<base>/<uuid>`` directory).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from vtpm_driver.model import custody

ENCRYPTED = 0x09   # swtpm blob flags: encrypted (0x01) with a 256-bit key (0x08)
PLAIN = 0x00


def blob(flags: int, payload: bytes = b"state") -> bytes:
    """A swtpm state file: header (version 2, min 1, 10 bytes, flags, total length) + data."""
    return struct.pack(">BBHHI", 2, 1, 10, flags, 10 + len(payload)) + payload


def make_state(base: Path, server_uuid: str, flags: int = ENCRYPTED,
               payload: bytes = b"state", *, lock: bool = False,
               owner: int | None = None) -> Path:
    """``<base>/<uuid>`` of a TPM 2.0 as libvirt's swtpm leaves it (0700 dirs, 0600 file).

    ``lock`` adds swtpm's ``tpm2/.lock`` (0640); ``owner`` (uid, used as gid too)
    chowns what swtpm would own, ``tpm2/`` and its files (needs root).
    """
    top = Path(base) / server_uuid
    (top / "tpm2").mkdir(parents=True, mode=0o700)
    state_file = top / "tpm2" / "tpm2-00.permall"
    state_file.write_bytes(blob(flags, payload))
    state_file.chmod(0o600)
    owned = [top / "tpm2", state_file]
    if lock:
        (top / "tpm2" / ".lock").touch(0o640)
        owned.append(top / "tpm2" / ".lock")
    if owner is not None:
        for path in owned:
            os.chown(path, owner, owner)
    return top


def custody_free(system_metadata: dict) -> dict:
    """``system_metadata`` without the custody keys (the generation and the
    pre-resize generation): what a test compares when it checks the rest."""
    return {k: v for k, v in system_metadata.items()
            if k not in (custody.GENERATION_KEY, custody.PRE_RESIZE_KEY)}
