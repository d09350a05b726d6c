"""PerSourcePenalties at a real bastion, with the real OpenSSH client coming
from several loopback addresses (127.0.0.1 is exempt in every test bastion;
127.0.0.2 and 127.0.0.4 are not, 127.0.0.3 is exempt here).

Small seconds so that a penalty starts, is enforced and expires within a
test: authfail 4 s, grace_exceeded 8 s, min 6 s, max 8 s."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ConsulTokens, Person, VaultSetup, bastion_sections

from devstack import BastionProcess, ConsulAgent
from devstack.process import wait_until
from devstack.sshd import ssh_command

GRACE = 3


def ssh_from(
    bastion: BastionProcess, source: str, user: str, key: Path, *command: str
) -> subprocess.CompletedProcess[bytes]:
    """The OpenSSH client from ``source`` (``ssh -b``)."""
    argv = ssh_command(
        port=bastion.port, user=user, identity=key, extra=["-b", source], command=command
    )
    return subprocess.run(
        argv, capture_output=True, timeout=30, check=False, stdin=subprocess.DEVNULL
    )


def audit(bastion: BastionProcess, event: str) -> list[dict[str, Any]]:
    lines = bastion.audit_file.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def series(bastion: BastionProcess, name: str, **labels: str) -> float:
    """A labelled series on the bastion's /metrics (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{name}\{{{re.escape(wanted)}\}} (\S+)$", bastion.metrics_text(), re.M)
    return float(found.group(1)) if found else 0.0


def first_bytes(bastion: BastionProcess, source: str) -> bytes:
    """What the bastion sends a raw TCP connection from ``source`` before
    closing it or within 5 s (b"" for a connection closed at once)."""
    with socket.create_connection(("127.0.0.1", bastion.port), 5, (source, 0)) as sock:
        try:
            return sock.recv(64)
        except ConnectionResetError:
            return b""


def wait_for(what: str, check: Callable[[], bool], timeout: float = 15.0) -> float:
    """Poll ``check`` until it holds; the seconds it took."""
    started = time.monotonic()
    wait_until(what, check, timeout)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def door(
    stack_dir: Path,
    consul: ConsulAgent,
    consul_tokens: ConsulTokens,
    vault: VaultSetup,
    known_hosts: Path,
    directory_entries: None,
) -> Iterator[BastionProcess]:
    sections = bastion_sections(consul_tokens, consul, known_hosts, vault, login_grace_time=GRACE)
    sections["penalties"] = {
        "authfail": 4,
        "noauth": 0.5,
        "grace_exceeded": 8,
        "min": 6,
        "max": 8,
        "exempt": ["127.0.0.1/32", "127.0.0.3/32"],
    }
    proc = BastionProcess(stack_dir / "bastion-penalties", sections)
    yield proc.start()
    proc.stop()


def test_failed_logins_earn_a_penalty_enforced_before_the_version_line(
    door: BastionProcess, people: dict[str, Person]
) -> None:
    alice, wrong = people["alice"].key, people["carol"].key
    for _ in range(2):  # 4 s, then 8 s: over the minimum (6 s)
        failed = ssh_from(door, "127.0.0.2", "alice", wrong, "hostname")
        assert failed.returncode == 255 and b"Permission denied" in failed.stderr, failed.stderr
    # the bastion weighs the connection's end just after the client has gone
    wait_for(
        "the penalty",
        lambda: any(r["source"] == "127.0.0.2/32" for r in audit(door, "penalty")),
        timeout=5,
    )
    started = time.monotonic()
    # the right key from the penalised source: closed before any SSH is spoken
    refused = ssh_from(door, "127.0.0.2", "alice", alice, "hostname")
    assert refused.returncode == 255, door.log.read_text()[-4000:]
    assert b"kex_exchange_identification" in refused.stderr, refused.stderr
    assert first_bytes(door, "127.0.0.2") == b""
    # everyone else logs in as usual
    ok = ssh_from(door, "127.0.0.1", "alice", alice, "hostname")
    assert ok.returncode == 0 and ok.stdout == b"host-102\n", ok.stderr
    # one audit record for the penalty, however many connections it refused
    for _ in range(5):
        assert first_bytes(door, "127.0.0.2") == b""
    (record,) = [r for r in audit(door, "penalty") if r["source"] == "127.0.0.2/32"]
    assert record["reason"] == "authfail" and record["earned"] == {"authfail": 2}
    assert 7 <= record["seconds"] <= 8
    assert series(door, "bastion_penalties_total", reason="authfail") == 1
    assert series(door, "bastion_connections_refused_total", reason="penalised") >= 7
    # it expires: the right key works again after the 8 s
    ended = wait_for(
        "the penalty to expire",
        lambda: ssh_from(door, "127.0.0.2", "alice", alice, "hostname").returncode == 0,
    )
    took = time.monotonic() - started
    print(f"penalty timeline: enforced at 0 s, refused until {took:.1f} s (poll {ended:.1f} s)")
    assert 5 <= took <= 11
    assert len([r for r in audit(door, "penalty") if r["source"] == "127.0.0.2/32"]) == 1


def test_exempt_source_is_never_penalised(door: BastionProcess, people: dict[str, Person]) -> None:
    for _ in range(4):
        failed = ssh_from(door, "127.0.0.3", "alice", people["carol"].key, "hostname")
        assert failed.returncode == 255 and b"Permission denied" in failed.stderr
    ok = ssh_from(door, "127.0.0.3", "alice", people["alice"].key, "hostname")
    assert ok.returncode == 0 and ok.stdout == b"host-102\n", ok.stderr
    assert not [r for r in audit(door, "penalty") if r["source"] == "127.0.0.3/32"]


def test_login_grace_time_exceeded_earns_a_penalty(door: BastionProcess) -> None:
    with socket.create_connection(("127.0.0.1", door.port), 10, ("127.0.0.4", 0)) as idle:
        assert idle.recv(64).startswith(b"SSH-2.0-")
        held = time.monotonic()
        while idle.recv(4096):  # says nothing until LoginGraceTime ends it
            pass
        assert GRACE - 0.5 <= time.monotonic() - held <= GRACE + 3
    wait_for("the penalty", lambda: first_bytes(door, "127.0.0.4") == b"", timeout=5)
    (record,) = [r for r in audit(door, "penalty") if r["source"] == "127.0.0.4/32"]
    assert record["reason"] == "grace_exceeded" and record["seconds"] == 8
