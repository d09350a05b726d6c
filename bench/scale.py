"""Scale: idle sessions and memory, parallel downloads, logins per second
with many clients, and the bastion with one worker against two.

Bastions with ``[server] workers`` are started here, one pair at a time, and
stopped after use. A bastion that refuses the key (a release without
workers) is reported as not available instead of failing the section.

Idle sessions at scale (10,000 through one bastion) hold ``echo ready; exec
cat`` sessions without a PTY: the machine has 4096 PTYs in all
(/proc/sys/kernel/pty/max). That bastion shares each upstream connection
between 8 sessions (``[upstream] reuse_max_shared = 8``, the maximum): 1,250
upstream connections, about 2,500 sshd processes and 10,000 ``cat`` on
host-102; without sharing it would be 10,000 connections, 20,000 sshd
processes (with the ``cat``, near the machine's pid_max of 32768) and 20,000
descriptors in the bastion (the hard RLIMIT_NOFILE is 20000 here).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.logins import rate_entry
from bench.measure import (
    MB,
    BenchError,
    descendants,
    machine_busy_seconds,
    run_ssh,
    summary,
    tree_cpu_seconds,
    tree_pss_kb,
    tree_rss_kb,
    wait_no_descendants,
)
from bench.plan import FAILURES, Plan, bastion_pid, rotate
from bench.stack import USER, BenchStack, from_source, remote
from bench.throughput import ratio, transfer
from devstack import BastionProcess
from devstack.process import StackError

ROOT = Path(__file__).resolve().parent.parent
CIPHER = "aes128-gcm"
IDLE_EXEC = "echo ready; exec cat"
# upstream sharing of the bastion holding 10,000 idle sessions (see above)
IDLE_UPSTREAM = {"reuse_max_shared": 8, "reuse_idle": 60}
# the OpenSSH rows of the scale tables
OPENSSH = ("openssh_direct", "openssh_jump", "openssh_nested")


# --------------------------------------------------------------------------
# idle sessions


def _idle_helper(
    stack: BenchStack,
    count: int,
    *,
    jump: bool = False,
    port: int | None = None,
    command: str | None = None,
) -> subprocess.Popen[str]:
    assert stack.bastion is not None and stack.jump is not None
    argv = [
        sys.executable,
        "-m",
        "bench.idle",
        "--user",
        USER,
        "--key",
        str(stack.key),
        "--known-hosts",
        str(stack.known_hosts),
        "--count",
        str(count),
    ]
    if command:
        argv += ["--exec", command]
    if jump:
        target = stack.hosts["host-102"]
        argv += [
            "--host",
            target.address,
            "--port",
            str(target.port),
            "--cert",
            f"{stack.key}-cert.pub",
            "--jump",
            f"{stack.jump.address}:{stack.jump.port}",
        ]
    else:
        argv += ["--port", str(port or stack.bastion.port)]
    return subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )


def _status(helper: subprocess.Popen[str]) -> dict[str, Any]:
    assert helper.stdout is not None
    line = helper.stdout.readline()
    if not line:
        raise BenchError(f"idle helper exited with {helper.wait(5)}")
    status: dict[str, Any] = json.loads(line)
    return status


def _close(helpers: list[subprocess.Popen[str]]) -> None:
    for helper in helpers:
        if helper.stdin is not None and not helper.stdin.closed:
            helper.stdin.close()
    for helper in helpers:
        try:
            helper.wait(120)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait(10)


def _hold(stack: BenchStack, count: int, jump: bool, measure: Any) -> dict[str, Any]:
    """Open ``count`` idle PTY sessions, return the readings of ``measure`` around it."""
    before = measure()
    helper = _idle_helper(stack, count, jump=jump)
    try:
        status = _status(helper)
        time.sleep(2)  # let the relays settle
        during = measure()
    finally:
        _close([helper])
    if status["failed"]:
        raise BenchError(f"{status['failed']} of {count} idle sessions failed: {status['errors']}")
    return {
        "sessions": status["ready"],
        "open_seconds": status["seconds"],
        "before_kb": before,
        "with_sessions_kb": during,
    }


def idle_sessions(stack: BenchStack, plan: Plan) -> dict[str, Any]:
    """Idle PTY sessions: the stack's bastion against the OpenSSH jump host."""
    assert stack.jump is not None and stack.jump.process is not None
    pid = bastion_pid(stack)
    b = _hold(stack, plan.idle_sessions, False, lambda: tree_rss_kb(pid))
    jump_pid = stack.jump.process.pid
    j = _hold(stack, plan.idle_jump_sessions, True, lambda: tree_pss_kb(jump_pid))
    return {
        "bastion": {
            "sessions": b["sessions"],
            "open_seconds": b["open_seconds"],
            "rss_before_mb": round(b["before_kb"] / 1024, 1),
            "rss_mb": round(b["with_sessions_kb"] / 1024, 1),
            "per_session_kb": round((b["with_sessions_kb"] - b["before_kb"]) / b["sessions"], 1),
        },
        "openssh_jump": {
            "sessions": j["sessions"],
            "pss_before_mb": round(j["before_kb"] / 1024, 1),
            "pss_mb": round(j["with_sessions_kb"] / 1024, 1),
            "per_session_kb": round((j["with_sessions_kb"] - j["before_kb"]) / j["sessions"], 1),
        },
        "method": (
            "idle PTY shells opened by asyncssh clients in a separate process and held open; "
            "bastion: VmRSS of the bastion's processes; OpenSSH jump host: PSS summed over its "
            "sshd processes (sessions tunnelled through it, ssh -J style)"
        ),
    }


def idle_curve(stack: BenchStack, plan: Plan) -> dict[str, Any]:
    """Idle sessions through one bastion, up to the plan's largest step;
    the bastion's memory at each step."""
    host = stack.hosts["host-102"]
    assert host.process is not None
    proc = stack.start_bastion("bastion-idle", upstream=IDLE_UPSTREAM)
    assert proc.process is not None
    pid = proc.process.pid
    helpers: list[subprocess.Popen[str]] = []
    points: list[dict[str, Any]] = []
    base_rss, base_pss = tree_rss_kb(pid), tree_pss_kb(pid)
    opened = 0.0
    try:
        for _ in range(plan.idle_helpers):
            helpers.append(_idle_helper(stack, 0, port=proc.port, command=IDLE_EXEC))
        for helper in helpers:
            _status(helper)
        for total in plan.idle_steps:
            n = len(helpers)
            for i, helper in enumerate(helpers):
                assert helper.stdin is not None
                helper.stdin.write(f"{total // n + (1 if i < total % n else 0)}\n")
                helper.stdin.flush()
            statuses = [_status(h) for h in helpers]
            ready = sum(s["ready"] for s in statuses)
            failed = sum(s["failed"] for s in statuses)
            seconds = max(s["seconds"] for s in statuses)
            opened += seconds
            time.sleep(0.5 if plan.quick else 2.0)  # let the relays settle
            tree = descendants(host.process.pid)
            point = {
                "sessions": ready,
                "failed": failed,
                "step_seconds": seconds,
                "open_seconds": round(opened, 1),
                "rss_mb": round(tree_rss_kb(pid) / 1024, 1),
                "pss_mb": round(tree_pss_kb(pid) / 1024, 1),
                "bastion_processes": 1 + len(descendants(pid)),
                "host_processes": len(tree),
            }
            points.append(point)
            print(f"[bench]   idle {ready} sessions: {point}", flush=True)
            if failed:
                errors = sorted({e for s in statuses for e in s["errors"]})[:3]
                FAILURES.add("scale", f"idle step {total}", BenchError(f"{failed}: {errors}"))
                break
    finally:
        _close(helpers)
        stack.stop_bastion(proc)
        # the upstream connections end with the bastion: wait for host-102's
        # sshd processes to go, so that the next measurements run on a quiet host
        wait_no_descendants(host.process.pid, 60)
    return {
        "bastion_rss_before_mb": round(base_rss / 1024, 1),
        "bastion_pss_before_mb": round(base_pss / 1024, 1),
        "points": points,
        "upstream": IDLE_UPSTREAM,
        "helpers": plan.idle_helpers,
        "method": (
            f"`{IDLE_EXEC}` sessions (no PTY) opened by {plan.idle_helpers} asyncssh client "
            "processes, 32 handshakes at a time each, held open; RSS and PSS summed over the "
            "bastion's processes; host processes: sshd and cat on host-102. Upstream "
            f"sharing {IDLE_UPSTREAM} (one upstream connection for 8 sessions)"
        ),
    }


# --------------------------------------------------------------------------
# parallel downloads and logins per second


def _parallel(argv: list[str], streams: int, size: int) -> float:
    """``streams`` downloads of ``size`` bytes at once; wall seconds until the last ends."""
    errors: list[Exception] = []

    def one(index: int) -> None:
        try:
            transfer(from_source(argv, index), "download", size)
        except BenchError as exc:
            errors.append(exc)

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def parallel_downloads(
    stack: BenchStack, plan: Plan, bastions: dict[str, BastionProcess]
) -> dict[str, Any]:
    openssh = stack.paths(CIPHER)
    paths = {p: openssh[p] for p in OPENSSH}
    pids: dict[str, int] = {}
    for name, proc in bastions.items():
        assert proc.process is not None
        paths[name] = stack.bastion_argv(CIPHER, proc)
        pids[name] = proc.process.pid
    out: dict[str, Any] = {"cipher": CIPHER, "total_bytes": plan.parallel_total}
    for streams in plan.parallel_counts:
        size = plan.parallel_total // streams
        rates: dict[str, list[float]] = {p: [] for p in paths}
        cpu: dict[str, list[float]] = {p: [] for p in pids}
        busy: dict[str, list[float]] = {p: [] for p in paths}
        for rep in range(plan.reps):
            for path in rotate(tuple(paths), rep):
                c0 = tree_cpu_seconds(pids[path]) if path in pids else 0.0
                m0 = machine_busy_seconds()
                try:
                    seconds = _parallel(paths[path], streams, size)
                except BenchError as exc:
                    FAILURES.add("scale", f"{streams} downloads {path}", exc)
                    continue
                rates[path].append(size * streams / seconds / MB)
                busy[path].append((machine_busy_seconds() - m0) / seconds)
                if path in pids:
                    cpu[path].append((tree_cpu_seconds(pids[path]) - c0) / (size * streams / 1e9))
                print(
                    f"[bench]   {streams} downloads {path}: {rates[path][-1]:.0f} MB/s", flush=True
                )
        table: dict[str, Any] = {}
        for path, values in rates.items():
            if not values:
                continue
            table[path] = {
                "mb_s": summary(values, 0),
                "vs_openssh_direct": ratio(values, rates["openssh_direct"]),
                "vs_openssh_jump": ratio(values, rates["openssh_jump"]),
                "machine_cpus_busy": round(sum(busy[path]) / len(busy[path]), 2),
            }
            if cpu.get(path):
                table[path]["bastion_cpu_s_per_gb"] = summary(cpu[path], 2)
        if rates.get("bastion_fresh_w1") and rates.get("bastion_fresh_w2"):
            table["w2_vs_w1"] = ratio(rates["bastion_fresh_w2"], rates["bastion_fresh_w1"])
        out[str(streams)] = table
    return out


def scale_logins(
    stack: BenchStack, plan: Plan, bastions: dict[str, BastionProcess]
) -> dict[str, Any]:
    """Fresh logins per second with many clients (bastions with reuse off)."""
    openssh = stack.paths(CIPHER)
    out: dict[str, Any] = {"clients": plan.scale_clients, "seconds": plan.scale_seconds}
    for path in OPENSSH:
        out[path] = rate_entry(openssh[path], plan.scale_clients, plan.scale_seconds, None)
    for name, proc in bastions.items():
        assert proc.process is not None
        argv = stack.bastion_argv(CIPHER, proc)
        out[name] = rate_entry(argv, plan.scale_clients, plan.scale_seconds, proc.process.pid)
    direct = out["openssh_direct"]["logins_per_s"]
    for path in (*OPENSSH, *bastions):
        out[path]["vs_openssh_direct"] = round(out[path]["logins_per_s"] / max(direct, 0.1), 2)
    if "bastion_fresh_w1" in out and "bastion_fresh_w2" in out:
        w1 = out["bastion_fresh_w1"]["logins_per_s"]
        out["w2_vs_w1"] = round(out["bastion_fresh_w2"]["logins_per_s"] / max(w1, 0.1), 2)
    return out


def _pair(
    stack: BenchStack, name: str, *, reuse: bool, notes: dict[str, str]
) -> dict[str, BastionProcess]:
    """Bastions with ``[server] workers`` 1 and 2 (whichever start; an older
    bastion without the key is stood in for by the stack's one-process one)."""
    out: dict[str, BastionProcess] = {}
    for workers in (1, 2):
        key = f"{name}_w{workers}"
        try:
            # a supervisor whose workers keep dying never exits: do not wait long
            out[key] = stack.start_bastion(
                key.replace("_", "-"), reuse=reuse, workers=workers, timeout=15
            )
        except StackError as exc:
            # the log's last line says why (e.g. "[server]: unknown key(s) workers")
            why = str(exc).strip().splitlines()[-1][:300]
            notes[key] = f"not available: the bastion did not start ({why})"
            print(f"[bench]   {key} not available: {why}", flush=True)
            continue
        proc = out[key].process
        assert proc is not None
        notes.setdefault(f"{key}_processes", str(1 + len(descendants(proc.pid))))
    if f"{name}_w1" not in out:
        # no workers key: the stack's bastion is one process, as workers = 1
        fallback = stack.bastion if reuse else stack.fresh_bastion
        assert fallback is not None
        out[f"{name}_w1"] = fallback
        notes[f"{name}_w1"] = "the stack's bastion (one process, no workers key)"
    return out


def reuse_hits(stack: BenchStack, plan: Plan) -> dict[str, Any]:
    """One person logging in again and again from one machine: the share of
    logins after the first that found an upstream connection to reuse, with
    workers = 1, and workers = 2 steered by source address or by the
    kernel's 4-tuple hash (bastion/workers.py)."""
    out: dict[str, Any] = {"logins": plan.reuse_logins}
    for name, workers, steering in (
        ("workers_1", 1, None),
        ("workers_2_source", 2, "source"),
        ("workers_2_kernel", 2, "kernel"),
    ):
        try:
            proc = stack.start_bastion(
                f"bastion-reuse-{name}", workers=workers, steering=steering, timeout=15
            )
        except StackError as exc:
            out[name] = {"error": str(exc).strip().splitlines()[-1][:200]}
            continue
        try:
            argv = remote(from_source(stack.bastion_argv(CIPHER, proc), 0), "true")
            for _ in range(plan.reuse_logins):
                try:
                    run_ssh(argv, timeout=30)
                except BenchError as exc:
                    FAILURES.add("scale", f"reuse {name}", exc)
            deadline = time.monotonic() + 5
            logins: list[dict[str, Any]] = []
            while time.monotonic() < deadline:
                logins = [r for r in proc.audit_records() if r.get("event") == "login"]
                if len(logins) >= plan.reuse_logins:
                    break
                time.sleep(0.05)
            reused = sum(1 for r in logins[1:] if r.get("reused"))
            out[name] = {
                "reused": reused,
                "hit_rate": round(reused / max(len(logins) - 1, 1), 2),
            }
            print(f"[bench]   reuse {name}: {out[name]}", flush=True)
        finally:
            stack.stop_bastion(proc)
    return out


def scale(stack: BenchStack, plan: Plan) -> dict[str, Any]:
    """Parallel downloads and fresh logins through one pair of bastions with
    upstream reuse off (every download its own upstream connection, as with
    OpenSSH; with reuse on, a person's parallel sessions would share one
    upstream connection and one sshd process on the host), then idle sessions."""
    notes: dict[str, str] = {}
    out: dict[str, Any] = {"notes": notes}
    pair = _pair(stack, "bastion_fresh", reuse=False, notes=notes)
    try:
        out["parallel_downloads"] = parallel_downloads(stack, plan, pair)
        out["logins"] = scale_logins(stack, plan, pair)
    finally:
        for proc in pair.values():
            if proc is not stack.fresh_bastion:
                stack.stop_bastion(proc)
    out["reuse"] = reuse_hits(stack, plan)
    out["idle"] = idle_curve(stack, plan)
    return out
