"""Throughput over every path, and CPU seconds per relayed GB.

Download ``head -c N /dev/zero``, upload ``cat > /dev/null``, both ways
``cat``; the paths alternate within each repetition. The bastion's CPU is
read from /proc (its process and any workers); the OpenSSH jump host's and
the nested hop's from the jump host's sshd process tree (the nested hop's
tree holds alice's inner ssh client too).
"""

from __future__ import annotations

import json
import time
from typing import Any

from bench.measure import (
    MB,
    BenchError,
    TreeCpu,
    percentile,
    run_ssh,
    summary,
    tree_cpu_seconds,
    wait_for_lines,
)
from bench.plan import (
    BASTION_PATHS,
    CPU_PATHS,
    DIRECTIONS,
    FAILURES,
    OPENSSH_CPU_PATHS,
    PATHS,
    Plan,
    bastion_pid,
    rotate,
)
from bench.stack import CIPHERS, BenchStack, remote


def transfer(argv: list[str], direction: str, size: int) -> float:
    """One transfer of ``size`` bytes over the path ``argv``; wall seconds."""
    if direction == "download":
        return run_ssh(remote(argv, f"head -c {size} /dev/zero"), timeout=180)
    if direction == "upload":
        return run_ssh(remote(argv, "cat > /dev/null"), stdin_bytes=size, timeout=180)
    return run_ssh(remote(argv, "cat"), stdin_bytes=size, timeout=180)


def expected_bytes(direction: str, size: int) -> tuple[int, int]:
    """(person → host, host → person) payload bytes."""
    return {"download": (0, size), "upload": (size, 0), "both": (size, size)}[direction]


def median(values: list[float]) -> float:
    return percentile(values, 50)


def ratio(values: list[float], reference: list[float]) -> float | None:
    if not values or not reference:
        return None
    return round(median(values) / median(reference), 2)


def check_audit(stack: BenchStack, lines_before: int, path: str, up: int, down: int) -> None:
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


def _one(
    stack: BenchStack, argv: list[str], path: str, direction: str, size: int
) -> tuple[float, float]:
    """(MB/s, CPU seconds on the measured side) of one transfer."""
    assert stack.bastion is not None and stack.jump is not None
    assert stack.jump.process is not None
    up, down = expected_bytes(direction, size)
    pid = bastion_pid(stack)
    audit_lines = len(wait_for_lines(stack.bastion.audit_file, 0, 0))
    c0 = tree_cpu_seconds(pid)
    # the jump host's sshd processes come and go with the connection
    tree = TreeCpu(stack.jump.process.pid) if path in OPENSSH_CPU_PATHS else None
    if tree is not None:
        tree.start()
    try:
        seconds = transfer(argv, direction, size)
    finally:
        used = tree.stop() if tree is not None else 0.0
    if path in BASTION_PATHS:
        used = tree_cpu_seconds(pid) - c0
        check_audit(stack, audit_lines, path, up, down)
    return size / seconds / MB, used


def throughput(stack: BenchStack, plan: Plan) -> tuple[dict[str, Any], dict[str, Any]]:
    sizes = {"download": plan.download, "upload": plan.upload, "both": plan.both}
    out: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    for cipher in CIPHERS:
        paths = stack.paths(cipher)
        out[cipher] = {}
        cpu[cipher] = {}
        for direction in DIRECTIONS:
            size = sizes[direction]
            up, down = expected_bytes(direction, size)
            rates: dict[str, list[float]] = {p: [] for p in PATHS}
            cpu_gb: dict[str, list[float]] = {p: [] for p in CPU_PATHS}
            for rep in range(plan.reps):
                for path in rotate(PATHS, rep):
                    try:
                        rate, used = _one(stack, paths[path], path, direction, size)
                    except BenchError as exc:
                        FAILURES.add("throughput", f"{cipher} {direction} {path}", exc)
                        continue
                    rates[path].append(rate)
                    if path in CPU_PATHS:
                        cpu_gb[path].append(used / ((up + down) / 1e9))
                    print(f"[bench]   {cipher} {direction} {path}: {rate:.0f} MB/s", flush=True)
            out[cipher][direction] = {
                path: {
                    "mb_s": summary(rates[path], 0),
                    "vs_openssh_jump": ratio(rates[path], rates["openssh_jump"]),
                    "vs_openssh_direct": ratio(rates[path], rates["openssh_direct"]),
                    "vs_openssh_nested": ratio(rates[path], rates["openssh_nested"]),
                }
                for path in PATHS
                if rates[path]
            }
            cpu[cipher][direction] = {
                path: {"cpu_s_per_gb": summary(cpu_gb[path], 2)}
                for path in CPU_PATHS
                if cpu_gb[path]
            }
            nested = cpu_gb["openssh_nested"]
            for path in BASTION_PATHS:
                if path in cpu[cipher][direction] and nested:
                    cpu[cipher][direction][path]["vs_openssh_nested"] = ratio(cpu_gb[path], nested)
    out["bytes"] = {"download": plan.download, "upload": plan.upload, "both_each_way": plan.both}
    cpu["method"] = (
        "bastion utime+stime (/proc/PID/stat, the process and its workers) over each "
        "transfer, divided by the payload bytes relayed in both directions (both ways counts "
        "2 x the size); GB = 1e9 bytes. OpenSSH jump host (-J): the same for the jump host's "
        "sshd processes; nested hop: its sshd processes plus alice's inner ssh client there "
        "(the same process tree), sampled every 50 ms (per-connection processes come and go)"
    )
    return out, cpu
