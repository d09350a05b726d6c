"""Several worker processes behind one address (``[server] workers``,
bastion/workers.py): steered by source address, one audit stream, one
/metrics view, a dead worker started again without losing the address, and
SIGTERM draining every worker."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from conftest import Person

from devstack import BastionProcess, ssh_command
from devstack.process import wait_until

SOURCES = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")


def login(proc: BastionProcess, person: Person, source: str) -> subprocess.CompletedProcess[bytes]:
    argv = ssh_command(
        port=proc.port,
        user=person.name,
        identity=person.key,
        extra=("-o", f"BindAddress={source}"),
        command=("echo ok",),
    )
    return subprocess.run(argv, capture_output=True, timeout=60, check=False)


def by_worker(proc: BastionProcess, series: str) -> dict[int, float]:
    """``series`` summed per worker label on the supervisor's merged /metrics."""
    out: dict[int, float] = {}
    for labels, value in re.findall(
        rf"^{re.escape(series)}\{{([^}}]*)\}} (\S+)$", proc.metrics_text(), re.M
    ):
        worker = re.search(r'worker="(\d+)"', labels)
        if worker:
            out[int(worker.group(1))] = out.get(int(worker.group(1)), 0.0) + float(value)
    return out


def workers_of(proc: BastionProcess) -> set[int]:
    """The supervisor's child processes (the workers)."""
    assert proc.process is not None
    pid = proc.process.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return {int(c) for c in children}


def steered_to(source: str, workers: int) -> int:
    """The worker the steering program picks: the IPv4 address modulo N."""
    a, b, c, d = (int(x) for x in source.split("."))
    return ((a << 24) | (b << 16) | (c << 8) | d) % workers


def test_workers_share_one_address_steered_by_source_with_one_audit_and_metrics_view(
    new_bastion: Callable[..., BastionProcess], people: dict[str, Person]
) -> None:
    proc = new_bastion(workers=2)
    alice = people["alice"]
    for source in SOURCES:
        done = login(proc, alice, source)
        assert (done.returncode, done.stdout) == (0, b"ok\n"), done.stderr
    # the same source three more times: the same worker, so its upstream
    # connection is reused (steering keeps reuse from falling to 1/N)
    for _ in range(3):
        assert login(proc, alice, "127.0.0.1").returncode == 0
    wait_until(
        "7 login records",
        lambda: sum(1 for r in proc.audit_records() if r.get("event") == "login") == 7,
        10,
    )
    logins = [r for r in proc.audit_records() if r.get("event") == "login"]
    # one file, whole lines from both workers
    for line in proc.audit_file.read_text().splitlines():
        json.loads(line)
    assert [r["reused"] for r in logins[4:]] == [True, True, True]
    per_worker = by_worker(proc, "bastion_logins_total")
    expected: dict[int, float] = {}
    for source in (*SOURCES, "127.0.0.1", "127.0.0.1", "127.0.0.1"):
        w = steered_to(source, 2)
        expected[w] = expected.get(w, 0.0) + 1
    assert per_worker == expected
    assert "bastion_workers 2.0" in proc.metrics_text()


def test_a_dead_worker_is_started_again_and_the_address_keeps_answering(
    new_bastion: Callable[..., BastionProcess], people: dict[str, Person]
) -> None:
    proc = new_bastion(workers=2)
    before = workers_of(proc)
    assert len(before) == 2
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    # a login at once: if it lands on the dead worker's socket it waits in
    # that socket's queue (the supervisor holds it) for the replacement
    for source in SOURCES[:2]:
        done = login(proc, people["alice"], source)
        assert (done.returncode, done.stdout) == (0, b"ok\n"), done.stderr

    def replaced() -> bool:
        now = workers_of(proc)
        return len(now) == 2 and victim not in now

    wait_until("the worker to be started again", replaced, 20)
    text = proc.metrics_text()
    assert re.search(r"^bastion_worker_restarts_total 1\.0$", text, re.M), text


def test_sigterm_drains_every_worker_then_the_supervisor_exits(
    new_bastion: Callable[..., BastionProcess], people: dict[str, Person]
) -> None:
    proc = new_bastion(workers=2)
    held = []
    for source in SOURCES[:2]:  # one session on each worker
        argv = ssh_command(
            port=proc.port,
            user="alice",
            identity=people["alice"].key,
            extra=("-o", f"BindAddress={source}"),
            command=("echo up; sleep 1; echo done",),
        )
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout is not None and p.stdout.readline() == b"up\n"
        held.append(p)
    assert proc.process is not None
    proc.process.proc.send_signal(signal.SIGTERM)
    # both sessions run to their end through the drain
    for p in held:
        out, err = p.communicate(timeout=30)
        assert (p.returncode, out) == (0, b"done\n"), err
    assert proc.process.proc.wait(timeout=30) == 0
    drains = [r for r in proc.audit_records() if r.get("event") == "drain"]
    assert len(drains) == 2  # one per worker


def test_kernel_steering_spreads_one_source_over_the_workers(
    new_bastion: Callable[..., BastionProcess], people: dict[str, Person]
) -> None:
    """``worker_steering = "kernel"`` (many people behind one NAT address):
    the kernel's 4-tuple hash spreads one source's connections over every
    worker (16 logins all on one of 2 workers: p = 2**-15)."""
    proc = new_bastion(workers=2, worker_steering="kernel")
    for _ in range(16):
        done = login(proc, people["alice"], "127.0.0.1")
        assert done.returncode == 0, done.stderr
    per_worker = by_worker(proc, "bastion_logins_total")
    assert sum(per_worker.values()) == 16
    assert set(per_worker) == {0, 1}, per_worker
