"""nova-api's validators for the flavor extra specs only vtpm-driver reads.

Nova validates every ``hw:`` extra spec a flavor is given (API microversion
2.86 and later) and refuses a key it does not know. Its plugin point, the
``nova.api.extra_spec_validators`` entry point namespace that
``nova.api.validation.extra_specs.validators`` loads, is where this module is
registered (see pyproject.toml): Nova is configured, not changed.

The value syntax here is the same as :func:`vtpm_driver.model.request.pcr_banks`
accepts (a repeated bank, which a pattern cannot see, is refused by the
compute when it builds the ``<tpm>``).
"""

from __future__ import annotations

from nova.api.validation.extra_specs import base

from vtpm_driver.model import request

_BANK = "|".join(request.PCR_BANKS)

EXTRA_SPEC_VALIDATORS = [
    base.ExtraSpecValidator(
        name=request.FLAVOR_PCR_BANKS_KEY,
        description=(
            "The PCR banks a TPM 2.0 has active (libvirt's <active_pcr_banks>), "
            "comma-separated. A host offers each bank it can activate as the trait "
            "CUSTOM_VTPM_PCR_BANK_<BANK>. Only supported by the vtpm-driver shim."
        ),
        value={
            "type": str,
            "description": "Comma-separated PCR banks",
            "pattern": rf"(?i)\s*({_BANK})\s*(,\s*({_BANK})\s*)*",
        },
    ),
]


def register() -> list[base.ExtraSpecValidator]:
    """What ``nova.api.validation.extra_specs.validators.load_validators`` calls."""
    return EXTRA_SPEC_VALIDATORS
