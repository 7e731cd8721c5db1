"""Migration benchmark: live and cold migration between the two test hosts.

In ONE run, on host-a and host-b of ``tools/test-hosts.sh``: a running server
with a vTPM (``user`` mode, the owner's credentials: the passphrase is read
from Barbican once per move) and the same server without one are live-migrated
A->B->A ``runs`` times through ``ServerService.migrate`` (one shared, warm
``HostSet``), interleaved with raw-libvirt copies of the same guest (with and
without ``<tpm>``) moved by a bare ``migrateToURI3`` with the same flags: the
floor no driver code can beat. Then ``runs`` cold migrations (+ revert) each.
Reported: medians, vTPM/no-TPM ratios and the vTPM's share, the driver's own
time outside libvirt's migration, and ours against the floor. Targets:
:mod:`bench.targets`; reading it: ``bench/README.md``.

``python -m bench.migrate_bench [RUNS] [--fresh-hosts]`` prints the section as
JSON (``--fresh-hosts``: a new ``HostSet`` per call, as one CLI command each).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: What ``tools/test-hosts.sh start`` writes: ``[vtpm] hosts`` (host-a, host-b) and
#: ``host_state_dirs`` (each host's swtpm directory as seen from here).
HOSTS_CONF = Path(os.environ.get("VTPM_HOSTS_DIR", "/var/lib/vtpm-driver/hosts"),
                  "vtpm-driver.conf")
GUEST_DIR = Path(os.environ.get("VTPM_GUEST_DIR", "/var/cache/vtpm-driver/guest"))
VTPM_SPECS = {"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}
#: :func:`bench_conf`'s temporary directory (console logs): ``<tmp>/<prefix>XXXXXXXX``.
WORKDIR_PREFIX = "vtpm-bench-migrate-"


class MigrateUnavailable(RuntimeError):
    """The test hosts or the guest are missing: the section is skipped."""


def check_available() -> None:
    rc = subprocess.run(["bash", str(REPO / "tools" / "test-hosts.sh"), "status"],
                        capture_output=True, timeout=60, check=False).returncode
    if rc != 0:
        raise MigrateUnavailable("test hosts not running (tools/test-hosts.sh start)")
    if not HOSTS_CONF.is_file():
        raise MigrateUnavailable(f"no {HOSTS_CONF} (tools/test-hosts.sh start writes it)")
    if not (GUEST_DIR / "vmlinuz").exists():
        raise MigrateUnavailable(f"no test guest in {GUEST_DIR} (tools/build-guest.sh)")


SERVICE_KEYS = ("auth_url", "username", "password", "project_name", "user_domain_name",
                "project_domain_name")


def bench_conf(service: dict[str, str] | None = None) -> Any:
    """The driver configuration for both test hosts (``service``: the service user's
    credentials, for ``deployment`` mode): :data:`HOSTS_CONF`, the hosts and their
    swtpm directories as the script that made them says (with several hosts the
    driver refuses a host whose directory it is not told).

    The console logs go to a new temporary directory: the caller removes it with
    :func:`remove_workdir` when done.
    """
    from keystoneauth1 import loading as ks_loading

    from vtpm_driver import conf as vtpm_conf

    conf = vtpm_conf.new_conf(config_files=[str(HOSTS_CONF)])
    conf.set_override("virt_type", "qemu", group="libvirt")
    conf.set_override("swtpm_enabled", True, group="libvirt")
    conf.set_override("guest_start_timeout", 240, group="vtpm")
    workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
    os.chmod(workdir, 0o755)
    conf.set_override("console_log_dir", str(workdir), group="vtpm")
    if service:
        group = vtpm_conf.SERVICE_USER_GROUP
        conf.register_opts(ks_loading.get_auth_plugin_conf_options("password"), group=group)
        conf.set_override("auth_type", "password", group=group)
        for key in SERVICE_KEYS:
            conf.set_override(key, service[key], group=group)
    return conf


def remove_workdir(conf: Any) -> None:
    """Remove the temporary directory :func:`bench_conf` made (``[vtpm]
    console_log_dir``) and what is in it; idempotent. Anything else, a directory
    not named ``WORKDIR_PREFIX*`` directly in the temporary directory or a
    symlink, is left alone."""
    path = Path(conf.vtpm.console_log_dir)
    if (path.parent != Path(tempfile.gettempdir()) or path.is_symlink()
            or not path.name.startswith(WORKDIR_PREFIX)):
        return
    shutil.rmtree(path, ignore_errors=True)


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


class _LibvirtClock:
    """Seconds spent inside ``virt.migrate.migrate`` (libvirt's migrateToURI3) per call.

    Installed for the whole run; the rest of a ``ServerService.migrate`` call
    is the driver's own time (lookups, checks, Barbican, secrets, clean-up).
    """

    def __init__(self) -> None:
        self.last = 0.0

    @contextlib.contextmanager
    def installed(self) -> Iterator[_LibvirtClock]:
        from vtpm_driver.virt import migrate as virt_migrate

        original = virt_migrate.migrate

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.last = time.perf_counter() - t0

        virt_migrate.migrate = timed
        try:
            yield self
        finally:
            virt_migrate.migrate = original


# --------------------------------------------------------------------------- raw floor

#: What ``vtpm_driver.virt.migrate`` passes for a live move, spelled out here so
#: the floor runs no vtpm-driver code at all.
def _raw_flags() -> int:
    import libvirt

    return (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
            | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)


def _raw_params() -> dict[str, str]:
    import libvirt

    return {libvirt.VIR_MIGRATE_PARAM_URI: "tcp://127.0.0.1",
            libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: "127.0.0.1"}


class RawGuests:
    """Two copies of the benchmark's vTPM guest made with libvirt only: one with its
    ``<tpm>`` (secret defined on both hosts the whole time), one without.

    Their XML is the driver's domain XML of the same guest with a new name and
    UUID, no ``<metadata>`` and a console file of their own, so the floor moves
    exactly the guest our path moves, without any of our steps.
    """

    def __init__(self, xml: str, workdir: Path, uris: dict[str, str]) -> None:
        import libvirt

        self.uris = dict(uris)
        self.conns = {name: libvirt.open(uri) for name, uri in self.uris.items()}
        self.where: dict[str, str] = {}
        self.secret_uuid = str(uuid.uuid4())
        self.passphrase = base64.b64encode(os.urandom(384))
        self._xml = {"vtpm": self._clone(xml, "vtpm", workdir, keep_tpm=True),
                     "no_tpm": self._clone(xml, "no_tpm", workdir, keep_tpm=False)}

    def _clone(self, xml: str, kind: str, workdir: Path, *, keep_tpm: bool) -> str:
        from lxml import etree

        root = etree.fromstring(xml)
        name = f"vtpm-bench-raw-{kind}-{uuid.uuid4().hex[:6]}"
        root.find("name").text = name
        root.find("uuid").text = str(uuid.uuid4())
        for tag in ("metadata", "description"):
            for node in root.findall(tag):
                root.remove(node)
        for source in root.findall("./devices/serial/source"):
            source.set("path", str(workdir / f"{name}.log"))
        devices = root.find("devices")
        for tpm in devices.findall("tpm"):
            if keep_tpm:
                for enc in tpm.iter("encryption"):
                    enc.set("secret", self.secret_uuid)
            else:
                devices.remove(tpm)
        return etree.tostring(root, encoding="unicode")

    def start(self) -> None:
        """Secret on both hosts, both guests defined and running on host-a."""
        secret_xml = (f"<secret ephemeral='no' private='yes'><uuid>{self.secret_uuid}</uuid>"
                      f"<usage type='vtpm'><name>vtpm-bench-raw-{self.secret_uuid}</name>"
                      "</usage></secret>")
        for conn in self.conns.values():
            conn.secretDefineXML(secret_xml).setValue(self.passphrase)
        for kind, xml in self._xml.items():
            self.conns["host-a"].defineXML(xml).create()
            self.where[kind] = "host-a"

    def migrate(self, kind: str, dest: str) -> float:
        """Seconds of one ``migrateToURI3`` of guest ``kind`` to ``dest``."""
        import libvirt
        from lxml import etree

        name = etree.fromstring(self._xml[kind]).find("name").text
        dom = self.conns[self.where[kind]].lookupByName(name)
        t0 = time.perf_counter()
        dom.migrateToURI3(self.uris[dest], _raw_params(), _raw_flags())
        elapsed = time.perf_counter() - t0
        self.where[kind] = dest
        assert self.conns[dest].lookupByName(name).state()[0] == libvirt.VIR_DOMAIN_RUNNING
        return elapsed

    def cleanup(self) -> list[str]:
        """Both guests (with their swtpm state) and the secret gone from both hosts."""
        import libvirt
        from lxml import etree

        problems = []
        for xml in self._xml.values():
            name = etree.fromstring(xml).find("name").text
            for host, conn in self.conns.items():
                try:
                    dom = conn.lookupByName(name)
                except libvirt.libvirtError:
                    continue
                try:
                    if dom.isActive():
                        dom.destroy()
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_TPM)
                except libvirt.libvirtError as exc:
                    problems.append(f"{name} on {host}: {exc}")
        for conn in self.conns.values():
            try:
                conn.secretLookupByUUIDString(self.secret_uuid).undefine()
            except libvirt.libvirtError:
                pass
            conn.close()
        return problems


# --------------------------------------------------------------------------- the run


def run(ctx: Any, runs: int = 3, conf: Any = None, *, fresh_hosts: bool = False) -> dict:
    """Live (ours and raw libvirt) and cold migrations, with and without a vTPM.

    Every round visits all kinds in an order rotated by the round number, so
    other load on the machine lands on all of them alike. Our calls share one
    :class:`~vtpm_driver.hosts.HostSet` (warm connections, as a long-running
    service; both kinds alike) after one untimed move each way. ``fresh_hosts``:
    every call gets its own ``HostSet`` instead (new connections, as one CLI
    command per process would, minus the process start). Without ``conf``, the
    one of :func:`bench_conf`, its temporary directory removed at the end.
    """
    if conf is not None:
        return _run(ctx, runs, conf, fresh_hosts)
    conf = bench_conf()
    try:
        return _run(ctx, runs, conf, fresh_hosts)
    finally:
        remove_workdir(conf)


def _run(ctx: Any, runs: int, conf: Any, fresh_hosts: bool) -> dict:
    from vtpm_driver.hosts import HostSet
    from vtpm_driver.service import ServerService
    from vtpm_driver.virt import migrate as virt_migrate

    workdir = Path(conf.vtpm.console_log_dir)
    hosts = HostSet(conf)

    def call(method: str, *args: Any, host: str | None = None, **kwargs: Any) -> Any:
        # A service per command, over the shared (warm) hosts; closed once at the end.
        if not fresh_hosts:
            service = ServerService(conf, None, context=lambda: ctx, hosts=hosts, host=host)
            return getattr(service, method)(*args, **kwargs)
        service = ServerService(conf, None, context=lambda: ctx, hosts=HostSet(conf),
                                host=host)
        try:
            return getattr(service, method)(*args, **kwargs)
        finally:
            service.close()

    kinds = {"vtpm": VTPM_SPECS, "no_tpm": {}}
    times: dict[str, list[float]] = {f"{k}_{m}": [] for k in kinds for m in ("live", "cold")}
    driver: dict[str, list[float]] = {k: [] for k in kinds}
    raw_times: dict[str, list[float]] = {k: [] for k in kinds}
    names: dict[str, str] = {}
    raw: RawGuests | None = None
    cleanup_failures: list[str] = []
    clock = _LibvirtClock()
    try:
        for kind, specs in kinds.items():
            names[kind] = f"vtpm-bench-mig-{kind}-{uuid.uuid4().hex[:6]}"
            call("create", names[kind], host="host-a", flavor_extra_specs=dict(specs),
                 image_properties={}, kernel=str(GUEST_DIR / "vmlinuz"),
                 initrd=str(GUEST_DIR / "initrd.img"), cmdline="console=ttyS0 vtpm_test=stay")
        xml = virt_migrate.domain_xml(hosts.backend("host-a").hypervisor.conn.lookupByName(
            names["vtpm"]))
        raw = RawGuests(xml, workdir, dict(conf.vtpm.hosts))
        raw.start()
        with clock.installed():
            for kind in kinds:  # untimed warm-up: connections, host reports, token checks
                for dest in ("host-b", "host-a"):
                    call("migrate", names[kind], dest, live=True)
                    raw.migrate(kind, dest)
            order = list(kinds)
            for i in range(runs):
                for kind in order[i % 2:] + order[:i % 2]:
                    for dest in ("host-b", "host-a"):
                        t0 = time.perf_counter()
                        call("migrate", names[kind], dest, live=True)
                        total = time.perf_counter() - t0
                        times[f"{kind}_live"].append(total)
                        driver[kind].append(total - clock.last)
                        raw_times[kind].append(raw.migrate(kind, dest))
        for i in range(runs):
            for kind in order[i % 2:] + order[:i % 2]:
                t0 = time.perf_counter()
                call("migrate", names[kind], "host-b", live=False)
                times[f"{kind}_cold"].append(time.perf_counter() - t0)
                call("revert_resize", names[kind])
    finally:
        if raw is not None:
            cleanup_failures += raw.cleanup()
        for name in names.values():
            try:
                call("delete", name)
            except Exception as exc:
                cleanup_failures.append(f"{name}: {exc}")
        hosts.close()
    return summarize(runs, times, driver, raw_times, cleanup_failures)


def summarize(runs: int, times: dict[str, list[float]], driver: dict[str, list[float]],
              raw_times: dict[str, list[float]], cleanup_failures: list[str]) -> dict:
    """The section: medians, ratios, the driver's own time and the raw-libvirt floor."""
    out: dict[str, Any] = {
        "runs": runs,
        "seconds": {k: [round(v, 3) for v in vals] for k, vals in times.items()},
        "cleanup_failures": len(cleanup_failures),
    }
    for move in ("live", "cold"):
        vtpm, plain = _median(times[f"vtpm_{move}"]), _median(times[f"no_tpm_{move}"])
        out[move] = {
            "vtpm_median_s": vtpm, "no_tpm_median_s": plain,
            "ratio": round(vtpm / plain, 3) if vtpm and plain else None,
            "vtpm_share": round((vtpm - plain) / vtpm, 3) if vtpm and plain else None,
        }
    live = out["live"]
    d_vtpm, d_plain = _median(driver["vtpm"]), _median(driver["no_tpm"])
    live["driver_ms"] = {"vtpm": _ms(d_vtpm), "no_tpm": _ms(d_plain),
                         "vtpm_extra": _ms(d_vtpm - d_plain) if d_vtpm is not None
                         and d_plain is not None else None}
    r_vtpm, r_plain = _median(raw_times["vtpm"]), _median(raw_times["no_tpm"])
    out["raw_libvirt_live"] = {
        "seconds": {k: [round(v, 3) for v in vals] for k, vals in raw_times.items()},
        "vtpm_median_s": r_vtpm, "no_tpm_median_s": r_plain,
        "ratio": round(r_vtpm / r_plain, 3) if r_vtpm and r_plain else None,
        "vtpm_extra_ms": _ms(r_vtpm - r_plain) if r_vtpm and r_plain else None,
    }
    if live["vtpm_median_s"] and live["no_tpm_median_s"] and r_vtpm and r_plain:
        ours_extra = live["vtpm_median_s"] - live["no_tpm_median_s"]
        live["vs_raw"] = {
            "vtpm_ratio_to_floor": round(live["vtpm_median_s"] / r_vtpm, 3),
            "no_tpm_ratio_to_floor": round(live["no_tpm_median_s"] / r_plain, 3),
            "vtpm_extra_minus_raw_extra_ms": _ms(ours_extra - (r_vtpm - r_plain)),
        }
    return out


def main(argv: list[str]) -> int:
    from bench import keymgr_bench, services

    check_available()
    clouds = services.load_clouds()
    ctx = keymgr_bench.owner_context(clouds["owner"])
    fresh = "--fresh-hosts" in argv
    argv = [a for a in argv if a != "--fresh-hosts"]
    print(json.dumps(run(ctx, int(argv[0]) if argv else 3, fresh_hosts=fresh), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
