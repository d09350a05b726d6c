"""Reusing a person's authenticated upstream connection for their next login
(``[upstream] reuse_idle``, bastion/upstream.py ``UpstreamPool``).

The host tells which connection a login arrived on: ``$SSH_CONNECTION``
names the bastion's source port, one per upstream TCP connection.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import ConsulTokens, Person, VaultSetup, route, start_bastion

import devstack
from devstack import (
    BastionProcess,
    ConsulAgent,
    SshdHost,
    ssh_command,
    stop_ssh_client,
)


def upstream_port(bastion: BastionProcess, person: Person) -> tuple[str, str]:
    """(host name, the bastion's source port the host saw) for one login."""
    argv = ssh_command(
        port=bastion.port,
        user=person.name,
        identity=person.key,
        command=['echo "$(hostname) $SSH_CONNECTION"'],
    )
    result = subprocess.run(
        argv, capture_output=True, timeout=60, check=False, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stderr
    host, _client_ip, client_port, *_ = result.stdout.decode().split()
    return host, client_port


@contextlib.contextmanager
def held_session(
    bastion: BastionProcess, person: Person, extra: Sequence[str] = ()
) -> Iterator[str]:
    """A session kept open through the bastion; yields the source port the host saw."""
    argv = ssh_command(
        port=bastion.port,
        user=person.name,
        identity=person.key,
        extra=extra,
        command=['echo "$SSH_CONNECTION"; sleep 20'],
    )
    holder = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline().decode().split()
        assert line, "the held session printed nothing"
        yield line[1]
    finally:
        stop_ssh_client(holder)


def wait_no_shared_connection(bastion: BastionProcess) -> None:
    """Until the bastion holds no upstream connection for reuse (its metric)."""
    devstack.wait_until(
        "idle upstream connection closed",
        lambda: bastion.metric("bastion_upstream_shared_connections") == 0,
        15,
    )


@pytest.fixture
def restore_routes(
    consul: ConsulAgent, hosts: dict[str, SshdHost], bastion: BastionProcess
) -> Iterator[None]:
    yield
    consul.kv_put("users/alice", route(hosts, "host-102"))
    consul.kv_put("users/bob", route(hosts, "host-101"))
    bastion.wait_synced(consul)


def test_next_login_reuses_the_upstream_connection(
    bastion: BastionProcess, people: dict[str, Person]
) -> None:
    alice = people["alice"]
    first = upstream_port(bastion, alice)
    second = upstream_port(bastion, alice)
    assert first[0] == second[0] == "host-102"
    assert second[1] == first[1], "a new upstream connection for the same person and host"
    # the audit says which login's certificate the host saw
    records = [
        r
        for r in bastion.audit_records()
        if r["event"] == "session" and r.get("user") == "alice" and r.get("outcome") == "ok"
    ]
    assert len(records) >= 2
    assert records[-1]["upstream_login"] == records[-2]["upstream_login"]
    assert records[-1]["upstream_login"].startswith("bastion:alice:")
    assert records[-1]["conn"] != records[-2]["conn"]
    log = bastion.log.read_text()
    assert "upstream connection of bastion:alice:" in log


def test_another_person_never_shares_a_connection(
    bastion: BastionProcess,
    consul: ConsulAgent,
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
    restore_routes: None,
) -> None:
    # bob is routed to the very account alice uses on host-102
    consul.kv_put("users/bob", route(hosts, "host-102", login="alice"))
    bastion.wait_synced(consul)
    alice_host, alice_port = upstream_port(bastion, people["alice"])
    bob_host, bob_port = upstream_port(bastion, people["bob"])
    assert alice_host == bob_host == "host-102"
    assert bob_port != alice_port
    # and bob's own second login does reuse his
    assert upstream_port(bastion, people["bob"])[1] == bob_port


def test_route_change_is_never_served_by_the_old_connection(
    bastion: BastionProcess,
    consul: ConsulAgent,
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
    restore_routes: None,
) -> None:
    alice = people["alice"]
    assert upstream_port(bastion, alice)[0] == "host-102"
    consul.kv_put("users/alice", route(hosts, "host-101"))
    bastion.wait_synced(consul)
    assert upstream_port(bastion, alice)[0] == "host-101"


def test_connection_with_a_remote_forward_is_not_shared(
    bastion: BastionProcess,
    consul: ConsulAgent,
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
    restore_routes: None,
) -> None:
    alice = people["alice"]
    consul.kv_put(
        "users/alice",
        json.dumps({"route": route(hosts, "host-102"), "remote_forwarding": True}),
    )
    bastion.wait_synced(consul)
    rport = devstack.free_port()
    forward = ["-o", "ExitOnForwardFailure=yes", "-R", f"127.0.0.1:{rport}:127.0.0.1:9"]
    with held_session(bastion, alice, forward) as forward_port:
        _, port = upstream_port(bastion, alice)
        assert port != forward_port, "a login was put on the connection carrying -R"


def test_idle_connection_closes_and_reuse_can_be_turned_off(
    tmp_path: Path,
    consul: ConsulAgent,
    consul_tokens: ConsulTokens,
    vault: VaultSetup,
    known_hosts: Path,
    people: dict[str, Person],
) -> None:
    alice = people["alice"]
    short = start_bastion(
        tmp_path / "short", consul, consul_tokens, vault, known_hosts, reuse_idle=3
    )
    try:
        first = upstream_port(short, alice)[1]
        assert upstream_port(short, alice)[1] == first  # within reuse_idle: reused
        wait_no_shared_connection(short)  # idle past reuse_idle: closed
        assert upstream_port(short, alice)[1] != first
    finally:
        short.stop()
    aged = start_bastion(
        tmp_path / "aged", consul, consul_tokens, vault, known_hosts, reuse_max_age=1
    )
    try:
        first = upstream_port(aged, alice)[1]
        # closed once older than reuse_max_age, though idle for less than reuse_idle
        wait_no_shared_connection(aged)
        assert upstream_port(aged, alice)[1] != first
    finally:
        aged.stop()
    off = start_bastion(tmp_path / "off", consul, consul_tokens, vault, known_hosts, reuse_idle=0)
    try:
        ports = {upstream_port(off, alice)[1] for _ in range(3)}
        assert len(ports) == 3
    finally:
        off.stop()


def test_host_with_max_sessions_1_gets_a_private_connection(
    tmp_path: Path,
    bastion: BastionProcess,
    consul: ConsulAgent,
    local_ca: Path,
    vault: VaultSetup,
    people: dict[str, Person],
    restore_routes: None,
) -> None:
    """A hardened host allows one session per connection: a second login
    while the first is open must not fail on the shared connection."""
    ca_keys = [local_ca.with_suffix(".pub"), vault.user_ca_pub]
    host = SshdHost("host-103", "127.0.1.103", tmp_path / "host-103", ca_keys, max_sessions=1)
    host.start()
    try:
        consul.register_node("host-103", host.address)
        consul.kv_put("host-keys/host-103", host.host_pubkey)
        consul.kv_put("users/alice", f"host-103:{host.port}")
        bastion.wait_synced(consul)
        alice = people["alice"]
        with held_session(bastion, alice) as first_port:
            name, port = upstream_port(bastion, alice)  # fails (255) without the fallback
            assert name == "host-103"
            assert port != first_port
            # the refusing connection is not shared any more: a third login
            # while the first still runs gets a connection of its own too
            assert upstream_port(bastion, alice)[0] == "host-103"
    finally:
        consul.kv_delete("host-keys/host-103")
        host.stop()
