"""Configuration options (oslo.config).

``[libvirt]`` options keep Nova's names, types and defaults so an operator can
reuse a nova.conf; when Nova has registered them already in the same process,
Nova's definitions win (see :func:`register_opts`). ``[key_manager]`` says
where Barbican is, ``[service_user]`` holds the credentials used in
``deployment`` secret-security mode, ``[nova]`` how ``vtpm-driver audit``
reaches Nova's compute API where Nova is the orchestrator (``[vtpm]
orchestrator = nova``), and ``[vtpm]`` holds this plugin's own options.
"""

from __future__ import annotations

from collections.abc import Iterable

from keystoneauth1 import loading as ks_loading
from oslo_config import cfg

SECRET_SECURITY_MODES = ("user", "host", "deployment")

libvirt_group = cfg.OptGroup(
    "libvirt",
    title="libvirt options",
    help="How to reach libvirt and whether this host offers emulated TPMs.",
)

libvirt_opts = [
    cfg.StrOpt(
        "connection_uri",
        default="",
        help="""
libvirt URI to connect to.

Empty means the usual URI for ``virt_type`` (``qemu:///system`` for ``kvm`` and
``qemu``). Set it only when libvirt listens elsewhere, e.g.
``qemu:///session`` for an unprivileged daemon.

Related options:

* ``virt_type``: decides the default URI.
""",
    ),
    cfg.StrOpt(
        "virt_type",
        default="kvm",
        choices=("kvm", "lxc", "qemu", "parallels"),
        help="""
Virtualization (domain) type used for guests.

Emulated TPMs need ``kvm`` or ``qemu``; with any other value and
``swtpm_enabled = True`` the driver refuses to start. Use ``qemu`` (TCG) on
hosts whose ``/dev/kvm`` cannot run guests.

Related options:

* ``connection_uri``: depends on this.
* ``swtpm_enabled``.
""",
    ),
    cfg.BoolOpt(
        "swtpm_enabled",
        default=False,
        help="""
Enable emulated TPM (Trusted Platform Module) in guests.

When True the host checks at start-up that libvirt supports the ``emulator``
TPM backend and that ``swtpm``, ``swtpm_setup`` and ``swtpm_ioctl`` are
installed, then reports the ``COMPUTE_SECURITY_TPM_*`` traits it can honour.
When False every TPM trait is reported as unsupported, and the driver refuses
to start if servers with a vTPM are defined on this host.

Related options:

* ``virt_type`` must be ``kvm`` or ``qemu``.
* ``swtpm_user``, ``swtpm_group``, ``supported_tpm_secret_security``.
""",
    ),
    cfg.StrOpt(
        "swtpm_user",
        default="tss",
        help="""
User that the ``swtpm`` binary runs as.

libvirt runs ``swtpm`` as this user (``swtpm_user`` in libvirt's qemu.conf,
``tss`` by default). The driver checks that the user exists and uses it to
own TPM state files it moves (resize, cold migration).

Related options:

* ``swtpm_group`` must also be set.
""",
    ),
    cfg.StrOpt(
        "swtpm_group",
        default="tss",
        help="""
Group that the ``swtpm`` binary runs as.

See ``swtpm_user``; the driver checks that the group exists.

Related options:

* ``swtpm_user`` must also be set.
""",
    ),
    cfg.ListOpt(
        "supported_tpm_secret_security",
        default=list(SECRET_SECURITY_MODES),
        help="""
TPM secret security modes this host supports.

A mode absent from this list is reported as an unsupported trait, so servers
that request it are never scheduled here. Possible values:

* ``user``: the Barbican secret belongs to the server owner and is readable
  only by the owner; the libvirt secret is private and ephemeral (undefined as
  soon as the guest runs). Starting the guest needs the owner's credentials.
* ``host``: the Barbican secret belongs to the owner; the libvirt secret is
  persistent and readable by host administrators, so the guest can be
  restarted without the owner.
* ``deployment``: the Barbican secret belongs to the service user of
  ``[service_user]``; the libvirt secret is private and ephemeral.
""",
    ),
]

key_manager_group = cfg.OptGroup(
    "key_manager",
    title="Key manager (Barbican) options",
    help="Where the Barbican service that stores vTPM passphrases is.",
)

key_manager_opts = [
    cfg.URIOpt(
        "barbican_endpoint",
        help="""
Barbican endpoint URL, e.g. ``http://127.0.0.1:9311``.

When set, the driver sends a user's token straight to this URL with no
Keystone round trip. When unset, the endpoint is looked up in the service
catalog (type ``key-manager``) with ``barbican_endpoint_type`` and
``barbican_region_name``.
""",
    ),
    cfg.StrOpt(
        "barbican_endpoint_type",
        default="public",
        choices=("public", "internal", "admin"),
        help="Catalog interface used to find Barbican when ``barbican_endpoint`` is unset.",
    ),
    cfg.StrOpt(
        "barbican_region_name",
        help="Catalog region used to find Barbican when ``barbican_endpoint`` is unset.",
    ),
    cfg.FloatOpt(
        "timeout",
        default=10.0,
        min=0.1,
        help="""
Seconds to wait for Barbican (connect and each read) before giving up with
``KeyManagerUnavailable``. Bounds how long a spawn or start can hang while the
key manager is down.
""",
    ),
]

vtpm_group = cfg.OptGroup(
    "vtpm",
    title="vtpm-driver options",
    help="Options of the vtpm-driver plugin itself.",
)

vtpm_opts = [
    cfg.BoolOpt(
        "owner_only_acl",
        default=True,
        help="""
Make each vTPM Barbican secret readable only by its owner.

When True (the default) the secret's read ACL is set to ``project-access:
false`` with the owner as the only listed user, so other members of the
owner's project cannot read the passphrase. Nova leaves it readable by every
project member; set False to get Nova's behaviour.
""",
    ),
    cfg.StrOpt(
        "swtpm_state_dir",
        default="/var/lib/libvirt/swtpm",
        help="""
Directory where libvirt keeps swtpm state, one ``<domain-uuid>`` subdirectory
per guest. Used to clean up after deleted servers, by resize, rebuild and
off-host copies, and by ``vtpm-driver audit`` to find orphans. Must match
libvirt's ``swtpm`` state location on this host (the host of ``[libvirt]
connection_uri``), as seen from where vtpm-driver runs.
""",
    ),
    cfg.StrOpt(
        "console_log_dir",
        default="/var/lib/vtpm-driver/console",
        help="""
Directory for standalone servers' serial console logs when
``server create --console-log`` is not given.
""",
    ),
    cfg.StrOpt(
        "resize_backup_dir",
        default="/var/lib/vtpm-driver/resize",
        help="""
Directory where a resize keeps the old swtpm state and server record
(``<uuid>/``) until it is confirmed or reverted. Kept outside
``swtpm_state_dir`` so ``vtpm-driver audit`` does not report it as an orphan.
""",
    ),
    cfg.IntOpt(
        "guest_start_timeout",
        default=60,
        min=1,
        help="Seconds to wait for a guest to reach the running state after start.",
    ),
    cfg.StrOpt(
        "lock_path",
        default="/var/lib/vtpm-driver/locks",
        help="""
Directory of the per-server lock files (oslo.concurrency external locks, one
``vtpm-<uuid>`` file per server, with a ``.holder`` file naming the operation
and process that holds it). Every command and process acting on this host's
servers must use the same directory.
""",
    ),
    cfg.FloatOpt(
        "lock_timeout",
        default=60.0,
        min=0,
        help="""
Seconds an operation waits for another operation on the same server to
finish. When it is still running after that, the operation is refused
(``ServerLocked``, naming the operation that holds the server); 0 refuses at
once.
""",
    ),
]

#: The deployment's EK certificate authority (issue 22): :mod:`vtpm_driver.virt.manufacture`.
vtpm_opts.extend([
    cfg.StrOpt(
        "ek_ca_certificate",
        help="""
PEM certificate of the CA that signs every new vTPM's endorsement key (EK) and
platform certificates (with ``ek_ca_key``). When set, the driver manufactures
each new TPM itself (``swtpm_setup`` with ``swtpm_localca``, as libvirt would,
before the first start), publishes the EK certificate for the owner (a
Barbican certificate secret beside the passphrase, and ``server show``) and
``host check`` verifies the CA. Unset: libvirt manufactures with the host's
``/etc/swtpm_setup.conf`` (Debian's signs with a CA made up on each host) and
nothing is published.
""",
    ),
    cfg.StrOpt(
        "ek_ca_key",
        help="""
The unencrypted PEM private key of ``ek_ca_certificate``. Read by root only
(``swtpm_setup`` runs as root); keep it 0600 root.
""",
    ),
    cfg.StrOpt(
        "ek_ca_dir",
        default="/var/lib/vtpm-driver/ek-ca",
        help="""
Where ``swtpm_localca``'s configuration and certificate serial counter for
``ek_ca_certificate`` are kept (root, 0700).
""",
    ),
])

#: Off-host copies of the TPM state (issue 15): :mod:`vtpm_driver.statestore`.
STATE_BACKUP_MODES = ("off", "on-stop", "periodic")

vtpm_opts.extend([
    cfg.StrOpt(
        "state_backup_dir",
        default="/var/lib/vtpm-driver/state-store",
        help="""
Where off-host copies of servers' TPM state are kept (one ``<uuid>/``
directory per server: the swtpm state as swtpm wrote it, encrypted with the
server's passphrase, its server record and ``meta.json``). It stands in for
object storage: it must be reachable from every compute host and survive any
one of them (shared or replicated storage, not a host's local disk).
Root-only (0700/0600). Used by Nova's shelve/unshelve and evacuation (through
the shim) and by ``state_backup``.
""",
    ),
    cfg.StrOpt(
        "state_backup",
        default="off",
        choices=STATE_BACKUP_MODES,
        help="""
When a server's TPM state is copied to ``state_backup_dir`` (Nova's shelve
always copies it). ``off``: never otherwise, so Nova's evacuation is refused.
``on-stop``: at every clean stop and suspend. ``periodic``: as on-stop, and
``vtpm-driver state backup`` (run it from cron) refreshes copies older than
``state_backup_interval``, running servers included.
""",
    ),
    cfg.IntOpt(
        "state_backup_interval",
        default=3600,
        min=60,
        help="""
With ``state_backup = periodic``: seconds after which ``vtpm-driver state
backup`` refreshes a server's copy; ``vtpm-driver audit`` reports older
copies as stale.
""",
    ),
    cfg.BoolOpt(
        "allow_stale_tpm_state",
        default=False,
        help="""
Let Nova's evacuation restore a copy of the TPM state that may be older
than the TPM the server last ran with (taken while it ran, or before it was
started again). SECURITY: the TPM goes back in time: NV counters and indices,
dictionary-attack lockout, sealed data and keys created since come back as
they were or are lost, so rollback protections built on the TPM are
defeated. False (the default) refuses such an evacuation, naming this option
and the copy's age. It also lets an operator accept a copy whose custody
generation is not the server's current one (a start, restore or resize
revert otherwise refused with StaleTPMState, e.g. after an interrupted
hand-over); each such acceptance is logged. Set it only for that operation.
""",
    ),
])

#: Who decides where each server lives (issue 20): ``none``, this libvirt host alone
#: (the standalone command line); ``nova``, Nova, asked by ``audit`` through ``[nova]``.
ORCHESTRATORS = ("none", "nova")

vtpm_opts.append(cfg.StrOpt(
    "orchestrator",
    default="none",
    choices=ORCHESTRATORS,
    help="""
Who decides where each server lives, and so whether ``vtpm-driver audit
--repair`` may call a server gone from what this host alone sees.

* ``none``: a standalone host; a server without a domain here is gone.
* ``nova``: Nova's computes (the ``nova.virt.vtpm`` shim). A server Nova
  shelved-offloaded, or runs on another compute, has no domain here, so
  before deleting a Barbican secret, an off-host copy or a state directory
  the audit asks Nova's compute API (``[nova]``, admin credentials, every
  project, soft-deleted servers included) which servers exist; what belongs
  to one of them is kept. When Nova cannot be asked (no credentials, an
  error, a timeout) the repair deletes none of those three kinds.

Set it explicitly: a missing or broken ``[nova]`` then refuses the deletions
instead of silently falling back to ``none``.

Related options:

* ``[nova]``: the credentials and endpoint used to ask Nova.
""",
))

NOVA_GROUP = "nova"
#: How long ``audit`` waits for Keystone and Nova when ``[nova] timeout`` is unset.
NOVA_DEFAULT_TIMEOUT = 30.0

nova_group = cfg.OptGroup(
    NOVA_GROUP,
    title="Nova API options",
    help="""
How ``vtpm-driver audit`` reaches Nova's compute API when ``[vtpm]
orchestrator = nova``: keystoneauth1 auth options (``auth_type``,
``auth_url``, ``username``, ``password``, ``project_name``,
``user_domain_name``, ``project_domain_name``...) of a user with the admin
role (it lists the servers of every project, soft-deleted included), session
options (TLS, ``timeout``, default 30 s) and adapter options (``region_name``,
``valid_interfaces``, ``endpoint_override``; the endpoint comes from the
catalog, service type ``compute``), as in cinder.conf's or neutron.conf's
``[nova]``.
""",
)


def _nova_adapter_opts() -> list[cfg.Opt]:
    """keystoneauth1's adapter options with Nova's defaults (as nova.conf.utils does)."""
    opts = ks_loading.get_adapter_conf_options(include_deprecated=False)
    cfg.set_defaults(opts, service_type="compute", valid_interfaces=["internal", "public"])
    return opts


def _nova_opts() -> list[cfg.Opt]:
    return (
        ks_loading.get_session_conf_options()
        + ks_loading.get_auth_common_conf_options()
        + ks_loading.get_auth_plugin_conf_options("password")
        + _nova_adapter_opts()
    )


SERVICE_USER_GROUP = "service_user"

service_user_group = cfg.OptGroup(
    SERVICE_USER_GROUP,
    title="Service user options",
    help="""
Credentials of the service user that owns vTPM secrets in ``deployment``
secret-security mode (keystoneauth1 options, as in nova.conf's
``[service_user]``: ``auth_type``, ``auth_url``, ``username``, ``password``,
``project_name``, ``user_domain_name``, ``project_domain_name``...).
""",
)


def _service_user_opts() -> list[cfg.Opt]:
    return (
        ks_loading.get_session_conf_options()
        + ks_loading.get_auth_common_conf_options()
        + ks_loading.get_auth_plugin_conf_options("password")
    )


def _register(conf: cfg.ConfigOpts, group: cfg.OptGroup, opts: Iterable[cfg.Opt]) -> None:
    """Register ``opts``, keeping an identically named option already there.

    Nova registers ``[libvirt] swtpm_enabled`` & co. with its own help text;
    oslo.config would raise ``DuplicateOptError`` for ours. The names, types
    and defaults are the same, so the first registration wins.
    """
    # A fresh OptGroup per ConfigOpts: register_group keeps a shallow copy of the
    # object it is given, whose _opts dict (where overrides and defaults live)
    # would otherwise be shared by every conf that new_conf() returns.
    if group.name not in conf:
        conf.register_group(cfg.OptGroup(group.name, title=group.title, help=group.help))
    for opt in opts:
        try:
            conf.register_opt(opt, group=group.name)
        except cfg.DuplicateOptError:
            continue


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register every vtpm-driver option on ``conf``."""
    _register(conf, libvirt_group, libvirt_opts)
    _register(conf, key_manager_group, key_manager_opts)
    _register(conf, vtpm_group, vtpm_opts)
    if SERVICE_USER_GROUP not in conf:
        conf.register_group(cfg.OptGroup(SERVICE_USER_GROUP, title=service_user_group.title,
                                          help=service_user_group.help))
    ks_loading.register_session_conf_options(conf, SERVICE_USER_GROUP)
    ks_loading.register_auth_conf_options(conf, SERVICE_USER_GROUP)
    if NOVA_GROUP not in conf:
        conf.register_group(cfg.OptGroup(NOVA_GROUP, title=nova_group.title,
                                          help=nova_group.help))
    ks_loading.register_session_conf_options(conf, NOVA_GROUP)
    ks_loading.register_auth_conf_options(conf, NOVA_GROUP)
    for opt in _nova_adapter_opts():
        try:
            conf.register_opt(opt, group=NOVA_GROUP)
        except cfg.DuplicateOptError:
            continue


def list_opts() -> list[tuple[cfg.OptGroup, list[cfg.Opt]]]:
    """The ``oslo.config.opts`` entry point (sample config generator)."""
    return [
        (libvirt_group, list(libvirt_opts)),
        (key_manager_group, list(key_manager_opts)),
        (service_user_group, _service_user_opts()),
        (nova_group, _nova_opts()),
        (vtpm_group, list(vtpm_opts)),
    ]


def libvirt_uri(conf: cfg.ConfigOpts) -> str:
    """The URI to connect to: ``connection_uri`` or the default for ``virt_type``."""
    if conf.libvirt.connection_uri:
        return conf.libvirt.connection_uri
    return {
        "kvm": "qemu:///system",
        "qemu": "qemu:///system",
        "lxc": "lxc:///",
        "parallels": "parallels:///system",
    }[conf.libvirt.virt_type]


def new_conf(args: list[str] | None = None, config_files: list[str] | None = None
             ) -> cfg.ConfigOpts:
    """A fresh ``ConfigOpts`` with our options registered and parsed."""
    conf = cfg.ConfigOpts()
    register_opts(conf)
    conf(args or [], project="vtpm-driver", default_config_files=config_files or [])
    return conf
