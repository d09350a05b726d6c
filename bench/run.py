"""The benchmark: one command, the real stack, the bastion against OpenSSH.

    .venv/bin/python -m bench.run            # full run, about 11 minutes, quiet machine
    .venv/bin/python -m bench.run --quick    # tiny sizes, about a minute (smoke test)
    .venv/bin/python -m bench.run --sections scale   # one part (comma list)

Starts Consul (ACLs via bootstrap-acl.sh), OpenBao (bootstrap-vault.sh),
host-101/host-102 (sshd), a plain OpenSSH jump host, an ssh-agent and the
bastion with Vault-signed upstream certificates (see ``bench/stack.py``),
then measures, with the same cipher on every path and runs alternating
between paths:

1. throughput (download, upload, both ways) over five paths: OpenSSH direct,
   OpenSSH jump host (``-J``), the OpenSSH nested hop (``ssh -A jump ssh
   host``), bastion routed session, bastion as ``-J`` (``bench/throughput.py``);
2. login latency (``ssh host true``, curve25519) and CPU per login
   (``bench/logins.py``);
3. route propagation (Consul PUT → new route in force / first login);
4. bastion memory with idle PTY sessions; new logins/s with 16 clients;
5. certificate signing cost (Vault/OpenBao vs local CA);
6. CPU seconds per relayed GB (bastion, jump host, nested hop);
7. scale (``bench/scale.py``): 4 and 8 parallel downloads and fresh logins/s
   with 32 clients, OpenSSH against bastions with ``[server] workers`` 1 and
   2; 10,000 idle sessions through one bastion, RSS at each step.

Writes ``bench/results/latest.{md,json}`` and PNG charts next to them
(``quick.*`` with ``--quick``, or ``--out DIR`` / ``--name``). Needs root
(sshd, ``unshare``), like the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import logins, plots, propagation, report, scale, throughput
from bench.measure import BenchError
from bench.plan import FAILURES, Plan
from bench.stack import BenchStack
from devstack.process import StackError

ROOT = Path(__file__).resolve().parent.parent


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
    "scale",
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
            tp, cpu = throughput.throughput(stack, plan)
            results["throughput"] = tp
            results["cpu_per_gb"] = cpu

        def do_login() -> None:
            results["login"] = logins.logins(stack, plan)

        def do_propagation() -> None:
            results["route_propagation"] = propagation.measure(
                stack, plan.changes, plan.login_changes
            )

        def do_concurrency() -> None:
            results["concurrency"] = {
                "idle": scale.idle_sessions(stack, plan),
                "login_rate": logins.login_rate(stack, plan),
            }

        def do_scale() -> None:
            results["scale"] = scale.scale(stack, plan)

        def do_signing() -> None:
            results["signing"] = logins.signing_cost(stack, plan)

        table = {
            "throughput": do_throughput,
            "login": do_login,
            "route_propagation": do_propagation,
            "concurrency": do_concurrency,
            "scale": do_scale,
            "signing": do_signing,
        }
        steps = [(s, table[s]) for s in sections]
        for section, step in steps:
            loads[section] = [round(x, 2) for x in os.getloadavg()]
            t0 = time.monotonic()
            print(f"[bench] {section}", flush=True)
            try:
                step()
            except (BenchError, StackError, OSError, subprocess.SubprocessError) as exc:
                errors += 1
                results.setdefault("errors", {})[section] = f"{type(exc).__name__}: {exc}"
                print(f"[bench] {section} FAILED: {exc}", flush=True)
            timings[section] = round(time.monotonic() - t0, 1)
            print(f"[bench] {section} done in {timings[section]} s", flush=True)
    results["meta"]["section_seconds"] = timings
    loads["end"] = [round(x, 2) for x in os.getloadavg()]
    results["meta"]["loadavg_before_section"] = loads
    results["meta"]["total_seconds"] = round(time.monotonic() - started, 1)
    if FAILURES.runs:
        results["failures"] = list(FAILURES.runs)
    results["targets"] = report.targets(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    results["plots"] = plots.write(results, out_dir, name)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(report.markdown(results))
    print(
        "[bench] section times: "
        + ", ".join(f"{k} {v} s" for k, v in timings.items())
        + f"; stack start {results['meta'].get('stack_seconds')} s",
        flush=True,
    )
    print(
        f"[bench] wrote {out_dir / name}.json, .md and {len(results['plots'])} charts in "
        f"{results['meta']['total_seconds']} s"
    )
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and counts (~1 min)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default=None, help="file name stem (latest / quick)")
    parser.add_argument("--reps", type=int, default=3, help="runs per path (full mode)")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}"
    )
    parser.add_argument("--keep", action="store_true", help="keep the stack's directory")
    parser.add_argument(
        "--idle-steps",
        default="",
        help="idle sessions to reach in the scale section, e.g. 1000,2500,5000,10000",
    )
    args = parser.parse_args(argv)
    sections = tuple(s for s in args.sections.split(",") if s)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    plan = Plan.small() if args.quick else Plan.full(args.reps)
    if args.idle_steps:
        try:
            steps = tuple(int(x) for x in args.idle_steps.split(","))
        except ValueError:
            parser.error("--idle-steps: whole numbers, comma separated")
        plan = dataclasses.replace(plan, idle_steps=steps)
    name = args.name or ("quick" if args.quick else "latest")
    return run(plan, args.out, name, sections, args.keep)


if __name__ == "__main__":
    sys.exit(main())
