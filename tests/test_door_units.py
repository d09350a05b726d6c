"""The door's pure parts: PerSourcePenalties arithmetic on a fake clock,
source blocks (PerSourceNetBlockSize), MaxStartups random early drop, and
PROXY protocol framing (v1 and v2 headers built by the proxyprotocol package)."""

from __future__ import annotations

import ipaddress

import pytest
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6, ProxyResultLocal
from proxyprotocol.v2 import ProxyProtocolV2

from bastion.access_settings import PenaltySettings
from bastion.core import proxy
from bastion.core.gate import max_startups_drop
from bastion.core.penalties import PenaltyBox, PenaltyStart, source_block


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def box(**settings: object) -> tuple[PenaltyBox, Clock, list[PenaltyStart]]:
    clock = Clock()
    started: list[PenaltyStart] = []
    values: dict[str, object] = {"min": 15.0, "max": 600.0, **settings}
    b = PenaltyBox(PenaltySettings(**values), 32, 64, clock=clock, on_start=started.append)  # type: ignore[arg-type]
    return b, clock, started


def test_source_blocks() -> None:
    assert source_block("192.0.2.7", 32, 64) == "192.0.2.7/32"
    assert source_block("192.0.2.7", 24, 64) == "192.0.2.0/24"
    assert source_block("2001:db8:1:2:3:4:5:6", 32, 64) == "2001:db8:1:2::/64"
    # an IPv4-mapped IPv6 address is the IPv4 source
    assert source_block("::ffff:192.0.2.7", 32, 64) == "192.0.2.7/32"
    assert source_block("fe80::1%eth0", 32, 64) == "fe80::/64"


def test_authfail_penalties_add_up_until_enforced_then_expire() -> None:
    b, clock, started = box(authfail=5.0)
    for _ in range(2):
        b.penalise("192.0.2.7", "authfail")
    assert b.refuses("192.0.2.7") is None  # 10 s: below min (15 s)
    b.penalise("192.0.2.7", "authfail")  # 15 s: enforced
    assert b.refuses("192.0.2.7") == "192.0.2.7/32"
    assert b.refuses("192.0.2.8") is None  # another source is not touched
    assert started == [PenaltyStart("192.0.2.7/32", 15.0, "authfail", {"authfail": 3})]
    clock.now += 14.9
    assert b.refuses("192.0.2.7") == "192.0.2.7/32"
    clock.now += 0.2
    assert b.refuses("192.0.2.7") is None
    assert len(b) == 0 and b.active == 0


def test_penalty_is_capped_at_max_and_started_once() -> None:
    b, clock, started = box(grace_exceeded=20.0, max=60.0)
    for _ in range(10):
        b.penalise("2001:db8::1", "grace_exceeded")
    # the whole /64 is one source
    assert b.refuses("2001:db8::ffff") == "2001:db8::/64"
    assert b.penalised() == {"2001:db8::/64": 60.0}
    assert len(started) == 1 and started[0].seconds == 20.0
    clock.now += 60.1
    assert b.refuses("2001:db8::1") is None


def test_exempt_sources_are_never_penalised() -> None:
    b, _, started = box(exempt=("10.0.0.0/8", "2001:db8::/32"))
    for _ in range(10):
        b.penalise("10.1.2.3", "authfail")
        b.penalise("::ffff:10.1.2.3", "authfail")
        b.penalise("2001:db8::5", "authfail")
    assert b.refuses("10.1.2.3") is None and b.refuses("2001:db8::5") is None
    assert started == [] and len(b) == 0


def test_disabled_penalties_do_nothing() -> None:
    b, _, _ = box(enabled=False)
    for _ in range(10):
        b.penalise("192.0.2.7", "authfail")
    assert b.refuses("192.0.2.7") is None


def test_full_table_permissive_records_no_new_penalty() -> None:
    b, _, _ = box(max_sources=2, noauth=20.0)
    b.penalise("192.0.2.1", "noauth")
    b.penalise("192.0.2.2", "noauth")
    b.penalise("192.0.2.3", "noauth")  # no room: not recorded
    assert b.refuses("192.0.2.3") is None
    assert b.refuses("192.0.2.9") is None  # permissive: others come in
    assert set(b.penalised()) == {"192.0.2.1/32", "192.0.2.2/32"}


def test_full_table_deny_all_refuses_everyone_until_entries_expire() -> None:
    b, clock, _ = box(max_sources=2, noauth=1.0, overflow="deny-all")
    b.penalise("192.0.2.1", "noauth")  # 1 s each: recorded, not enforced
    b.penalise("192.0.2.2", "noauth")
    assert b.refuses("192.0.2.9") == "*"
    clock.now += 11  # expired, swept at the next check
    assert b.refuses("192.0.2.9") is None


def test_max_startups_random_early_drop() -> None:
    # MaxStartups 10:30:100 (sshd.c drop_connection): none below start, 30 %
    # at start rising to 100 % at full; at full the registry turns away
    assert not max_startups_drop(9, 10, 30, 100, 0.0)
    assert max_startups_drop(10, 10, 30, 100, 0.29)
    assert not max_startups_drop(10, 10, 30, 100, 0.30)
    assert max_startups_drop(55, 10, 30, 100, 0.64)  # 30 + 70 * 45/90 = 65 %
    assert not max_startups_drop(55, 10, 30, 100, 0.66)
    assert max_startups_drop(99, 10, 30, 100, 0.99)
    assert not max_startups_drop(100, 10, 30, 100, 0.0)


def test_proxy_v1_header_and_what_follows() -> None:
    data = b"PROXY TCP4 198.51.100.7 192.0.2.1 50000 22\r\nSSH-2.0-OpenSSH_9.2\r\n"
    header = proxy.parse(data)
    assert header == proxy.ProxyHeader("198.51.100.7", 50000, 1, 44)
    assert data[header.length :] == b"SSH-2.0-OpenSSH_9.2\r\n"
    six = proxy.parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 50000 22\r\n")
    assert six is not None and six.address == "2001:db8::7"
    unknown = proxy.parse(b"PROXY UNKNOWN\r\n")
    assert unknown is not None and unknown.address is None  # the socket's peer stands
    # incomplete: wait for more
    assert proxy.parse(b"PROX") is None
    assert proxy.parse(b"PROXY TCP4 198.51.100.7 19") is None


@pytest.mark.parametrize(
    "data",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n",  # a client that skipped its proxy
        b"PROXY TCP4 198.51.100.7 192.0.2.1 50000\r\n",  # a field missing
        b"PROXY TCP4 300.1.1.1 192.0.2.1 50000 22\r\n",
        b"PROXY " + b"A" * 200,  # no end of line within 107 bytes
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff",  # v2 longer than allowed
    ],
)
def test_proxy_header_errors(data: bytes) -> None:
    with pytest.raises(proxy.ProxyHeaderError):
        proxy.parse(data)


def test_proxy_v2_headers() -> None:
    v2 = ProxyProtocolV2()
    four = v2.pack(
        ProxyResultIPv4(
            (ipaddress.IPv4Address("203.0.113.9"), 41000),
            (ipaddress.IPv4Address("192.0.2.1"), 22),
        )
    )
    assert proxy.parse(four[:15]) is None
    assert proxy.parse(four + b"SSH-2.0-x\r\n") == proxy.ProxyHeader(
        "203.0.113.9", 41000, 2, len(four)
    )
    six = v2.pack(
        ProxyResultIPv6(
            (ipaddress.IPv6Address("2001:db8::9"), 41001),
            (ipaddress.IPv6Address("2001:db8::1"), 22),
        )
    )
    assert proxy.parse(six) == proxy.ProxyHeader("2001:db8::9", 41001, 2, len(six))
    local = proxy.parse(v2.pack(ProxyResultLocal()))  # a proxy's own health check
    assert local is not None and local.address is None


def test_looks_like_proxy() -> None:
    assert proxy.looks_like_proxy(b"PROXY TCP4 ") is True
    assert proxy.looks_like_proxy(b"\r\n\r\n\x00\r\nQUIT\n!") is True
    assert proxy.looks_like_proxy(b"PRO") is None
    assert proxy.looks_like_proxy(b"\r\n") is None
    assert proxy.looks_like_proxy(b"SSH-2.0-OpenSSH") is False
    assert proxy.looks_like_proxy(b"S") is False


def test_proxy_sources_are_never_penalised_themselves() -> None:
    clock = Clock()
    proxies = (ipaddress.ip_network("10.0.0.5/32"),)
    b = PenaltyBox(PenaltySettings(noauth=20.0), clock=clock, also_exempt=proxies)
    b.penalise("10.0.0.5", "noauth")  # a load balancer's health check
    b.penalise("10.0.0.6", "noauth")
    assert b.refuses("10.0.0.5") is None
    assert b.refuses("10.0.0.6") == "10.0.0.6/32"


def _v2(command: int, family: int, body: bytes) -> bytes:
    return proxy.V2_SIGNATURE + bytes([command, family]) + len(body).to_bytes(2, "big") + body


@pytest.mark.parametrize(
    "data",
    [
        # address blocks shorter than their family needs: the decoder raised
        # struct.error from inside it (one uncaught traceback per connection)
        _v2(0x21, 0x11, b"abcd"),  # TCP over IPv4 needs 12 bytes
        _v2(0x21, 0x21, bytes(12)),  # TCP over IPv6 needs 36
        _v2(0x21, 0x31, bytes(4)),  # UNIX needs 216
        _v2(0x21, 0x12, bytes(11)),  # UDP over IPv4
        # a v1 source with a zone names an interface of the proxy's, and no
        # TCP client has source port 0
        b"PROXY TCP6 fe80::1%eth0 ::1 50000 22\r\n",
        b"PROXY TCP4 198.51.100.7 192.0.2.1 0 22\r\n",
        b"PROXY TCP6 2001:db8::7 2001:db8::1 0 22\r\n",
    ],
)
def test_proxy_headers_the_decoder_chokes_on_are_invalid(data: bytes) -> None:
    with pytest.raises(proxy.ProxyHeaderError):
        proxy.parse(data)


def test_proxy_v2_source_port_0_is_invalid() -> None:
    zero = ProxyProtocolV2().pack(
        ProxyResultIPv4(
            (ipaddress.IPv4Address("203.0.113.9"), 0),
            (ipaddress.IPv4Address("192.0.2.1"), 22),
        )
    )
    with pytest.raises(proxy.ProxyHeaderError, match="port 0"):
        proxy.parse(zero)
