"""Turning results into ``latest.md``: the target checklist, the tables,
and links to the charts (``bench/plots.py``) next to it."""

from __future__ import annotations

from typing import Any

from bench.plan import PATH_NAMES
from bench.targets import get as _get
from bench.targets import targets

__all__ = ["markdown", "targets"]


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
    plots = results.get("plots", {})
    if plots:
        w("Charts: " + ", ".join(f"[{k}]({v})" for k, v in plots.items()) + ".")
        w("")
    w("## Targets (issues 14 and 6)")
    w("")
    w("| issue | target | goal | measured | met |")
    w("|---|---|---|---|---|")
    for t in results.get("targets", []):
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        w(f"| {t.get('issue', '')} | {t['target']} | {t['goal']} | {t['value']} | {met} |")
    w("")

    tp = results.get("throughput")
    if tp:
        sizes = tp.get("bytes", {})
        w(
            "## 1. Throughput (MB/s, median (min-max); ratios vs the OpenSSH jump host "
            "and vs the OpenSSH nested hop)"
        )
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
            chart = plots.get(f"throughput-{cipher}")
            if chart:
                w(f"![throughput, {cipher}]({chart})")
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
                    cells.append(
                        f"{_stat(e['mb_s'])} · {e['vs_openssh_jump']}x · "
                        f"{e.get('vs_openssh_nested')}x"
                    )
                w(f"| {title} | {' | '.join(cells)} |")
            w("")

    login = results.get("login")
    if login:
        w("## 2. Login latency (`ssh host true`, curve25519-sha256, aes128-gcm)")
        w("")
        if plots.get("login-latency"):
            w(f"![login latency]({plots['login-latency']})")
            w("")
        w("| path | p50 ms | p95 ms | vs OpenSSH jump | vs OpenSSH direct | vs nested hop |")
        w("|---|---|---|---|---|---|")
        for path, title in PATH_NAMES.items():
            e = login["paths"].get(path)
            if e:
                w(
                    f"| {title} | {e['p50_ms']} | {e['p95_ms']} | {e['vs_openssh_jump']}x | "
                    f"{e['vs_openssh_direct']}x | {e.get('vs_openssh_nested')}x |"
                )
        w("")
        jcpu = login.get("jump_host_cpu_ms_per_login", {})
        if jcpu:
            w(
                f"Jump host CPU per login (its sshd processes, read from the sshd master's "
                f"reaped-children counters): {jcpu.get('openssh_jump')} ms as `-J`, "
                f"{jcpu.get('openssh_nested')} ms for the nested hop (sshd plus the inner ssh "
                "client's login to host-102)."
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
        w("## 6. CPU seconds per relayed GB (median (min-max) · bastion vs nested hop)")
        w("")
        w("| cipher | path | download | upload | both ways |")
        w("|---|---|---|---|---|")
        for cipher in ("aes128-gcm", "default"):
            for path in ("bastion", "bastion_jump", "openssh_jump", "openssh_nested"):
                if _get(cpu, cipher, "download", path) is None:
                    continue
                cells = []
                for d in ("download", "upload", "both"):
                    cell = _stat(_get(cpu, cipher, d, path, "cpu_s_per_gb"))
                    vs = _get(cpu, cipher, d, path, "vs_openssh_nested")
                    cells.append(f"{cell} · {vs}x" if vs is not None else cell)
                title = {
                    "openssh_jump": "OpenSSH jump host's sshd",
                    "openssh_nested": "nested hop: jump host's sshd + inner ssh",
                }.get(path, PATH_NAMES[path])
                w(f"| {cipher} | {title} | {' | '.join(cells)} |")
        w("")
        w(f"Method: {cpu.get('method', '')}.")
        w("")

    scale = results.get("scale")
    if scale:
        lines.extend(_scale(scale, plots))

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


def _scale(scale: dict[str, Any], plots: dict[str, str]) -> list[str]:
    lines: list[str] = []
    w = lines.append
    w("## 7. Scale: workers, parallel downloads, fresh logins, 10,000 idle sessions")
    w("")
    if plots.get("scale"):
        w(f"![scale]({plots['scale']})")
        w("")
    for key, note in scale.get("notes", {}).items():
        w(f"- {key}: {note}")
    w("")
    par = scale.get("parallel_downloads")
    if par:
        w(
            f"Aggregate throughput of parallel downloads ({par['cipher']}, "
            f"{par['total_bytes']} bytes per run split over the streams; bastions with upstream "
            "reuse off, so that each download has its own upstream connection as with OpenSSH), "
            "MB/s median (min-max):"
        )
        w("")
        counts = [k for k in par if k.isdigit()]
        w("| path | " + " | ".join(f"{c} downloads" for c in counts) + " |")
        w("|---|" + "---|" * len(counts))
        for path, title in PATH_NAMES.items():
            if not any(_get(par, c, path) for c in counts):
                continue
            cells = []
            for c in counts:
                e = _get(par, c, path)
                if not e:
                    cells.append("n/a")
                    continue
                cpu = e.get("bastion_cpu_s_per_gb")
                extra = f", bastion {cpu['median']} CPU s/GB" if cpu else ""
                cells.append(f"{_stat(e['mb_s'])} ({e['machine_cpus_busy']} CPUs busy{extra})")
            w(f"| {title} | {' | '.join(cells)} |")
        w("")
        ratios = {c: _get(par, c, "w2_vs_w1") for c in counts}
        w(
            "workers = 2 vs workers = 1: "
            + ", ".join(
                f"{c} downloads {'n/a' if r is None else f'{r}x'}" for c, r in ratios.items()
            )
        )
        w("")
    logins = scale.get("logins")
    if logins:
        w(
            f"Fresh logins per second, {logins['clients']} parallel `ssh host true` clients for "
            f"{logins['seconds']} s (bastions with upstream reuse off):"
        )
        w("")
        w(
            "| path | logins/s | failed | vs OpenSSH direct | bastion CPU ms/login "
            "| machine CPU ms/login |"
        )
        w("|---|---|---|---|---|---|")
        for path, title in PATH_NAMES.items():
            e = logins.get(path)
            if isinstance(e, dict):
                w(
                    f"| {title} | {e['logins_per_s']} | {e['failed']} | "
                    f"{e['vs_openssh_direct']}x | {e.get('bastion_cpu_ms_per_login', '')} | "
                    f"{e['machine_cpu_ms_per_login']} |"
                )
        w("")
        if "w2_vs_w1" in logins:
            w(f"workers = 2 vs workers = 1: {logins['w2_vs_w1']}x.")
            w("")
    reuse = scale.get("reuse")
    if reuse:
        w(
            f"Upstream reuse with workers: one person, {reuse['logins']} logins in a row from "
            "one machine; the share of logins after the first that reused an upstream "
            "connection:"
        )
        w("")
        w("| bastion | reused | hit rate |")
        w("|---|---|---|")
        for key, title in (
            ("workers_1", "workers = 1"),
            ("workers_2_source", "workers = 2, steered by source address (default)"),
            ("workers_2_kernel", 'workers = 2, `worker_steering = "kernel"`'),
        ):
            e = reuse.get(key)
            if isinstance(e, dict):
                got = (e.get("reused", ""), e.get("hit_rate", e.get("error", "")))
                w(f"| {title} | {got[0]} | {got[1]} |")
        w("")
    idle = scale.get("idle")
    if idle:
        w(
            f"Idle sessions through one bastion (RSS {idle['bastion_rss_before_mb']} MB before; "
            f"{idle['method']}):"
        )
        w("")
        if plots.get("idle-rss"):
            w(f"![bastion memory against idle sessions]({plots['idle-rss']})")
            w("")
        w(
            "| sessions | failed | open s (cumulative) | RSS MB | PSS MB | bastion processes "
            "| host-102 processes |"
        )
        w("|---|---|---|---|---|---|---|")
        for p in idle.get("points", []):
            w(
                f"| {p['sessions']} | {p['failed']} | {p['step_seconds']} "
                f"({p['open_seconds']}) | {p['rss_mb']} | {p['pss_mb']} | "
                f"{p['bastion_processes']} | {p['host_processes']} |"
            )
        w("")
    return lines
