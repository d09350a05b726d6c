"""Session recordings (asciicast v2) through a real bastion.

A real OpenSSH client in tmux types, resizes and presses Ctrl-C through a
bastion that records alice; the file is then checked line by line, played
back with ``bastion replay`` and accepted by Debian's ``asciinema`` player.
The caps (per session, total) and an unusable recordings directory are
checked on bastions of their own. Nothing waits a fixed time: every wait
polls a condition against a deadline.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ConsulTokens, Person, VaultSetup, bastion_sections, route
from test_terminal import Tmux, login, ssh_argv

import devstack
from bastion.config import parse_settings
from bastion.directory.grammar import parse_route
from bastion.errors import BastionError, ConfigError, MalformedRoute
from bastion.recording import recording_path
from devstack import BastionProcess, ConsulAgent, SshdHost, wait_until

# -- helpers ------------------------------------------------------------------------


def recording_bastion(
    workdir: Path,
    consul: ConsulAgent,
    consul_tokens: ConsulTokens,
    vault: VaultSetup,
    known_hosts: Path,
    **recording: object,
) -> BastionProcess:
    sections = bastion_sections(consul_tokens, consul, known_hosts, vault)
    sections["recording"] = dict(recording)
    return BastionProcess(workdir, sections).start()


@pytest.fixture
def stack(
    consul: ConsulAgent,
    consul_tokens: ConsulTokens,
    vault: VaultSetup,
    known_hosts: Path,
    directory_entries: None,
) -> Iterator[Callable[..., BastionProcess]]:
    """Starts bastions with a ``[recording]`` section; stops them after the test."""
    started: list[BastionProcess] = []

    def start(workdir: Path, **recording: object) -> BastionProcess:
        proc = recording_bastion(workdir, consul, consul_tokens, vault, known_hosts, **recording)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def entry(consul: ConsulAgent, hosts: dict[str, SshdHost]) -> Iterator[Callable[[str, str], None]]:
    """Sets directory entries for the test; puts back those of ``directory_entries``."""
    changed: set[str] = set()

    def put(user: str, value: str) -> None:
        changed.add(user)
        consul.kv_put(f"users/{user}", value)

    yield put
    originals = {"alice": route(hosts, "host-102"), "bob": route(hosts, "host-101")}
    for user in changed:
        consul.kv_put(f"users/{user}", originals[user])


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    term = Tmux(tmp_path)
    try:
        yield term
    finally:
        term.kill()


def parse_cast(path: Path) -> tuple[dict[str, Any], list[tuple[float, str, str]]]:
    """Header and events, checked against asciicast v2 on the way."""
    lines = path.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])
    assert header["version"] == 2
    assert isinstance(header["width"], int) and isinstance(header["height"], int)
    events = []
    last = 0.0
    for text in lines[1:]:
        t, code, data = json.loads(text)
        assert isinstance(t, int | float) and isinstance(code, str) and isinstance(data, str)
        assert code in ("o", "i", "r", "m"), code
        assert t >= last, f"time goes back: {text}"
        last = t
        events.append((float(t), code, data))
    return header, events


def output_of(events: list[tuple[float, str, str]]) -> str:
    return "".join(data for _, code, data in events if code == "o")


def new_session(bastion: BastionProcess, user: str, seen: set[str]) -> str:
    """The session id of ``user``'s next session record not in ``seen``."""
    record = bastion.wait_audit(
        lambda r: (
            r.get("event") == "session"
            and r.get("user") == user
            and r.get("session_id") not in seen
        ),
        timeout=15,
    )
    sid = str(record["session_id"])
    seen.add(sid)
    return sid


def wait_finished(bastion: BastionProcess, sid: str) -> None:
    """Until the writer has closed the session's file (its INFO line)."""
    wait_until(
        f"recording of {sid} finished",
        lambda: f"recording of session {sid} finished" in bastion.log.read_text(errors="replace"),
        15,
        log=bastion.log,
    )


def ssh(
    bastion: BastionProcess, person: Person, command: str, *extra: str
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ssh_argv(bastion, person, command, extra=["-T", *extra]),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )


def replay_raw(bastion: BastionProcess, sid: str, *args: str) -> bytes:
    result = subprocess.run(
        [devstack.bastion_bin(), "replay", sid, "--config", str(bastion.config), *args],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def recording_metric(bastion: BastionProcess, what: str) -> float:
    found = re.search(
        rf'^bastion_recording_events_total\{{what="{re.escape(what)}"\}} (\S+)$',
        bastion.metrics_text(),
        re.M,
    )
    return float(found.group(1)) if found else 0.0


# -- a real terminal session ----------------------------------------------------------


def test_records_an_interactive_session(
    stack: Callable[..., BastionProcess],
    entry: Callable[[str, str], None],
    consul: ConsulAgent,
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
    tmux: Tmux,
    tmp_path: Path,
) -> None:
    alice = people["alice"]
    rec_dir = tmp_path / "recordings"
    bastion = stack(tmp_path / "bastion", dir=str(rec_dir), input=True)
    entry("alice", json.dumps({"route": route(hosts, "host-102"), "record": True}))
    bastion.wait_synced(consul)

    login(tmux, bastion, alice)
    token = secrets.token_hex(6)
    tmux.type(f'echo "rec""-{token}"')  # printed: rec-<token>; typed: rec""-<token>
    tmux.wait_for_screen(rf"^rec-{token}$")

    tmux.tmux("resize-window", "-t", "t", "-x", "120", "-y", "40")
    deadline = time.monotonic() + 10
    while (size := tmux.output_of("$(stty size)")) != "40 120":
        assert time.monotonic() < deadline, f"stty size still {size!r} after resize"

    tmux.type('echo "sleep""ing"; sleep 100')
    tmux.wait_for_screen(r"^sleeping$")
    tmux.keys("C-c")
    assert tmux.output_of("alive") == "alive"
    tmux.type("exit")
    assert tmux.exit_status() == 0

    sid = new_session(bastion, "alice", set())
    wait_finished(bastion, sid)
    path = rec_dir / f"{sid}.cast"

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(rec_dir.stat().st_mode) == 0o700
    header, events = parse_cast(path)
    assert (header["width"], header["height"]) == (100, 30)
    assert header["env"] == {"TERM": "tmux-256color"}
    assert header["user"] == "alice"
    assert header["route"] == route(hosts, "host-102")
    assert header["session"] == sid
    assert abs(header["timestamp"] - time.time()) < 300
    assert "command" not in header  # a shell

    text = output_of(events)
    assert f"rec-{token}" in text
    assert "sleeping" in text and "^C" in text and "alive" in text
    assert ("r", "120x40") in [(code, data) for _, code, data in events]
    typed = "".join(data for _, code, data in events if code == "i")
    assert f'echo "rec""-{token}"' in typed
    assert "\x03" in typed  # the Ctrl-C, as input

    # bastion replay: the same text, with or without the timing
    assert replay_raw(bastion, sid, "--raw") == text.encode()
    assert replay_raw(bastion, sid, "--speed", "50", "--idle-limit", "0.01") == text.encode()

    # and the packaged player accepts it (asciinema cat needs a terminal: script(1))
    player = shutil.which("asciinema")
    assert player, "asciinema is not installed: run scripts/setup.sh"
    result = subprocess.run(
        ["script", "-qec", f"{player} cat {path}", "/dev/null"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)},
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"rec-{token}".encode() in result.stdout


# -- caps -----------------------------------------------------------------------------


def test_caps(
    stack: Callable[..., BastionProcess],
    entry: Callable[[str, str], None],
    consul: ConsulAgent,
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
    tmp_path: Path,
) -> None:
    alice, bob = people["alice"], people["bob"]
    rec_dir = tmp_path / "recordings"
    bastion = stack(
        tmp_path / "bastion",
        dir=str(rec_dir),
        default=True,
        exec=True,
        max_session_bytes=8192,
        max_total_bytes=30000,
    )
    entry("bob", json.dumps({"route": route(hosts, "host-101"), "record": False}))
    bastion.wait_synced(consul)
    seen: set[str] = set()

    # a small exec session is recorded whole: the command, then the same bytes
    result = ssh(bastion, alice, r"printf 'h\303\251llo\nw\303\266rld\n'")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "héllo\nwörld\n".encode()
    small = new_session(bastion, "alice", seen)
    wait_finished(bastion, small)
    header, events = parse_cast(rec_dir / f"{small}.cast")
    assert header["command"] == r"printf 'h\303\251llo\nw\303\266rld\n'"
    assert replay_raw(bastion, small, "--raw") == result.stdout

    # bob's entry says "record": false, over the default
    assert ssh(bastion, bob, "true").returncode == 0
    bobs = new_session(bastion, "bob", seen)

    # a session that prints far more than max_session_bytes: recording stops
    # with a marker, the output arrives complete
    expected = "".join(f"{n}\n" for n in range(1, 200001)).encode()
    result = ssh(bastion, alice, "seq 1 200000")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
    big = new_session(bastion, "alice", seen)
    wait_finished(bastion, big)
    assert not (rec_dir / f"{bobs}.cast").exists()
    path = rec_dir / f"{big}.cast"
    assert path.stat().st_size <= 8192
    _, events = parse_cast(path)
    assert events[-1][1] == "m" and "max_session_bytes" in events[-1][2]
    assert expected.decode().startswith(output_of(events))
    assert recording_metric(bastion, "capped") >= 1

    # max_total_bytes: the oldest finished recordings go first
    order = [small, big]
    for _ in range(4):
        assert ssh(bastion, alice, "seq 1 5000").returncode == 0
        sid = new_session(bastion, "alice", seen)
        wait_finished(bastion, sid)
        order.append(sid)
    left = sorted(p.stem for p in rec_dir.glob("*.cast"))
    assert sum(p.stat().st_size for p in rec_dir.glob("*.cast")) <= 30000
    assert 2 <= len(left) < len(order)
    assert left == sorted(order[-len(left) :]), (order, left)
    assert recording_metric(bastion, "removed") == len(order) - len(left)


# -- an unusable directory --------------------------------------------------------------


def test_unwritable_directory_never_blocks_a_login(
    stack: Callable[..., BastionProcess], people: dict[str, Person], tmp_path: Path
) -> None:
    """The bastion runs as root, for which no mode bit is a wall: the
    recordings directory sits under a regular file (ENOTDIR)."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    bastion = stack(tmp_path / "bastion", dir=str(blocker / "recordings"), default=True, exec=True)
    assert "ERROR bastion.recording: recordings directory" in bastion.log.read_text()

    seen: set[str] = set()
    for _ in range(2):
        result = ssh(bastion, people["alice"], "echo ok")
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"ok\n"
        sid = new_session(bastion, "alice", seen)
        wait_until(
            "the recording error is logged",
            lambda sid=sid: f"cannot record session {sid}" in bastion.log.read_text(),
            15,
            log=bastion.log,
        )
    log_text = bastion.log.read_text()
    assert re.search(r"ERROR bastion\.recording: cannot record session", log_text)
    assert "Traceback" not in log_text
    assert recording_metric(bastion, "error-open") == 2
    assert bastion.process is not None and bastion.process.proc.poll() is None


# -- settings, entries, names (no stack) ---------------------------------------------------


def settings_with(recording: dict[str, object]) -> dict[str, Any]:
    return {
        "server": {"host_keys": ["/k"]},
        "upstream": {"ca_key": "/ca"},
        "recording": recording,
    }


def test_recording_settings() -> None:
    s = parse_settings(settings_with({"dir": "/var/lib/bastion/rec", "input": True}))
    assert s.recording.enabled and s.recording.input and not s.recording.default
    assert not parse_settings(settings_with({})).recording.enabled
    for bad, key in [
        ({"default": True}, "[recording] default"),
        ({"dir": "/r", "max_session_bytes": 100}, "[recording] max_session_bytes"),
        ({"dir": "/r", "max_session_bytes": 10**6, "max_total_bytes": 10**5}, "max_total_bytes"),
        ({"dir": "/r", "exec": "yes"}, "[recording] exec"),
        ({"dir": "/r", "size": 1}, "[recording]: unknown key(s) size"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(key)):
            parse_settings(settings_with(bad), Path("/etc/bastion/bastion.toml"))


def test_record_in_the_directory_entry() -> None:
    assert parse_route("alice", "host-102").record is None
    assert parse_route("alice", '{"route": "host-102"}').record is None
    assert parse_route("alice", '{"route": "host-102", "record": true}').record is True
    assert parse_route("alice", '{"route": "host-102", "record": false}').record is False
    for value in ('"yes"', "1", "null"):
        with pytest.raises(MalformedRoute, match="'record' must be true or false"):
            parse_route("alice", f'{{"route": "host-102", "record": {value}}}')


def test_recording_names() -> None:
    assert recording_path(Path("/r"), "3f2a9c01b4e7-1") == Path("/r/3f2a9c01b4e7-1.cast")
    assert recording_path(Path("/r"), "3f2a9c01b4e7-1.cast") == Path("/r/3f2a9c01b4e7-1.cast")
    for bad in ("../etc/passwd", "/abs", "", ".hidden", "a/b"):
        with pytest.raises(BastionError):
            recording_path(Path("/r"), bad)
