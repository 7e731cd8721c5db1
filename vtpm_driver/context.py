"""Request context: who is asking, and with which token.

Filled in by ``issue 4`` (keystoneauth1 auth plugin). The dataclass shape is
fixed here so the other modules can use it.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(repr=False)
class RequestContext:
    """The caller of an operation (Nova's RequestContext attribute names)."""

    user_id: str
    project_id: str
    auth_token: str | None = None
    roles: tuple[str, ...] = ()
    service_catalog: list[dict] = dataclasses.field(default_factory=list)
    user_name: str | None = None
    project_name: str | None = None

    def __repr__(self) -> str:  # never show the token
        return (
            f"RequestContext(user_id={self.user_id!r}, project_id={self.project_id!r}, "
            f"roles={self.roles!r}, auth_token={'***' if self.auth_token else None})"
        )
