"""Drain: SIGTERM takes the bastion out of Consul first, then stops accepting;
live sessions are told, keep running (bytes exact) up to drain_timeout, and
are closed with a notice after it; a second SIGTERM ends at once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable

from conftest import Person

import devstack
from devstack import BastionProcess, ConsulAgent, ssh_command

MiB = 1024 * 1024


def hold(proc: BastionProcess, person: Person) -> subprocess.Popen[bytes]:
    """A session through ``proc`` that has printed "up" and then waits a minute."""
    argv = ssh_command(
        port=proc.port, user=person.name, identity=person.key, command=("echo up; sleep 60",)
    )
    held = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert held.stdout is not None and held.stdout.readline() == b"up\n"
    return held


def register(consul: ConsulAgent, proc: BastionProcess) -> str:
    """The bastion's service on the agent, as `bastion register` leaves it
    (here through the API with a TTL check: the API refuses script checks)."""
    service_id = f"ssh-bastion-{proc.port}"
    status, body = consul.api(
        "PUT",
        "/v1/agent/service/register",
        body={
            "ID": service_id,
            "Name": "ssh-bastion",
            "Port": proc.port,
            "Check": {"CheckID": f"{service_id}-ttl", "TTL": "10m", "Status": "passing"},
        },
    )
    assert status == 200, body
    return service_id


def passing_ids(consul: ConsulAgent) -> set[str]:
    status, body = consul.api("GET", "/v1/health/service/ssh-bastion?passing=1")
    assert status == 200, body
    return {entry["Service"]["ID"] for entry in body or []}


def accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_drain_leaves_consul_then_lets_transfers_finish(
    new_bastion: Callable[..., BastionProcess], consul: ConsulAgent, people: dict[str, Person]
) -> None:
    proc = new_bastion(drain_timeout=60)
    service_id = register(consul, proc)
    try:
        assert service_id in passing_ids(consul)
        alice = people["alice"]
        # two long-running downloads, 40 MiB each over about four seconds
        stream = "for i in $(seq 1 40); do head -c 1048576 /dev/zero; sleep 0.1; done"
        argv = ssh_command(port=proc.port, user="alice", identity=alice.key, command=(stream,))
        sessions = [
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)
        ]
        devstack.wait_until(
            "sessions running",
            lambda: sum(1 for r in proc.audit_records() if r["event"] == "session-start") == 2,
            15,
        )
        assert proc.process is not None
        sigterm = time.monotonic()
        os.kill(proc.process.pid, signal.SIGTERM)
        # out of Consul first (what DNS and the catalog's passing list answer) ...
        devstack.wait_until("out of consul", lambda: service_id not in passing_ids(consul), 15)
        out_of_consul = time.monotonic() - sigterm
        # ... then no new connections
        devstack.wait_until("listener closed", lambda: not accepting(proc.port), 15)
        outputs = [p.communicate(timeout=60) for p in sessions]
        for (out, err), p in zip(outputs, sessions, strict=True):
            assert p.returncode == 0, err
            assert len(out) == 40 * MiB  # not a byte lost
            assert b"bastion: this bastion is being drained" in err
        proc.process.proc.wait(timeout=30)  # it ends once its sessions have
        records = proc.audit_records()
        drain = next(r for r in records if r["event"] == "drain")
        assert drain["live"] == 2 and drain["why"] == "SIGTERM"
        assert drain["consul_seconds"] <= out_of_consul + 0.5
        stop = next(r for r in records if r["event"] == "stop")
        assert stop == {**stop, "drained": 2, "closed": 0}
        assert [r["outcome"] for r in records if r["event"] == "session"] == ["ok", "ok"]
        # started again, it takes itself out of maintenance mode: offered again
        proc.start()
        devstack.wait_until("back in consul", lambda: service_id in passing_ids(consul), 15)
    finally:
        proc.stop()
        consul.api("PUT", f"/v1/agent/service/deregister/{service_id}")


def test_sessions_past_the_drain_timeout_are_closed_with_a_notice(
    new_bastion: Callable[..., BastionProcess], people: dict[str, Person]
) -> None:
    proc = new_bastion(drain_timeout=2)
    try:
        held = hold(proc, people["alice"])
        assert proc.process is not None
        os.kill(proc.process.pid, signal.SIGTERM)
        _, err = held.communicate(timeout=30)
        assert held.returncode == 255
        assert b"this bastion is being drained" in err
        assert b"this bastion was drained; log in again to reach another one" in err
        closed = proc.wait_audit(lambda r: r["event"] == "connection" and r.get("user") == "alice")
        assert closed["reason"] == "drained" and closed["outcome"] == "ended"
        session = proc.wait_audit(lambda r: r["event"] == "session")
        assert session["outcome"] == "error" and session["reason"] == "drained"
        stop = proc.wait_audit(lambda r: r["event"] == "stop")
        assert stop["closed"] == 1
    finally:
        proc.stop()


def test_a_second_sigterm_ends_at_once(
    new_bastion: Callable[..., BastionProcess], people: dict[str, Person]
) -> None:
    proc = new_bastion(drain_timeout=600)
    try:
        held = hold(proc, people["alice"])
        assert proc.process is not None
        os.kill(proc.process.pid, signal.SIGTERM)
        devstack.wait_until("draining", lambda: not accepting(proc.port), 15)
        started = time.monotonic()
        os.kill(proc.process.pid, signal.SIGTERM)
        proc.process.proc.wait(timeout=15)
        assert time.monotonic() - started < 10
        held.communicate(timeout=30)
        assert held.returncode == 255
    finally:
        proc.stop()
