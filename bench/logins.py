"""Logins: latency and CPU per login, logins per second under parallel
clients, and what certificate signing adds to a login."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from typing import Any

from bench import signing
from bench.measure import (
    BenchError,
    machine_busy_seconds,
    percentile,
    reaped_cpu_seconds,
    run_ssh,
    summary,
    tree_cpu_seconds,
    wait_no_descendants,
)
from bench.plan import (
    FAILURES,
    LOGIN_BASTION_PATHS,
    LOGIN_PATHS,
    OPENSSH_CPU_PATHS,
    Plan,
    bastion_pid,
    rotate,
)
from bench.stack import BenchStack, from_source, remote


def _ratio(value: float, reference: list[float]) -> float | None:
    return round(value / percentile(reference, 50), 2) if reference else None


def logins(stack: BenchStack, plan: Plan) -> dict[str, Any]:
    """``ssh host true`` over every path, alternating; CPU per login of the
    bastion, and of the jump host's sshd tree for the OpenSSH hops (read from
    the sshd master's reaped-children counters once the login's processes
    have exited)."""
    assert stack.jump is not None and stack.jump.process is not None
    jump_pid = stack.jump.process.pid
    paths = stack.paths("aes128-gcm")
    times: dict[str, list[float]] = {p: [] for p in LOGIN_PATHS}
    cpu: dict[str, list[float]] = {p: [] for p in (*LOGIN_BASTION_PATHS, *OPENSSH_CPU_PATHS)}
    for path in LOGIN_PATHS:  # warm-up: page cache, Vault token, connection pools
        try:
            run_ssh(remote(paths[path], "true"), timeout=30)
        except BenchError as exc:
            FAILURES.add("login", f"warm-up {path}", exc)
    for rep in range(plan.logins):
        for path in rotate(LOGIN_PATHS, rep):
            openssh = path in OPENSSH_CPU_PATHS
            if openssh:
                wait_no_descendants(jump_pid)
            pid = bastion_pid(stack, path)
            c0 = reaped_cpu_seconds(jump_pid) if openssh else tree_cpu_seconds(pid)
            try:
                times[path].append(run_ssh(remote(paths[path], "true"), timeout=30) * 1000)
            except BenchError as exc:
                FAILURES.add("login", path, exc)
                continue
            if openssh and wait_no_descendants(jump_pid):
                cpu[path].append((reaped_cpu_seconds(jump_pid) - c0) * 1000)
            elif path in LOGIN_BASTION_PATHS:
                cpu[path].append((tree_cpu_seconds(pid) - c0) * 1000)
    out: dict[str, Any] = {"paths": {}, "kex": "curve25519-sha256", "cipher": "aes128-gcm"}
    for path in LOGIN_PATHS:
        if not times[path]:
            continue
        p50 = percentile(times[path], 50)
        out["paths"][path] = {
            "p50_ms": round(p50, 1),
            "p95_ms": round(percentile(times[path], 95), 1),
            **{k: v for k, v in summary(times[path], 1).items() if k != "median"},
            "vs_openssh_jump": _ratio(p50, times["openssh_jump"]),
            "vs_openssh_direct": _ratio(p50, times["openssh_direct"]),
            "vs_openssh_nested": _ratio(p50, times["openssh_nested"]),
            # every sample, for the latency chart
            "samples_ms": [round(t, 1) for t in times[path]],
        }

    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 2) if values else None

    out["bastion_cpu_ms_per_login"] = {p: mean(cpu[p]) for p in LOGIN_BASTION_PATHS}
    out["jump_host_cpu_ms_per_login"] = {p: mean(cpu[p]) for p in OPENSSH_CPU_PATHS}
    return out


def load(argv: list[str], clients: int, seconds: float) -> tuple[int, int, float]:
    """``clients`` threads running ``ssh ... true`` back to back for ``seconds``,
    each from its own loopback source address (:func:`bench.stack.from_source`)."""
    done = [0]
    failed = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker(index: int) -> None:
        command = remote(from_source(argv, index), "true")
        while time.perf_counter() < deadline:
            try:
                run_ssh(command, timeout=60)
                ok = True
            except (BenchError, subprocess.TimeoutExpired):
                ok = False
            with lock:
                if ok:
                    done[0] += 1
                else:
                    failed[0] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0], failed[0], time.perf_counter() - started


def rate_entry(
    argv: list[str], clients: int, seconds: float, bastion: int | None
) -> dict[str, Any]:
    """Logins per second through one path, with the CPU it took: the
    bastion's (process and workers) if ``bastion`` is its pid, and the
    machine's (every process: ssh clients, sshd, the bastion, ...)."""
    c0 = tree_cpu_seconds(bastion) if bastion else 0.0
    m0 = machine_busy_seconds()
    done, failed, elapsed = load(argv, clients, seconds)
    machine = machine_busy_seconds() - m0
    entry: dict[str, Any] = {
        "logins_per_s": round(done / elapsed, 1),
        "logins": done,
        "failed": failed,
        "machine_cpu_ms_per_login": round(machine * 1000 / max(done, 1), 1),
        "machine_cpu_util": round(machine / elapsed / len(os.sched_getaffinity(0)), 2),
    }
    if bastion and done:
        cpu = tree_cpu_seconds(bastion) - c0
        entry["bastion_cpu_ms_per_login"] = round(cpu * 1000 / done, 2)
        entry["bastion_cpu_util"] = round(cpu / elapsed, 2)
    return entry


def login_rate(stack: BenchStack, plan: Plan) -> dict[str, Any]:
    paths = stack.paths("aes128-gcm")
    out: dict[str, Any] = {"clients": plan.load_clients, "seconds": plan.load_seconds}
    for path in ("openssh_direct", "bastion", "bastion_fresh", "openssh_jump", "bastion_jump"):
        pid = bastion_pid(stack, path) if path in LOGIN_BASTION_PATHS else None
        out[path] = rate_entry(paths[path], plan.load_clients, plan.load_seconds, pid)
    direct = out["openssh_direct"]["logins_per_s"]
    for path in ("openssh_direct", "openssh_jump", *LOGIN_BASTION_PATHS):
        out[path]["vs_openssh_direct"] = round(out[path]["logins_per_s"] / max(direct, 0.1), 2)
    return out


def signing_cost(stack: BenchStack, plan: Plan) -> dict[str, Any]:
    out = signing.measure(stack, plan.signs)
    # end to end: the same login through a bastion signing locally
    local = stack.start_local_ca_bastion()
    try:
        # both with upstream reuse off, so that every login is signed
        assert stack.fresh_bastion is not None and local.process is not None
        argvs = {
            "vault": [*stack.bastion_argv("aes128-gcm", stack.fresh_bastion), "true"],
            "local_ca": [*stack.bastion_argv("aes128-gcm", local), "true"],
        }
        pids = {"vault": bastion_pid(stack, "bastion_fresh"), "local_ca": local.process.pid}
        times: dict[str, list[float]] = {k: [] for k in argvs}
        cpu: dict[str, float] = dict.fromkeys(argvs, 0.0)
        for argv in argvs.values():
            run_ssh(argv)
        for rep in range(plan.signing_logins):
            for k in rotate(tuple(argvs), rep):
                c0 = tree_cpu_seconds(pids[k])
                times[k].append(run_ssh(argvs[k]) * 1000)
                cpu[k] += tree_cpu_seconds(pids[k]) - c0
        out["login"] = {
            k: {
                "p50_ms": round(percentile(times[k], 50), 1),
                "bastion_cpu_ms_per_login": round(cpu[k] * 1000 / plan.signing_logins, 2),
            }
            for k in argvs
        }
    finally:
        stack.stop_local_ca_bastion()
    return out
