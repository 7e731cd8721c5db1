"""One exception hierarchy for everything the driver refuses or cannot do.

Every error a caller can see derives from :class:`VTPMError`; invalid input
never escapes as ``KeyError``/``ValueError``/``AttributeError``. Messages are
written for an operator: they name the offending key and value and say what
would be accepted. They never contain secret material.
"""

from __future__ import annotations


class VTPMError(Exception):
    """Base class of all vtpm-driver errors."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidVTPMConfig(VTPMError):
    """The flavor extra specs or image properties ask for an impossible vTPM."""


class FlavorImageConflict(InvalidVTPMConfig):
    """Flavor and image set the same vTPM attribute to different values."""


class InvalidFirmwareRequest(InvalidVTPMConfig):
    """The flavor or image ask for firmware that cannot be given (``hw_firmware_type``,
    Secure Boot). A kind of invalid request, refused before anything is created,
    as an invalid vTPM request is."""


class InvalidConfiguration(VTPMError):
    """This host or its configuration cannot provide what was asked of it."""


class VTPMSecretForbidden(VTPMError):
    """The key manager refused access to the vTPM secret (HTTP 401/403)."""


class VTPMSecretNotFound(VTPMError):
    """The vTPM secret no longer exists in the key manager."""


class KeyManagerUnavailable(VTPMError):
    """The key manager could not be reached or answered with a server error."""


class OperationNotSupportedForVTPM(VTPMError):
    """The requested lifecycle operation is not supported for vTPM servers."""


class NotAuthorized(VTPMError):
    """The caller's project may not act on this server (Nova's owner-or-admin rule)."""


class HypervisorUnavailable(VTPMError):
    """libvirt could not be reached at the configured URI."""


class InstanceNotFound(VTPMError):
    """No server (libvirt domain) with that name or UUID exists on this host."""


class InstanceExists(VTPMError):
    """A server with that name or UUID already exists on this host."""


class VirtError(VTPMError):
    """libvirt refused an operation (define, start, secret handling, ...)."""


class ServerLocked(VTPMError):
    """Another operation holds the server's lock and did not finish in time."""


class UnsafeStatePath(VTPMError):
    """A TPM state tree holds something other than regular files and directories.

    A symlink (or device, FIFO, socket) in a swtpm state directory, a resize
    backup or an off-host copy is never copied, recreated or followed: it
    could point a read or a copy at any file of the host. ``path`` names it.
    """

    def __init__(self, path: str, kind: str, doing: str = "use") -> None:
        super().__init__(f"refusing to {doing} TPM state {path!r}: it is a {kind}, not a "
                         "regular file or directory")
        self.path = path


class InvalidJournalEntry(VTPMError):
    """A server's intent journal entry (``vtpm_intent``) is garbled: nothing can tell
    what its interrupted operation did, so no operation decides anything from it.
    ``field`` names the offending field (``vtpm_intent`` itself when unparseable)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class CopyMismatch(VTPMError):
    """An off-host copy of a TPM state says it belongs to something other than the
    server it would be restored for (another owner, project, UUID, TPM version or
    secret mode): it is never restored. ``field`` names what disagrees."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class VTPMSecretConflict(VTPMError):
    """The host holds a libvirt vTPM secret for the server that its record does not
    name: the TPM state may be encrypted with it, so it is never replaced."""


class StaleTPMState(VTPMError):
    """A copy of a server's TPM state is not the current one (issue 20, custody).

    Its generation differs from the one the server's record holds
    (:mod:`vtpm_driver.model.custody`): starting, restoring or copying it back would
    roll the TPM back or run a second copy of it. ``copy`` names the copy,
    ``found`` and ``current`` are the two generations (``found`` None: the
    copy has none).
    """

    def __init__(self, message: str, *, copy: str, found: int | None,
                 current: int | None) -> None:
        super().__init__(message)
        self.copy = copy
        self.found = found
        self.current = current


class OrchestratorUnavailable(VTPMError):
    """The orchestrator (Nova) could not say which servers exist (issue 20).

    No credentials in ``[nova]``, Keystone or Nova refused them, Nova could not
    be reached in time or answered with something that is no server list.
    ``audit --repair`` then deletes no Barbican secret, off-host copy or state
    directory: without Nova's word a shelved-offloaded server (no domain
    anywhere) looks exactly like a deleted one. ``orchestrator`` names it.
    """

    def __init__(self, message: str, orchestrator: str = "Nova") -> None:
        super().__init__(message)
        self.orchestrator = orchestrator
