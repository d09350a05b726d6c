"""The targets of issues 6 and 14, each with the measured value and whether
it is met (``None``: not measured in this run)."""

from __future__ import annotations

from typing import Any

CIPHER_NAMES = ("aes128-gcm", "default")
DIRECTION_NAMES = ("download", "upload", "both")
IDLE_TARGET_SESSIONS = 10_000


def get(results: dict[str, Any], *keys: str) -> Any:
    """``results[k1][k2]...``, or None where a key is missing."""
    cur: Any = results
    for key in keys:
        if not isinstance(cur, dict) or key not in cur:
            return None
        cur = cur[key]
    return cur


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(issue: int, name: str, value: Any, goal: str, met: bool | None) -> None:
        out.append({"issue": issue, "target": name, "goal": goal, "value": value, "met": met})

    def at_least(issue: int, name: str, value: Any, bound: float, unit: str = "x") -> None:
        met = None if value is None else value >= bound
        add(issue, name, value, f">= {bound}{unit}", met)

    def at_most(issue: int, name: str, value: Any, bound: float, unit: str = "x") -> None:
        met = None if value is None else value <= bound
        add(issue, name, value, f"<= {bound}{unit}", met)

    tp = results.get("throughput") or {}
    cpu = results.get("cpu_per_gb") or {}
    for cipher in CIPHER_NAMES:
        for d in DIRECTION_NAMES:
            value = get(tp, cipher, d, "bastion", "vs_openssh_nested")
            at_least(14, f"routed vs OpenSSH nested hop, {cipher}, {d}", value, 1.3)
    for cipher in CIPHER_NAMES:
        for d in DIRECTION_NAMES:
            value = get(cpu, cipher, d, "bastion", "vs_openssh_nested")
            at_most(14, f"bastion CPU/GB vs nested hop's sshd + ssh, {cipher}, {d}", value, 1.0)
    for cipher in CIPHER_NAMES:
        for d in DIRECTION_NAMES:
            value = get(tp, cipher, d, "bastion", "vs_openssh_jump")
            at_least(14, f"routed vs OpenSSH jump host, {cipher}, {d}", value, 1.2)
    for cipher in CIPHER_NAMES:
        for d in DIRECTION_NAMES:
            value = get(tp, cipher, d, "bastion_jump", "vs_openssh_jump")
            at_least(14, f"bastion -J vs OpenSSH jump host, {cipher}, {d}", value, 1.0)

    scale = results.get("scale") or {}
    clients = get(scale, "logins", "clients")
    value = get(scale, "logins", "bastion_fresh_w2", "vs_openssh_direct")
    at_least(14, f"fresh logins/s, {clients} clients, workers = 2, vs OpenSSH direct", value, 1.0)
    value = get(results, "login", "bastion_cpu_ms_per_login", "bastion_fresh")
    at_most(14, "bastion CPU per fresh login (reuse off)", value, 10, " ms")
    value = get(scale, "parallel_downloads", "4", "w2_vs_w1")
    at_least(14, "4 parallel downloads, workers = 2 vs workers = 1", value, 1.6)
    points = get(scale, "idle", "points") or []
    last = points[-1] if points else {}
    n, rss = last.get("sessions"), last.get("rss_mb")
    met = None if rss is None or (n or 0) < IDLE_TARGET_SESSIONS else rss <= 400
    add(14, f"bastion RSS with {n} idle sessions (MB)", rss, "<= 400 MB at 10,000", met)

    login = get(results, "login", "paths", "bastion") or {}
    at_most(6, "login p50 vs OpenSSH jump host", login.get("vs_openssh_jump"), 0.5)
    at_most(6, "login p50 vs OpenSSH direct", login.get("vs_openssh_direct"), 1.0)
    value = get(results, "login", "bastion_cpu_ms_per_login", "bastion")
    at_most(6, "bastion CPU per login, upstream reuse on", value, 10, " ms")
    value = get(results, "route_propagation", "in_force_ms", "p99")
    at_most(6, "route propagation p99", value, 250, " ms")
    idle = get(results, "concurrency", "idle", "bastion") or {}
    n, rss = idle.get("sessions"), idle.get("rss_mb")
    add(6, f"bastion RSS with {n} idle PTY sessions (MB)", rss, "<= 150 MB at 1,000", None)
    if rss is not None:
        out[-1]["met"] = rss <= 150
    rate = results.get("concurrency", {}).get("login_rate", {})
    clients = rate.get("clients")
    value = get(rate, "bastion", "vs_openssh_direct")
    at_least(6, f"new logins/s, {clients} clients, vs OpenSSH direct", value, 1.0)
    value = get(rate, "bastion_fresh", "vs_openssh_direct")
    at_least(6, f"new logins/s, {clients} clients, reuse off, vs OpenSSH direct", value, 1.0)
    return out
