"""Time-bound access grants: ``bastion grant`` writes a key bound to a Consul
session with a TTL; the bastion honours it while it lasts, to the second,
and ends the sessions it allowed when it goes (expiry or ``--revoke``).

The grammar and the table are unit-tested; the rest runs the real CLI, real
Consul sessions, a real bastion and real OpenSSH clients (``ssh -J`` through
the bastion to a host only the grant allows).
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ConsulTokens, Person, route

import devstack
from bastion.directory.grants import BadGrant, GrantTable, is_grant_route, parse_grant
from bastion.errors import BastionError
from bastion.grants import grant_name, parse_duration
from devstack import BastionProcess, ConsulAgent, SshdHost, ssh_command, stop_ssh_client

# --------------------------------------------------------------------------
# the grammar (pure)


def _value(**fields: object) -> bytes:
    return json.dumps({"route": "host-103", "expires": 2_000_000_000, **fields}).encode()


NOW = 2_000_000_000 - 3600.0  # an hour before _value's "expires"


def test_parse_grant_reads_route_expiry_and_who() -> None:
    g = parse_grant(
        "grants/alice/host-103", "alice", "host-103", _value(by="ops", reason="INC"), now=NOW
    )
    assert [str(t) for t in g.targets] == ["host-103"]
    assert (g.expires, g.by, g.reason) == (2_000_000_000.0, "ops", "INC")
    assert is_grant_route(g.route) and g.route.raw == "grant grants/alice/host-103: host-103"
    assert g.route.login == "alice"


@pytest.mark.parametrize(
    ("user", "value", "problem"),
    [
        ("Alice", _value(), "not a user name"),
        ("alice", b"host-103", "not JSON"),
        ("alice", b"[1]", "not a JSON object"),
        ("alice", _value(extra=1), "unknown keys"),
        ("alice", json.dumps({"route": "host-103"}).encode(), "'expires'"),
        ("alice", _value(expires="soon"), "'expires'"),
        ("alice", _value(expires=True), "'expires'"),
        ("alice", _value(route='{"route": "x"}'), "plain form"),
        ("alice", _value(route="host 103"), "bad host"),
        ("alice", _value(by=3), "'by'"),
        ("alice", b"x" * 5000, "bytes"),
        # an "expires" that never comes (Python's json takes these)
        ("alice", b'{"route": "host-103", "expires": Infinity}', "finite"),
        ("alice", b'{"route": "host-103", "expires": -Infinity}', "finite"),
        ("alice", b'{"route": "host-103", "expires": NaN}', "finite"),
        ("alice", b'{"route": "host-103", "expires": 1e400}', "finite"),
        ("alice", b'{"route": "host-103", "expires": 1' + b"0" * 400 + b"}", "finite"),
        ("alice", _value(expires=1e300), "grant_max"),
        ("alice", _value(expires=NOW + 86400 + 61), "grant_max"),
        ("alice", _value(by="ops\x1b[2J"), "'by'"),
        ("alice", _value(reason="INC\nforged line"), "'reason'"),
        ("alice", _value(reason="x" * 201), "'reason'"),
        ("alice", _value(route="host-1," * 9 + "host-2"), "targets"),
    ],
)
def test_parse_grant_refuses_what_gives_nothing(user: str, value: bytes, problem: str) -> None:
    with pytest.raises(BadGrant, match=problem):
        parse_grant(f"grants/{user}/h", user, "h", value, now=NOW)


def test_parse_grant_bounds_expires_by_grant_max_with_slack() -> None:
    # grant_max (+60 s of clock skew) after the time the value is read
    for longest in (86400.0, 3600.0):
        ok = _value(expires=NOW + longest + 59)
        assert parse_grant("grants/a/h", "a", "h", ok, now=NOW, longest=longest).expires > NOW
        with pytest.raises(BadGrant, match="grant_max"):
            late = _value(expires=NOW + longest + 61)
            parse_grant("grants/a/h", "a", "h", late, now=NOW, longest=longest)
    # long past is no problem: an ended grant
    assert not parse_grant("grants/a/h", "a", "h", _value(expires=0), now=NOW).active(NOW)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("host-103", True),
        ("127.0.1.101", True),
        ("2001_db8__1", True),
        ("INC-42", True),
        ("inf", True),
        ("a/b", False),
        ("x y", False),
        (".hidden", False),
        ("-x", False),
        ("h" * 254, False),
        ("caf\u00e9", False),
    ],
)
def test_grant_names(name: str, ok: bool) -> None:
    """The key's last part: a host-like name (`bastion grant` writes the host's)."""
    if ok:
        assert parse_grant(f"grants/a/{name}", "a", name, _value(), now=NOW).name == name
    else:
        with pytest.raises(BadGrant, match="grant name"):
            parse_grant(f"grants/a/{name}", "a", name, _value(), now=NOW)


def test_grant_table_judges_a_value_once(caplog: pytest.LogCaptureFixture) -> None:
    """A malformed value is logged once, however many changes follow; an
    "expires" is judged against the time the value was first read (so an
    unchanged too-distant grant does not come into force later)."""
    now = 1_000_000.0
    far = _value(expires=now + 86400 + 120)
    entries = {
        "alice/inf": b'{"route": "host-103", "expires": Infinity}',
        "alice/far": far,
        "alice/host-101": _value(route="host-101", expires=now + 600),
        "alice/": b"",  # a Consul "folder": not a grant, no warning
    }
    with caplog.at_level("WARNING", logger="bastion.directory"):
        first = GrantTable(entries, now=now)
        later = GrantTable(
            {**entries, "bob/x": _value(expires=now + 60)}, previous=first, now=now + 3600
        )
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2, warned
    assert any("grants/alice/inf" in w and "finite" in w for w in warned)
    assert set(first.malformed) == set(later.malformed) == {"alice/inf", "alice/far"}
    assert [g.name for g in later.for_user("alice", now)] == ["host-101"]
    assert later.next_expiry(now) == now + 60
    # a bastion that reads it first an hour later takes it (bounded from then)
    assert "alice/far" not in GrantTable(entries, now=now + 3600).malformed
    # rewritten: judged again
    fixed = GrantTable(
        {**entries, "alice/far": _value(expires=now + 7200)}, previous=first, now=now
    )
    assert [g.name for g in fixed.for_user("alice", now)] == ["far", "host-101"]


def test_grant_table_serves_only_grants_in_force() -> None:
    now = 1_000_000.0
    table = GrantTable(
        {
            "alice/host-103": _value(expires=now + 60),
            "alice/host-101": _value(route="host-101", expires=now + 600),
            "alice/old": _value(route="host-9", expires=now - 1),
            "bob/x": b"not json",  # ignored, logged once
        }
    )
    assert [g.name for g in table.for_user("alice", now)] == ["host-101", "host-103"]
    assert table.for_user("alice", now + 61)[0].name == "host-101"
    assert table.for_user("alice", now + 601) == ()
    assert table.for_user("bob", now) == ()
    assert table.next_expiry(now) == now + 60
    assert table.next_expiry(now + 60) == now + 600
    fewer = GrantTable({"alice/host-101": _value(route="host-101", expires=now + 600)})
    assert fewer.changed_users(table) == {"alice"}
    assert GrantTable(dict(table.raw)).changed_users(table) == set()


def test_durations_and_names() -> None:
    assert parse_duration("2h", 86400) == 7200
    assert parse_duration("90s", 86400) == parse_duration("90", 86400) == 90
    assert parse_duration("15m", 86400) == 900
    assert parse_duration("1d", 86400) == 86400
    for bad, longest in (("5s", 86400), ("2d", 86400), ("3h", 3600), ("soon", 86400)):
        with pytest.raises(BastionError):
            parse_duration(bad, longest)
    assert grant_name("host-103") == grant_name("admin@host-103:2222") == "host-103"
    assert grant_name("[2001:db8::1]:22, host-101") == "2001_db8__1"


# --------------------------------------------------------------------------
# the real thing


def bastion_cli(proc: BastionProcess, tokens: ConsulTokens, *args: str) -> str:
    """``bastion grant ARGS`` with the operator's token; its stdout (exit 0)."""
    res = grant_cli(proc, tokens, *args)
    assert res.returncode == 0, res.stderr
    return res.stdout


def grant_cli(
    proc: BastionProcess, tokens: ConsulTokens, *args: str
) -> subprocess.CompletedProcess[str]:
    """``bastion grant ARGS`` with the operator's token, whatever its exit."""
    return subprocess.run(
        [
            devstack.bastion_bin(),
            "grant",
            *args,
            "--config",
            str(proc.config),
            "--consul-token-file",
            str(tokens.files / "operator.token"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def jump_key(tmp_path: Path, people: dict[str, Person], local_ca: Path) -> Path:
    """alice's key with a certificate the hosts trust (end-to-end login after -J)."""
    key = tmp_path / "id_alice"
    key.write_bytes(people["alice"].key.read_bytes())
    key.with_suffix(".pub").write_text(people["alice"].pubkey + "\n")
    key.chmod(0o600)
    devstack.sign_user_key(local_ca, key.with_suffix(".pub"), ["alice"], "alice-e2e")
    return key


def jump(proc: BastionProcess, key: Path, host: SshdHost, command: str) -> list[str]:
    """``ssh -J alice@bastion alice@HOST COMMAND`` (as ProxyCommand -W, no config)."""
    opts = (
        "-F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes -o StrictHostKeyChecking=no "
        "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
    )
    return [
        *f"ssh {opts} -i {key}".split(),
        "-o",
        f"ProxyCommand=ssh {opts} -i {key} -p {proc.port} -W %h:%p alice@127.0.0.1",
        "-p",
        str(host.port),
        f"alice@{host.name}",
        command,
    ]


def run(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        argv, capture_output=True, timeout=30, check=False, stdin=subprocess.DEVNULL
    )


def kv_status(consul: ConsulAgent, key: str) -> int:
    return consul.api("GET", f"/v1/kv/{key}")[0]


@pytest.fixture
def clean_grants(consul: ConsulAgent) -> Iterator[None]:
    yield
    consul.api("DELETE", "/v1/kv/grants/?recurse")


def test_grant_allows_a_jump_while_it_lasts_then_ends_it(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    consul_tokens: ConsulTokens,
    hosts: dict[str, SshdHost],
    jump_key: Path,
    clean_grants: None,
) -> None:
    """Two bastions: one running when the grant is written, one started after
    it (it finds the grant at its first load). Both allow the jump, both end
    the held jump when the grant expires, on their own clock."""
    proc = new_bastion()
    h101 = hosts["host-101"]
    refused = run(jump(proc, jump_key, h101, "hostname"))
    assert refused.returncode == 255  # alice's route is host-102 only
    out = bastion_cli(proc, consul_tokens, "alice", route(hosts, "host-101"), "--for", "15s")
    granted_at = time.time()
    assert "granted alice host-101" in out and "grants/alice/host-101" in out, out
    status, body = consul.api("GET", "/v1/kv/grants/alice/host-101")
    assert status == 200 and body[0]["Session"]
    value = json.loads(base64.b64decode(body[0]["Value"]))
    assert value["route"] == route(hosts, "host-101") and value["by"]
    expires = value["expires"]
    assert abs(expires - (granted_at + 15)) < 2
    late = new_bastion()
    held: list[subprocess.Popen[bytes]] = []
    try:
        for bastion in (proc, late):
            # in force within the watch's latency
            devstack.wait_until(
                "the grant is in force",
                lambda b=bastion: run(jump(b, jump_key, h101, "hostname")).stdout == b"host-101\n",
                8,
            )
            session = subprocess.Popen(
                jump(bastion, jump_key, h101, "echo up; sleep 60"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            held.append(session)
            assert session.stdout is not None and session.stdout.readline() == b"up\n"
        assert time.time() < expires, "too slow to test before the grant expired"
        # the held jumps close when the grant expires, on the bastion's clock
        ended = []
        for session in held:
            session.wait(timeout=max(0.0, expires - time.time()) + 5)
            ended.append(time.time())
            assert session.returncode == 255
        assert all(expires <= t < expires + 3 for t in ended), (expires, ended)
        for bastion in (proc, late):
            rec = next(r for r in bastion.audit_records() if r["event"] == "revoke")
            assert (rec["user"], rec["cause"], rec["action"]) == ("alice", "grant-ended", "closed")
            # and new jumps are refused at once, whatever Consul still holds
            assert run(jump(bastion, jump_key, h101, "hostname")).returncode == 255
        # Consul deletes the key itself (it may take up to twice the TTL)
        devstack.wait_until(
            "consul deleted the expired grant",
            lambda: kv_status(consul, "grants/alice/host-101") == 404,
            35,
        )
        print(
            f"grant 15 s: jumps closed {[round(t - expires, 2) for t in ended]} s after "
            f"expires; consul deleted the key {time.time() - expires:+.1f} s after"
        )
    finally:
        for session in held:
            stop_ssh_client(session)


def test_grant_routes_a_person_without_an_entry_and_revoke_ends_it_now(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    consul_tokens: ConsulTokens,
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
    clean_grants: None,
) -> None:
    carol = people["carol"]
    consul.kv_put("ssh-keys/dave", carol.pubkey + "\n")  # dave: keys, no users/ entry
    proc = new_bastion()
    login = ssh_command(port=proc.port, user="dave", identity=carol.key, command=("hostname",))
    try:
        assert run(login).returncode == 255
        grant = route(hosts, "host-102", login="carol")
        bastion_cli(proc, consul_tokens, "dave", grant, "--for", "5m", "--reason", "INC-42")
        listed = bastion_cli(proc, consul_tokens, "--list")
        assert "dave" in listed and grant in listed and "INC-42" in listed, listed
        devstack.wait_until(
            "dave routed by the grant",
            lambda: run(login).stdout == b"host-102\n",
            8,
        )
        explained = run([devstack.bastion_bin(), "route", "dave", "--config", str(proc.config)])
        assert explained.returncode == 0 and b"verdict: carol@host-102" in explained.stdout
        audit = [r for r in proc.audit_records() if r["event"] == "login" and r["user"] == "dave"]
        assert audit[-1]["route"].startswith("grant grants/dave/host-102: ")
        held = subprocess.Popen(
            ssh_command(
                port=proc.port, user="dave", identity=carol.key, command=("echo up; sleep 60",)
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert held.stdout is not None and held.stdout.readline() == b"up\n"
            out = bastion_cli(proc, consul_tokens, "--revoke", "dave", grant)
            assert "revoked" in out
            assert kv_status(consul, "grants/dave/host-102") == 404  # at once
            _, err = held.communicate(timeout=5)
            assert held.returncode == 255
            assert b"your access grant ended" in err, err
        finally:
            stop_ssh_client(held)
        assert run(login).returncode == 255
        assert "no grants" in bastion_cli(proc, consul_tokens, "--list")
    finally:
        consul.kv_delete("ssh-keys/dave")


def test_a_grant_that_never_ends_grants_nothing_and_hides_no_other(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    consul_tokens: ConsulTokens,
    hosts: dict[str, SshdHost],
    jump_key: Path,
    clean_grants: None,
) -> None:
    """Keys written by hand (here with the management token; the operator's
    writes the same) whose "expires" is Infinity, NaN or 1e300: the bastion
    ignores each with one WARNING, `--list` shows them as malformed beside
    the good grants, and `--revoke` takes the key names `--list` shows."""
    proc = new_bastion()
    h101 = hosts["host-101"]
    target = route(hosts, "host-101")
    bad = {
        "inf": f'{{"route": "{target}", "expires": Infinity, "by": "x"}}',
        "nan": f'{{"route": "{target}", "expires": NaN}}',
        "huge": json.dumps({"route": target, "expires": 1e300}),
    }
    for name, value in bad.items():
        consul.kv_put(f"grants/alice/{name}", value)

    def warnings(name: str) -> int:
        return proc.log.read_text().count(f"ignoring grant 'grants/alice/{name}'")

    devstack.wait_until("the bastion read the bad grants", lambda: all(warnings(n) for n in bad), 8)
    assert run(jump(proc, jump_key, h101, "hostname")).returncode == 255  # nothing granted
    # a good grant beside them, by hand (no session) and named otherwise
    good = json.dumps({"route": target, "expires": round(time.time()) + 600, "by": "ops"})
    consul.kv_put("grants/alice/inc-42", good)
    bastion_cli(proc, consul_tokens, "bob", route(hosts, "host-102"), "--for", "5m")
    devstack.wait_until(
        "the good grant is in force",
        lambda: run(jump(proc, jump_key, h101, "hostname")).stdout == b"host-101\n",
        8,
    )
    assert {n: warnings(n) for n in bad} == dict.fromkeys(bad, 1)  # once per change
    listed = bastion_cli(proc, consul_tokens, "--list")
    lines = {tuple(line.split()[:2]): line for line in listed.splitlines()}
    for name in bad:
        assert "malformed, ignored" in lines["alice", name], listed
    assert "finite" in lines["alice", "inf"] and "grant_max" in lines["alice", "huge"]
    assert target in lines["alice", "inc-42"] and "by ops" in lines["alice", "inc-42"]
    assert route(hosts, "host-102") in lines["bob", "host-102"], listed
    # --revoke by a key name --list shows, or by the route of a hand-written key
    assert "grants/alice/inf" in bastion_cli(proc, consul_tokens, "--revoke", "alice", "inf")
    assert kv_status(consul, "grants/alice/inf") == 404
    out = bastion_cli(proc, consul_tokens, "--revoke", "alice", target)
    assert "grants/alice/inc-42" in out and kv_status(consul, "grants/alice/inc-42") == 404
    devstack.wait_until(
        "the revoked grant no longer allows the jump",
        lambda: run(jump(proc, jump_key, h101, "hostname")).returncode == 255,
        8,
    )
    missing = grant_cli(proc, consul_tokens, "--revoke", "alice", "nosuch")
    assert missing.returncode == 1
    assert "no grant of alice named 'nosuch'" in missing.stderr, missing.stderr
    assert "alice's grants under grants/: huge, nan" in missing.stderr, missing.stderr
    nobody = grant_cli(proc, consul_tokens, "--revoke", "carol", "host-101")
    assert nobody.returncode == 1 and "carol's grants under grants/: none" in nobody.stderr


def test_the_bastion_token_cannot_grant(
    new_bastion: Callable[..., BastionProcess], consul_tokens: ConsulTokens
) -> None:
    proc = new_bastion()  # its settings file; its token
    res = subprocess.run(
        [
            devstack.bastion_bin(),
            "grant",
            "alice",
            "host-101",
            "--for",
            "1m",
            "--config",
            str(proc.config),
            "--consul-token-file",
            str(consul_tokens.files / "bastion.token"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 1
    assert res.stderr.startswith("bastion: ") and "403" in res.stderr, res.stderr
    assert "acl-policies/operator.hcl" in res.stderr
