"""How a server is shown: plain fields for ``server show`` / ``server list`` (pure).

No I/O and no secret: the passphrase never reaches a field; the Barbican
secret's UUID does (it is what an operator looks up).
"""

from __future__ import annotations

from typing import Any

from vtpm_driver import exception
from vtpm_driver.model import request, rules
from vtpm_driver.model.server import (
    EK_CERT_KEY,
    EK_FINGERPRINT_KEY,
    EK_PEM_KEY,
    flavor_extra_specs,
    image_properties,
    recorded_secret,
)

#: Nova's power_state values (nova/compute/power_state.py) -> the names Nova's API shows.
POWER_STATES = {0: "pending", 1: "running", 3: "paused", 4: "shutdown", 6: "crashed",
                7: "suspended"}
RESIZE_PENDING = "awaiting confirm or revert"

#: ``server show`` fields, in order (``vtpm_error`` follows when the request is invalid).
SHOW_FIELDS = (
    "name", "uuid", "power_state", "resize_status",
    "user_id", "user_name", "project_id", "project_name",
    "vtpm", "vtpm_version", "vtpm_model", "secret_security", "vtpm_secret_uuid",
    "ek_fingerprint", "ek_certificate", "ek_certificate_secret",
    "flavor_extra_specs", "image_properties", "vcpus", "memory_mb",
    "kernel", "initrd", "cmdline", "disk", "console_log",
)

def power_state_name(info: object) -> str:
    """Nova's name for ``driver.get_info(instance)`` (or its ``state``)."""
    state = getattr(info, "state", info)
    if isinstance(state, str):
        return state
    if isinstance(state, int) and not isinstance(state, bool):
        return POWER_STATES.get(state, f"state {state}")
    return "unknown"


def vtpm_or_error(instance: Any) -> tuple[request.VTPMConfig | None, str | None]:
    """(config, None), (None, None) without a vTPM, or (None, reason) if invalid."""
    try:
        return rules.vtpm_of(instance), None
    except exception.VTPMError as exc:
        return None, str(exc)


def server_fields(instance: Any, power_state: str, resize_pending: bool = False,
                  vtpm: request.VTPMConfig | request.Unparsed | None = request.UNPARSED
                  ) -> dict[str, Any]:
    """What ``server show`` says about ``instance``, as plain values (no secret).

    ``vtpm``: its request as the caller already parsed it (a create).
    """
    config, error = vtpm_or_error(instance) if vtpm is request.UNPARSED else (vtpm, None)
    flavor = getattr(instance, "flavor", None)
    image_meta = getattr(instance, "image_meta", None)
    sysmeta = getattr(instance, "system_metadata", None) or {}
    fields = {
        "name": getattr(instance, "name", None),
        "uuid": getattr(instance, "uuid", None),
        "power_state": power_state,
        "resize_status": RESIZE_PENDING if resize_pending else None,
        "user_id": getattr(instance, "user_id", None),
        "user_name": getattr(instance, "user_name", None),
        "project_id": getattr(instance, "project_id", None),
        "project_name": getattr(instance, "project_name", None),
        "vtpm": config is not None,
        "vtpm_version": config.version if config else None,
        "vtpm_model": config.model if config else None,
        "secret_security": config.secret_security if config else None,
        "vtpm_secret_uuid": recorded_secret(instance),
        # Public: a TPM manufactured with the deployment's EK CA ([vtpm] ek_ca_*).
        "ek_fingerprint": sysmeta.get(EK_FINGERPRINT_KEY),
        "ek_certificate": sysmeta.get(EK_PEM_KEY),
        "ek_certificate_secret": sysmeta.get(EK_CERT_KEY),
        "flavor_extra_specs": dict(flavor_extra_specs(flavor)),
        "image_properties": dict(image_properties(image_meta)),
        "vcpus": getattr(flavor, "vcpus", None),
        "memory_mb": getattr(flavor, "memory_mb", None),
        "kernel": getattr(image_meta, "kernel", None),
        "initrd": getattr(image_meta, "initrd", None),
        "cmdline": getattr(image_meta, "cmdline", None),
        "disk": getattr(image_meta, "disk", None),
        "console_log": getattr(instance, "console_log", None),
    }
    if error is not None:
        fields["vtpm_error"] = error
    return fields


def summary_fields(instance: Any, power_state: str) -> dict[str, Any]:
    """What ``server list`` says about ``instance`` ('invalid' for a bad vTPM request)."""
    config, error = vtpm_or_error(instance)
    return {
        "name": instance.name,
        "uuid": instance.uuid,
        "owner": str(getattr(instance, "user_name", None) or instance.user_id),
        "project": getattr(instance, "project_name", None) or instance.project_id,
        "vtpm_version": config.version if config else ("invalid" if error else None),
        "vtpm_model": config.model if config else None,
        "secret_security": config.secret_security if config else None,
        "power_state": power_state,
    }
