"""``bastion sessions`` and ``bastion kill`` over the admin socket (real everything).

People hold real OpenSSH sessions open through the bastion; the command line
lists and ends them; the person's client prints the operator's notice and
exits 255; the audit log has the kill and the connection's end. Only root,
the bastion's user and ``[admin] group`` may use the socket (file modes, and
the peer's credentials again behind them).
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from conftest import ConsulTokens, Person, VaultSetup, bastion_sections

import devstack
from bastion.config import parse_settings
from bastion.errors import ConfigError
from devstack import BastionProcess, ConsulAgent, ssh_command, stop_ssh_client, wait_until

ROOT = Path(__file__).resolve().parent.parent
GROUP = "carol"  # the [admin] group: carol's own group (bob is not in it)


# -- helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def socket_dir() -> Iterator[Path]:
    """Where the admin sockets live: in /tmp and 0755 (pytest's tmp_path is
    0700 under root's own directory), so that bob and carol can reach them
    and only the bastion's own modes decide."""
    path = Path(tempfile.mkdtemp(prefix="bastion-admin-"))
    path.chmod(0o755)
    yield path
    # the bastions are stopped by then; their directories are root's
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture(scope="module")
def admin_bastion(
    tmp_path_factory: pytest.TempPathFactory,
    socket_dir: Path,
    consul: ConsulAgent,
    consul_tokens: ConsulTokens,
    vault: VaultSetup,
    known_hosts: Path,
    directory_entries: None,
) -> Iterator[BastionProcess]:
    sections = bastion_sections(consul_tokens, consul, known_hosts, vault)
    sections["admin"] = {"socket": str(socket_dir / "run" / "admin.sock"), "group": GROUP}
    proc = BastionProcess(tmp_path_factory.mktemp("admin") / "bastion", sections)
    try:
        yield proc.start()
    finally:
        proc.stop()


def socket_of(proc: BastionProcess) -> Path:
    return Path(proc.sections["admin"]["socket"])


def _python_for(user: str) -> str:
    """An interpreter ``user`` may run (the venv's may live in root's home)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run(
            ["runuser", "-u", user, "--", candidate, "-c", "import asyncio"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        if probe.returncode == 0:
            return candidate
    pytest.fail(f"no Python interpreter that {user} may run")


def cli(*args: str | Path, as_user: str | None = None) -> subprocess.CompletedProcess[str]:
    """The ``bastion`` command line, as root or (``runuser``) as ``as_user``."""
    argv: list[str]
    if as_user is None:
        argv = [devstack.bastion_bin()]
    else:
        site = Path(asyncssh.__file__).resolve().parent.parent
        argv = [
            "runuser",
            "-u",
            as_user,
            "--",
            "env",
            f"PYTHONPATH={ROOT}:{site}",
            _python_for(as_user),
            "-m",
            "bastion.cli",
        ]
    return subprocess.run(
        [*argv, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd="/",
    )


def sessions(sock: Path) -> list[dict[str, Any]]:
    result = cli("sessions", "--json", "--socket", sock)
    assert result.returncode == 0, result.stderr
    listed: list[dict[str, Any]] = json.loads(result.stdout)
    return listed


def session_of(sock: Path, user: str) -> dict[str, Any]:
    found = [s for s in sessions(sock) if s["user"] == user]
    assert len(found) == 1, found
    return found[0]


class Held:
    """A real OpenSSH session kept open through the bastion, printing a tick
    every 0.1 s; its output is read without blocking."""

    def __init__(self, proc: BastionProcess, person: Person) -> None:
        argv = ssh_command(
            port=proc.port,
            user=person.name,
            identity=person.key,
            command=["echo started; for i in $(seq 600); do echo tick; sleep 0.1; done"],
        )
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._streams = {"out": self.proc.stdout.fileno(), "err": self.proc.stderr.fileno()}
        for fd in self._streams.values():
            os.set_blocking(fd, False)
        self.out = b""
        self.err = b""

    def pump(self) -> None:
        for name, fd in self._streams.items():
            with contextlib.suppress(BlockingIOError, OSError):
                while chunk := os.read(fd, 65536):
                    setattr(self, name, getattr(self, name) + chunk)

    def wait_started(self) -> None:
        def started() -> bool:
            self.pump()
            return b"started\n" in self.out

        wait_until("ssh session started", started, 30, self.proc)

    def wait_exit(self) -> int:
        code = self.proc.wait(15)
        self.pump()
        return code

    def stop(self) -> None:
        stop_ssh_client(self.proc)  # reaps it and closes its pipes, also once it has exited


# -- settings --------------------------------------------------------------------


BASE: dict[str, Any] = {
    "server": {"host_keys": ["/nonexistent/hostkey"]},
    "consul": {"token_file": "/nonexistent/token"},
    "upstream": {"ca_key": "/nonexistent/ca", "known_hosts": "/nonexistent/known_hosts"},
}


def settings_with(admin: dict[str, Any]) -> Any:
    return parse_settings({**BASE, "admin": admin}, Path("/etc/bastion/bastion.toml"))


def test_admin_settings() -> None:
    assert parse_settings(BASE).admin.socket_path == Path("/run/bastion/admin.sock")
    assert settings_with({"socket": ""}).admin.socket_path is None
    assert settings_with({"group": "root"}).admin.group == "root"
    for admin, message in [
        ({"group": "no-such-group-here"}, "[admin] group: no such group 'no-such-group-here'"),
        ({"socket": "admin.sock"}, "[admin] socket: must be an absolute path"),
        ({"socket": "/" + "x" * 120}, "[admin] socket: longer than 107 bytes"),
        ({"socket": 1}, "[admin] socket: must be a string"),
        ({"sockt": "/x"}, "[admin]: unknown key(s) sockt"),
    ]:
        with pytest.raises(ConfigError) as err:
            settings_with(admin)
        assert message in str(err.value)
        assert str(err.value).startswith("/etc/bastion/bastion.toml: ")


# -- listing and ending sessions ---------------------------------------------------


def test_sessions_are_listed_and_kill_ends_them_with_a_notice(
    admin_bastion: BastionProcess, people: dict[str, Person]
) -> None:
    sock = socket_of(admin_bastion)
    alice = Held(admin_bastion, people["alice"])
    bob = Held(admin_bastion, people["bob"])
    try:
        alice.wait_started()
        bob.wait_started()
        mine = {s["user"]: s for s in sessions(sock)}
        a, b = mine["alice"], mine["bob"]
        assert a["upstream"].startswith("host-102"), a
        assert b["upstream"].startswith("host-101"), b
        assert a["route"].startswith("host-102"), a
        assert a["source"].startswith("127.0.0.1:") and a["source"] != b["source"]
        assert a["channels"] == 1 and a["bytes_down"] > 0 and a["idle"] < 5, a

        # the counters move while the session prints
        wait_until(
            "alice's bytes grow",
            lambda: session_of(sock, "alice")["bytes_down"] > a["bytes_down"],
            15,
        )
        table = cli("sessions", "--socket", sock)
        assert table.returncode == 0, table.stderr
        header, *rows = table.stdout.splitlines()
        assert header.split() == [
            "CONN", "USER", "SOURCE", "UPSTREAM", "SINCE", "CHANNELS", "UP", "DOWN", "IDLE",
        ]  # fmt: skip
        alice_row = next(r for r in rows if r.startswith(a["conn"]))
        assert alice_row.split()[1:3] == ["alice", a["source"]]

        killed = cli("kill", "--user", "alice", "--why", "maintenance", "--socket", sock)
        assert killed.returncode == 0, killed.stderr
        assert killed.stdout.startswith(f"ended {a['conn']} (alice from {a['source']} to host-102")

        # alice's client prints the notice and exits 255
        assert alice.wait_exit() == 255
        assert b"bastion: maintenance" in alice.err, alice.err

        # audited: the operator's kill and the connection's own end
        kill = admin_bastion.wait_audit(
            lambda r: r["event"] == "kill" and r.get("target") == "user:alice"
        )
        assert kill["ended"] == [a["conn"]]
        assert kill["who"] == "root (uid 0)"
        assert kill["why"] == "maintenance"
        closed = admin_bastion.wait_audit(
            lambda r: r["event"] == "connection" and r.get("conn") == a["conn"]
        )
        assert closed["reason"] == "ended-by-operator"
        assert closed["user"] == "alice"
        assert closed["source"] == a["source"]

        # bob's session is untouched: still running, still listed, still printing
        assert bob.proc.poll() is None
        assert [s["user"] for s in sessions(sock)] == ["bob"]
        before = len(bob.out)

        def bob_prints() -> bool:
            bob.pump()
            return len(bob.out) > before

        wait_until("bob's session goes on", bob_prints, 10, bob.proc)

        # by connection id, with the default notice
        killed = cli("kill", b["conn"], "--socket", sock)
        assert killed.returncode == 0, killed.stderr
        assert bob.wait_exit() == 255
        assert b"bastion: your session was ended by an operator" in bob.err, bob.err
        kill = admin_bastion.wait_audit(
            lambda r: r["event"] == "kill" and r.get("target") == b["conn"]
        )
        assert kill["ended"] == [b["conn"]]
        wait_until("no live sessions", lambda: sessions(sock) == [], 10)
        assert cli("sessions", "--socket", sock).stdout == "no live sessions\n"
    finally:
        alice.stop()
        bob.stop()


def test_command_line_errors_are_one_line(admin_bastion: BastionProcess, tmp_path: Path) -> None:
    sock = socket_of(admin_bastion)
    nothing = cli("kill", "--user", "nobody", "--socket", sock)
    assert nothing.returncode == 1
    assert nothing.stderr == "bastion: no live session of user nobody\n"
    # an attempt is audited too
    record = admin_bastion.wait_audit(
        lambda r: r["event"] == "kill" and r.get("target") == "user:nobody"
    )
    assert record["ended"] == []

    missing = cli("sessions", "--socket", tmp_path / "none.sock")
    assert missing.returncode == 1
    assert missing.stderr.startswith(f"bastion: no admin socket at {tmp_path / 'none.sock'}: ")
    assert missing.stderr.count("\n") == 1

    bad_why = cli("kill", "--user", "alice", "--why", "two\nlines", "--socket", sock)
    assert bad_why.returncode == 1
    assert "why must be one line" in bad_why.stderr

    # the socket named by the settings file
    listed = cli("sessions", "--config", admin_bastion.config)
    assert listed.returncode == 0, listed.stderr
    off = tmp_path / "off.toml"
    off.write_text(admin_bastion.config.read_text().replace(str(sock), ""))
    result = cli("sessions", "--config", off)
    assert result.returncode == 1
    assert result.stderr == f'bastion: {off}: [admin] socket is "": the admin socket is off\n'


# -- who may use the socket --------------------------------------------------------


def test_only_root_and_the_group_may_use_the_socket(admin_bastion: BastionProcess) -> None:
    sock = socket_of(admin_bastion)
    gid = grp.getgrnam(GROUP).gr_gid
    bob = f"bob (uid {pwd.getpwnam('bob').pw_uid})"
    st = sock.stat()
    assert (oct(st.st_mode & 0o777), st.st_gid) == (oct(0o660), gid)
    st = sock.parent.stat()
    assert (oct(st.st_mode & 0o777), st.st_gid) == (oct(0o750), gid)

    denied = cli("sessions", "--socket", sock, as_user="bob")
    assert denied.returncode == 1
    assert denied.stderr.startswith(f"bastion: permission denied opening {sock}"), denied.stderr

    member = cli("sessions", "--json", "--socket", sock, as_user=GROUP)
    assert member.returncode == 0, member.stderr
    assert isinstance(json.loads(member.stdout), list)

    # belt and braces: with the modes loosened, the peer's credentials still decide
    try:
        sock.parent.chmod(0o755)
        sock.chmod(0o666)
        refused = cli("kill", "--user", "alice", "--socket", sock, as_user="bob")
    finally:
        sock.parent.chmod(0o750)
        sock.chmod(0o660)
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"bastion: refused: {bob} may not use the admin socket"), (
        refused.stderr
    )
    assert f"admin socket: refused {bob}" in admin_bastion.log.read_text()
    assert not [r for r in admin_bastion.audit_records() if str(r.get("who", "")).startswith("bob")]


# -- the protocol --------------------------------------------------------------------


def test_oversized_and_malformed_requests_get_an_error(admin_bastion: BastionProcess) -> None:
    sock = socket_of(admin_bastion)

    def connect() -> tuple[socket.socket, Any]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(sock))
        return s, s.makefile("rb")

    big, big_in = connect()
    with big, big_in:
        big.sendall(b'{"op": "sessions", "pad": "' + b"x" * 5000)
        answer = json.loads(big_in.readline())
        assert answer == {"ok": False, "error": "request longer than 4096 bytes; closing"}
        assert big_in.readline() == b""  # closed

    conn, conn_in = connect()
    with conn, conn_in:
        for request, error in [
            (b"not json\n", "not a JSON request"),
            (b"[1, 2]\n", "a request is a JSON object with an 'op'"),
            (b'{"op": "dance"}\n', "unknown op 'dance' (sessions, kill, drain)"),
            (b'{"op": "kill"}\n', "kill: give exactly one of conn and user"),
            (b'{"op": "kill", "user": "a", "conn": "b"}\n', "kill: give exactly one of"),
            (b'{"op": "kill", "user": 7}\n', "kill: user must be a name"),
            (b'{"op": "kill", "user": "a", "why": "\\u001b[2J"}\n', "kill: why must be one line"),
            (b'{"op": "kill", "user": "a", "signal": 9}\n', "kill: unknown field(s) signal"),
            (b"\xff\xfe\n", "not a JSON request"),
        ]:
            conn.sendall(request)
            answer = json.loads(conn_in.readline())
            assert answer["ok"] is False and answer["error"].startswith(error), (request, answer)
        # the same connection goes on serving
        conn.sendall(b'{"op": "sessions"}\n')
        assert json.loads(conn_in.readline()) == {"ok": True, "sessions": []}

    # and the bastion goes on serving everyone
    assert cli("sessions", "--socket", sock).returncode == 0


# -- the socket file's life ------------------------------------------------------------


def test_live_socket_is_an_error_stale_one_is_replaced_and_removed_at_exit(
    admin_bastion: BastionProcess, tmp_path: Path, socket_dir: Path
) -> None:
    sock = socket_of(admin_bastion)
    # a second bastion on the same socket does not start, and leaves it alone
    second = BastionProcess(tmp_path / "second", admin_bastion.sections)
    with contextlib.suppress(devstack.StackError):
        second.start()
    assert second.process is not None
    assert second.process.proc.wait(30) == 1
    assert f"[admin] socket: {sock} is in use: another bastion" in second.log.read_text()
    assert cli("sessions", "--socket", sock).returncode == 0

    # no group: a directory of its own, 0700, and the socket 0600
    fresh = socket_dir / "fresh" / "admin.sock"
    sections = {**admin_bastion.sections, "admin": {"socket": str(fresh)}}
    third = BastionProcess(tmp_path / "third", sections)
    try:
        third.start()
        assert fresh.parent.stat().st_mode & 0o777 == 0o700
        assert fresh.stat().st_mode & 0o777 == 0o600
        assert third.process is not None
        os.killpg(third.process.pid, signal.SIGKILL)  # leaves a stale socket file
        third.process.proc.wait(10)
    finally:
        third.stop()
    assert fresh.is_socket()
    assert cli("sessions", "--socket", fresh).stderr.startswith("bastion: nothing answers at")

    fourth = BastionProcess(tmp_path / "fourth", sections)
    try:
        fourth.start()
        assert cli("sessions", "--socket", fresh).returncode == 0
        assert f"replacing the stale admin socket {fresh}" in fourth.log.read_text()
    finally:
        fourth.stop()
    assert fourth.process is not None and fourth.process.proc.returncode == 0
    assert not fresh.exists()  # removed on shutdown
