"""Idle limits and a person's own limits, end to end: real OpenSSH clients,
a bastion of the test's own, real Consul and sshd.

ChannelTimeout closes a quiet session with a line on it (and a quiet ``-J``
tunnel), never a busy one; UnusedConnectionTimeout closes ``ssh -N`` with a
disconnect the client prints; an entry's own timeouts win over ``[server]``;
``"from"`` refuses a login (and a jump) from another address; ``"max_sessions"``
refuses one session too many across connections; ``"disabled"`` refuses the
login. Each with its audit record."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Person, route

import devstack
from devstack import BastionProcess, ConsulAgent, SshdHost, ssh_command, stop_ssh_client

Entries = Callable[..., None]


@pytest.fixture
def entries(
    consul: ConsulAgent, hosts: dict[str, SshdHost], directory_entries: None
) -> Iterator[Callable[[BastionProcess, str, dict[str, Any]], None]]:
    """Set a person's JSON entry (routed to host-102) and wait until
    ``bastion`` has it; every entry is restored after the test."""
    touched: set[str] = set()

    def put(bastion: BastionProcess, user: str, keys: dict[str, Any]) -> None:
        touched.add(user)
        consul.kv_put(f"users/{user}", json.dumps({"route": route(hosts, "host-102"), **keys}))
        bastion.wait_synced(consul)

    yield put
    for user in touched:
        consul.kv_put(f"users/{user}", route(hosts, "host-101" if user == "bob" else "host-102"))


def ssh(
    proc: BastionProcess, person: Person, command: str, *extra: str, timeout: float = 30
) -> tuple[subprocess.CompletedProcess[bytes], float]:
    """Run ``command`` through ``proc``; the result and the seconds it took."""
    argv = ssh_command(
        port=proc.port, user=person.name, identity=person.key, extra=extra, command=(command,)
    )
    started = time.monotonic()
    result = subprocess.run(
        argv, capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
    )
    return result, time.monotonic() - started


def start(
    proc: BastionProcess, person: Person, command: str, *extra: str
) -> subprocess.Popen[bytes]:
    argv = ssh_command(
        port=proc.port, user=person.name, identity=person.key, extra=extra, command=(command,)
    )
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def record(proc: BastionProcess, **fields: Any) -> dict[str, Any]:
    """The newest audit record with these fields (polled for)."""
    return proc.wait_audit(lambda r: all(r.get(k) == v for k, v in fields.items()))


def test_channel_timeout_closes_a_quiet_session_not_a_busy_one(
    new_bastion: Callable[..., BastionProcess], people: dict[str, Person]
) -> None:
    proc = new_bastion(channel_timeout=1.5)
    alice = people["alice"]
    # output every 0.4 s for 3 s: twice the timeout, never quiet for 1.5 s
    busy = start(proc, alice, "for i in 1 2 3 4 5 6 7 8; do echo $i; sleep 0.4; done")
    # on a terminal the line starts on a line of its own (after a prompt)
    terminal = start(proc, alice, "echo up; sleep 30", "-tt")
    quiet, seconds = ssh(proc, alice, "echo up; sleep 30; echo never")
    assert quiet.returncode == 255
    assert quiet.stdout == b"up\n"
    assert quiet.stderr == (
        b"bastion: no data for 1.5 s on this session (ChannelTimeout); closed\r\n"
    )
    assert 1.5 <= seconds < 6
    out, err = terminal.communicate(timeout=30)
    assert terminal.returncode == 255 and out == b"up\r\n"
    assert err == b"\r\nbastion: no data for 1.5 s on this session (ChannelTimeout); closed\r\n"
    out, err = busy.communicate(timeout=30)
    assert busy.returncode == 0, err
    assert out == b"".join(b"%d\n" % i for i in range(1, 9))
    closed = record(proc, event="session", reason="channel-timeout")
    assert closed["user"] == "alice" and closed["outcome"] == "error"
    assert closed["message"] == "no data for 1.5 s on this session (ChannelTimeout); closed"
    # the connection itself was ended by the client after its session closed
    assert record(proc, event="connection", conn=closed["conn"])["outcome"] == "authenticated"


def test_channel_timeout_closes_a_quiet_jump_tunnel(
    tmp_path: Path,
    new_bastion: Callable[..., BastionProcess],
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
    local_ca: Path,
) -> None:
    proc = new_bastion(channel_timeout=1.5)
    cfg = jump_config(tmp_path, proc, people["alice"], local_ca, hosts)
    port = str(hosts["host-102"].port)
    argv = ["ssh", "-F", str(cfg), "-p", port, "host-102"]
    # end-to-end SSH through the tunnel; no keepalives either way, so a quiet
    # command leaves the tunnel without a byte
    result = subprocess.run(
        [*argv, "echo up; sleep 30"], capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 255 and result.stdout == b"up\n"
    tunnel = record(proc, event="tunnel", reason="channel-timeout")
    assert tunnel["user"] == "alice" and tunnel["bytes_down"] > 0
    # a jump that keeps talking is not closed
    busy = "for i in 1 2 3 4 5 6 7 8; do echo $i; sleep 0.4; done"
    result = subprocess.run([*argv, busy], capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(b"8\n")


def test_unused_connection_timeout_closes_ssh_n_with_a_message(
    new_bastion: Callable[..., BastionProcess], people: dict[str, Person]
) -> None:
    proc = new_bastion(unused_connection_timeout=1.5)
    alice = people["alice"]
    started = time.monotonic()
    idle = subprocess.run(
        ssh_command(
            port=proc.port, user="alice", identity=alice.key, extra=("-N", "-o", "LogLevel=INFO")
        ),
        capture_output=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    seconds = time.monotonic() - started
    assert idle.returncode == 255
    assert b"bastion: no open channels for 1.5 s (UnusedConnectionTimeout)" in idle.stderr
    assert 1.5 <= seconds < 6
    ended = record(proc, event="connection", reason="unused-connection-timeout")
    assert ended["user"] == "alice" and ended["outcome"] == "ended"
    # a connection with a session is in use however long it runs; the clock
    # starts again when its last channel has closed
    result, seconds = ssh(proc, alice, "sleep 2.5; echo done")
    assert result.returncode == 0 and result.stdout == b"done\n", result.stderr


def test_the_entry_overrides_the_server_settings(
    new_bastion: Callable[..., BastionProcess],
    people: dict[str, Person],
    entries: Callable[[BastionProcess, str, dict[str, Any]], None],
) -> None:
    proc = new_bastion(channel_timeout=1.5)
    # carol: ChannelTimeout off for her; bob: an UnusedConnectionTimeout the server lacks
    entries(proc, "carol", {"channel_timeout": 0})
    entries(proc, "bob", {"unused_connection_timeout": "1s", "channel_timeout": "5m"})
    result, _ = ssh(proc, people["carol"], "sleep 2.5; echo still here")
    assert result.returncode == 0 and result.stdout == b"still here\n", result.stderr
    result, _ = ssh(proc, people["bob"], "sleep 2.5; echo still here")  # 5 min, not 1.5 s
    assert result.returncode == 0 and result.stdout == b"still here\n", result.stderr
    started = time.monotonic()
    unused = subprocess.run(
        ssh_command(
            port=proc.port,
            user="bob",
            identity=people["bob"].key,
            extra=("-N", "-o", "LogLevel=INFO"),
        ),
        capture_output=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert unused.returncode == 255
    assert b"no open channels for 1 s (UnusedConnectionTimeout)" in unused.stderr
    assert time.monotonic() - started < 5
    # alice has no entry of her own: the server's 1.5 s applies
    result, _ = ssh(proc, people["alice"], "sleep 30")
    assert result.returncode == 255 and b"(ChannelTimeout)" in result.stderr


def test_from_refuses_another_source_after_authentication(
    tmp_path: Path,
    new_bastion: Callable[..., BastionProcess],
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
    local_ca: Path,
    entries: Callable[[BastionProcess, str, dict[str, Any]], None],
) -> None:
    proc = new_bastion()
    alice = people["alice"]
    entries(proc, "alice", {"from": ["127.0.0.1", "10.0.0.0/8"]})
    result, _ = ssh(proc, alice, "hostname")
    assert result.returncode == 0 and result.stdout == b"host-102\n", result.stderr
    result, _ = ssh(proc, alice, "hostname", "-b", "127.0.0.2", "-o", "LogLevel=INFO")
    assert result.returncode == 255 and result.stdout == b""
    assert b"bastion: alice may not log in from 127.0.0.2" in result.stderr
    refused = record(proc, event="connection", reason="source-not-allowed")
    assert refused["outcome"] == "refused" and refused["user"] == "alice"
    assert refused["source"].startswith("127.0.0.2:")
    assert refused["message"] == "alice may not log in from 127.0.0.2"
    # ssh -J needs the login as well: refused from 127.0.0.2, fine from 127.0.0.1
    port = str(hosts["host-102"].port)
    for bind, code in (("127.0.0.2", 255), ("127.0.0.1", 0)):
        cfg = jump_config(tmp_path / bind, proc, alice, local_ca, hosts, bind=bind)
        jump = subprocess.run(
            ["ssh", "-F", str(cfg), "-p", port, "host-102", "hostname"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert jump.returncode == code, jump.stderr
        if code:
            assert b"alice may not log in from 127.0.0.2" in jump.stderr
        else:
            assert jump.stdout == b"host-102\n"
    assert record(proc, event="tunnel")["source"].startswith("127.0.0.1:")
    assert len([r for r in proc.audit_records() if r["event"] == "tunnel"]) == 1


def test_max_sessions_across_connections(
    new_bastion: Callable[..., BastionProcess],
    people: dict[str, Person],
    entries: Callable[[BastionProcess, str, dict[str, Any]], None],
) -> None:
    proc = new_bastion()
    alice = people["alice"]
    entries(proc, "alice", {"max_sessions": 2})
    held = [start(proc, alice, "echo up; sleep 60") for _ in range(2)]
    try:
        for h in held:
            assert h.stdout is not None and h.stdout.readline() == b"up\n"
        # OpenSSH prints a channel's open failure at LogLevel INFO, its default
        third, _ = ssh(proc, alice, "echo third", "-o", "LogLevel=INFO")
        assert third.returncode == 255 and third.stdout == b""
        assert (
            b"open failed: administratively prohibited: alice has 2 sessions open at this "
            b"bastion (max_sessions 2 in the directory); close one first" in third.stderr
        )
        refused = record(proc, event="session", outcome="refused")
        assert refused["reason"] == "max-sessions" and refused["user"] == "alice"
        # bob is not counted with alice
        other, _ = ssh(proc, people["bob"], "echo bob")
        assert other.stdout == b"bob\n", other.stderr
        stop_ssh_client(held.pop())
        devstack.wait_until(
            "a session closed",
            lambda: sum(1 for r in proc.audit_records() if r["event"] == "session") >= 2,
            10,
        )
        again, _ = ssh(proc, alice, "echo again")
        assert again.returncode == 0 and again.stdout == b"again\n", again.stderr
    finally:
        for h in held:
            stop_ssh_client(h)


def test_a_disabled_entry_refuses_the_login(
    new_bastion: Callable[..., BastionProcess],
    people: dict[str, Person],
    entries: Callable[[BastionProcess, str, dict[str, Any]], None],
) -> None:
    proc = new_bastion()
    entries(proc, "carol", {"disabled": True})
    result, _ = ssh(proc, people["carol"], "hostname", "-o", "LogLevel=INFO")
    assert result.returncode == 255 and result.stdout == b""
    assert b"bastion: carol is disabled in the directory" in result.stderr
    refused = record(proc, event="connection", reason="disabled")
    assert refused["outcome"] == "refused" and refused["user"] == "carol"
    assert not [r for r in proc.audit_records() if r["event"] == "login"]
    entries(proc, "carol", {"disabled": False})
    result, _ = ssh(proc, people["carol"], "hostname")
    assert result.stdout == b"host-102\n", result.stderr


def jump_config(
    tmp: Path,
    proc: BastionProcess,
    person: Person,
    local_ca: Path,
    hosts: dict[str, SshdHost],
    bind: str | None = None,
) -> Path:
    """An ssh_config for ``ssh host-102`` through the bastion (ProxyJump),
    with a certificate host-102 trusts for the end-to-end login; the jump's
    connection leaves from ``bind``."""
    tmp.mkdir(parents=True, exist_ok=True)
    key = tmp / f"id_{person.name}"
    shutil.copy(person.key, key)
    shutil.copy(person.key.with_suffix(".pub"), key.with_suffix(".pub"))
    key.chmod(0o600)
    devstack.sign_user_key(local_ca, key.with_suffix(".pub"), [person.name], "e2e")
    known = tmp / "known_hosts"
    known.write_text(
        "".join(
            f"[{n}]:{h.port},[{h.address}]:{h.port} {h.host_pubkey}\n" for n, h in hosts.items()
        )
    )
    cfg = tmp / "ssh_config"
    bind_line = f"    BindAddress {bind}\n" if bind else ""
    cfg.write_text(f"""\
Host bastion
    HostName 127.0.0.1
    Port {proc.port}
    User {person.name}
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel INFO
{bind_line}
Host host-101 host-102
    ProxyJump bastion
    User {person.name}
    UserKnownHostsFile {known}
    StrictHostKeyChecking yes

Host *
    IdentityFile {key}
    IdentitiesOnly yes
    BatchMode yes
    LogLevel ERROR
    ConnectTimeout 10
    GlobalKnownHostsFile /dev/null
""")
    return cfg
