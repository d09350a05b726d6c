"""Field faults: every request an OpenSSH client sends works as it does against
plain sshd, or is refused visibly (OpenSSH's wording, exit 255) and audited.

Each test names the fault it guards (issue "field faults", 1-10). Where the
client's behaviour is the point, the same command also runs against host-102's
own sshd and the two results are compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

import asyncssh
import pytest
from conftest import ConsulTokens, Person, VaultSetup, bastion_sections, start_bastion

import devstack
from devstack import BastionProcess, ConsulAgent, SshdHost, ssh_command, stop_ssh_client

DNS_NAME = "host-102.bastion.test"  # scripts/setup.sh puts it in /etc/hosts


# -- helpers -----------------------------------------------------------------


def run(
    argv: Sequence[str | bytes], timeout: float = 60, **kw: object
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(  # type: ignore[call-overload,no-any-return]
        list(argv),
        capture_output=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        **kw,
    )


def via_bastion(
    bastion: BastionProcess, user: str, key: Path, *command: str | bytes, extra: Sequence[str] = ()
) -> list[str | bytes]:
    argv: list[str | bytes] = list(
        ssh_command(port=bastion.port, user=user, identity=key, extra=extra)
    )
    return argv + list(command)


def direct(
    host: SshdHost, user: str, key: Path, *command: str | bytes, extra: Sequence[str] = ()
) -> list[str | bytes]:
    """The same client straight to the host's own sshd (``key`` has a certificate)."""
    argv: list[str | bytes] = list(
        ssh_command(port=host.port, user=user, host=host.address, identity=key, extra=extra)
    )
    return argv + list(command)


def until(
    attempt: Callable[[], subprocess.CompletedProcess[bytes]],
    done: Callable[[subprocess.CompletedProcess[bytes]], bool],
    timeout: float = 15.0,
) -> subprocess.CompletedProcess[bytes]:
    """Repeat ``attempt`` until ``done`` holds (a directory change is in force
    within milliseconds; this waits for it instead of sleeping)."""
    deadline = time.monotonic() + timeout
    while True:
        result = attempt()
        if done(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


@pytest.fixture
def cert_key(tmp_path: Path, people: dict[str, Person], local_ca: Path) -> Path:
    """alice's key with a certificate the hosts trust (for direct comparisons)."""
    key = tmp_path / "id_alice"
    shutil.copy(people["alice"].key, key)
    shutil.copy(people["alice"].key.with_suffix(".pub"), key.with_suffix(".pub"))
    key.chmod(0o600)
    devstack.sign_user_key(local_ca, key.with_suffix(".pub"), ["alice"], "alice-faults")
    return key


@pytest.fixture
def entry(consul: ConsulAgent, hosts: dict[str, SshdHost]) -> Iterator[Callable[[object], None]]:
    """Set alice's directory entry (a string or a JSON object); restored after."""

    def put(value: object) -> None:
        consul.kv_put("users/alice", value if isinstance(value, str) else json.dumps(value))

    yield put
    consul.kv_put("users/alice", f"host-102:{hosts['host-102'].port}")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (sshd's per-connection processes call
    setsid, so a process group would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def audit_after(bastion: BastionProcess, mark: int) -> list[dict[str, object]]:
    return bastion.audit_records()[mark:]


# -- 1. every route form reaches the host or is refused with its reason -------


@pytest.fixture(scope="module")
def host_v6(stack_dir: Path, local_ca: Path, vault: VaultSetup) -> Iterator[SshdHost]:
    """A third sshd, on the IPv6 loopback, for the bracketed route form."""
    host = SshdHost(
        "host-six", "::1", stack_dir / "host-six", [local_ca.with_suffix(".pub"), vault.user_ca_pub]
    )
    try:
        yield host.start()
    finally:
        host.stop()


@pytest.fixture(scope="module")
def form_bastion(
    stack_dir: Path,
    consul: ConsulAgent,
    consul_tokens: ConsulTokens,
    vault: VaultSetup,
    hosts: dict[str, SshdHost],
    host_v6: SshdHost,
    directory_entries: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[BastionProcess]:
    """A bastion whose known_hosts also knows the IPv6 host (reuse off, so that
    each form makes its own upstream connection), and a node ``host-void``
    (127.0.1.199) with a known host key where nothing listens."""
    void_key = devstack.keygen(tmp_path_factory.mktemp("void") / "host_key")
    consul.register_node("host-void", "127.0.1.199")
    for name in ("host-void", "127.0.1.199"):
        consul.kv_put(f"host-keys/{name}", void_key.with_suffix(".pub").read_text())
    known = stack_dir / "known_hosts_forms"
    # a DNS name is matched by name, as OpenSSH does (CheckHostIP no)
    h102 = hosts["host-102"]
    known.write_text(
        "".join(h.known_hosts_line() + "\n" for h in [*hosts.values(), host_v6])
        + f"[{DNS_NAME}]:{h102.port} {h102.host_pubkey}\n"
        + f"nosuch.invalid {h102.host_pubkey}\n"  # known, but it does not resolve
    )
    proc = start_bastion(
        stack_dir / "bastion-forms", consul, consul_tokens, vault, known, reuse_idle=0
    )
    try:
        yield proc
    finally:
        proc.stop()


ROUTE_FORMS = [
    # (entry template, expected hostname on success, or the refusal text)
    ("host-102:{p102}", "host-102", None),
    ("alice@host-102:{p102}", "host-102", None),
    ("host-999:{p102}, host-102:{p102}", "host-102", None),
    ("127.0.1.102:{p102}", "host-102", None),
    ("alice@127.0.1.102:{p102}", "host-102", None),
    (DNS_NAME + ":{p102}", "host-102", None),
    ("alice@" + DNS_NAME + ":{p102}", "host-102", None),
    ("[::1]:{p6}", "host-six", None),
    ("alice@[::1]:{p6}", "host-six", None),
    ("host-void", None, "cannot reach host-void (127.0.1.199:22): Connection refused"),
    ("127.0.1.199", None, "cannot reach 127.0.1.199:22: Connection refused"),
    ("nosuch.invalid:22", None, "cannot resolve nosuch.invalid:22"),
    ("[::1]:1", None, "no known host key for [::1]:1; refusing to connect"),
    ("host-999", None, "host-999 is not a known host"),
]


@pytest.mark.parametrize(("form", "lands", "refusal"), ROUTE_FORMS)
def test_every_route_form_lands_or_is_refused_with_its_reason(
    form_bastion: BastionProcess,
    entry: Callable[[object], None],
    hosts: dict[str, SshdHost],
    host_v6: SshdHost,
    people: dict[str, Person],
    form: str,
    lands: str | None,
    refusal: str | None,
) -> None:
    value = form.format(p102=hosts["host-102"].port, p6=host_v6.port)
    entry(value)
    alice = people["alice"]

    def attempt() -> subprocess.CompletedProcess[bytes]:
        return run(via_bastion(form_bastion, "alice", alice.key, "hostname; id -un"))

    if lands is not None:
        result = until(attempt, lambda r: r.stdout.startswith(lands.encode()))
        assert result.returncode == 0, (value, result.stderr)
        assert result.stdout == f"{lands}\nalice\n".encode()
    else:
        assert refusal is not None
        result = until(attempt, lambda r: refusal.encode() in r.stderr)
        assert result.returncode == 255
        assert result.stderr.startswith(b"bastion: "), result.stderr
        assert refusal.encode() in result.stderr, (value, result.stderr)
        assert b"internal error" not in result.stderr
        record = form_bastion.wait_audit(
            lambda r: r.get("event") == "session" and refusal in str(r.get("message"))
        )
        assert record["reason"] not in ("internal-error", None)
        assert record["outcome"] == "error"
    assert "Traceback" not in form_bastion.log.read_text()


def test_jump_to_a_dns_route(
    tmp_path: Path,
    form_bastion: BastionProcess,
    entry: Callable[[object], None],
    hosts: dict[str, SshdHost],
    cert_key: Path,
) -> None:
    port = hosts["host-102"].port
    entry(f"{DNS_NAME}:{port}")
    opts = "-F /dev/null -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
    opts += f" -o BatchMode=yes -o LogLevel=ERROR -o IdentitiesOnly=yes -i {cert_key}"
    proxy = f"ssh {opts} -W %h:%p -p {form_bastion.port} alice@127.0.0.1"
    argv = [*opts.split(), "-o", f"ProxyCommand={proxy}", "-p", str(port), f"alice@{DNS_NAME}"]
    result = until(lambda: run(["ssh", *argv, "hostname"]), lambda r: r.returncode == 0)
    assert result.stdout == b"host-102\n", result.stderr


class EchoServer:
    """A TCP echo server on 127.0.0.1 (the client's side of a -R forward)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


# -- 2. memory is bounded per channel, whatever shares a connection -------------

MiB = 1024 * 1024


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest.fixture
def bulk_bastion(
    tmp_path: Path,
    consul: ConsulAgent,
    consul_tokens: ConsulTokens,
    vault: VaultSetup,
    known_hosts: Path,
    directory_entries: None,
) -> Iterator[BastionProcess]:
    """A bastion of its own (reuse on), so its peak RSS is this test's."""
    proc = start_bastion(tmp_path / "bastion", consul, consul_tokens, vault, known_hosts)
    try:
        yield proc
    finally:
        proc.stop()


def bastion_pid(proc: BastionProcess) -> int:
    assert proc.process is not None
    return proc.process.pid


def test_bulk_sessions_sharing_one_upstream_connection(
    bulk_bastion: BastionProcess, people: dict[str, Person]
) -> None:
    """Two `head -c N | ssh cat | wc -c` at once on one reused upstream
    connection (the fault: 67 MB -> 935 MB for 1 GiB each)."""
    alice = people["alice"]
    argv = via_bastion(bulk_bastion, "alice", alice.key)
    first = run([*argv, "true"])  # opens the upstream connection the others reuse
    assert first.returncode == 0, first.stderr
    pid = bastion_pid(bulk_bastion)
    before = rss_kb(pid)
    size = 256 * MiB
    command = " ".join(str(a) for a in argv)
    procs = [
        subprocess.Popen(
            f"head -c {size} /dev/zero | {command} cat | wc -c",
            shell=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [int(out) for out, _ in outs] == [size, size], [err for _, err in outs]
    records = [r for r in bulk_bastion.audit_records() if r["event"] == "session"]
    assert sum(1 for r in records if r.get("upstream_login") != f"bastion:alice:{r['conn']}") >= 2
    growth_mb = (rss_kb(pid, "VmHWM") - before) / 1024
    assert growth_mb < 40, f"bastion peak RSS grew {growth_mb:.0f} MB"


class SlowEcho(EchoServer):
    """Echoes 64 KiB, then rests 2 ms: a sink slower than the relay."""

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
                time.sleep(0.002)


def test_many_channels_on_one_client_connection(
    bulk_bastion: BastionProcess,
    entry: Callable[[object], None],
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
) -> None:
    """One client connection (as ControlMaster has), three `cat` sessions and
    three `-L` tunnels to a slow echo server, all at once, both ways."""
    echo = SlowEcho()
    entry({"route": f"host-102:{hosts['host-102'].port}", "local_forwarding": True})
    alice = people["alice"]
    until(
        lambda: run(via_bastion(bulk_bastion, "alice", alice.key, "true")),
        lambda r: r.returncode == 0,
    )
    pid = bastion_pid(bulk_bastion)
    size = 64 * MiB
    chunk = bytes(range(256)) * 256

    expected = hashlib.sha256(chunk * (size // len(chunk))).digest()

    async def pump(writer: asyncssh.SSHWriter[bytes], reader: asyncssh.SSHReader[bytes]) -> bool:
        async def send() -> None:
            for _ in range(size // len(chunk)):
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()

        sender = asyncio.ensure_future(send())
        digest = hashlib.sha256()
        while data := await reader.read(1 << 20):
            digest.update(data)
        await sender
        return digest.digest() == expected

    async def main() -> list[bool]:
        async with asyncssh.connect(
            "127.0.0.1", bulk_bastion.port, options=_asyncssh_conn(bulk_bastion, alice)
        ) as conn:
            streams = []
            for _ in range(3):
                w, r, _ = await conn.open_session("cat", encoding=None)
                streams.append((w, r))
            for _ in range(3):
                r, w = await conn.open_connection("127.0.0.1", echo.port, encoding=None)
                streams.append((w, r))
            return list(await asyncio.gather(*(pump(w, r) for w, r in streams)))

    before = rss_kb(pid)
    try:
        exact = asyncio.run(main())
    finally:
        echo.close()
    assert exact == [True] * 6  # every byte back, in order
    growth_mb = (rss_kb(pid, "VmHWM") - before) / 1024
    assert growth_mb < 40, f"bastion peak RSS grew {growth_mb:.0f} MB"


# -- 3. the end of one channel never ends its connection or other channels -----


class ClosingServer:
    """A TCP server that behaves like sshd towards a stranger: sends a banner,
    reads a line and 16 bytes, then closes cleanly (so later bytes from the
    client get a reset)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    @staticmethod
    def _one(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(10)
            conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 test\r\n")
            reader = conn.makefile("rb")
            reader.readline()
            reader.read(16)

    def close(self) -> None:
        self.sock.close()


class TunnelEnd(asyncssh.SSHTCPSession[bytes]):
    def __init__(self) -> None:
        self.data = b""
        self.got = asyncio.Event()
        self.eof = asyncio.Event()
        self.closed = asyncio.Event()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.data += data
        self.got.set()

    def eof_received(self) -> bool:
        self.eof.set()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        for event in (self.got, self.eof, self.closed):
            event.set()


async def tunnel_order(
    conn: asyncssh.SSHClientConnection, order: str, host: str, port: int
) -> None:
    """Open a tunnel to ``host:port``, end it in ``order``, and wait until it is closed."""
    chan, end = await conn.create_connection(TunnelEnd, host, port, encoding=None)
    await asyncio.wait_for(end.got.wait(), 10)  # the server's banner
    if order == "late-data":
        # the far side closes first; bytes after that meet a reset; then our EOF
        chan.write(b"SSH-2.0-x\r\n" + b"\xff" * 16)
        await asyncio.wait_for(end.eof.wait(), 10)
        if not chan.is_closing():
            chan.write(b"late")
            await asyncio.sleep(0.02)
            chan.write_eof()
    elif order == "client-eof":
        chan.write_eof()
    elif order == "client-close":
        chan.close()
    elif order == "junk-then-eof":
        chan.write(b"junk" * 4096)
        chan.write_eof()
    elif order == "abort":
        chan.abort()
    await asyncio.wait_for(end.closed.wait(), 15)


ORDERS = ["late-data", "client-eof", "client-close", "junk-then-eof", "abort"]


@pytest.mark.parametrize("path", ["jump", "local-forward"])
def test_ending_tunnels_in_any_order_keeps_the_connection(
    bastion: BastionProcess,
    entry: Callable[[object], None],
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
    path: str,
) -> None:
    """Many tunnels opened and ended in varied orders and overlaps (the
    ``ssh -D`` fault: one tunnel's end took the whole connection): the
    connection and its other channels carry on, and every tunnel is audited."""
    far = ClosingServer()
    host102 = hosts["host-102"]
    if path == "jump":  # the bastion connects itself
        entry({"route": f"host-102:{host102.port}", "jump": [f"127.0.0.1:{far.port}"]})
    else:  # the routed host connects (direct-tcpip on the upstream connection)
        entry({"route": f"host-102:{host102.port}", "local_forwarding": True})
    mark = len(bastion.audit_records())
    kind = "tunnel" if path == "jump" else "forward"

    async def main() -> int:
        options = _asyncssh_conn(bastion, people["alice"])
        opened = 0
        async with asyncssh.connect("127.0.0.1", bastion.port, options=options) as conn:
            session = await conn.create_process("cat", encoding=None)
            for round_ in range(6):
                orders = ORDERS[round_ % len(ORDERS) :] + ORDERS[: round_ % len(ORDERS)]
                await asyncio.gather(
                    *(tunnel_order(conn, order, "127.0.0.1", far.port) for order in orders)
                )
                opened += len(orders)
                # the long-lived session on the same connection still echoes
                session.stdin.write(b"ping %d\n" % round_)
                line = await asyncio.wait_for(session.stdout.readline(), 10)
                assert line == b"ping %d\n" % round_
            session.stdin.write_eof()
            await session.wait_closed()
            assert (await conn.run("hostname", check=True)).stdout == "host-102\n"
        return opened

    try:
        # the directory change is in force within milliseconds: wait for it
        until(
            lambda: run(via_bastion(bastion, "alice", people["alice"].key, "true")),
            lambda r: r.returncode == 0,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                opened = asyncio.run(main())
                break
            except asyncssh.ChannelOpenError:
                if time.monotonic() > deadline:
                    raise
    finally:
        far.close()
    records = [r for r in audit_after(bastion, mark) if r["event"] == kind]
    deadline = time.monotonic() + 10
    while len(records) < opened and time.monotonic() < deadline:
        time.sleep(0.05)
        records = [r for r in audit_after(bastion, mark) if r["event"] == kind]
    assert len([r for r in records if r["outcome"] == "ok"]) >= opened, records
    assert "Traceback" not in bastion.log.read_text()


# -- 4. ssh -R 0: the allocated port is named in the reply and the channels ---


def read_until(stream: IO[bytes], pattern: bytes, timeout: float) -> re.Match[bytes] | None:
    """Read ``stream`` (a pipe) line by line until ``pattern`` matches or time is up."""
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 0.2)
        if ready:
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            if match := re.search(pattern, buf):
                return match
    return None


def remote_forward_port_0(argv: list[str | bytes]) -> bytes:
    """Run ``ssh -N -R 0:127.0.0.1:ECHO`` (``argv`` without the destination's
    command, LogLevel=INFO), connect to the port the host allocated and return
    what comes back for a payload."""
    echo = EchoServer()
    proc = subprocess.Popen(
        [
            *argv[:-1],
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            f"0:127.0.0.1:{echo.port}",
            argv[-1],
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        match = read_until(proc.stderr, rb"Allocated port (\d+)", 15)
        assert match, "no 'Allocated port' line from ssh"
        with socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=10) as s:
            s.sendall(b"through -R 0\n")
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(4096):
                got += chunk
        return got
    finally:
        stop_ssh_client(proc)
        echo.close()


def test_remote_forward_port_0_like_sshd(
    bastion: BastionProcess,
    entry: Callable[[object], None],
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
    cert_key: Path,
) -> None:
    entry({"route": f"host-102:{hosts['host-102'].port}", "remote_forwarding": True})
    info = ("-o", "LogLevel=INFO")
    plain = remote_forward_port_0(direct(hosts["host-102"], "alice", cert_key, extra=info))
    assert plain == b"through -R 0\n"
    alice = people["alice"]
    until(
        lambda: run(via_bastion(bastion, "alice", alice.key, "true")), lambda r: r.returncode == 0
    )
    assert remote_forward_port_0(via_bastion(bastion, "alice", alice.key, extra=info)) == plain


# -- 5. SSH strings are bytes ---------------------------------------------------


def test_command_and_environment_bytes_pass_unchanged(
    bastion: BastionProcess, hosts: dict[str, SshdHost], people: dict[str, Person], cert_key: Path
) -> None:
    mark = len(bastion.audit_records())
    command = b"printf '%s' '\xe9\xff' | od -An -tx1; printf '%s' \"$LC_BYTES\" | od -An -tx1"
    env = {**os.environ, "LC_BYTES": os.fsdecode(b"caf\xe9\x80")}
    extra = ("-o", "SendEnv=LC_BYTES")
    plain = run(direct(hosts["host-102"], "alice", cert_key, command, extra=extra), env=env)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.split() == [b"e9", b"ff", b"63", b"61", b"66", b"e9", b"80"]
    relayed = run(via_bastion(bastion, "alice", people["alice"].key, command, extra=extra), env=env)
    assert (relayed.returncode, relayed.stdout, relayed.stderr) == (0, plain.stdout, b"")
    record = bastion.wait_audit(
        lambda r: (
            r.get("event") == "session"
            and r.get("user") == "alice"
            and r in audit_after(bastion, mark)
        )
    )
    assert record["outcome"] == "ok" and record["exit_status"] == 0


def test_subsystem_name_bytes_reach_the_host(
    bastion: BastionProcess, hosts: dict[str, SshdHost], people: dict[str, Person]
) -> None:
    """A subsystem the host does not have is the host's refusal, not ours."""

    async def main() -> tuple[int | None, bytes]:
        async with asyncssh.connect(
            "127.0.0.1",
            bastion.port,
            username="alice",
            known_hosts=None,
            client_keys=[str(people["alice"].key)],
            config=None,
        ) as conn:
            proc = await conn.create_process(subsystem=b"sftp\xe9", encoding=None)  # type: ignore[arg-type]
            _, err = await proc.communicate()
            return proc.exit_status, err

    mark = len(bastion.audit_records())
    status, err = asyncio.run(main())
    assert status == 255, err
    assert err.startswith(b"bastion: the host refused the session"), err
    record = bastion.wait_audit(
        lambda r: r.get("event") == "session" and r in audit_after(bastion, mark)
    )
    assert record["reason"] == "upstream-refused"
    # the host's sshd saw the name byte for byte (it logs bytes with strnvis)
    sshd_log = (hosts["host-102"].workdir / "sshd.log").read_text(errors="replace")
    assert "subsystem request for sftp\\351" in sshd_log, sshd_log[-2000:]


# -- 6. every channel type and global request: works, or OpenSSH's refusal ---


def test_local_forward_refused_by_policy_says_so(
    bastion: BastionProcess, people: dict[str, Person]
) -> None:
    mark = len(bastion.audit_records())
    argv = via_bastion(bastion, "alice", people["alice"].key, extra=("-o", "LogLevel=INFO"))
    port = devstack.free_port()
    proc = subprocess.Popen(
        [*argv[:-1], "-N", "-L", f"127.0.0.1:{port}:10.255.0.9:5432", argv[-1]],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        devstack.wait_until("local forward", lambda: _connectable(port), 15, proc)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(10) == b""  # the refused channel closes the local side
        assert proc.stderr is not None
        match = read_until(proc.stderr, rb"open failed: [^\r\n]*", 10)
    finally:
        stop_ssh_client(proc)
    assert match is not None
    assert match.group(0) == (
        b"open failed: administratively prohibited: alice may not connect to 10.255.0.9:5432: "
        b"not a jump host in the directory, and local forwarding (-L, -D) is off"
    )
    records = audit_after(bastion, mark)
    assert any(
        r["event"] == "tunnel" and r["outcome"] == "refused" and r["reason"] == "forward-denied"
        for r in records
    ), records


def unix_echo(path: Path) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    path.chmod(0o777)  # alice's sshd session connects to it
    srv.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return srv


def through_local_socket_forward(argv: list[str | bytes], sock_path: Path) -> bytes:
    port = devstack.free_port()
    proc = subprocess.Popen(
        [
            *argv[:-1],
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-L",
            f"127.0.0.1:{port}:{sock_path}",
            argv[-1],
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        devstack.wait_until("local forward", lambda: _connectable(port), 15, proc)
        got = b""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"to a socket\n")
            s.shutdown(socket.SHUT_WR)
            with contextlib.suppress(ConnectionResetError):  # a refused channel
                while chunk := s.recv(4096):
                    got += chunk
    finally:
        stop_ssh_client(proc)
    return got


def _connectable(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def test_local_forward_to_a_unix_socket(
    tmp_path: Path,
    bastion: BastionProcess,
    entry: Callable[[object], None],
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
    cert_key: Path,
) -> None:
    sock_dir = Path(f"/tmp/bastion-sock-{os.getpid()}")
    sock_dir.mkdir(exist_ok=True)
    sock_dir.chmod(0o755)
    srv = unix_echo(sock_dir / "echo.sock")
    try:
        plain = through_local_socket_forward(
            direct(hosts["host-102"], "alice", cert_key), sock_dir / "echo.sock"
        )
        assert plain == b"to a socket\n"
        argv = via_bastion(bastion, "alice", people["alice"].key)
        # policy off: refused as sshd refuses with AllowStreamLocalForwarding no
        mark = len(bastion.audit_records())
        refused = through_local_socket_forward(argv, sock_dir / "echo.sock")
        assert refused == b""
        records = audit_after(bastion, mark)
        assert any(
            r["event"] == "forward"
            and r["outcome"] == "refused"
            and r["reason"] == "forward-denied"
            for r in records
        ), records
        # policy on: works, byte for byte the same
        entry({"route": f"host-102:{hosts['host-102'].port}", "local_forwarding": True})
        until(lambda: run([*argv, "true"]), lambda r: r.returncode == 0)
        got = b""
        deadline = time.monotonic() + 15
        while got != plain and time.monotonic() < deadline:
            got = through_local_socket_forward(argv, sock_dir / "echo.sock")
        assert got == plain
        assert any(
            r["event"] == "forward" and r["outcome"] == "ok" and r.get("upstream")
            for r in audit_after(bastion, mark)
        )
    finally:
        srv.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_x11_request_refused_as_sshd_refuses_it(
    bastion: BastionProcess, hosts: dict[str, SshdHost], people: dict[str, Person], cert_key: Path
) -> None:
    env = {**os.environ, "DISPLAY": "127.0.0.1:99"}
    extra = ("-X", "-o", "LogLevel=INFO", "-o", "XAuthLocation=/nonexistent")
    plain = run(direct(hosts["host-102"], "alice", cert_key, "echo ok", extra=extra), env=env)
    mark = len(bastion.audit_records())
    relayed = run(
        via_bastion(bastion, "alice", people["alice"].key, "echo ok", extra=extra), env=env
    )
    assert plain.stdout == relayed.stdout == b"ok\n"
    assert b"X11 forwarding request failed on channel 0" in plain.stderr, plain.stderr
    assert b"X11 forwarding request failed on channel 0" in relayed.stderr, relayed.stderr
    record = bastion.wait_audit(
        lambda r: r.get("event") == "x11-req" and r in audit_after(bastion, mark)
    )
    assert record["outcome"] == "refused" and record["reason"] == "request-denied"


def _asyncssh_conn(bastion: BastionProcess, person: Person) -> asyncssh.SSHClientConnectionOptions:
    return asyncssh.SSHClientConnectionOptions(
        username=person.name, known_hosts=None, client_keys=[str(person.key)], config=None
    )


def test_tun_refused_administratively(bastion: BastionProcess, people: dict[str, Person]) -> None:
    mark = len(bastion.audit_records())

    async def main() -> asyncssh.ChannelOpenError:
        async with asyncssh.connect(
            "127.0.0.1", bastion.port, options=_asyncssh_conn(bastion, people["alice"])
        ) as conn:
            with pytest.raises(asyncssh.ChannelOpenError) as err:
                await conn.open_tun()
            # the connection and its other channels carry on
            result = await conn.run("hostname", check=True)
            assert result.stdout == "host-102\n"
            return err.value

    err = asyncio.run(main())
    assert err.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
    assert "tunnel device forwarding" in err.reason
    assert any(
        r["event"] == "tun" and r["outcome"] == "refused" for r in audit_after(bastion, mark)
    )


REFUSED = (asyncssh.ChannelOpenError, asyncssh.DisconnectError, asyncssh.ConnectionLost)


def test_no_more_sessions_is_honoured(bastion: BastionProcess, people: dict[str, Person]) -> None:
    mark = len(bastion.audit_records())

    async def main() -> None:
        async with asyncssh.connect(
            "127.0.0.1", bastion.port, options=_asyncssh_conn(bastion, people["alice"])
        ) as conn:
            first = await conn.run("hostname", check=True)
            assert first.stdout == "host-102\n"
            # what OpenSSH's client sends once its session is open (PROTOCOL 2.2)
            conn._send_global_request(b"no-more-sessions@openssh.com", want_reply=False)  # type: ignore[attr-defined]
            with pytest.raises(REFUSED):
                await conn.run("hostname")

    asyncio.run(main())
    record = bastion.wait_audit(
        lambda r: r.get("event") == "connection" and r in audit_after(bastion, mark)
    )
    assert record["reason"] == "request-denied", record
    assert "sessions disabled" in str(record["message"])
    refused = [r for r in audit_after(bastion, mark) if r["event"] == "session"]
    assert [r["outcome"] for r in refused] == ["ok", "refused"]


def test_keepalives_and_openssh_defaults_work(
    bastion: BastionProcess, people: dict[str, Person]
) -> None:
    """ServerAliveInterval's keepalive@openssh.com and the no-more-sessions an
    ordinary `ssh host cmd` sends: the session runs to its end."""
    extra = ("-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=2")
    result = run(
        via_bastion(bastion, "alice", people["alice"].key, "sleep 2.5; echo ok", extra=extra)
    )
    assert (result.returncode, result.stdout) == (0, b"ok\n"), result.stderr


# -- 7. MaxAuthTries -------------------------------------------------------------


def test_max_auth_tries_as_sshd(
    tmp_path: Path,
    bastion: BastionProcess,
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
    cert_key: Path,
) -> None:
    wrong = [devstack.keygen(tmp_path / f"wrong{i}") for i in range(20)]
    ids: list[str] = []
    for key in wrong:
        ids += ["-i", str(key)]
    mark = len(bastion.audit_records())
    # the right key last: sshd (MaxAuthTries 6 by default) never gets to it
    plain = run(direct(hosts["host-102"], "alice", cert_key, "true", extra=ids))
    relayed = run(via_bastion(bastion, "alice", people["alice"].key, "hostname", extra=ids))
    assert plain.returncode == relayed.returncode == 255
    assert b"Too many authentication failures" in plain.stderr, plain.stderr
    assert b"Too many authentication failures" in relayed.stderr, relayed.stderr
    assert relayed.stdout == b""
    record = bastion.wait_audit(
        lambda r: (
            r.get("event") == "connection"
            and r.get("reason") == "max-auth-tries"
            and r in audit_after(bastion, mark)
        )
    )
    assert record["auth_failures"] == 6 and record["outcome"] == "refused"
    # with fewer wrong keys than the limit, the right one still works
    few = ids[: 2 * 4]
    ok = run(via_bastion(bastion, "alice", people["alice"].key, "hostname", extra=few))
    assert ok.stdout == b"host-102\n", ok.stderr


# -- 8 and 9. refusals the client shows at LogLevel=ERROR --------------------


def test_turned_away_connection_is_told_why(
    tmp_path: Path,
    consul: ConsulAgent,
    consul_tokens: ConsulTokens,
    vault: VaultSetup,
    known_hosts: Path,
    people: dict[str, Person],
    directory_entries: None,
) -> None:
    sections = bastion_sections(consul_tokens, consul, known_hosts, vault, max_unauthenticated=2)
    proc = BastionProcess(tmp_path / "bastion", sections).start()
    held = []
    try:
        for _ in range(2):
            held.append(socket.create_connection(("127.0.0.1", proc.port)))
        for s in held:  # both admitted: each gets a version line
            s.settimeout(10)
            assert s.recv(64).startswith(b"SSH-2.0-")
        result = run(via_bastion(proc, "alice", people["alice"].key, "hostname"))
        assert result.returncode == 255
        assert b"invalid characters" not in result.stderr, result.stderr
        assert b"too many unauthenticated connections" in result.stderr, result.stderr
        for s in held:
            s.close()
        ok = until(
            lambda: run(via_bastion(proc, "alice", people["alice"].key, "hostname")),
            lambda r: r.returncode == 0,
        )
        assert ok.stdout == b"host-102\n"
    finally:
        proc.stop()


# -- 10. logs and audit reasons ---------------------------------------------------


def test_tracebacks_are_not_chained_to_the_uvloop_import(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import logging, sys, types
        import bastion.serving, bastion.cli

        async def serve(settings, drain_timeout, role=None):
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                logging.getLogger("bastion").exception("something failed")

        bastion.serving.serve = serve
        one_process = types.SimpleNamespace(server=types.SimpleNamespace(workers=1))
        bastion.cli.load_settings = lambda path: one_process
        sys.exit(bastion.cli.main(["serve", "--config", "unused.toml"]))
        """
    )
    result = run([sys.executable, "-c", script])
    assert result.returncode == 0, result.stderr
    assert b"RuntimeError: boom" in result.stderr
    assert b"uvloop" not in result.stderr
    assert b"During handling" not in result.stderr


def test_host_killed_mid_session_is_audited_as_lost(
    tmp_path: Path,
    bastion: BastionProcess,
    consul: ConsulAgent,
    entry: Callable[[object], None],
    people: dict[str, Person],
    local_ca: Path,
    vault: VaultSetup,
    known_hosts: Path,
) -> None:
    host = SshdHost("host-103", "127.0.1.103", tmp_path / "host-103", [vault.user_ca_pub]).start()
    try:
        consul.register_node("host-103", "127.0.1.103")
        consul.kv_put("host-keys/host-103", host.host_pubkey)
        entry(f"host-103:{host.port}")
        alice = people["alice"]
        until(
            lambda: run(via_bastion(bastion, "alice", alice.key, "hostname")),
            lambda r: r.stdout == b"host-103\n",
        )
        mark = len(bastion.audit_records())
        proc = subprocess.Popen(
            via_bastion(bastion, "alice", alice.key, "echo started; sleep 60"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"started\n"
        # the host goes away: its listener and every session process
        assert host.process is not None
        for pid in [*descendants(host.process.pid), host.process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 255
        assert b"bastion: connection to the host was lost" in err, err
        record = bastion.wait_audit(
            lambda r: r.get("event") == "session" and r in audit_after(bastion, mark)
        )
        assert record["outcome"] == "error" and record["reason"] == "upstream-lost"
        conn = bastion.wait_audit(
            lambda r: r.get("event") == "connection" and r.get("conn") == record["conn"]
        )
        assert conn["channels"] == 1 and conn["outcome"] == "authenticated"
    finally:
        host.stop()
        consul.kv_delete("host-keys/host-103")


# -- found by a hostile review ----------------------------------------------------


def test_nul_bytes_are_refused_not_passed_upstream(
    bastion: BastionProcess, people: dict[str, Person]
) -> None:
    """sshd reads these strings as C strings; passed upstream a NUL would end
    the host's connection, which the person's other sessions share."""
    mark = len(bastion.audit_records())

    async def main() -> list[str]:
        async with asyncssh.connect(
            "127.0.0.1", bastion.port, options=_asyncssh_conn(bastion, people["alice"])
        ) as conn:
            held = await conn.create_process("echo held; cat", encoding=None)
            assert await held.stdout.readline() == b"held\n"
            refused = []
            for kwargs in (
                {"command": "echo a\0b"},
                {"subsystem": "sftp\0x"},
                {"command": "true", "term_type": "xterm\0x"},
            ):
                try:
                    await conn.run(**kwargs, check=True)  # type: ignore[arg-type]
                except (asyncssh.ChannelOpenError, asyncssh.ProcessError) as exc:
                    refused.append(type(exc).__name__)
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_unix_connection("/tmp/x\0y")
            # the held session on the same connection still works
            held.stdin.write(b"still here\n")
            assert await held.stdout.readline() == b"still here\n"
            held.stdin.write_eof()
            await held.wait_closed()
            return refused

    assert len(asyncio.run(main())) == 3
    kinds = {r["event"] for r in audit_after(bastion, mark) if r.get("outcome") == "refused"}
    assert {"exec", "subsystem", "pty-req", "forward"} <= kinds, kinds
    assert "Traceback" not in bastion.log.read_text()


def test_client_text_cannot_forge_log_lines(
    bastion: BastionProcess, people: dict[str, Person]
) -> None:
    forged = "x\n2026-01-01 00:00:00,000 INFO bastion.frontdoor: login of root forged"

    async def main() -> None:
        async with asyncssh.connect(
            "127.0.0.1", bastion.port, options=_asyncssh_conn(bastion, people["alice"])
        ) as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_unix_connection(forged)

    asyncio.run(main())
    log = bastion.log.read_text()
    assert "login of root forged" in log  # logged, escaped on one line
    assert not any(line.startswith("2026-01-01") for line in log.splitlines())


def test_max_sessions_per_connection(bastion: BastionProcess, people: dict[str, Person]) -> None:
    """sshd's MaxSessions (10): the 11th open session is refused, administratively."""

    async def main() -> asyncssh.ChannelOpenError:
        async with asyncssh.connect(
            "127.0.0.1", bastion.port, options=_asyncssh_conn(bastion, people["alice"])
        ) as conn:
            held = [await conn.create_process("cat", encoding=None) for _ in range(10)]
            with pytest.raises(asyncssh.ChannelOpenError) as err:
                await conn.create_process("cat", encoding=None)
            for proc in held:
                proc.stdin.write_eof()
                await proc.wait_closed()
            # once they end, sessions open again
            assert (await conn.run("hostname", check=True)).stdout == "host-102\n"
            return err.value

    err = asyncio.run(main())
    assert err.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
    assert "MaxSessions 10" in err.reason


def test_password_logins_do_not_tell_which_users_exist(
    tmp_path: Path, bastion: BastionProcess, people: dict[str, Person]
) -> None:
    askpass = tmp_path / "askpass"
    askpass.write_text("#!/bin/sh\necho wrong-password\n")
    askpass.chmod(0o700)
    env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force"}
    answers = []
    for user in ("carol", "nobody-here", "zed"):
        argv = ssh_command(
            port=bastion.port,
            user=user,
            extra=(
                "-o",
                "BatchMode=no",
                "-o",
                "PreferredAuthentications=password",
                "-o",
                "NumberOfPasswordPrompts=1",
            ),
            command=("true",),
        )
        result = run(argv, env=env)
        assert result.returncode == 255
        answers.append(result.stderr.replace(user.encode(), b"USER"))
    assert answers[0] == answers[1] == answers[2], answers
    assert b"no route" not in answers[1]


def test_a_failed_method_then_a_good_key_is_audited_as_authenticated(
    tmp_path: Path, bastion: BastionProcess, people: dict[str, Person]
) -> None:
    """One mistyped password, then the key: the connection is not a refusal."""
    mark = len(bastion.audit_records())

    async def main() -> None:
        options = asyncssh.SSHClientConnectionOptions(
            username="alice",
            known_hosts=None,
            config=None,
            client_keys=[str(people["alice"].key)],
            password="not-it",
            preferred_auth=["password", "publickey"],
        )
        async with asyncssh.connect("127.0.0.1", bastion.port, options=options) as conn:
            assert (await conn.run("hostname", check=True)).stdout == "host-102\n"

    asyncio.run(main())
    closed = bastion.wait_audit(
        lambda r: r.get("event") == "connection" and r in audit_after(bastion, mark)
    )
    assert closed["outcome"] == "authenticated" and "reason" not in closed, closed


def test_a_resize_while_the_session_opens_reaches_the_host(
    tmp_path: Path,
    consul: ConsulAgent,
    consul_tokens: ConsulTokens,
    vault: VaultSetup,
    known_hosts: Path,
    people: dict[str, Person],
    directory_entries: None,
) -> None:
    """A window change sent right after the shell request, while the bastion
    is still logging in upstream, is not lost."""
    proc = start_bastion(tmp_path / "bastion", consul, consul_tokens, vault, known_hosts)
    try:

        async def main() -> str:
            options = _asyncssh_conn(proc, people["alice"])
            # an upstream connection to reuse: then opening the session is the
            # one round trip left for the resize to fall into
            async with asyncssh.connect("127.0.0.1", proc.port, options=options) as warm:
                await warm.run("true", check=True)
            async with asyncssh.connect("127.0.0.1", proc.port, options=options) as conn:
                shell = await conn.create_process(term_type="xterm", term_size=(80, 24))
                shell.change_terminal_size(100, 40)  # before the host's session exists
                shell.stdin.write("stty size; exit\n")
                out, _ = await asyncio.wait_for(shell.communicate(), 30)
                return str(out)

        assert "40 100" in asyncio.run(main())
    finally:
        proc.stop()
