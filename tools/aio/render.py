"""Write the all-in-one cloud's configuration into its state directory.

Run by ``tools/openstack-aio.sh`` with the AIO virtualenv. Service passwords
(Keystone users nova/placement/glance, the RabbitMQ user) are generated on the
first run and then only read; everything else is rewritten on every run from
this file, so the configuration always matches the script.

``render.py --print-password NAME`` prints one stored password on stdout, so
the shell can hand it to ``rabbitmqctl`` on standard input instead of the
command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stacklib import KEYSTONE_URL, REGION, stack_dir, write_private
from stacklib import load_passwords as _load_passwords

RABBIT_HOST = "127.0.0.1:5672"
RABBIT_USER = "nova"
RABBIT_VHOST = "nova"
# MariaDB (tools/openstack-aio.sh runs its own server on 127.0.0.1:3306).
DB_HOST = "127.0.0.1:3306"
DB_USER = "aio"
DATABASES = ("nova_api", "nova", "nova_cell0", "placement", "glance")
ENDPOINTS = {
    # service type -> (service name, public URL)
    "compute": ("nova", "http://127.0.0.1:8774/v2.1"),
    "placement": ("placement", "http://127.0.0.1:8778"),
    "image": ("glance", "http://127.0.0.1:9292"),
}
# Keystone users this cloud owns (all in project "service"); "rabbit" is RabbitMQ's,
# "mariadb" the database user's.
PASSWORD_NAMES = ("nova", "placement", "glance", "rabbit", "mariadb")
# Clouds copied from the keymgr stack's clouds.yaml (same Keystone, same users).
CLOUDS = ("owner", "member", "other", "admin")
# The first compute ("vtpm-aio") drives the system libvirtd; these drive the private
# test hosts of tools/test-hosts.sh, one each: name -> its libvirtd's TCP port. Each runs
# inside its host's mount namespace (its /var/lib/libvirt, /run/libvirt), so [libvirt]
# connection_uri stays qemu:///system.
LIBVIRT_PORT = {"host-a": 16611, "host-b": 16612, "host-c": 16613, "host-d": 16614}
MULTIHOST = tuple(LIBVIRT_PORT)
# Availability zones: servers created without one land on "vtpm-aio" (what the
# single-host tests expect); each pair of test hosts forms a zone of its own, so that
# a move's only choice is the other host of the pair.
DEFAULT_ZONE = "vtpm-aio"
MULTIHOST_ZONE = "vtpm-multihost"
SECOND_PAIR_ZONE = "vtpm-multihost-2"
#: Under ``<aio>/data``: the AIO's deployment EK CA (ca.pem, ca.key) and swtpm_localca's work.
EK_CA_DIR = "ek-ca"
PAIR_ZONES = {MULTIHOST_ZONE: ("host-a", "host-b"), SECOND_PAIR_ZONE: ("host-c", "host-d")}


def pair_peer(host: str) -> str:
    """The other test host of ``host``'s pair, where its live migrations go."""
    (peer,) = [h for pair in PAIR_ZONES.values() if host in pair for h in pair if h != host]
    return peer

def aio_dir() -> Path:
    return Path(os.environ.get("VTPM_AIO_DIR", "/var/lib/vtpm-driver/aio"))


def load_passwords(root: Path) -> dict[str, str]:
    """This cloud's stored passwords; missing ones are generated once and saved."""
    return _load_passwords(root, PASSWORD_NAMES)


def ini(sections: dict[str, dict[str, object]]) -> str:
    """oslo.config INI text from nested dicts (booleans as True/False)."""
    out = ["# Written by tools/openstack-aio.sh (tools/aio/render.py): do not edit.\n"]
    for section, opts in sections.items():
        out.append(f"[{section}]")
        out.extend(f"{key} = {value}" for key, value in opts.items())
        out.append("")
    return "\n".join(out)


def authtoken(user: str, password: str) -> dict[str, object]:
    """keystonemiddleware / keystoneauth password options for a service user."""
    return {
        "www_authenticate_uri": KEYSTONE_URL,
        "auth_url": KEYSTONE_URL,
        "auth_type": "password",
        "username": user,
        "password": password,
        "project_name": "service",
        "user_domain_name": "Default",
        "project_domain_name": "Default",
        "region_name": REGION,
    }


def db_url(pw: dict[str, str], database: str) -> str:
    """SQLAlchemy URL of one of this cloud's MariaDB databases (PyMySQL driver).

    Nova derives cell0's URL from ``[database] connection`` (``nova`` ->
    ``nova_cell0``), so the password never has to go on a command line.
    """
    return f"mysql+pymysql://{DB_USER}:{pw['mariadb']}@{DB_HOST}/{database}?charset=utf8"


def nova_conf(root: Path, pw: dict[str, str], compute_driver: str, debug: bool) -> str:
    venv = root / "venv"
    helper = f"{venv}/bin/privsep-helper --config-file {root}/etc/nova/nova.conf"
    ksa = authtoken("nova", pw["nova"])
    client = {**{k: v for k, v in ksa.items() if k != "www_authenticate_uri"}}
    return ini(
        {
            "DEFAULT": {
                "host": "vtpm-aio",
                "my_ip": "127.0.0.1",
                "debug": debug,
                "state_path": root / "nova",
                "instances_path": root / "instances",
                "transport_url": (
                    f"rabbit://{RABBIT_USER}:{pw['rabbit']}@{RABBIT_HOST}/{RABBIT_VHOST}"
                ),
                "compute_driver": compute_driver,
                "enabled_apis": "osapi_compute",
                # No Neutron here: the periodic cache refresh would only ask it.
                "heal_instance_info_cache_interval": -1,
                "use_rootwrap_daemon": False,
                "shutdown_timeout": 5,
                "graceful_shutdown_timeout": 10,
                "instance_build_timeout": 600,
                "resume_guests_state_on_host_boot": False,
                "update_resources_interval": 60,
                "default_schedule_zone": DEFAULT_ZONE,
            },
            "api": {"auth_strategy": "keystone"},
            "api_database": {"connection": db_url(pw, "nova_api")},
            "database": {"connection": db_url(pw, "nova")},
            "keystone_authtoken": {**ksa, "service_token_roles_required": True},
            "placement": client,
            "glance": {"region_name": REGION, "valid_interfaces": "public"},
            "neutron": {
                **client,
                "region_name": REGION,
                "endpoint_override": "http://127.0.0.1:9696",
            },
            "service_user": {**client, "send_service_user_token": False},
            # castellan (Nova's own libvirt driver) reads backend + [barbican]; the
            # vtpm-driver shim reads barbican_endpoint* from [key_manager].
            "key_manager": {
                "backend": "barbican",
                "barbican_endpoint": "http://127.0.0.1:9311",
                "barbican_endpoint_type": "public",
                "barbican_region_name": REGION,
            },
            "barbican": {
                "auth_endpoint": KEYSTONE_URL,
                "barbican_endpoint_type": "public",
                "barbican_region_name": REGION,
            },
            "libvirt": {
                "virt_type": "qemu",
                "connection_uri": "qemu:///system",
                "cpu_mode": "none",
                "swtpm_enabled": True,
                "hw_machine_type": "x86_64=q35",
                "wait_soft_reboot_seconds": 10,
            },
            "compute": {"consecutive_build_service_disable_threshold": 0},
            # The shim's off-host TPM state copies (nova/virt/vtpm/offhost.py): a
            # directory every compute sees stands in for object storage; a copy at
            # every stop, so that a server of a dead compute can be evacuated.
            "vtpm": {"state_backup": "on-stop", "state_backup_dir": root / "state-store"},
            "conductor": {"workers": 1},
            "scheduler": {"workers": 1, "discover_hosts_in_cells_interval": -1},
            "filter_scheduler": {"track_instance_changes": False},
            "vnc": {"enabled": False},
            "spice": {"enabled": False},
            "serial_console": {"enabled": False},
            "oslo_messaging_notifications": {"driver": "noop"},
            "oslo_concurrency": {"lock_path": root / "nova" / "locks"},
            "nova_sys_admin": {"helper_command": helper},
            "privsep_osbrick": {"helper_command": helper},
            "vif_plug_linux_bridge_privileged": {"helper_command": helper},
            "vif_plug_ovs_privileged": {"helper_command": helper},
            "wsgi": {"api_paste_config": root / "etc" / "nova" / "api-paste.ini"},
        }
    )


def compute_host_conf(root: Path, host: str) -> str:
    """What a test host's nova-compute changes in nova.conf (read after it).

    * its own ``host`` and ``state_path`` (Nova keeps the compute node's UUID in
      ``state_path/compute_id``; two services sharing it would be one node);
    * live migration on loopback, with both hosts on 127.0.0.1: the destination's
      libvirtd is named by port (``live_migration_uri``, as ``%s`` is the
      destination's ``live_migration_inbound_addr``, 127.0.0.1) and the data goes
      through that libvirtd connection (``live_migration_tunnelled``). Nova's
      native transport would give QEMU ``tcp://127.0.0.1`` but no listen address,
      so the destination QEMU would listen on every address (and libvirt refuses
      a loopback ``migration_address``): see
      ../shared/notes/two-hosts-on-one-machine.md. Both options are deprecated
      in Nova; this pairing only works within a pair, which is all this is for.

    ``instances_path`` is the shared one of nova.conf: Nova takes a destination
    with the same ``my_ip`` for shared storage (cold migration copies locally,
    live migration needs no block migration), so it must be.

    The first pair (host-a, host-b) also manufactures each new TPM with the
    deployment's EK CA that ``openstack-aio.sh`` makes in ``data/ek-ca``
    (``[vtpm] ek_ca_*``, :mod:`vtpm_driver.virt.manufacture`).
    """
    peer = LIBVIRT_PORT[pair_peer(host)]
    ek_ca = root / "data" / EK_CA_DIR
    vtpm = ({"ek_ca_certificate": ek_ca / "ca.pem", "ek_ca_key": ek_ca / "ca.key",
             "ek_ca_dir": ek_ca / "work"} if host in PAIR_ZONES[MULTIHOST_ZONE] else {})
    return ini(
        {
            "DEFAULT": {"host": host, "state_path": root / f"nova-{host}"},
            **({"vtpm": vtpm} if vtpm else {}),
            "libvirt": {
                "connection_uri": "qemu:///system",
                "live_migration_inbound_addr": "127.0.0.1",
                "live_migration_uri": f"qemu+tcp://%s:{peer}/system",
                "live_migration_tunnelled": True,
            },
        }
    )


def placement_conf(root: Path, pw: dict[str, str], debug: bool) -> str:
    return ini(
        {
            "DEFAULT": {"debug": debug, "log_file": root / "logs" / "placement-api.log"},
            "api": {"auth_strategy": "keystone"},
            "placement_database": {
                "connection": db_url(pw, "placement"),
            },
            "keystone_authtoken": authtoken("placement", pw["placement"]),
            "oslo_concurrency": {"lock_path": root / "placement" / "locks"},
        }
    )


def glance_conf(root: Path, pw: dict[str, str], debug: bool) -> str:
    gdata = root / "data" / "glance"
    return ini(
        {
            "DEFAULT": {
                "debug": debug,
                "log_file": root / "logs" / "glance-api.log",
                "enabled_backends": "file:file",
                "worker_self_reference_url": ENDPOINTS["image"][1],
                "image_cache_dir": gdata / "cache",
                "show_image_direct_url": False,
                "workers": 1,
            },
            "database": {"connection": db_url(pw, "glance")},
            "glance_store": {"default_backend": "file"},
            "file": {"filesystem_store_datadir": f"{gdata / 'images'}/"},
            "os_glance_staging_store": {"filesystem_store_datadir": f"{gdata / 'staging'}/"},
            "os_glance_tasks_store": {"filesystem_store_datadir": f"{gdata / 'tasks'}/"},
            "keystone_authtoken": authtoken("glance", pw["glance"]),
            "paste_deploy": {
                "flavor": "keystone",
                "config_file": root / "etc" / "glance" / "glance-api-paste.ini",
            },
            "oslo_concurrency": {"lock_path": root / "glance" / "locks"},
        }
    )


def rabbitmq_conf() -> str:
    host, port = RABBIT_HOST.split(":")
    return (
        "# Written by tools/openstack-aio.sh: RabbitMQ for the all-in-one cloud.\n"
        f"listeners.tcp.default = {host}:{port}\n"
        "log.file.level = warning\n"
        "disk_free_limit.absolute = 50MB\n"
    )


def clouds_files(root: Path) -> dict[Path, str]:
    """clouds.yaml and openrc-<cloud> for the clouds this cloud's users need."""
    src = yaml.safe_load((stack_dir() / "clouds.yaml").read_text())["clouds"]
    clouds = {name: src[name] for name in CLOUDS}
    header = "# Written by tools/openstack-aio.sh: the all-in-one cloud, do not edit.\n"
    files = {root / "clouds.yaml": header + yaml.safe_dump({"clouds": clouds})}
    for name, cloud in clouds.items():
        auth = cloud["auth"]
        lines = [
            f"# Credentials for cloud '{name}' of the vtpm-driver all-in-one cloud.",
            f"export OS_AUTH_URL={auth['auth_url']}",
            f"export OS_USERNAME={auth['username']}",
            f"export OS_PASSWORD='{auth['password']}'",
            f"export OS_PROJECT_NAME={auth['project_name']}",
            f"export OS_USER_DOMAIN_NAME={auth['user_domain_name']}",
            f"export OS_PROJECT_DOMAIN_NAME={auth['project_domain_name']}",
            "export OS_IDENTITY_API_VERSION=3",
            f"export OS_REGION_NAME={cloud.get('region_name', REGION)}",
            "export OS_INTERFACE=public",
        ]
        files[root / f"openrc-{name}"] = "\n".join(lines) + "\n"
    return files


#: vtpm-driver's nova-api component (nova/virt/vtpm/README.rst, "Through Nova's API").
VTPM_PASTE_FILTER = "[filter:vtpm]\npaste.filter_factory = nova.virt.vtpm.api:filter_factory\n"


def api_paste_with_vtpm(stock: str) -> str:
    """Nova's api-paste.ini with the ``vtpm`` filter last before the v2.1 app, as an
    operator adds it: in both keystone pipelines (the v2.1 and the legacy v2 one).

    :raises ValueError: Nova's file no longer has the two pipelines.
    """
    app = " osapi_compute_app_v21\n"
    lines = stock.splitlines(keepends=True)
    pipelines = [i for i, line in enumerate(lines)
                 if line.startswith("keystone =") and line.endswith(app)]
    if len(pipelines) != 2:
        raise ValueError(f"api-paste.ini: expected 2 keystone pipelines ending in "
                         f"osapi_compute_app_v21, found {len(pipelines)}")
    for i in pipelines:
        lines[i] = lines[i][: -len(app)] + " vtpm" + app
    return "".join(lines) + "\n" + VTPM_PASTE_FILTER


def config_files(root: Path, compute_driver: str, debug: bool) -> dict[Path, str]:
    """Every file this script owns, path -> content."""
    pw = load_passwords(root)
    etc = root / "etc"
    venv_etc = root / "venv" / "etc"
    nova_paste = (venv_etc / "nova" / "api-paste.ini").read_text()
    files = {
        etc / "nova" / "nova.conf": nova_conf(root, pw, compute_driver, debug),
        **{etc / "nova" / f"compute-{h}.conf": compute_host_conf(root, h) for h in MULTIHOST},
        etc / "placement" / "placement.conf": placement_conf(root, pw, debug),
        etc / "glance" / "glance-api.conf": glance_conf(root, pw, debug),
        root / "rabbitmq" / "rabbitmq.conf": rabbitmq_conf(),
        root / "rabbitmq" / "enabled_plugins": "[].\n",
        # Paste pipelines as the packages ship them (the WSGI apps read them from
        # their config directory); nova-api's with our component, and a second
        # nova-api (nova-api-plain, the tests' "without the component") as shipped.
        etc / "nova" / "api-paste.ini": api_paste_with_vtpm(nova_paste),
        etc / "nova" / "api-paste-plain.ini": nova_paste,
        etc / "glance" / "glance-api-paste.ini": (
            venv_etc / "glance" / "glance-api-paste.ini"
        ).read_text(),
    }
    files.update(clouds_files(root))
    return files


def stale(files: dict[Path, str]) -> list[Path]:
    """Files whose content on disk differs from what they should hold."""
    out = []
    for path, text in files.items():
        try:
            if path.read_text() != text:
                out.append(path)
        except OSError:
            out.append(path)
    return out


def render(root: Path, compute_driver: str, debug: bool) -> None:
    for d in (
        "data/glance/images",
        "data/glance/staging",
        "data/glance/tasks",
        "data/glance/cache",
        "nova/locks",
        *(f"nova-{h}" for h in MULTIHOST),
        "placement/locks",
        "glance/locks",
        "logs",
        "run",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    files = config_files(root, compute_driver, debug)
    for path in stale(files):
        write_private(path, files[path])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print-password", metavar="NAME", choices=PASSWORD_NAMES)
    parser.add_argument("--compute-driver", default="libvirt.LibvirtDriver")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument(
        "--check", action="store_true", help="exit 1, naming them, if files are out of date"
    )
    args = parser.parse_args(argv)
    root = aio_dir()
    if args.print_password:
        sys.stdout.write(load_passwords(root)[args.print_password])
        return 0
    if args.check:
        out_of_date = stale(config_files(root, args.compute_driver, args.debug))
        for path in out_of_date:
            print(f"[openstack-aio] out of date: {path}")
        return 1 if out_of_date else 0
    render(root, args.compute_driver, args.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
