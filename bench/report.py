"""Turning results into the target checklist and ``latest.md``."""

from __future__ import annotations

from typing import Any

PATH_NAMES = {
    "openssh_direct": "OpenSSH direct",
    "openssh_jump": "OpenSSH jump host (`-J`)",
    "bastion": "bastion, routed session",
    "bastion_jump": "bastion as `-J`",
    "bastion_fresh": "bastion, routed, upstream reuse off",
}


def _get(results: dict[str, Any], *keys: str) -> Any:
    cur: Any = results
    for key in keys:
        if not isinstance(cur, dict) or key not in cur:
            return None
        cur = cur[key]
    return cur


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 6's targets, each with the measured value and whether it is met."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: Any, goal: str, met: bool | None) -> None:
        out.append({"target": name, "goal": goal, "value": value, "met": met})

    tp = results.get("throughput") or {}
    for cipher in ("aes128-gcm", "default"):
        for direction in ("download", "upload", "both"):
            ratio = _get(tp, cipher, direction, "bastion", "vs_openssh_jump")
            add(
                f"routed throughput, {cipher}, {direction}",
                ratio,
                ">= 1.0x OpenSSH jump host",
                None if ratio is None else ratio >= 1.0,
            )
    for cipher in ("aes128-gcm", "default"):
        for direction in ("download", "upload", "both"):
            ratio = _get(tp, cipher, direction, "bastion_jump", "vs_openssh_jump")
            add(
                f"bastion -J throughput, {cipher}, {direction}",
                ratio,
                ">= 0.9x OpenSSH jump host",
                None if ratio is None else ratio >= 0.9,
            )
    login = _get(results, "login", "paths", "bastion") or {}
    jump_r, direct_r = login.get("vs_openssh_jump"), login.get("vs_openssh_direct")
    add(
        "login p50 vs OpenSSH jump host",
        jump_r,
        "<= 0.5x",
        None if jump_r is None else jump_r <= 0.5,
    )
    add(
        "login p50 vs OpenSSH direct",
        direct_r,
        "<= 1.0x",
        None if direct_r is None else direct_r <= 1.0,
    )
    cpu = _get(results, "login", "bastion_cpu_ms_per_login", "bastion")
    add("bastion CPU per login (ms)", cpu, "<= 10 ms", None if cpu is None else cpu <= 10)
    cpu = _get(results, "login", "bastion_cpu_ms_per_login", "bastion_fresh")
    add(
        "bastion CPU per login, upstream reuse off (ms)",
        cpu,
        "<= 10 ms",
        None if cpu is None else cpu <= 10,
    )
    p99 = _get(results, "route_propagation", "in_force_ms", "p99")
    add("route propagation p99 (ms)", p99, "< 250 ms", None if p99 is None else p99 < 250)
    idle = _get(results, "concurrency", "idle", "bastion") or {}
    rss, n = idle.get("rss_mb"), idle.get("sessions")
    add(
        f"bastion RSS with {n} idle sessions (MB)",
        rss,
        "<= 150 MB at 1,000 sessions",
        None if rss is None else rss <= 150,
    )
    rate = _get(results, "concurrency", "login_rate", "bastion", "vs_openssh_direct")
    add(
        "new logins/s, 16 clients, vs OpenSSH direct",
        rate,
        ">= 1.0x",
        None if rate is None else rate >= 1.0,
    )
    rate = _get(results, "concurrency", "login_rate", "bastion_fresh", "vs_openssh_direct")
    add(
        "new logins/s, 16 clients, upstream reuse off, vs OpenSSH direct",
        rate,
        ">= 1.0x",
        None if rate is None else rate >= 1.0,
    )
    return out


def _stat(s: dict[str, Any] | None, unit: str = "") -> str:
    if not s:
        return "n/a"
    if s.get("n", 1) == 1 or s["min"] == s["max"]:
        return f"{s['median']:g}{unit}"
    return f"{s['median']:g}{unit} ({s['min']:g}-{s['max']:g})"


def markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    lines: list[str] = []
    w = lines.append
    w("# Bastion benchmark")
    w("")
    w(
        f"{meta.get('mode', '?')} run, {meta.get('date', '?')}, git `{meta.get('git', '?')}`, "
        f"{meta.get('cpus', '?')} CPUs, kernel {meta.get('kernel', '?')}, "
        f"total {meta.get('total_seconds', '?')} s. "
        "Produced by `.venv/bin/python -m bench.run` (see `bench/run.py` for the method); "
        "raw numbers in the `.json` next to this file."
    )
    w("")
    versions = meta.get("versions", {})
    if versions:
        w("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
        w("")
    if results.get("errors"):
        w("**Sections that failed:**")
        for section, err in results["errors"].items():
            w(f"- {section}: {err}")
        w("")

    if results.get("failures"):
        w(f"**Single runs that failed ({len(results['failures'])}; left out of the figures):**")
        for f in results["failures"][:20]:
            w(f"- {f['section']} {f['run']}: {f['error']}")
        w("")
    w("## Targets (issue 6)")
    w("")
    w("| target | goal | measured | met |")
    w("|---|---|---|---|")
    for t in results.get("targets", []):
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        w(f"| {t['target']} | {t['goal']} | {t['value']} | {met} |")
    w("")

    tp = results.get("throughput")
    if tp:
        sizes = tp.get("bytes", {})
        w("## 1. Throughput (MB/s, median (min-max); ratio vs OpenSSH jump host)")
        w("")
        w(
            f"download `head -c {sizes.get('download')} /dev/zero`, upload "
            f"`cat > /dev/null` of {sizes.get('upload')} bytes, both ways `cat` of "
            f"{sizes.get('both_each_way')} bytes each way; MB = 10^6 bytes; "
            f"{meta.get('plan', {}).get('reps', '?')} alternating runs per path."
        )
        w("")
        for cipher in ("aes128-gcm", "default"):
            if cipher not in tp:
                continue
            label = (
                "aes128-gcm@openssh.com on every leg"
                if cipher == "aes128-gcm"
                else "OpenSSH's default (chacha20-poly1305 on the client's legs; the "
                "bastion's own upstream leg picks aes128-gcm)"
            )
            w(f"### {label}")
            w("")
            w("| path | download | upload | both ways |")
            w("|---|---|---|---|")
            for path, title in PATH_NAMES.items():
                if _get(tp, cipher, "download", path) is None:
                    continue  # a login-only path
                cells = []
                for direction in ("download", "upload", "both"):
                    e = _get(tp, cipher, direction, path)
                    if e is None:
                        cells.append("n/a")
                        continue
                    cells.append(f"{_stat(e['mb_s'])} · {e['vs_openssh_jump']}x")
                w(f"| {title} | {' | '.join(cells)} |")
            w("")

    login = results.get("login")
    if login:
        w("## 2. Login latency (`ssh host true`, curve25519-sha256, aes128-gcm)")
        w("")
        w("| path | p50 ms | p95 ms | vs OpenSSH jump | vs OpenSSH direct |")
        w("|---|---|---|---|---|")
        for path, title in PATH_NAMES.items():
            e = login["paths"].get(path)
            if e:
                w(
                    f"| {title} | {e['p50_ms']} | {e['p95_ms']} | {e['vs_openssh_jump']}x | "
                    f"{e['vs_openssh_direct']}x |"
                )
        w("")
        cpu = login.get("bastion_cpu_ms_per_login", {})
        w(
            f"Bastion CPU per login: {cpu.get('bastion')} ms (routed session, the person's "
            "upstream connection reused: one SSH handshake, a new channel upstream, the "
            f"session relay), {cpu.get('bastion_fresh')} ms (routed, reuse off: both SSH "
            f"handshakes and a certificate request), {cpu.get('bastion_jump')} ms "
            "(as `-J`: one handshake and a TCP stream)."
        )
        w("")

    prop = results.get("route_propagation")
    if prop:
        f = prop["in_force_ms"]
        g = prop["first_login_ms"]
        w("## 3. Route propagation (`PUT /v1/kv/users/bob`)")
        w("")
        w("| measure | changes | p50 ms | p99 ms | max ms |")
        w("|---|---|---|---|---|")
        w(f"| new route in force | {f['n']} | {f['p50']} | {f['p99']} | {f['max']} |")
        w(
            f"| first login on the new host, started | {g['n']} | {g['p50']} | "
            f"{g['p99']} | {g['max']} |"
        )
        d = prop.get("first_login_done_ms")
        if d:
            w(
                f"| first login on the new host, finished | {d['n']} | {d['p50']} | "
                f"{d['p99']} | {d['max']} |"
            )
        w("")
        w(f"Method: {prop['method']}.")
        w("")

    conc = results.get("concurrency")
    if conc:
        idle = conc.get("idle", {})
        b, j = idle.get("bastion", {}), idle.get("openssh_jump", {})
        w("## 4. Concurrency")
        w("")
        if b:
            w(
                f"Idle interactive sessions through the bastion: {b['sessions']} sessions "
                f"opened in {b['open_seconds']} s; bastion RSS {b['rss_before_mb']} MB before, "
                f"**{b['rss_mb']} MB** with them ({b['per_session_kb']} KB per session)."
            )
        if j:
            w(
                f"OpenSSH jump host for comparison: {j['sessions']} sessions, its sshd "
                f"processes' PSS {j['pss_before_mb']} → {j['pss_mb']} MB "
                f"({j['per_session_kb']} KB per session)."
            )
        w("")
        rate = conc.get("login_rate", {})
        if rate:
            w(
                f"New logins per second, {rate['clients']} parallel `ssh host true` clients "
                f"for {rate['seconds']} s:"
            )
            w("")
            w(
                "| path | logins/s | failed | vs OpenSSH direct | bastion CPU ms/login | "
                "machine CPU ms/login | machine CPU busy |"
            )
            w("|---|---|---|---|---|---|---|")
            for path, title in PATH_NAMES.items():
                e = rate.get(path)
                if e:
                    w(
                        f"| {title} | {e['logins_per_s']} | {e['failed']} | "
                        f"{e['vs_openssh_direct']}x | {e.get('bastion_cpu_ms_per_login', '')} | "
                        f"{e.get('machine_cpu_ms_per_login', '')} | "
                        f"{round(100 * e.get('machine_cpu_util', 0))}% |"
                    )
            w("")

    sig = results.get("signing")
    if sig:
        w("## 5. Certificate signing per login")
        w("")
        w("| signer | issue p50 ms | issue p95 ms | bastion-side CPU ms | OpenBao CPU ms |")
        w("|---|---|---|---|---|")
        for k, title in (("vault", "Vault/OpenBao SSH engine"), ("local_ca", "local CA key")):
            e = sig[k]
            w(
                f"| {title} | {e['wall_ms']['p50']} | {e['wall_ms']['p95']} | "
                f"{e['bastion_side_cpu_ms']} | {e.get('openbao_cpu_ms', '—')} |"
            )
        w("")
        lg = sig.get("login")
        if lg:
            w(
                f"End to end (`ssh bastion true`): login p50 {lg['vault']['p50_ms']} ms with "
                f"Vault, {lg['local_ca']['p50_ms']} ms with a local CA; bastion CPU per login "
                f"{lg['vault']['bastion_cpu_ms_per_login']} vs "
                f"{lg['local_ca']['bastion_cpu_ms_per_login']} ms."
            )
            w("")

    cpu = results.get("cpu_per_gb")
    if cpu:
        w("## 6. CPU seconds per relayed GB (median (min-max))")
        w("")
        w("| cipher | path | download | upload | both ways |")
        w("|---|---|---|---|---|")
        for cipher in ("aes128-gcm", "default"):
            for path in ("bastion", "bastion_jump", "openssh_jump"):
                if _get(cpu, cipher, "download", path) is None:
                    continue
                cells = [
                    _stat(_get(cpu, cipher, d, path, "cpu_s_per_gb"))
                    for d in ("download", "upload", "both")
                ]
                title = "OpenSSH jump host's sshd" if path == "openssh_jump" else PATH_NAMES[path]
                w(f"| {cipher} | {title} | {' | '.join(cells)} |")
        w("")
        w(f"Method: {cpu.get('method', '')}.")
        w("")

    loads = meta.get("loadavg_before_section")
    if loads:
        w(
            "Machine load average (1/5/15 min) when each section started, to judge how much "
            "other work shared the CPUs: "
            + "; ".join(f"{k} {'/'.join(str(x) for x in v)}" for k, v in loads.items())
            + "."
        )
        w("")
    secs = meta.get("section_seconds")
    if secs:
        w(
            "Section run times: "
            + ", ".join(f"{k} {v} s" for k, v in secs.items())
            + f"; stack start {meta.get('stack_seconds')} s."
        )
        w("")
    return "\n".join(lines)
