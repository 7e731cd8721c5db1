"""The key manager, in castellan's shape: the interface and its implementations.

* :mod:`.api`: :class:`KeyManagerAPI`, what the vTPM core calls, and
  :class:`KeyManagerAuditAPI`, what the audit calls.
* :mod:`.barbican`: :class:`KeyManager`, the Barbican implementation
  (owner-only read ACL, the minimum of round trips).
* :mod:`.client`: python-barbicanclient on a keystoneauth1 session, wired for
  that floor and for quiet logs.
* :mod:`.errors`: Barbican and Keystone failures mapped once, by HTTP status.
* :mod:`.context`: :class:`RequestContext`, who is asking and with which token.
"""

from vtpm_driver.keymgr.api import KeyManagerAPI, KeyManagerAuditAPI
from vtpm_driver.keymgr.barbican import SYSMETA_KEY, KeyManager
from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.keymgr.errors import error_for_status

__all__ = ["SYSMETA_KEY", "KeyManager", "KeyManagerAPI", "KeyManagerAuditAPI", "RequestContext",
           "error_for_status"]
