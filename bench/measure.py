"""Measuring tools: summary statistics, /proc readings, timed OpenSSH runs."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1_000_000


class BenchError(RuntimeError):
    """A measurement could not be taken (a run failed)."""


def summary(samples: Sequence[float], digits: int = 1) -> dict[str, Any]:
    """median, min, max (and p95/p99 where there are enough samples)."""
    if not samples:
        raise BenchError("no samples")
    out: dict[str, Any] = {
        "median": round(statistics.median(samples), digits),
        "min": round(min(samples), digits),
        "max": round(max(samples), digits),
        "n": len(samples),
    }
    return out


def percentile(samples: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile (pct in 0..100)."""
    if not samples:
        raise BenchError("no samples")
    data = sorted(samples)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * pct / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3): utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its live descendants (a bastion with
    workers is a supervisor and its worker processes)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += cpu_seconds(p)
    return total


def reaped_cpu_seconds(pid: int) -> float:
    """utime + stime of a process plus those of its reaped children
    (cutime + cstime): an sshd master's per-connection processes add theirs
    once they have exited and been waited for."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def wait_no_descendants(pid: int, timeout: float = 2.0) -> bool:
    """Wait until ``pid`` has no live descendants (its connections' processes
    ended and were reaped); False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while descendants(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent not idle since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


def rss_kb(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for {pid}")


def tree_rss_kb(pid: int) -> int:
    """VmRSS summed over a process and its live descendants, KiB (pages
    shared between them count once per process: an upper bound)."""
    total = 0
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, BenchError):
            total += rss_kb(p)
    return total


def tree_pss_kb(pid: int) -> int:
    """PSS summed over a process and its live descendants, KiB."""
    return sum(pss_kb(p) for p in [pid, *descendants(pid)])


def pss_kb(pid: int) -> int:
    """Proportional set size of a process (shared pages divided among sharers), KiB."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return 0


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (from /proc/*/stat parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class TreeCpu:
    """CPU seconds used by the descendants of ``root`` between ``start()`` and
    ``stop()``, sampled every 50 ms: an OpenSSH server's per-connection
    processes come and go with the connection, and the master reaps none of
    them into its own counters in time to be read."""

    def __init__(self, root: int) -> None:
        self._root = root
        self._peak: dict[int, float] = {}
        self._before: dict[int, float] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _cpu(pid: int) -> float | None:
        try:
            return cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            return None  # it exited between listing and reading

    def _sample(self) -> None:
        while not self._done.is_set():
            for pid in descendants(self._root):
                cpu = self._cpu(pid)
                if cpu is not None:
                    self._peak[pid] = max(self._peak.get(pid, 0.0), cpu)
            self._done.wait(0.05)

    def start(self) -> None:
        for pid in descendants(self._root):
            self._before[pid] = self._cpu(pid) or 0.0
        self._thread.start()

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return sum(cpu - self._before.get(pid, 0.0) for pid, cpu in self._peak.items())


def run_ssh(
    argv: Sequence[str],
    *,
    stdin_bytes: int = 0,
    timeout: float = 300,
) -> float:
    """Run an OpenSSH command (output to /dev/null); returns wall seconds.

    ``stdin_bytes`` > 0 feeds that many zero bytes from ``head`` on stdin.
    A non-zero exit status is a BenchError with the stderr tail.
    """
    feeder = None
    stdin: Any = subprocess.DEVNULL
    if stdin_bytes:
        feeder = subprocess.Popen(
            ["head", "-c", str(stdin_bytes), "/dev/zero"], stdout=subprocess.PIPE
        )
        stdin = feeder.stdout
    started = time.perf_counter()
    # its own process group: a timeout also ends the ProxyJump child (ssh -W)
    proc = subprocess.Popen(
        list(argv),
        stdin=stdin,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise BenchError(f"{' '.join(argv[-3:])}: no answer after {timeout:.0f} s") from None
    finally:
        if feeder is not None:
            assert feeder.stdout is not None
            feeder.stdout.close()
            feeder.kill()
            feeder.wait(10)
    elapsed = time.perf_counter() - started
    _reap_group(proc.pid)
    if proc.returncode != 0:
        tail = stderr.decode(errors="replace")[-400:]
        raise BenchError(f"{' '.join(argv[-3:])}: exit {proc.returncode}: {tail}")
    return elapsed


def _reap_group(pgid: int) -> None:
    """End what is left of an ssh's process group once ssh has exited.

    ssh itself ends its ProxyJump child (``ssh -W``) with SIGHUP on exit; where
    SIGHUP is ignored (nohup) the child would linger, so do what ssh meant to.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)


def wait_for_lines(path: Path, count: int, timeout: float = 5.0) -> list[str]:
    """The file's lines once it has at least ``count`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.01)
