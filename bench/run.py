"""The benchmark: one command, the real stack, the bastion against OpenSSH.

    .venv/bin/python -m bench.run            # full run, about 10 minutes
    .venv/bin/python -m bench.run --quick    # tiny sizes, under a minute (smoke test)

Starts Consul (ACLs via bootstrap-acl.sh), OpenBao (bootstrap-vault.sh),
host-101/host-102 (sshd), a plain OpenSSH jump host and the bastion with
Vault-signed upstream certificates (see ``bench/stack.py``), then measures,
with the same cipher on every path and runs alternating between paths:

1. throughput (download, upload, both ways) over four paths: OpenSSH direct,
   OpenSSH jump host (``-J``), bastion routed session, bastion as ``-J``;
2. login latency (``ssh host true``, curve25519) and bastion CPU per login;
3. route propagation (Consul PUT → new route in force / first login);
4. bastion memory with many idle sessions; new logins/s with 16 clients;
5. certificate signing cost (Vault/OpenBao vs local CA);
6. bastion CPU seconds per relayed GB.

Writes ``bench/results/latest.{md,json}`` (``quick.{md,json}`` with
``--quick``, or ``--out DIR``). Needs root (sshd, ``unshare``), like the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import propagation, report, signing
from bench.measure import (
    MB,
    BenchError,
    TreeCpu,
    cpu_seconds,
    descendants,
    machine_busy_seconds,
    percentile,
    pss_kb,
    rss_kb,
    run_ssh,
    summary,
    wait_for_lines,
)
from bench.stack import CIPHERS, USER, BenchStack

ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30
MiB = 1 << 20
DIRECTIONS = ("download", "upload", "both")
PATHS = ("openssh_direct", "openssh_jump", "bastion", "bastion_jump")
BASTION_PATHS = ("bastion", "bastion_jump")
# CPU per GB: the bastion's two paths and the OpenSSH jump host's sshd
CPU_PATHS = (*BASTION_PATHS, "openssh_jump")
# logins also through a bastion with upstream reuse off
LOGIN_PATHS = (*PATHS, "bastion_fresh")
LOGIN_BASTION_PATHS = (*BASTION_PATHS, "bastion_fresh")


@dataclass(frozen=True)
class Plan:
    """Sizes and counts; ``quick`` shrinks everything to a smoke test."""

    quick: bool
    download: int
    upload: int
    both: int
    reps: int
    logins: int
    load_seconds: float
    load_clients: int
    idle_sessions: int
    idle_jump_sessions: int
    changes: int
    login_changes: int
    signs: int
    signing_logins: int

    @classmethod
    def full(cls, reps: int = 3) -> Plan:
        return cls(False, GiB, GiB, 256 * MiB, reps, 40, 10.0, 16, 1000, 100, 100, 20, 100, 20)

    @classmethod
    def small(cls) -> Plan:
        return cls(True, 8 * MiB, 8 * MiB, 4 * MiB, 1, 3, 2.0, 16, 20, 5, 5, 2, 5, 3)


# single runs that failed (a section goes on without their sample)
FAILURES: list[dict[str, str]] = []


def _failed(section: str, what: str, exc: Exception) -> None:
    FAILURES.append({"section": section, "run": what, "error": str(exc)[:300]})
    print(f"[bench]   FAILED {section} {what}: {exc}", flush=True)


def _rotate(items: tuple[str, ...], n: int) -> list[str]:
    k = n % len(items)
    return [*items[k:], *items[:k]]


def _bastion_pid(stack: BenchStack, path: str = "bastion") -> int:
    bastion = stack.fresh_bastion if path == "bastion_fresh" else stack.bastion
    assert bastion is not None and bastion.process is not None
    return bastion.process.pid


# --------------------------------------------------------------------------
# 1 + 6: throughput and CPU per relayed GB


def _transfer(argv: list[str], direction: str, size: int) -> float:
    if direction == "download":
        return run_ssh([*argv, f"head -c {size} /dev/zero"], timeout=180)
    if direction == "upload":
        return run_ssh([*argv, "cat > /dev/null"], stdin_bytes=size, timeout=180)
    return run_ssh([*argv, "cat"], stdin_bytes=size, timeout=180)


def _expected_bytes(direction: str, size: int) -> tuple[int, int]:
    """(person → host, host → person) payload bytes."""
    return {"download": (0, size), "upload": (size, 0), "both": (size, size)}[direction]


def _check_audit(stack: BenchStack, lines_before: int, path: str, up: int, down: int) -> None:
    """The bastion's own audit record must show every byte relayed."""
    assert stack.bastion is not None
    kind = "session" if path == "bastion" else "tunnel"
    # a connection writes several records (connect, login, ...); the channel's
    # is written a moment after the client has exited
    deadline = time.monotonic() + 5.0
    while True:
        lines = wait_for_lines(stack.bastion.audit_file, lines_before + 1)
        records = [json.loads(x) for x in lines[lines_before:]]
        mine = [r for r in records if r.get("event") == kind]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if not mine:
        raise BenchError(f"{path}: no audit record after the transfer")
    rec = mine[-1]
    got_up, got_down = rec.get("bytes_up", 0), rec.get("bytes_down", 0)
    # a tunnel carries the person's SSH packets: at least the payload
    ok = (
        (got_up, got_down) == (up, down) if kind == "session" else got_up >= up and got_down >= down
    )
    if not ok:
        raise BenchError(f"{path}: relayed {got_up}/{got_down} bytes, expected {up}/{down}")


def throughput(stack: BenchStack, plan: Plan) -> tuple[dict[str, Any], dict[str, Any]]:
    assert stack.bastion is not None and stack.jump is not None
    assert stack.jump.process is not None
    pid = _bastion_pid(stack)
    jump_pid = stack.jump.process.pid
    sizes = {"download": plan.download, "upload": plan.upload, "both": plan.both}
    out: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    for cipher in CIPHERS:
        paths = stack.paths(cipher)
        out[cipher] = {}
        cpu[cipher] = {}
        for direction in DIRECTIONS:
            size = sizes[direction]
            up, down = _expected_bytes(direction, size)
            rates: dict[str, list[float]] = {p: [] for p in PATHS}
            cpu_gb: dict[str, list[float]] = {p: [] for p in CPU_PATHS}
            for rep in range(plan.reps):
                for path in _rotate(PATHS, rep):
                    audit_lines = len(wait_for_lines(stack.bastion.audit_file, 0, 0))
                    c0 = cpu_seconds(pid)
                    # the OpenSSH jump host's sshd processes, measured the same way
                    jump_cpu = TreeCpu(jump_pid) if path == "openssh_jump" else None
                    if jump_cpu is not None:
                        jump_cpu.start()
                    try:
                        seconds = _transfer(paths[path], direction, size)
                    except BenchError as exc:
                        _failed("throughput", f"{cipher} {direction} {path}", exc)
                        continue
                    finally:
                        used = jump_cpu.stop() if jump_cpu is not None else 0.0
                    c1 = cpu_seconds(pid)
                    rates[path].append(size / seconds / MB)
                    if path in BASTION_PATHS:
                        _check_audit(stack, audit_lines, path, up, down)
                        cpu_gb[path].append((c1 - c0) / ((up + down) / 1e9))
                    elif jump_cpu is not None:
                        cpu_gb[path].append(used / ((up + down) / 1e9))
                    print(
                        f"[bench]   {cipher} {direction} {path}: {size / seconds / MB:.0f} MB/s",
                        flush=True,
                    )
            ref = statistics_median(rates["openssh_jump"])
            direct = statistics_median(rates["openssh_direct"])
            out[cipher][direction] = {
                path: {
                    "mb_s": summary(rates[path], 0),
                    "vs_openssh_jump": round(statistics_median(rates[path]) / ref, 2),
                    "vs_openssh_direct": round(statistics_median(rates[path]) / direct, 2),
                }
                for path in PATHS
            }
            cpu[cipher][direction] = {
                path: {"cpu_s_per_gb": summary(cpu_gb[path], 2)} for path in CPU_PATHS
            }
    out["bytes"] = {"download": plan.download, "upload": plan.upload, "both_each_way": plan.both}
    cpu["method"] = (
        "bastion utime+stime (/proc/PID/stat) over each transfer, divided by the payload "
        "bytes relayed in both directions (both ways counts 2 x the size); GB = 1e9 bytes. "
        "The OpenSSH jump host: the same for its sshd processes, sampled every 50 ms "
        "(per-connection processes come and go)"
    )
    return out, cpu


def statistics_median(values: list[float]) -> float:
    return percentile(values, 50)


# --------------------------------------------------------------------------
# 2: login latency and CPU per login


def logins(stack: BenchStack, plan: Plan) -> dict[str, Any]:
    paths = stack.paths("aes128-gcm")
    times: dict[str, list[float]] = {p: [] for p in LOGIN_PATHS}
    cpu: dict[str, list[float]] = {p: [] for p in LOGIN_BASTION_PATHS}
    for path in LOGIN_PATHS:  # warm-up: page cache, Vault token, connection pools
        try:
            run_ssh([*paths[path], "true"], timeout=30)
        except BenchError as exc:
            _failed("login", f"warm-up {path}", exc)
    for rep in range(plan.logins):
        for path in _rotate(LOGIN_PATHS, rep):
            pid = _bastion_pid(stack, path)
            c0 = cpu_seconds(pid)
            try:
                times[path].append(run_ssh([*paths[path], "true"], timeout=30) * 1000)
            except BenchError as exc:
                _failed("login", path, exc)
                continue
            if path in LOGIN_BASTION_PATHS:
                cpu[path].append((cpu_seconds(pid) - c0) * 1000)
    jump_p50 = percentile(times["openssh_jump"], 50)
    direct_p50 = percentile(times["openssh_direct"], 50)
    out: dict[str, Any] = {"paths": {}, "kex": "curve25519-sha256", "cipher": "aes128-gcm"}
    for path in LOGIN_PATHS:
        p50 = percentile(times[path], 50)
        out["paths"][path] = {
            "p50_ms": round(p50, 1),
            "p95_ms": round(percentile(times[path], 95), 1),
            **{k: v for k, v in summary(times[path], 1).items() if k != "median"},
            "vs_openssh_jump": round(p50 / jump_p50, 2),
            "vs_openssh_direct": round(p50 / direct_p50, 2),
        }
    out["bastion_cpu_ms_per_login"] = {
        path: round(sum(cpu[path]) / len(cpu[path]), 2) for path in LOGIN_BASTION_PATHS
    }
    return out


# --------------------------------------------------------------------------
# 4: idle sessions and logins per second


def _idle_helper(stack: BenchStack, count: int, *, jump: bool) -> subprocess.Popen[str]:
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
        argv += ["--port", str(stack.bastion.port)]
    return subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )


def _hold(stack: BenchStack, count: int, jump: bool, measure: Callable[[], int]) -> dict[str, Any]:
    """Open ``count`` idle sessions, return the readings of ``measure`` around it."""
    before = measure()
    helper = _idle_helper(stack, count, jump=jump)
    try:
        assert helper.stdout is not None and helper.stdin is not None
        line = helper.stdout.readline()
        if not line:
            raise BenchError(f"idle helper exited with {helper.wait(5)}")
        status = json.loads(line)
        time.sleep(2)  # let the relays settle
        during = measure()
        helper.stdin.close()
        helper.wait(120)
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait(10)
    if status["failed"]:
        raise BenchError(f"{status['failed']} of {count} idle sessions failed: {status['errors']}")
    return {
        "sessions": status["ready"],
        "open_seconds": status["seconds"],
        "before_kb": before,
        "with_sessions_kb": during,
    }


def idle_sessions(stack: BenchStack, plan: Plan) -> dict[str, Any]:
    assert stack.jump is not None and stack.jump.process is not None
    pid = _bastion_pid(stack)
    b = _hold(stack, plan.idle_sessions, False, lambda: rss_kb(pid))
    jump_pid = stack.jump.process.pid

    def jump_pss() -> int:
        return sum(pss_kb(p) for p in [jump_pid, *descendants(jump_pid)])

    j = _hold(stack, plan.idle_jump_sessions, True, jump_pss)
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
            "bastion: VmRSS of the bastion process; OpenSSH jump host: PSS summed over its "
            "sshd processes (sessions tunnelled through it, ssh -J style)"
        ),
    }


def _load(argv: list[str], clients: int, seconds: float) -> tuple[int, int, float]:
    """``clients`` threads running ``ssh ... true`` back to back for ``seconds``."""
    done = [0]
    failed = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        while time.perf_counter() < deadline:
            try:
                run_ssh([*argv, "true"], timeout=60)
                ok = True
            except (BenchError, subprocess.TimeoutExpired):
                ok = False
            with lock:
                if ok:
                    done[0] += 1
                else:
                    failed[0] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0], failed[0], time.perf_counter() - started


def login_rate(stack: BenchStack, plan: Plan) -> dict[str, Any]:
    paths = stack.paths("aes128-gcm")
    out: dict[str, Any] = {"clients": plan.load_clients, "seconds": plan.load_seconds}
    for path in ("openssh_direct", "bastion", "bastion_fresh", "openssh_jump", "bastion_jump"):
        pid = _bastion_pid(stack, path)
        c0, m0 = cpu_seconds(pid), machine_busy_seconds()
        done, failed, elapsed = _load(paths[path], plan.load_clients, plan.load_seconds)
        cpu, machine = cpu_seconds(pid) - c0, machine_busy_seconds() - m0
        entry: dict[str, Any] = {
            "logins_per_s": round(done / elapsed, 1),
            "logins": done,
            "failed": failed,
            # every process on the machine: ssh clients, sshd, the bastion, ...
            "machine_cpu_ms_per_login": round(machine * 1000 / max(done, 1), 1),
            "machine_cpu_util": round(machine / elapsed / len(os.sched_getaffinity(0)), 2),
        }
        if path in LOGIN_BASTION_PATHS and done:
            entry["bastion_cpu_ms_per_login"] = round(cpu * 1000 / done, 2)
            entry["bastion_cpu_util"] = round(cpu / elapsed, 2)
        out[path] = entry
    direct = out["openssh_direct"]["logins_per_s"]
    for path in LOGIN_PATHS:
        out[path]["vs_openssh_direct"] = round(out[path]["logins_per_s"] / direct, 2)
    return out


# --------------------------------------------------------------------------
# 5: signing


def signing_cost(stack: BenchStack, plan: Plan) -> dict[str, Any]:
    out = signing.measure(stack, plan.signs)
    # end to end: the same login through a bastion signing locally
    local = stack.start_local_ca_bastion()
    try:
        # both with upstream reuse off, so that every login is signed
        assert stack.fresh_bastion is not None and local.process is not None
        vault_pid = _bastion_pid(stack, "bastion_fresh")
        prefix = stack.paths("aes128-gcm")["bastion"][:-3]
        argvs = {
            "vault": [*prefix, "-p", str(stack.fresh_bastion.port), "127.0.0.1", "true"],
            "local_ca": [*prefix, "-p", str(local.port), "127.0.0.1", "true"],
        }
        pids = {"vault": vault_pid, "local_ca": local.process.pid}
        times: dict[str, list[float]] = {k: [] for k in argvs}
        cpu: dict[str, float] = dict.fromkeys(argvs, 0.0)
        for argv in argvs.values():
            run_ssh(argv)
        for rep in range(plan.signing_logins):
            for k in _rotate(tuple(argvs), rep):
                c0 = cpu_seconds(pids[k])
                times[k].append(run_ssh(argvs[k]) * 1000)
                cpu[k] += cpu_seconds(pids[k]) - c0
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


# --------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import asyncssh

    import devstack

    def first_line(argv: list[str]) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "?"
        return (proc.stdout or proc.stderr).strip().splitlines()[0]

    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]

        uv = str(uvloop.__version__)
    except ImportError:
        uv = "not installed"
    return {
        "python": platform.python_version(),
        "asyncssh": asyncssh.__version__,
        "openssh": first_line([devstack.ssh_bin(), "-V"]),
        "consul": first_line([devstack.consul_bin(), "version"]),
        "openbao": first_line([devstack.bao_bin(), "version"]),
        "uvloop": uv,
    }


def _git() -> str:
    proc = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() or "?"


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


SECTIONS = (
    "throughput",
    "login",
    "route_propagation",
    "concurrency",
    "signing",
)


def _stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the stack is stopped on the way out.

    SIGHUP gets a handler that does nothing: the bench still survives a hang-up
    as under nohup, but its children start with the default disposition (an
    ignored signal would be inherited) and the ssh clients behave as from a
    terminal: ssh ends its ProxyJump child with SIGHUP.
    """

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, lambda signum, frame: None)


def run(plan: Plan, out_dir: Path, name: str, sections: tuple[str, ...], keep: bool) -> int:
    _stop_on_sigterm()
    nofile = _raise_nofile()
    started = time.monotonic()
    results: dict[str, Any] = {
        "meta": {
            "mode": "quick" if plan.quick else "full",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "host": platform.node(),
            "cpus": len(os.sched_getaffinity(0)),
            "kernel": platform.release(),
            "git": _git(),
            "nofile": nofile,
            "plan": asdict(plan),
            "versions": _versions(),
        }
    }
    errors = 0
    timings: dict[str, float] = {}
    # other work on the machine skews every figure: record how busy it was
    loads: dict[str, list[float]] = {"start": [round(x, 2) for x in os.getloadavg()]}
    print(f"[bench] starting the stack ({results['meta']['mode']} run)", flush=True)
    with BenchStack(keep=keep) as stack:
        results["meta"]["stack_seconds"] = round(time.monotonic() - started, 1)
        steps: list[tuple[str, Callable[[], None]]] = []

        def do_throughput() -> None:
            tp, cpu = throughput(stack, plan)
            results["throughput"] = tp
            results["cpu_per_gb"] = cpu

        def do_login() -> None:
            results["login"] = logins(stack, plan)

        def do_propagation() -> None:
            results["route_propagation"] = propagation.measure(
                stack, plan.changes, plan.login_changes
            )

        def do_concurrency() -> None:
            results["concurrency"] = {
                "idle": idle_sessions(stack, plan),
                "login_rate": login_rate(stack, plan),
            }

        def do_signing() -> None:
            results["signing"] = signing_cost(stack, plan)

        table = {
            "throughput": do_throughput,
            "login": do_login,
            "route_propagation": do_propagation,
            "concurrency": do_concurrency,
            "signing": do_signing,
        }
        steps = [(s, table[s]) for s in sections]
        for section, step in steps:
            loads[section] = [round(x, 2) for x in os.getloadavg()]
            t0 = time.monotonic()
            print(f"[bench] {section}", flush=True)
            try:
                step()
            except (BenchError, OSError, subprocess.SubprocessError) as exc:
                errors += 1
                results.setdefault("errors", {})[section] = f"{type(exc).__name__}: {exc}"
                print(f"[bench] {section} FAILED: {exc}", flush=True)
            timings[section] = round(time.monotonic() - t0, 1)
            print(f"[bench] {section} done in {timings[section]} s", flush=True)
    results["meta"]["section_seconds"] = timings
    loads["end"] = [round(x, 2) for x in os.getloadavg()]
    results["meta"]["loadavg_before_section"] = loads
    results["meta"]["total_seconds"] = round(time.monotonic() - started, 1)
    if FAILURES:
        results["failures"] = list(FAILURES)
    results["targets"] = report.targets(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(report.markdown(results))
    print(f"[bench] wrote {out_dir / name}.json and .md in {results['meta']['total_seconds']} s")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and counts (< 60 s)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default=None, help="file name stem (latest / quick)")
    parser.add_argument("--reps", type=int, default=3, help="runs per path (full mode)")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}"
    )
    parser.add_argument("--keep", action="store_true", help="keep the stack's directory")
    args = parser.parse_args(argv)
    sections = tuple(s for s in args.sections.split(",") if s)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    plan = Plan.small() if args.quick else Plan.full(args.reps)
    name = args.name or ("quick" if args.quick else "latest")
    return run(plan, args.out, name, sections, args.keep)


if __name__ == "__main__":
    sys.exit(main())
