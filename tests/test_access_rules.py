"""A person's own limits, as pure logic: the directory keys ("from",
"max_sessions", the two timeouts, "mfa", "disabled"), the policy's answer at
the end of authentication, and the idle timers' clock (real asyncio timers,
short times). End to end with real clients: test_person_limits.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from bastion.config import load_settings
from bastion.core.idle import IdleTimers, shown
from bastion.core.limits import SessionCounter, source_ip
from bastion.core.relay import RelayStats
from bastion.directory.grammar import RouteTable, parse_route
from bastion.errors import (
    AccessDenied,
    AccountDisabled,
    ConfigError,
    MalformedRoute,
    NoRoute,
    SourceNotAllowed,
)
from bastion.model import AccessRules, Route
from bastion.policy import LoginPolicy
from bastion.trust import HostKeyPolicy


def access(value: str) -> AccessRules:
    return parse_route("alice", value).access


def test_plain_entries_and_json_without_the_keys_have_no_limits() -> None:
    assert access("host-102") == AccessRules()
    assert access('{"route": "host-102"}') == AccessRules()


def test_every_key_parsed() -> None:
    rules = access(
        '{"route": "host-102", "from": ["127.0.0.1", "10.0.0.0/8", "2001:db8::/32"],'
        ' "max_sessions": 2, "channel_timeout": "1h30m", "unused_connection_timeout": 45,'
        ' "mfa": "totp", "disabled": true}'
    )
    assert rules == AccessRules(
        sources=("127.0.0.1/32", "10.0.0.0/8", "2001:db8::/32"),
        max_sessions=2,
        channel_timeout=5400.0,
        unused_connection_timeout=45.0,
        mfa="totp",
        disabled=True,
    )


def test_from_as_one_string_like_authorized_keys() -> None:
    assert access('{"route": "h", "from": "192.0.2.0/24, 10.1.2.3"}').sources == (
        "192.0.2.0/24",
        "10.1.2.3/32",
    )


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),  # off for this person, whatever [server] says
        (2.5, 2.5),
        ('"90"', 90.0),
        ('"30s"', 30.0),
        ('"5m"', 300.0),
        ('"1h30m"', 5400.0),
        ('"1H30M10S"', 5410.0),
        ('"2d"', 172800.0),
        ('"1w"', 604800.0),
    ],
)
def test_timeouts_in_sshd_time_formats(value: object, seconds: float) -> None:
    rules = access(f'{{"route": "h", "channel_timeout": {value}}}')
    assert rules.channel_timeout == seconds


BAD = [
    ('"from": "not-an-address"', "'from': not an address or CIDR: 'not-an-address'"),
    ('"from": []', "'from' is empty"),
    ('"from": ""', "'from' is empty"),
    ('"from": [10]', "'from' must be a list of addresses or CIDRs"),
    ('"from": ["10.0.0.0/33"]', "not an address or CIDR"),
    ('"max_sessions": 0', "'max_sessions' must be a whole number of at least 1"),
    ('"max_sessions": true', "'max_sessions' must be a whole number"),
    ('"max_sessions": 1.5', "'max_sessions' must be a whole number"),
    ('"max_sessions": "2"', "'max_sessions' must be a whole number"),
    ('"channel_timeout": -1', "'channel_timeout' must be between 0 (off) and"),
    ('"channel_timeout": "5 min"', "'channel_timeout': bad time '5 min'"),
    ('"channel_timeout": "1x"', "'channel_timeout': bad time '1x'"),
    ('"channel_timeout": ""', "'channel_timeout': bad time"),
    ('"channel_timeout": true', "'channel_timeout' must be seconds (a number) or a time"),
    ('"unused_connection_timeout": null', "'unused_connection_timeout' must be seconds"),
    ('"unused_connection_timeout": 1e309', "must be between 0 (off) and"),
    ('"mfa": "sms"', "'mfa' must be \"totp\""),
    ('"disabled": "yes"', "'disabled' must be true or false"),
]


@pytest.mark.parametrize(("keys", "message"), BAD, ids=[b[0] for b in BAD])
def test_wrong_values_make_the_entry_malformed(keys: str, message: str) -> None:
    with pytest.raises(MalformedRoute) as err:
        parse_route("alice", f'{{"route": "host-102", {keys}}}')
    assert message in err.value.user_message
    assert "users/alice" in err.value.user_message  # which key to fix


class Entries:
    """Routes parsed by the real grammar and route table, held in memory."""

    default_port = 22

    def __init__(self, **entries: str) -> None:
        self.table = RouteTable({k: v.encode() for k, v in entries.items()})

    def route_for(self, user: str) -> Route:
        return self.table.route_for(user)

    def node(self, name: str) -> None:
        return None

    def resolve_target(self, route: Route, target: object) -> NoRoute:
        return NoRoute("unused here")


def admit(user: str, source: str, **entries: str) -> AccessRules:
    policy = LoginPolicy(Entries(**entries), HostKeyPolicy(None, None))  # type: ignore[arg-type]
    return policy.admit(user, source)


def test_admit_from_inside_and_outside_from() -> None:
    entry = '{"route": "h", "from": ["127.0.0.1", "10.0.0.0/8", "2001:db8::/32"]}'
    assert admit("alice", "127.0.0.1", alice=entry).sources
    assert admit("alice", "10.200.0.7", alice=entry).sources
    assert admit("alice", "2001:db8::5", alice=entry).sources
    # a dual-stack listener reports IPv4 clients as mapped addresses
    assert admit("alice", "::ffff:10.1.1.1", alice=entry).sources
    for outside in ("127.0.0.2", "192.0.2.7", "2001:db9::1", "garbage"):
        with pytest.raises(SourceNotAllowed) as err:
            admit("alice", outside, alice=entry)
        assert err.value.user_message.startswith(f"alice may not log in from {outside}")
        assert err.value.reason == "source-not-allowed"


def test_admit_disabled_first() -> None:
    with pytest.raises(AccountDisabled) as err:
        admit("alice", "127.0.0.1", alice='{"route": "h", "disabled": true, "from": "10.0.0.1"}')
    assert err.value.user_message == "alice is disabled in the directory"
    assert isinstance(err.value, AccessDenied) and err.value.reason == "disabled"


def test_admit_without_a_usable_entry_leaves_the_refusal_to_routing() -> None:
    # the routing decision that follows names the real problem (no route, malformed)
    assert admit("bob", "127.0.0.1") == AccessRules()
    assert admit("bob", "127.0.0.1", bob='{"route": "h", "max_sessions": 0}') == AccessRules()


def test_source_ip_of_a_source() -> None:
    assert source_ip("127.0.0.1:50022") == "127.0.0.1"
    assert source_ip("2001:db8::1:50022") == "2001:db8::1"
    assert source_ip("[2001:db8::1]:50022") == "2001:db8::1"


def test_session_counter_counts_each_channel_once() -> None:
    counter = SessionCounter()
    one, two = RelayStats("session"), RelayStats("session")
    counter.add("alice", one)
    counter.add("alice", one)
    counter.add("alice", two)
    assert counter.count("alice") == 2 and counter.count("bob") == 0
    counter.discard("alice", one)
    counter.discard("alice", one)
    assert counter.count("alice") == 1


def test_shown() -> None:
    assert [shown(s) for s in (1.5, 45, 300, 5400, 7200)] == [
        "1.5 s",
        "45 s",
        "5 min",
        "1 h 30 min",
        "2 h",
    ]


def test_idle_timers_follow_activity_and_fire_once() -> None:
    asyncio.run(_follow_activity())


async def _follow_activity() -> None:
    idle: list[tuple[str, float]] = []
    unused: list[float] = []
    unused_fired = asyncio.Event()
    start = time.monotonic()

    def on_unused() -> None:
        unused.append(time.monotonic() - start)
        unused_fired.set()

    timers = IdleTimers(
        0.3, 0.2, lambda st: idle.append((st.kind, time.monotonic() - start)), on_unused
    )
    timers.start()
    await asyncio.sleep(0.1)
    busy, quiet = RelayStats("session"), RelayStats("tunnel")
    timers.opened(busy)  # channels open before UnusedConnectionTimeout: it never fires
    timers.opened(quiet)
    for _ in range(8):  # data on `busy` every 0.1 s: never idle
        await asyncio.sleep(0.1)
        busy.last_activity = time.monotonic()
    assert [kind for kind, _ in idle] == ["tunnel"]
    assert 0.35 <= idle[0][1] < 0.6  # opened at ~0.1, idle 0.3
    assert unused == []
    timers.closed(quiet)
    timers.closed(busy)  # the last channel: the connection is unused from now
    closed_at = time.monotonic() - start
    await asyncio.wait_for(unused_fired.wait(), 1.0)
    assert len(unused) == 1 and 0.2 <= unused[0] - closed_at < 0.35
    assert [kind for kind, _ in idle] == ["tunnel"]  # busy was never idle


def test_idle_timers_off_and_stopped() -> None:
    asyncio.run(_off_and_stopped())


async def _off_and_stopped() -> None:
    fired: list[str] = []
    off = IdleTimers(0, 0, lambda st: fired.append("idle"), lambda: fired.append("unused"))
    off.start()
    off.opened(RelayStats("session"))
    stopped = IdleTimers(0.05, 0.05, lambda st: fired.append("idle"), lambda: fired.append("u"))
    stopped.start()
    chan = RelayStats("session")
    stopped.opened(chan)
    stopped.stop()
    stopped.closed(chan)  # a channel's end after the connection's: no new timer
    await asyncio.sleep(0.2)
    assert fired == []


@pytest.mark.parametrize("key", ["channel_timeout", "unused_connection_timeout"])
@pytest.mark.parametrize("value", ["-1", "nan", "1e9"])
def test_server_timeouts_are_validated(tmp_path: Path, key: str, value: str) -> None:
    path = tmp_path / "bastion.toml"
    path.write_text(
        f'[server]\nhost_keys = ["k"]\n{key} = {value}\n'
        '[consul]\ntoken_file = "t"\n[upstream]\nca_key = "ca"\nknown_hosts = "kh"\n'
    )
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert f"[server] {key}: must be" in err.value.user_message
