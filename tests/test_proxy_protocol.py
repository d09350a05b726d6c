"""PROXY protocol v1 and v2 at a real bastion: a small relay bound to
127.0.0.5 (the one address in ``proxy_protocol_from``) prepends a header
naming another client address, and the real OpenSSH client logs in through
it. The header's address is the one the audit, the penalties and the logs
use; an untrusted source that speaks PROXY, and a trusted proxy that does
not, are dropped."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ConsulTokens, Person, VaultSetup, bastion_sections
from proxyprotocol.result import ProxyResult, ProxyResultIPv4, ProxyResultIPv6, ProxyResultLocal
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

from devstack import BastionProcess, ConsulAgent
from devstack.process import wait_until
from devstack.sshd import ssh_command

PROXY = "127.0.0.5"
GRACE = 3


def _closer(*socks: socket.socket) -> Callable[[], None]:
    def close() -> None:
        for sock in socks:
            sock.close()

    return close


class HeaderRelay:
    """A TCP relay on 127.0.0.1 that connects to the bastion from 127.0.0.5
    and sends ``header`` first, as a load balancer would."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.header = b""
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def local(self) -> None:
        """A v2 ``LOCAL`` header (a load balancer's own connection)."""
        self.header = ProxyProtocolV2().pack(ProxyResultLocal())

    def client(self, version: int, address: str, port: int) -> None:
        """The client address the next connections' headers name."""
        ip = ipaddress.ip_address(address)
        result: ProxyResult
        if ip.version == 4:
            result = ProxyResultIPv4((ip, port), (ipaddress.IPv4Address("127.0.0.1"), 22))
        else:
            result = ProxyResultIPv6((ip, port), (ipaddress.IPv6Address("::1"), 22))
        self.header = (ProxyProtocolV1() if version == 1 else ProxyProtocolV2()).pack(result)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port), 5, (PROXY, 0))
            upstream.sendall(self.header)
            done = threading.Barrier(2, action=_closer(client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b, done), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, done: threading.Barrier) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        done.wait()  # the last direction to end closes both sockets

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def proxied(
    stack_dir: Path,
    consul: ConsulAgent,
    consul_tokens: ConsulTokens,
    vault: VaultSetup,
    known_hosts: Path,
    directory_entries: None,
) -> Iterator[tuple[BastionProcess, HeaderRelay]]:
    sections = bastion_sections(
        consul_tokens,
        consul,
        known_hosts,
        vault,
        login_grace_time=GRACE,
        proxy_protocol_from=[f"{PROXY}/32"],
    )
    sections["penalties"] = {"authfail": 10, "min": 15, "max": 30, "exempt": ["127.0.0.1/32"]}
    proc = BastionProcess(stack_dir / "bastion-proxied", sections).start()
    relay = HeaderRelay(proc.port)
    yield proc, relay
    relay.close()
    proc.stop()


def login(port: int, key: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ssh_command(port=port, user="alice", identity=key, command=["hostname"]),
        capture_output=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def audit(bastion: BastionProcess, event: str) -> list[dict[str, Any]]:
    lines = bastion.audit_file.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def refused(bastion: BastionProcess, reason: str) -> float:
    found = re.search(
        rf'^bastion_connections_refused_total\{{reason="{reason}"\}} (\S+)$',
        bastion.metrics_text(),
        re.M,
    )
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize(
    ("version", "address", "port"), [(1, "198.51.100.23", 40001), (2, "2001:db8::23", 40002)]
)
def test_the_client_address_from_the_header_is_used(
    proxied: tuple[BastionProcess, HeaderRelay],
    people: dict[str, Person],
    version: int,
    address: str,
    port: int,
) -> None:
    bastion, relay = proxied
    relay.client(version, address, port)
    result = login(relay.port, people["alice"].key)
    assert result.returncode == 0 and result.stdout == b"host-102\n", result.stderr
    source = f"{address}:{port}"
    assert [r for r in audit(bastion, "connect") if r["source"] == source]
    (record,) = [r for r in audit(bastion, "login") if r["source"] == source]
    assert record["user"] == "alice"
    assert f"login of alice from {source}" in bastion.log.read_text()


def test_a_local_header_keeps_the_proxy_address(
    proxied: tuple[BastionProcess, HeaderRelay], people: dict[str, Person]
) -> None:
    bastion, relay = proxied
    relay.local()
    result = login(relay.port, people["alice"].key)
    assert result.returncode == 0 and result.stdout == b"host-102\n", result.stderr
    (record,) = [r for r in audit(bastion, "login") if r["source"].startswith(f"{PROXY}:")]
    assert record["user"] == "alice"


def test_penalties_fall_on_the_client_behind_the_proxy(
    proxied: tuple[BastionProcess, HeaderRelay], people: dict[str, Person]
) -> None:
    bastion, relay = proxied
    relay.client(2, "203.0.113.66", 50000)
    for _ in range(2):  # 10 s, then 20 s: over the minimum (15 s)
        failed = login(relay.port, people["carol"].key)
        assert b"Permission denied" in failed.stderr, failed.stderr

    def penalties() -> list[dict[str, Any]]:
        return [r for r in audit(bastion, "penalty") if r["source"] == "203.0.113.66/32"]

    # the bastion sees the end just after the client
    wait_until("the penalty record", lambda: bool(penalties()), 5)
    (record,) = penalties()
    assert record["reason"] == "authfail"
    # that client is refused, not the proxy: another client behind it logs in
    assert login(relay.port, people["alice"].key).returncode == 255
    relay.client(2, "203.0.113.67", 50000)
    ok = login(relay.port, people["alice"].key)
    assert ok.returncode == 0 and ok.stdout == b"host-102\n", ok.stderr


def test_untrusted_source_speaking_proxy_is_dropped(
    proxied: tuple[BastionProcess, HeaderRelay],
) -> None:
    bastion, _ = proxied
    before = refused(bastion, "proxy-untrusted")
    with socket.create_connection(("127.0.0.1", bastion.port), 5, ("127.0.0.6", 0)) as sock:
        sock.sendall(b"PROXY TCP4 10.9.9.9 127.0.0.1 1234 22\r\nSSH-2.0-OpenSSH_9.2\r\n")
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(4096):
                data += chunk
    assert data.startswith(b"SSH-2.0-")  # the version line, then the end
    assert b"\n" not in data[data.index(b"\n") + 1 :]  # no key exchange followed
    assert refused(bastion, "proxy-untrusted") == before + 1
    assert "10.9.9.9" not in bastion.audit_file.read_text()


def test_trusted_proxy_without_a_header_is_dropped(
    proxied: tuple[BastionProcess, HeaderRelay],
) -> None:
    bastion, _ = proxied
    with socket.create_connection(("127.0.0.1", bastion.port), 5, (PROXY, 0)) as sock:
        sock.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(64) == b""  # nothing: not even a version line
    assert refused(bastion, "proxy-missing") == 1
    # and one that sends nothing is dropped at the deadline (the grace time here)
    with socket.create_connection(("127.0.0.1", bastion.port), 10, (PROXY, 0)) as sock:
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(64) == b""
        assert GRACE - 0.5 <= time.monotonic() - started <= GRACE + 2
    assert refused(bastion, "proxy-timeout") == 1


def test_a_header_the_decoder_chokes_on_is_counted_not_a_traceback(
    proxied: tuple[BastionProcess, HeaderRelay],
) -> None:
    # a v2 TCP-over-IPv4 header with a 4-byte address block (12 needed): the
    # decoder raised struct.error, logged as a traceback per connection
    bastion, _ = proxied
    before = refused(bastion, "proxy-invalid")
    short = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x04abcd"
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", bastion.port), 5, (PROXY, 0)) as sock:
            sock.sendall(short)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(64) == b""  # dropped, not even a version line
    assert refused(bastion, "proxy-invalid") == before + 3
    log = bastion.log.read_text()
    # no line per connection (the door's summary, every 10 s at most, may
    # name the last error)
    assert "Traceback" not in log and "struct.error" not in log


def test_fair_share_applies_to_the_client_behind_the_proxy(
    new_bastion: Callable[..., BastionProcess], people: dict[str, Person]
) -> None:
    """The door is full (4) of two clients' idle connections, all through
    the proxy: a third client's header is still read, and its login evicts
    the oldest connection of a client holding 2 (docs/hostile-clients.md)."""

    def no_penalties(sections: dict[str, dict[str, object]]) -> None:
        sections["penalties"] = {"enabled": False}

    bastion = new_bastion(
        tweak=no_penalties, max_unauthenticated=4, proxy_protocol_from=[f"{PROXY}/32"]
    )
    held = []
    try:
        for n in (7, 7, 8, 8):
            sock = socket.create_connection(("127.0.0.1", bastion.port), 5, (PROXY, 0))
            held.append(sock)
            sock.sendall(f"PROXY TCP4 198.51.100.{n} 127.0.0.1 4000{len(held)} 22\r\n".encode())
            assert sock.recv(64).startswith(b"SSH-2.0-")
        assert bastion.metric("bastion_unauthenticated_connections") == 4
        relay = HeaderRelay(bastion.port)
        try:
            relay.client(1, "198.51.100.9", 50000)
            result = login(relay.port, people["alice"].key)
        finally:
            relay.close()
        assert result.returncode == 0 and result.stdout == b"host-102\n", result.stderr
        assert refused(bastion, "evicted") == 1
        # the oldest of 198.51.100.7's was told why and closed
        held[0].settimeout(5)
        told = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := held[0].recv(4096):
                told += chunk
        assert b"too many unauthenticated connections from your address" in told
    finally:
        for sock in held:
            sock.close()
