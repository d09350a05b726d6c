"""The directory entry grammar and the route table (pure, no I/O)."""

from __future__ import annotations

import logging
import random

import pytest

from bastion.addresses import consul_base_url
from bastion.config import parse_settings
from bastion.directory.grammar import RouteTable, parse_route
from bastion.directory.watch import next_index
from bastion.errors import ConfigError, MalformedRoute, NoRoute
from bastion.identity import valid_user_name
from bastion.model import ForwardingPolicy, Route, Target


def node(host: str, port: int | None = None, login: str | None = None) -> Target:
    return Target(host, port, login, is_node=True)


def addr(host: str, port: int | None = None, login: str | None = None) -> Target:
    return Target(host, port, login, is_node=False)


VALID: list[tuple[str | bytes, tuple[Target, ...]]] = [
    ("host-102", (node("host-102"),)),
    ("host-102:2222", (node("host-102", 2222),)),
    ("admin@host-102", (node("host-102", None, "admin"),)),
    ("host-102, host-101", (node("host-102"), node("host-101"))),
    ("host-102,host-101", (node("host-102"), node("host-101"))),
    ("10.0.0.5:22", (addr("10.0.0.5", 22),)),
    ("10.0.0.5", (addr("10.0.0.5"),)),
    ("[2001:db8::1]", (addr("2001:db8::1"),)),
    ("[2001:db8:0::1]:2200", (addr("2001:db8::1", 2200),)),
    ("db1.example.com", (addr("db1.example.com"),)),
    ("ops_1@db1.example.com:65535", (addr("db1.example.com", 65535, "ops_1"),)),
    ("_svc@host_9", (node("host_9", None, "_svc"),)),
    ("HOST-102", (node("HOST-102"),)),
    ("  host-102  \n", (node("host-102"),)),  # a file's final newline
    (b"host-102\r\n", (node("host-102"),)),
    ("h1,h2,h3,h4,h5,h6,h7,h8", tuple(node(f"h{i}") for i in range(1, 9))),
    (
        "a@h1, b@10.1.2.3:1, [::1]:22",
        (node("h1", None, "a"), addr("10.1.2.3", 1, "b"), addr("::1", 22)),
    ),
]


@pytest.mark.parametrize(("value", "targets"), VALID, ids=[repr(v[0]) for v in VALID])
def test_valid_plain(value: str | bytes, targets: tuple[Target, ...]) -> None:
    route = parse_route("alice", value)
    assert route.targets == targets
    assert route.user == "alice"
    assert route.login == "alice"
    assert route.policy == ForwardingPolicy()
    assert route.raw == (value.decode() if isinstance(value, bytes) else value).strip()


def test_valid_json() -> None:
    value = (
        '{"route": "host-102, host-101", "agent_forwarding": true, '
        '"local_forwarding": false, "remote_forwarding": false, '
        '"jump": ["host-103", "10.0.0.9:22"]}'
    )
    route = parse_route("alice", value)
    assert route == Route(
        user="alice",
        login="alice",
        targets=(node("host-102"), node("host-101")),
        policy=ForwardingPolicy(
            agent_forwarding=True, jump=(node("host-103"), addr("10.0.0.9", 22))
        ),
        raw=value,
    )


def test_valid_json_minimal_and_multiline() -> None:
    route = parse_route("alice", b'{\n  "route": "admin@host-102:2222"\n}\n')
    assert route.targets == (node("host-102", 2222, "admin"),)
    assert route.policy == ForwardingPolicy()
    route = parse_route("bob", '{"route": "h", "remote_forwarding": true, "jump": []}')
    assert route.policy == ForwardingPolicy(remote_forwarding=True)


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("alice", True),
        ("_svc", True),
        ("a.b-c_9", True),
        ("a" * 32, True),
        ("a" * 33, False),
        ("Alice", False),
        ("alice\n", False),
        ("9lives", False),
        ("-x", False),
        ("", False),
        ("al ice", False),
        ("élise", False),
    ],
)
def test_one_user_name_grammar(name: str, valid: bool) -> None:
    """The same rule for the person, the directory key, the upstream login."""
    assert valid_user_name(name) is valid
    if valid:
        assert parse_route(name, "host-102").login == name
        assert parse_route("bob", f"{name}@host-102").targets[0].login == name
    else:
        with pytest.raises(MalformedRoute):
            parse_route(name, "alice@host-102")
        with pytest.raises(MalformedRoute):
            parse_route("bob", f"{name}@host-102")


def test_a_key_that_is_not_a_user_name_is_ignored() -> None:
    table = RouteTable({"Alice": b"host-102", "alice": b"host-101"})
    assert table.ignored == ("Alice",)
    assert table.route_for("alice").targets[0].host == "host-101"
    with pytest.raises(NoRoute):
        table.route_for("Alice")


P = "directory entry for alice is malformed: "
S = " (ask an operator to fix users/alice)"

MALFORMED: list[tuple[str | bytes, str]] = [
    ("", "value is empty"),
    ("  \n\t ", "value is empty"),
    ("h" * 1025, "value is 1025 bytes (at most 1024)"),
    ("é" * 513, "value is 1026 bytes (at most 1024)"),
    (b"host-\xff102", "value is not valid UTF-8 (byte 5)"),
    ("host\ud800", "value is not valid UTF-8"),
    ("host-102\nhost-101", "control character U+000A at position 8 of the value"),
    ("host-102\x00", "control character U+0000 at position 8 of the value"),
    ("host\t-102", "control character U+0009 at position 4 of the value"),
    ("host-102\x7f", "control character U+007F at position 8 of the value"),
    ("host-102\x85", "control character U+0085 at position 8 of the value"),
    ("host-102:99999", "bad port '99999'"),
    ("host-102:0", "bad port '0'"),
    ("host-102:65536", "bad port '65536'"),
    ("host-102:", "bad port ''"),
    ("host-102:22a", "bad port '22a'"),
    ("host-102:-1", "bad port '-1'"),
    ("host-102:\u0662\u0662", "bad port '\\u0662\\u0662'"),
    ("host-102:000022", "bad port '000022'"),
    ("[::1]:0", "bad port '0'"),
    ("host 102", "bad host name 'host 102'"),
    ("-host", "bad host name '-host'"),
    (".host", "bad host name '.host'"),
    ("a..b", "bad host name 'a..b'"),
    ("höst", "bad host name 'h\\xf6st'"),
    ("host/1", "bad host name 'host/1'"),
    ("h" * 254, "bad host name '" + "h" * 40 + "...'"),
    (":22", "empty host in ':22'"),
    ("999.1.1.1", "bad IPv4 address '999.1.1.1'"),
    ("10.0.0", "bad IPv4 address '10.0.0'"),
    ("2001:db8::1", "bad target '2001:db8::1': an IPv6 address needs brackets"),
    ("[2001:db8::1", "unclosed '[' in '[2001:db8::1'"),
    ("[zz::1]", "bad IPv6 address 'zz::1'"),
    ("[10.0.0.1]", "bad IPv6 address '10.0.0.1'"),
    ("[::1]x", "unexpected 'x' after ']'"),
    ("Admin@host-102", "bad login 'Admin'"),
    ("1x@host-102", "bad login '1x'"),
    ("a" * 33 + "@host-102", "bad login '" + "a" * 33 + "'"),
    ("@host-102", "empty login before '@' in '@host-102'"),
    ("a@b@host-102", "bad login 'a@b'"),
    ("ad min@host-102", "bad login 'ad min'"),
    ("host-102,", "target 2 of the value is empty"),
    ("host-102,,host-101", "target 2 of the value is empty"),
    (",host-102", "target 1 of the value is empty"),
    ("h1,h2,h3,h4,h5,h6,h7,h8,h9", "9 targets in the value (at most 8)"),
    # JSON form
    ("{", "invalid JSON: Expecting property name enclosed in double quotes"),
    ('{"route": "h"} x', "invalid JSON: Extra data"),
    ('{"route": "h", "route": "g"}', "invalid JSON: duplicate key 'route'"),
    ('{"x": 1}', "unknown key(s) 'x'"),
    ('{"route": "h", "agent": true}', "unknown key(s) 'agent'"),
    ('{"agent_forwarding": true}', "the JSON object has no 'route'"),
    ('{"route": 5}', "'route' must be a string"),
    ('{"route": ["h"]}', "'route' must be a string"),
    ('{"route": ""}', "the route is empty"),
    ('{"route": "h\\nx"}', "control character U+000A at position 1 of the route"),
    ('{"route": "h:0"}', "bad port '0'"),
    ('{"route": "h", "agent_forwarding": "yes"}', "'agent_forwarding' must be true or false"),
    ('{"route": "h", "local_forwarding": 1}', "'local_forwarding' must be true or false"),
    ('{"route": "h", "remote_forwarding": null}', "'remote_forwarding' must be true or false"),
    ('{"route": "h", "jump": "h2"}', "'jump' must be a list of strings"),
    ('{"route": "h", "jump": [1]}', "'jump' must be a list of strings"),
    ('{"route": "h", "jump": ["a,b"]}', "jump entry 'a,b' must name one host"),
    ('{"route": "h", "jump": ["x@h2"]}', "jump entry 'x@h2' must not name a login"),
    ('{"route": "h", "jump": [""]}', "the jump entry is empty"),
    ('{"route": "h", "jump": ["h:70000"]}', "bad port '70000'"),
    (
        '{"route": "h", "jump": ' + str([f"h{i}" for i in range(9)]).replace("'", '"') + "}",
        "9 jump entries (at most 8)",
    ),
    ('{"route": "h", "x": ' + "[" * 400 + "]" * 400 + "}", "unknown key(s) 'x' (known: "),
    ('{"x":' + "[" * 1015, "invalid JSON: maximum recursion depth exceeded"),
    ("{" + '"a":' * 300, "value is 1201 bytes (at most 1024)"),
]


@pytest.mark.parametrize(("value", "problem"), MALFORMED, ids=[repr(v[0])[:40] for v in MALFORMED])
def test_malformed(value: str | bytes, problem: str) -> None:
    with pytest.raises(MalformedRoute) as info:
        parse_route("alice", value)
    message = info.value.user_message
    assert message.startswith(P + problem), message
    assert message.endswith(S), message
    assert info.value.detail.startswith("users/alice: " + problem)
    assert info.value.reason == "malformed-route"
    assert "\n" not in message and message.isascii() and message.isprintable()


def test_message_names_key_with_custom_prefix() -> None:
    with pytest.raises(MalformedRoute) as info:
        parse_route("bob", "h:0", routes_prefix="bastion/routes/")
    assert info.value.user_message == (
        "directory entry for bob is malformed: bad port '0' "
        "(ask an operator to fix bastion/routes/bob)"
    )


def test_fuzz_random_bytes_only_malformed() -> None:
    rng = random.Random(20240611)
    alphabet = b'abz09-._@:,[]{}" \n\t\x00\xff\xc3\xa9:host-102admin{}"route":true'
    parsed = 0
    for i in range(20000):
        length = rng.randint(0, 60 if i % 50 else 1100)
        if i % 2:
            value = bytes(rng.getrandbits(8) for _ in range(length))
        else:
            value = bytes(rng.choice(alphabet) for _ in range(length))
        try:
            route = parse_route("alice", value)
        except MalformedRoute as exc:
            assert exc.user_message.isascii() and exc.user_message.isprintable()
            continue
        parsed += 1
        assert 1 <= len(route.targets) <= 8
    assert parsed > 0  # the fuzz does reach the valid forms too


def test_fuzz_mutated_json_only_malformed() -> None:
    rng = random.Random(7)
    seed = (
        '{"route": "admin@host-102:2222, [::1]", "agent_forwarding": true, '
        '"jump": ["host-103", "10.0.0.9:22"]}'
    )
    for _ in range(5000):
        chars = list(seed)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(chars))
            chars[pos] = chr(
                rng.choice([0, 10, 34, 44, 58, 64, 91, 93, 123, 125, rng.randint(0, 0x2FF)])
            )
        try:
            parse_route("alice", "".join(chars))
        except MalformedRoute as exc:
            assert exc.user_message.isascii() and exc.user_message.isprintable()


def test_route_table_isolates_errors_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "bastion.directory")
    entries = {"alice": b"host-102", "bob": b"host-102:99999", "team/carol": b"h", "": b""}
    table = RouteTable(entries)
    assert table.route_for("alice").targets == (node("host-102"),)
    with pytest.raises(MalformedRoute, match="bad port '99999'"):
        table.route_for("bob")
    with pytest.raises(NoRoute) as info:
        table.route_for("carol")
    assert info.value.user_message == "no route for carol: ask an operator to add users/carol"
    with pytest.raises(NoRoute):
        table.route_for("team/carol")  # nested keys are not routes
    assert len(table) == 1 and set(table.errors) == {"bob"} and table.ignored == ("team/carol",)
    bob_lines = [r for r in caplog.records if "users/bob" in r.getMessage()]
    assert len(bob_lines) == 1
    # an unrelated change does not log bob again; a change of bob's entry does
    caplog.clear()
    table2 = RouteTable({**entries, "dave": b"h"}, previous=table)
    for _ in range(5):
        with pytest.raises(MalformedRoute):
            table2.route_for("bob")
    assert not caplog.records
    RouteTable({**entries, "bob": b"host-102:0"}, previous=table2)
    assert [r.getMessage() for r in caplog.records] == [
        "malformed directory entry users/bob: bad port '0'"
    ]


def test_no_route_message_is_safe() -> None:
    with pytest.raises(NoRoute) as info:
        RouteTable({}).route_for("ev\nil\x1b[31m")
    assert info.value.user_message.isprintable()


@pytest.mark.parametrize(
    ("previous", "returned", "expected"),
    [
        (0, 5, 5),
        (5, 5, 5),
        (5, 9, 9),
        (9, 5, 0),
        (9, 0, 0),
        (0, 0, 1),
        (3, 0, 0),
    ],
)
def test_next_index(previous: int, returned: int, expected: int) -> None:
    assert next_index(previous, returned) == expected


@pytest.mark.parametrize(
    ("address", "url"),
    [
        ("http://127.0.0.1:8500", "http://127.0.0.1:8500"),
        ("https://consul.example:8501/", "https://consul.example:8501"),
        ("https://consul.example", "https://consul.example:8501"),
        ("127.0.0.1:9000", "http://127.0.0.1:9000"),
        ("localhost", "http://localhost:8500"),
        ("http://[::1]:8500", "http://[::1]:8500"),
    ],
)
def test_consul_address(address: str, url: str) -> None:
    assert consul_base_url(address) == url


@pytest.mark.parametrize(
    "address",
    [
        "ftp://x:1",
        "http://:8500",
        "http://h:99999",
        "http://u:p@h:1",
        "http://h:1/v1",
        "unix:///run/consul.sock",
    ],
)
def test_consul_address_rejected(address: str) -> None:
    with pytest.raises(ValueError):
        consul_base_url(address)
    # the settings name the key
    with pytest.raises(ConfigError, match=r"\[consul\] address"):
        parse_settings(
            {
                "server": {"host_keys": ["k"]},
                "consul": {"address": address},
                "upstream": {"ca_key": "ca"},
            }
        )
