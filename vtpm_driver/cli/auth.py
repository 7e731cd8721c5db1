"""The global ``--os-*`` options and logging in with them (keystoneauth1 loading helpers).

Credentials come the OpenStack way: ``OS_*`` variables give the defaults of
keystoneauth1's ``--os-*`` options. They are options of the application, not
of each command (as in python-openstackclient), parsed once; the caller logs
in only when a command first needs a :class:`~vtpm_driver.keymgr.context.RequestContext`.
"""

from __future__ import annotations

import argparse

from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import loading as ks_loading

from vtpm_driver import exception
from vtpm_driver.keymgr.context import RequestContext

DEFAULT_AUTH_TYPE = "password"

# Password-family plugins: credentials checked up front so a missing one is named.
_PASSWORD_PLUGINS = frozenset({"password", "v3password", "v2password"})
_CREDENTIALS = (
    # (what, namespace attributes any one of which suffices, how to set it)
    ("auth URL", ("os_auth_url",), "OS_AUTH_URL or --os-auth-url"),
    ("user", ("os_username", "os_user_id"), "OS_USERNAME or --os-username"),
    ("password", ("os_password",), "OS_PASSWORD or --os-password"),
    ("project", ("os_project_name", "os_project_id"), "OS_PROJECT_NAME or --os-project-name"),
)
_ANY_CREDENTIAL = ("os_auth_url", "os_username", "os_user_id", "os_password", "os_token",
                   "os_application_credential_id", "os_application_credential_secret")


def add_auth_options(parser: argparse.ArgumentParser, argv: list[str]
                     ) -> exception.InvalidConfiguration | None:
    """Add keystoneauth1's ``--os-*`` options (defaults from ``OS_*``) and session options.

    keystoneauth1 picks the plugin, hence its options, from ``--os-auth-type``
    in ``argv`` (else ``OS_AUTH_TYPE``, else ``password``). An unknown type
    adds only ``--os-auth-type`` and is returned, not raised: commands that
    need no credentials still work, and logging in reports it.
    """
    try:
        ks_loading.register_auth_argparse_arguments(parser, argv, default=DEFAULT_AUTH_TYPE)
    except ks_exc.NoMatchingPlugin as exc:
        error = exception.InvalidConfiguration(
            f"authentication type {exc.name!r} (OS_AUTH_TYPE or --os-auth-type) is not a "
            "keystoneauth1 plugin; use e.g. 'password'")
    else:
        error = None
    ks_loading.register_session_argparse_arguments(parser)
    return error


def credentials_given(options: argparse.Namespace) -> bool:
    """True if any credential was given (so a partial set is an error, not 'none')."""
    return any(getattr(options, name, None) for name in _ANY_CREDENTIAL)


def missing_credentials(options: argparse.Namespace) -> list[str]:
    """Password credentials not given, each with how to give it ([] for other plugins)."""
    auth_type = getattr(options, "os_auth_type", None)
    if not isinstance(auth_type, str) or auth_type not in _PASSWORD_PLUGINS:
        return []  # other plugins: keystoneauth1 names what is missing
    return [
        f"{what} ({how})"
        for what, names, how in _CREDENTIALS
        if not any(getattr(options, name, None) for name in names)
    ]


def authenticate(options: argparse.Namespace) -> RequestContext:
    """Log in with the parsed ``--os-*`` options and capture who the caller is.

    :raises InvalidConfiguration: a credential is missing or the auth type unknown.
    :raises VTPMSecretForbidden: Keystone refused the credentials.
    :raises KeyManagerUnavailable: Keystone could not be reached.
    """
    missing = missing_credentials(options)
    if missing:
        raise exception.InvalidConfiguration(
            f"missing credentials: {'; '.join(missing)}. Source an openrc file or pass the "
            "--os-* options; the server's owner is the user who creates it"
        )
    try:
        auth = ks_loading.load_auth_from_argparse_arguments(options)
    except ks_exc.MissingRequiredOptions as exc:
        names = ", ".join("--os-" + opt.name for opt in exc.options)
        raise exception.InvalidConfiguration(f"missing credentials: {names}") from None
    except ks_exc.NoMatchingPlugin as exc:
        raise exception.InvalidConfiguration(
            f"authentication type {exc.name!r} is not a keystoneauth1 plugin"
        ) from None
    if auth is None:
        raise exception.InvalidConfiguration(
            "no credentials: set OS_AUTH_URL, OS_USERNAME, OS_PASSWORD, OS_PROJECT_NAME "
            "(and the domain variables) or the matching --os-* options"
        )
    session = ks_loading.load_session_from_argparse_arguments(options, auth=auth)
    return RequestContext.from_session(session)
