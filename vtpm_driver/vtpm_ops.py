"""Deprecated: the orchestration moved to :mod:`vtpm_driver.ops`.

Only the two names the Nova shim (``nova/virt/vtpm/driver.py``) still imports
remain, until it uses :mod:`vtpm_driver.ops.secrets` and
:mod:`vtpm_driver.keymgr` directly; then this module goes. Nothing in
``vtpm_driver`` imports it.
"""

from __future__ import annotations

from vtpm_driver.keymgr import KeyManagerAPI
from vtpm_driver.ops.secrets import StartSecret

__all__ = ["KeyManagerAPI", "StartSecret"]
