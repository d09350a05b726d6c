"""A/B: two bastions in one stack, transfers alternating between them.

A noisy machine moves every figure of a full run by 10-20 %; two bastions
measured in turn, in the same minutes, tell a real change from noise. Bastion
B differs from A by its ``BASTION_TUNING`` features and/or by the code it
runs (``--b-pythonpath`` of a checkout, e.g. ``git worktree add /tmp/old
HEAD~3``)::

    python -m bench.ab --b-tuning none                 # the speed-ups, on vs off
    python -m bench.ab --b-pythonpath /tmp/old --reps 7 # this tree vs an older one
    python -m bench.ab --logins 300 --directions ""    # CPU per login only

Prints, per direction and path, the median MB/s and bastion CPU s/GB (with
every run's CPU figure); with ``--logins N``, N ``ssh ... true`` logins per
bastion in alternating blocks of 25, and each bastion's CPU per login and
median login time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Sequence

from bench.measure import cpu_seconds, run_ssh
from bench.plan import DIRECTIONS
from bench.stack import CIPHERS, BenchStack
from bench.throughput import transfer


def _swap_port(argv: list[str], old: int, new: int) -> list[str]:
    return [a.replace(str(old), str(new)) for a in argv]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--a-tuning", default="all", help="BASTION_TUNING of bastion A")
    parser.add_argument("--b-tuning", default="all", help="BASTION_TUNING of bastion B")
    parser.add_argument("--b-pythonpath", default="", help="run bastion B from this checkout")
    parser.add_argument("--cipher", choices=sorted(CIPHERS), default="aes128-gcm")
    parser.add_argument("--directions", default=",".join(DIRECTIONS))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--mib", type=int, default=512, help="bytes per transfer, MiB")
    parser.add_argument("--logins", type=int, default=0, help="logins per bastion (0: none)")
    args = parser.parse_args(argv)
    directions = [d for d in args.directions.split(",") if d]
    if set(directions) - set(DIRECTIONS):
        parser.error(f"directions: {', '.join(DIRECTIONS)}")
    size = args.mib << 20

    saved = {k: os.environ.get(k) for k in ("BASTION_TUNING", "PYTHONPATH")}
    os.environ["BASTION_TUNING"] = args.a_tuning
    try:
        with BenchStack() as stack:
            a = stack.bastion
            os.environ["BASTION_TUNING"] = args.b_tuning
            if args.b_pythonpath:
                os.environ["PYTHONPATH"] = args.b_pythonpath
            b = stack._start_bastion("bastion-b", vault=True)
            assert a is not None and a.process is not None and b.process is not None
            paths = stack.paths(args.cipher)
            runs = {
                "A": (paths["bastion"], a.process.pid),
                "B": (_swap_port(paths["bastion"], a.port, b.port), b.process.pid),
                "A -J": (paths["bastion_jump"], a.process.pid),
                "B -J": (_swap_port(paths["bastion_jump"], a.port, b.port), b.process.pid),
            }
            for direction in directions:
                rates: dict[str, list[float]] = {k: [] for k in runs}
                cpu: dict[str, list[float]] = {k: [] for k in runs}
                gb = size / 1e9 * (2 if direction == "both" else 1)
                for rep in range(args.reps):
                    order = list(runs) if rep % 2 == 0 else list(reversed(runs))
                    for name in order:
                        command, pid = runs[name]
                        c0 = cpu_seconds(pid)
                        seconds = transfer(command, direction, size)
                        cpu[name].append((cpu_seconds(pid) - c0) / gb)
                        rates[name].append(size / seconds / 1e6)
                for name in runs:
                    print(
                        f"{direction:8s} {name:4s} {statistics.median(rates[name]):6.0f} MB/s  "
                        f"cpu {statistics.median(cpu[name]):.2f} s/GB  "
                        f"{[round(x, 2) for x in cpu[name]]}",
                        flush=True,
                    )
            if args.logins:
                _logins(runs["A"], runs["B"], args.logins)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return 0


def _logins(a: tuple[list[str], int], b: tuple[list[str], int], count: int) -> None:
    """Fresh ``ssh ... true`` logins, alternating A and B in blocks of 25."""
    cpu = {"A": 0.0, "B": 0.0}
    times: dict[str, list[float]] = {"A": [], "B": []}
    done = 0
    while done < count:
        block = min(25, count - done)
        for name, (argv, pid) in (("A", a), ("B", b)) if done % 50 == 0 else (("B", b), ("A", a)):
            c0 = cpu_seconds(pid)
            for _ in range(block):
                times[name].append(run_ssh([*argv, "true"], timeout=30) * 1000)
            cpu[name] += cpu_seconds(pid) - c0
        done += block
    for name in ("A", "B"):
        print(
            f"logins   {name:4s} cpu {cpu[name] / count * 1000:.2f} ms/login  "
            f"p50 {statistics.median(times[name]):.1f} ms",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
