"""The asyncssh speed-ups (bastion/fastpath/): still valid for the installed
asyncssh, doing what they claim, and a real relayed session works with them.

If asyncssh is upgraded and the functions the patches replace change, the
first test fails: re-read the changed functions, re-check the patches, then
update ``FINGERPRINTS`` in bastion/fastpath/pins.py (``pins.fingerprint(...)``
prints the new values).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import asyncssh
import pytest
from asyncssh.channel import SSHChannel
from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_IGNORE
from asyncssh.encryption import get_encryption
from asyncssh.packet import SSHPacketLogger
from conftest import Person

from bastion import fastpath
from bastion.fastpath.skip_ignore import ignore_is_redundant
from devstack import BastionProcess, ssh_command


@pytest.fixture
def tuned() -> Iterator[None]:
    fastpath.revert()
    assert fastpath.apply()
    try:
        yield
    finally:
        fastpath.revert()


def test_installed_asyncssh_is_the_verified_one() -> None:
    assert fastpath.mismatches() == [], (
        "asyncssh changed under bastion/fastpath/: re-verify the patches, then "
        "update VERIFIED_VERSIONS and pins.FINGERPRINTS"
    )


def test_patched_functions_have_the_expected_signatures() -> None:
    names = {
        "send_packet": ["self", "pkttype", "args", "handler"],
        "data_received": ["self", "data", "datatype"],
        "_send": ["self", "data"],
    }
    for attr, params in names.items():
        assert list(inspect.signature(getattr(SSHConnection, attr)).parameters) == params
    for attr in ("log_sent_packet", "log_received_packet"):
        sig = inspect.signature(getattr(SSHPacketLogger, attr))
        assert list(sig.parameters) == ["self", "pkttype", "pktid", "packet", "note"]
    # the empty IGNORE the patch recognises is asyncssh's String(b'')
    assert asyncssh.packet.String(b"") == b"\x00\x00\x00\x00"


def test_apply_revert_and_unknown_features() -> None:
    fastpath.revert()
    original = SSHConnection.send_packet
    try:
        assert fastpath.apply(["skip_ignore"])
        assert fastpath.applied() == frozenset({"skip_ignore"})
        assert SSHConnection.send_packet is not original
        assert fastpath.apply(["skip_ignore"])  # idempotent
    finally:
        fastpath.revert()
    assert SSHConnection.send_packet is original
    assert fastpath.applied() == frozenset()
    with pytest.raises(ValueError, match="unknown"):
        fastpath.apply(["turbo"])


def test_unverified_version_is_a_no_op_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fastpath.revert()
    original = SSHConnection.send_packet
    monkeypatch.setattr(asyncssh, "__version__", "9.0.0")
    with caplog.at_level(logging.WARNING, logger="bastion.tuning"):
        assert not fastpath.apply()
    assert SSHConnection.send_packet is original
    assert fastpath.applied() == frozenset()
    assert "not applied" in caplog.text and "9.0.0" in caplog.text


@pytest.mark.parametrize(
    ("alg", "redundant"),
    [
        (b"aes128-gcm@openssh.com", True),
        (b"aes256-gcm@openssh.com", True),
        (b"chacha20-poly1305@openssh.com", True),
        (b"aes128-ctr", True),
        (b"aes256-ctr", True),
        (b"aes128-cbc", False),
        (b"aes256-cbc", False),
        (b"3des-cbc", False),
    ],
)
def test_ignore_is_redundant_only_without_iv_chaining(alg: bytes, redundant: bool) -> None:
    from asyncssh.encryption import get_encryption_params

    keysize, ivsize, _, mac_keysize, _, etm = get_encryption_params(alg, b"hmac-sha2-256")
    enc = get_encryption(
        alg, os.urandom(keysize), os.urandom(ivsize), b"hmac-sha2-256", os.urandom(mac_keysize), etm
    )
    assert ignore_is_redundant(enc) is redundant
    assert ignore_is_redundant(None) is False


# -- in-process: an asyncssh server and client with the patches on -----------


def _client_options(client_key: asyncssh.SSHKey, alg: str) -> dict[str, Any]:
    """An in-process client that reads no config, agent or known_hosts."""
    return {
        "username": "x",
        "client_keys": [client_key],
        "known_hosts": None,
        "config": None,
        "agent_path": None,
        "encryption_algs": [alg],
    }


class _AnyoneServer(asyncssh.SSHServer):
    """Lets any client key in (in-process tests only)."""

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return True


async def _echo_roundtrip(
    alg: str, payload: bytes, rekey_bytes: int | None = None
) -> tuple[bytes, int]:
    """Echo ``payload`` over one session with cipher ``alg``; (echo, IGNOREs seen)."""
    seen = {"ignore": 0}
    handlers: dict[int, Any] = SSHConnection._packet_handlers  # type: ignore[attr-defined]
    process_ignore = handlers[MSG_IGNORE]

    def counting(self: SSHConnection, *args: Any) -> Any:
        seen["ignore"] += 1
        return process_ignore(self, *args)

    handlers[MSG_IGNORE] = counting
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")

    async def echo(process: asyncssh.SSHServerProcess[bytes]) -> None:
        data = await process.stdin.read()
        process.stdout.write(data)
        process.exit(0)

    try:
        server = await asyncssh.create_server(
            _AnyoneServer,
            "127.0.0.1",
            0,
            server_host_keys=[host_key],
            process_factory=echo,
            encoding=None,
            encryption_algs=[alg],
            config=None,
            **({"rekey_bytes": rekey_bytes} if rekey_bytes else {}),
        )
        port = server.sockets[0].getsockname()[1]
        async with asyncssh.connect(
            "127.0.0.1",
            port,
            **_client_options(client_key, alg),
            **({"rekey_bytes": rekey_bytes} if rekey_bytes else {}),
        ) as conn:
            result = await conn.run(input=payload, encoding=None, check=True)
        server.close()
        await server.wait_closed()
    finally:
        handlers[MSG_IGNORE] = process_ignore
    assert isinstance(result.stdout, bytes)
    return result.stdout, seen["ignore"]


@pytest.mark.parametrize(
    ("alg", "expect_ignores"),
    [
        ("aes128-gcm@openssh.com", False),
        ("chacha20-poly1305@openssh.com", False),
        ("aes128-ctr", False),
        ("aes128-cbc", True),
    ],
)
def test_ignores_dropped_only_where_safe_and_data_intact(
    tuned: None, alg: str, expect_ignores: bool
) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    echoed, ignores = asyncio.run(_echo_roundtrip(alg, payload))
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert (ignores > 0) is expect_ignores, ignores


@pytest.mark.parametrize("alg", ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"])
def test_bulk_data_across_many_rekeys(tuned: None, alg: str) -> None:
    # a rekey every 256 KiB: the fast data path must hand over to asyncssh
    # when one comes due and carry on with the new keys
    kexes = {"n": 0}
    send_kexinit = SSHConnection._send_kexinit

    def counting(self: SSHConnection) -> None:
        kexes["n"] += 1
        send_kexinit(self)

    SSHConnection._send_kexinit = counting  # type: ignore[method-assign]
    try:
        payload = os.urandom(4 * 1024 * 1024 + 5)
        echoed, _ = asyncio.run(_echo_roundtrip(alg, payload, rekey_bytes=256 * 1024))
    finally:
        SSHConnection._send_kexinit = send_kexinit  # type: ignore[method-assign]
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert kexes["n"] > 10, kexes


def test_fast_channel_data_is_what_carries_bulk_data(tuned: None) -> None:
    # the fast path is taken (and so is what the byte checks above exercise)
    sent = {"slow": 0}
    send_packet = SSHChannel.send_packet

    def counting(self: SSHChannel[Any], pkttype: int, *args: bytes) -> None:
        if pkttype == MSG_CHANNEL_DATA:
            sent["slow"] += 1
        send_packet(self, pkttype, *args)

    SSHChannel.send_packet = counting  # type: ignore[method-assign]
    try:
        payload = os.urandom(2 * 1024 * 1024)
        echoed, _ = asyncio.run(_echo_roundtrip("aes128-gcm@openssh.com", payload))
    finally:
        SSHChannel.send_packet = send_packet  # type: ignore[method-assign]
    assert echoed == payload
    assert sent["slow"] < 5, sent  # 2 x 64 packets of data went the fast way


def test_fast_receive_is_what_carries_bulk_data(tuned: None) -> None:
    # asyncssh's own data handler sees (almost) nothing: the bytes checked
    # by the echo tests above came through the fast receive path
    handlers: dict[int, Any] = SSHChannel._packet_handlers  # type: ignore[attr-defined]
    process_data = handlers[MSG_CHANNEL_DATA]
    seen = {"slow": 0}

    def counting(self: SSHChannel[Any], *args: Any) -> Any:
        seen["slow"] += 1
        return process_data(self, *args)

    handlers[MSG_CHANNEL_DATA] = counting
    try:
        payload = os.urandom(2 * 1024 * 1024)
        echoed, _ = asyncio.run(_echo_roundtrip("aes128-gcm@openssh.com", payload))
    finally:
        handlers[MSG_CHANNEL_DATA] = process_data
    assert echoed == payload
    assert seen["slow"] < 5, seen  # 2 x 64 packets of data came the fast way


async def _raw_channel_data(*payload: bytes, flood: int = 1) -> str:
    """Open a session on a server that never reads its stdin, then send
    MSG_CHANNEL_DATA packets made by hand (``payload`` after the channel
    number), ``flood`` times, ignoring the window; the reason the server
    gave for disconnecting ("" if it did not)."""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")

    async def sit(process: asyncssh.SSHServerProcess[bytes]) -> None:
        await asyncio.sleep(30)

    reason = {"text": ""}

    class Client(asyncssh.SSHClient):
        def connection_lost(self, exc: Exception | None) -> None:
            if isinstance(exc, asyncssh.DisconnectError):
                reason["text"] = exc.reason

    server = await asyncssh.create_server(
        _AnyoneServer, "127.0.0.1", 0, server_host_keys=[host_key], process_factory=sit, config=None
    )
    port = server.sockets[0].getsockname()[1]
    try:
        conn, _ = await asyncssh.create_connection(
            Client, "127.0.0.1", port, **_client_options(client_key, "aes128-gcm@openssh.com")
        )
        chan, _ = await conn.create_session(asyncssh.SSHClientSession, "sit", encoding=None)
        remote = chan._send_chan  # type: ignore[attr-defined]
        for _ in range(flood):
            conn.send_packet(MSG_CHANNEL_DATA, asyncssh.packet.UInt32(remote), *payload)  # type: ignore[attr-defined]
        await asyncio.wait_for(conn.wait_closed(), 10)
    except TimeoutError:
        conn.close()
    finally:
        server.close()
        await server.wait_closed()
    return reason["text"]


@pytest.mark.parametrize("tuning_on", [True, False])
def test_malformed_or_excess_channel_data_is_refused_as_asyncssh_does(tuning_on: bool) -> None:
    """The fast receive path hands what it does not recognise to asyncssh,
    whose checks then apply: the same refusals with and without it."""
    fastpath.revert()
    try:
        if tuning_on:
            assert fastpath.apply()
        string = asyncssh.packet.String
        # data lengths that do not match the packet
        reason = asyncio.run(_raw_channel_data(string(b"abc"), b"\x00"))
        assert reason == "Unexpected data at end of packet", reason
        reason = asyncio.run(_raw_channel_data(asyncssh.packet.UInt32(100)))
        assert reason == "Incomplete packet", reason
        # more than the server has room for: 2 MiB buffered unread by the
        # session, then the 2 MiB window it granted
        reason = asyncio.run(_raw_channel_data(string(b"x" * 32000), flood=200))
        assert reason == "Window exceeded", reason
    finally:
        fastpath.revert()


def test_untuned_asyncssh_sends_the_ignores_the_patch_removes() -> None:
    # the premise of skip_ignore, checked on the installed asyncssh
    fastpath.revert()
    echoed, ignores = asyncio.run(_echo_roundtrip("aes128-gcm@openssh.com", b"x" * 100_000))
    assert echoed == b"x" * 100_000
    assert ignores > 0


def test_reused_aead_is_byte_identical_to_asyncssh() -> None:
    """The reuse_aead ciphers produce exactly asyncssh's bytes, and reject what it rejects."""
    from asyncssh.crypto.chacha import ChachaCipher
    from asyncssh.crypto.cipher import GCMCipher

    fastpath.revert()
    chacha_key, gcm_key, iv = os.urandom(64), os.urandom(16), os.urandom(12)
    cases = [(os.urandom(4), os.urandom(n), os.urandom(8)) for n in (0, 1, 63, 64, 65, 32768)]

    def run() -> list[Any]:
        out: list[Any] = []
        chacha = ChachaCipher(chacha_key)
        enc = GCMCipher("aes128-gcm", gcm_key, iv)
        dec = GCMCipher("aes128-gcm", gcm_key, iv)
        for header, data, nonce in cases:
            sealed, tag = chacha.encrypt_and_sign(header, data, nonce)
            bad = bytes([tag[0] ^ 1]) + tag[1:]
            out += [
                sealed,
                tag,
                chacha.decrypt_header(sealed[:4], nonce),
                chacha.verify_and_decrypt(sealed[:4], sealed[4:], nonce, tag),
                chacha.verify_and_decrypt(sealed[:4], sealed[4:], nonce, bad),
            ]
            sealed, tag = enc.encrypt_and_sign(header, data)
            out += [sealed, tag, dec.verify_and_decrypt(sealed[:4], sealed[4:], tag)]
        # a forged GCM tag is refused (and the nonce still moves on, as in asyncssh)
        sealed, tag = enc.encrypt_and_sign(b"abcd", b"payload")
        out.append(dec.verify_and_decrypt(sealed[:4], sealed[4:], bytes(16)))
        return out

    untuned = run()
    assert untuned[4] is None and untuned[3] == cases[0][1] and untuned[-1] is None
    try:
        assert fastpath.apply(["reuse_aead"])
        assert run() == untuned
    finally:
        fastpath.revert()


async def _split_reads_roundtrip(alg: str, payload: bytes, chunk: int) -> bytes:
    """Echo over an SSH connection whose transport delivers reads of ``chunk`` bytes."""
    original = SSHConnection.data_received

    def rechunk(self: SSHConnection, data: bytes, datatype: Any = None) -> None:
        for i in range(0, len(data), chunk):
            original(self, data[i : i + chunk], datatype)

    SSHConnection.data_received = rechunk  # type: ignore[method-assign]
    try:
        echoed, _ = await _echo_roundtrip(alg, payload)
    finally:
        SSHConnection.data_received = original  # type: ignore[method-assign]
    return echoed


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
@pytest.mark.parametrize("alg", ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"])
def test_exact_receive_handles_any_read_boundaries(tuned: None, alg: str, chunk: int) -> None:
    # reads that split headers, packets and MACs anywhere, and reads of many packets
    payload = os.urandom(300_000 if chunk < 100 else 3_000_000)
    echoed = asyncio.run(_split_reads_roundtrip(alg, payload, chunk))
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


def test_exact_receive_keeps_asyncssh_buffer_to_one_packet(tuned: None) -> None:
    # the point of the patch: the parse buffer never holds more than one packet
    seen = {"max": 0}

    class Watched:
        """Records the size of every value asyncssh stores as its parse buffer."""

        def __get__(self, conn: Any, owner: Any = None) -> bytes:
            return conn.__dict__["_watched_inpbuf"]  # type: ignore[no-any-return]

        def __set__(self, conn: Any, value: bytes) -> None:
            seen["max"] = max(seen["max"], len(value))
            conn.__dict__["_watched_inpbuf"] = value

    SSHConnection._inpbuf = Watched()  # type: ignore[attr-defined]
    try:
        payload = os.urandom(4_000_000)
        echoed = asyncio.run(_split_reads_roundtrip("aes128-gcm@openssh.com", payload, 1 << 20))
    finally:
        del SSHConnection._inpbuf  # type: ignore[attr-defined]
    assert echoed == payload
    assert 0 < seen["max"] <= 35_000 + 64, seen


async def _login_options(tmp_path: Any, config_text: str | None, user: str) -> tuple[bool, bool]:
    """Log ``user`` in to an asyncssh server whose only accepted key is listed
    in an authorized_keys file that a ``Match User`` block of the server's
    config names (or no config at all: ``config_text`` None). Returns (login
    accepted, the connection still uses the listener's options object)."""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    keys_file = tmp_path / "authorized_keys"
    keys_file.write_bytes(client_key.export_public_key())
    config: list[str] | None = None
    if config_text is not None:
        path = tmp_path / "sshd_config"
        path.write_text(config_text.format(keys=keys_file))
        config = [str(path)]
    seen: dict[str, bool] = {}

    class Server(asyncssh.SSHServer):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            self.conn = conn
            self.first_options = conn._options  # type: ignore[attr-defined]

        def begin_auth(self, username: str) -> bool:
            # asyncssh calls this right after re-reading (or not) its options
            seen["same"] = self.conn._options is self.first_options  # type: ignore[attr-defined]
            return True

    server = await asyncssh.create_server(
        Server, "127.0.0.1", 0, server_host_keys=[host_key], config=config, gss_host=None
    )
    port = server.sockets[0].getsockname()[1]
    try:
        options = {**_client_options(client_key, "aes128-gcm@openssh.com"), "username": user}
        async with asyncssh.connect("127.0.0.1", port, preferred_auth=["publickey"], **options):
            accepted = True
    except asyncssh.PermissionDenied:
        accepted = False
    finally:
        server.close()
        await server.wait_closed()
    return accepted, seen.get("same", False)


def test_static_server_options_still_applies_match_blocks(tuned: None, tmp_path: Any) -> None:
    """A server with a config file re-reads it per login, as asyncssh does:
    the key is only authorized for ``alice`` through her ``Match`` block."""
    config = "Match User alice\n  AuthorizedKeysFile {keys}\n"
    assert asyncio.run(_login_options(tmp_path, config, "alice"))[0] is True
    assert asyncio.run(_login_options(tmp_path, config, "bob"))[0] is False


def test_static_server_options_without_a_config_keeps_the_listeners(
    tuned: None, tmp_path: Any
) -> None:
    """No config file (the bastion's case): the listener's options serve the
    whole login; plain asyncssh rebuilds them in a worker thread."""
    assert asyncio.run(_login_options(tmp_path, None, "alice")) == (False, True)
    fastpath.revert()
    assert asyncio.run(_login_options(tmp_path, None, "alice")) == (False, False)


# -- the real bastion (tuning applied at start) -----------------------------


def test_real_relayed_session_with_tuning(
    bastion: BastionProcess, people: dict[str, Person]
) -> None:
    payload = os.urandom(8 * 1024 * 1024)
    argv = ssh_command(
        port=bastion.port,
        user="alice",
        identity=people["alice"].key,
        extra=["-o", "Ciphers=aes128-gcm@openssh.com"],
        command=["cat"],
    )
    result = subprocess.run(argv, input=payload, capture_output=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(payload).digest()
    log = bastion.log.read_text()
    assert "speed-ups applied" in log, log[-2000:]
    assert "speed-ups not applied" not in log


def test_bastion_tuning_environment_variable() -> None:
    assert fastpath.features_from_env(None) == fastpath.FEATURES
    assert fastpath.features_from_env(" ALL ") == fastpath.FEATURES
    assert fastpath.features_from_env("none") == ()
    assert fastpath.features_from_env("skip_ignore, exact_receive") == (
        "skip_ignore",
        "exact_receive",
    )
    with pytest.raises(ValueError, match="unknown feature turbo"):
        fastpath.features_from_env("skip_ignore,turbo")
    fastpath.revert()
    original = SSHConnection.data_received
    assert fastpath.apply(fastpath.features_from_env("none"))
    assert fastpath.applied() == frozenset()
    assert SSHConnection.data_received is original


def test_startup_line_names_the_features_and_the_window_fix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fastpath.revert()
    try:
        with caplog.at_level(logging.INFO, logger="bastion.tuning"):
            assert fastpath.apply(["skip_ignore", "quickack"])
        line = f"asyncssh {asyncssh.__version__} speed-ups applied: quickack, skip_ignore"
        assert fastpath.describe() == f"{line} (window fix on)"
        assert fastpath.describe() in caplog.text
        fastpath.revert()
        assert fastpath.describe().endswith("speed-ups off (window fix off)")
        assert fastpath.apply([])
        assert fastpath.describe().endswith("speed-ups off (window fix on)")
    finally:
        fastpath.revert()


def test_importing_the_data_plane_loads_no_patch() -> None:
    """The package alone loads nothing of asyncssh or cryptography, and
    the relays (which import asyncssh themselves) take only the socket helper:
    the patches are imported by apply()."""
    code = (
        "import json, sys\n"
        "import bastion.fastpath\n"
        "libs = [m for m in sys.modules if m.split('.')[0] in ('asyncssh', 'cryptography')]\n"
        "import bastion.core.relay, bastion.core.tunnel\n"
        "ours = [m for m in sys.modules if m.startswith(('bastion.fastpath', 'bastion.tuning'))]\n"
        "print(json.dumps([sorted(libs), sorted(ours)]))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True
    )
    libs, ours = json.loads(result.stdout)
    assert libs == []
    assert ours == ["bastion.fastpath", "bastion.fastpath.sockets"]


class _SlowReader(asyncssh.SSHServerSession[bytes]):
    """Takes one packet per resume, as a relay towards a slower sink does."""

    def __init__(self, done: asyncio.Future[int]) -> None:
        self._done = done
        self._got = 0
        self.peak = 0  # most the peer could have sent and we not yet consumed

    def connection_made(self, chan: Any) -> None:
        self._chan = chan

    def shell_requested(self) -> bool:
        return True

    def data_received(self, data: bytes, datatype: Any) -> None:
        chan = self._chan
        self._got += len(data)
        self.peak = max(self.peak, chan._recv_window + sum(len(d) for d, _ in chan._recv_buf))
        chan.pause_reading()
        asyncio.get_running_loop().call_later(0.001, chan.resume_reading)

    def eof_received(self) -> bool:
        self._done.set_result(self._got)
        self._chan.exit(0)
        return False


@pytest.mark.parametrize("features", ["all", "none"])
def test_paused_channel_buffers_no_more_than_its_window(features: str) -> None:
    """Data queued while reading is paused still counts against the window
    (asyncssh re-opened the whole window on every resume: unbounded buffering)."""
    size = 8 * 1024 * 1024

    async def run() -> tuple[int, int, int]:
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        sessions: list[_SlowReader] = []

        class Server(_AnyoneServer):
            def session_requested(self) -> _SlowReader:
                sessions.append(_SlowReader(done))
                return sessions[-1]

        server = await asyncssh.create_server(
            Server, "127.0.0.1", 0, server_host_keys=[host_key], encoding=None, config=None
        )
        port = server.sockets[0].getsockname()[1]
        async with asyncssh.connect(
            "127.0.0.1", port, **_client_options(client_key, "aes128-gcm@openssh.com")
        ) as conn:
            writer, _, _ = await conn.open_session(encoding=None)
            chunk = b"\0" * 65536
            for _ in range(size // len(chunk)):
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()
            got = await asyncio.wait_for(done, 30)
            window = writer.channel.get_recv_window()
        server.close()
        await server.wait_closed()
        return got, sessions[0].peak, window

    fastpath.revert()
    try:
        assert fastpath.apply(fastpath.features_from_env(features))
        got, peak, window = asyncio.run(run())
    finally:
        fastpath.revert()
    assert got == size
    assert peak <= window, f"{peak} bytes in flight or queued, window {window}"
