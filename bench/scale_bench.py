"""Scale: concurrent vTPM preparations, and ``init_host`` with many vTPM domains defined.

A *preparation* is what a vTPM start needs before QEMU runs: the Barbican
secret is created (POST + ACL PUT), the libvirt ``vtpm`` secret is defined with
the passphrase and undefined again (SPEC E1/E3). No guest is started, so this
measures the key manager + libvirt secret path alone under concurrency.

``init_host`` is timed with 0 and then N defined (never started) domains that
look like vTPM servers to the driver: a ``<tpm>`` device and our server record
asking for ``hw:tpm_version=2.0``. With ``swtpm_enabled = False`` the driver
scans every domain for an emulated TPM (SPEC C4) and refuses to start, so
that mode is timed to its refusal; with ``swtpm_enabled = True`` it checks the
host only. Domains that other users have defined are counted
(``domains_on_host``) and the growth fit uses that count. Every domain, libvirt secret and Barbican
secret created here is removed again, also after an error.
"""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from collections.abc import Callable
from typing import Any

from bench import stats
from bench.services import AccessLogCounter
from vtpm_driver import conf as vtpm_conf
from vtpm_driver import keymgr
from vtpm_driver.keymgr import context as vtpm_context
from vtpm_driver.model.server import Flavor, Instance
from vtpm_driver.ops import secrets as ops_secrets
from vtpm_driver.virt import connection, domain, guest, record, secret

DOMAIN_PREFIX = "vtpm-bench-"
TPM_SPECS = {"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-tis"}


# --- concurrent preparations ----------------------------------------------------------------

def _prepare(km: keymgr.KeyManager, ctx: vtpm_context.RequestContext,
             conn: Any, created: list[Instance]) -> float:
    """One preparation; returns its duration. The instance goes to ``created`` for cleanup."""
    t0 = time.perf_counter()
    inst = Instance(name="bench-prep", user_id=ctx.user_id, project_id=ctx.project_id)
    created.append(inst)
    secret_uuid, passphrase = km.create_vtpm_secret(ctx, inst, "user")
    start = ops_secrets.StartSecret(secret_uuid, passphrase, persistent=False)
    with ops_secrets.secret_for_start(secret.LibvirtSecretStore(conn), inst, start):
        pass  # a real start would launch QEMU here
    return time.perf_counter() - t0


def _error_name(exc: BaseException) -> str:
    return type(exc).__name__


def run_preparations(ctx: vtpm_context.RequestContext, levels: list[int], tasks: int,
                     counter: AccessLogCounter) -> dict:
    """For each concurrency N: ``max(tasks, N)`` preparations on N threads."""
    conf = vtpm_conf.new_conf()
    km = keymgr.KeyManager(conf)
    hv = connection.Hypervisor(vtpm_conf.libvirt_uri(conf))
    results = []
    try:
        conn = hv.conn
        for n in levels:
            count = max(tasks, n)
            created: list[Instance] = []
            durations: list[float] = []
            failures: dict[str, int] = {}
            counter.mark()
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
                futures = [pool.submit(_prepare, km, ctx, conn, created) for _ in range(count)]
                for fut in concurrent.futures.as_completed(futures):
                    try:
                        durations.append(fut.result())
                    except Exception as exc:  # counted and reported
                        failures[_error_name(exc)] = failures.get(_error_name(exc), 0) + 1
            wall = time.perf_counter() - t0
            requests_seen = counter.read().as_dict()
            cleanup_failures = _cleanup_preparations(km, ctx, conn, created)
            results.append({
                "concurrency": n,
                "preparations": count,
                "succeeded": len(durations),
                "failures": sum(failures.values()),
                "failure_types": failures,
                "wall_s": round(wall, 3),
                "throughput_per_s": round(len(durations) / wall, 2) if wall > 0 else None,
                "latency_ms": stats.summarize(durations, scale=1000.0),
                "requests": requests_seen,
                "cleanup_failures": cleanup_failures,
            })
    finally:
        hv.close()
    return {"tasks_per_level": tasks, "levels": results}


def _cleanup_preparations(km: keymgr.KeyManager, ctx: vtpm_context.RequestContext,
                          conn: Any, created: list[Instance]) -> int:
    """Delete the Barbican secrets (and any libvirt secret left); count what failed."""
    failed = 0
    for inst in created:
        secret_uuid = inst.system_metadata.get(keymgr.SYSMETA_KEY)
        try:
            if secret_uuid:
                secret.undefine_vtpm_secret(conn, secret_uuid)
            km.delete_vtpm_secret(ctx, inst, "user")
        except Exception:  # best-effort, reported as a count
            failed += 1
    return failed


# --- init_host with many domains -------------------------------------------------------------

def _bench_domain_xml(run_id: str, index: int, console_dir: str) -> str:
    dom_uuid = str(uuid.uuid4())
    name = f"{DOMAIN_PREFIX}{run_id}-{index:04d}"
    xml = domain.guest_xml(name, dom_uuid, 1, 128, console_log=f"{console_dir}/{name}.log",
                           kernel="/nonexistent/vmlinuz")  # never started
    xml = domain.add_tpm(xml, "2.0", "tpm-tis", str(uuid.uuid4()))
    server = Instance(
        name=name, uuid=dom_uuid, user_id="bench", project_id="bench",
        flavor=Flavor(vcpus=1, memory_mb=128, extra_specs=dict(TPM_SPECS)),
        system_metadata={keymgr.SYSMETA_KEY: str(uuid.uuid4())},
    )
    return record.set_server_record(xml, server)


def define_domains(conn: Any, run_id: str, start: int, count: int,
                   console_dir: str) -> list[Any]:
    return [guest.define(conn, _bench_domain_xml(run_id, i, console_dir))
            for i in range(start, start + count)]


def undefine_domains(conn: Any, run_id: str | None = None) -> int:
    """Undefine every bench domain (of ``run_id``, or of any run); returns how many."""
    prefix = DOMAIN_PREFIX + (f"{run_id}-" if run_id else "")
    removed = 0
    for dom in conn.listAllDomains(0):
        try:
            if not dom.name().startswith(prefix):
                continue
            guest.remove(dom)
            removed += 1
        except Exception:  # a vanished domain is fine here
            continue
    return removed


def _time_init_host(make_driver: Callable[[], Any], repeats: int) -> tuple[list[float], str]:
    """Fresh driver + init_host, ``repeats`` times; also what it did (ok / raised X)."""
    samples = []
    outcome = "ok"
    for _ in range(repeats):
        drv = make_driver()
        t0 = time.perf_counter()
        try:
            drv.init_host("bench-host")
        except Exception as exc:  # a refusal is a result too (SPEC C4)
            outcome = f"raised {type(exc).__name__}"
        samples.append(time.perf_counter() - t0)
    return samples, outcome


def run_init_host(levels: list[int], repeats: int, console_dir: str) -> dict:
    """init_host time with N defined vTPM domains, swtpm enabled and disabled (C4 scan)."""
    from vtpm_driver.driver import VTPMDriver

    run_id = uuid.uuid4().hex[:8]
    modes = {"swtpm_enabled": True, "swtpm_disabled": False}
    confs = {}
    for mode, enabled in modes.items():
        conf = vtpm_conf.new_conf()
        conf.set_override("swtpm_enabled", enabled, group="libvirt")
        conf.set_override("virt_type", "qemu", group="libvirt")
        confs[mode] = conf
    points: list[dict] = []
    hv = connection.Hypervisor(vtpm_conf.libvirt_uri(confs["swtpm_enabled"]))
    try:
        conn = hv.conn
        defined = 0
        for n in sorted({0, *levels}):
            t0 = time.perf_counter()
            define_domains(conn, run_id, defined, n - defined, console_dir)
            define_s = time.perf_counter() - t0
            defined = n
            point: dict[str, Any] = {"domains": n, "domains_on_host": len(conn.listAllDomains(0)),
                                     "define_s": round(define_s, 3)}
            for mode, conf in confs.items():
                samples, outcome = _time_init_host(lambda c=conf: VTPMDriver(c), repeats)
                point[mode] = {"latency_ms": stats.summarize(samples, scale=1000.0),
                               "outcome": outcome}
            points.append(point)
        t0 = time.perf_counter()
        removed = undefine_domains(conn, run_id)
        undefine_s = time.perf_counter() - t0
    finally:
        leftover = undefine_domains(hv.conn, run_id)
        hv.close()
    fits = {}
    for mode in modes:
        # Other users' domains are scanned too: fit against everything on the host.
        ns = [p["domains_on_host"] for p in points]
        ts = [p[mode]["latency_ms"]["median"] / 1000.0 for p in points]
        try:
            fits[mode] = stats.growth_fit(ns, ts)
        except ValueError:
            fits[mode] = None
    return {"repeats": repeats, "points": points, "fit": fits,
            "domains_undefined": removed, "undefine_s": round(undefine_s, 3),
            "leftover_domains_removed": leftover}
