"""Speed-ups that reach into asyncssh internals, applied once at start.

A relayed byte costs the bastion one decryption and one encryption, and
almost all the rest of its CPU is asyncssh's per-packet Python. Each change
below was profiled (py-spy) and measured with ``bench/`` (``python -m
bench.run``; results in ``bench/results/latest.md``):

``skip_ignore``
    No empty SSH_MSG_IGNORE before every packet with AEAD or CTR ciphers.
    asyncssh sends one ahead of every encrypted non-kex packet: the old
    countermeasure (RFC 4251 §9.3.1, OpenSSH's CBC-era mitigation) against
    the chosen-plaintext attack on CBC mode, where the IV of the next packet
    is the last ciphertext block of the previous one and so is known to an
    observer. AES-GCM (fresh nonce per packet), chacha20-poly1305 (sequence
    number as nonce) and AES-CTR (RFC 4344, designed as the fix for exactly
    this attack) have no IV chaining, and OpenSSH sends nothing of the kind
    with them. The IGNORE is empty, so it never hid lengths either. With every
    other cipher (CBC, arcfour, anything unknown) it is still sent. Saves an
    encryption and a packet per data packet.
``quiet_packet_log``
    asyncssh formats a name and byte count for every packet it sends or
    receives, then drops the text unless ``asyncssh.set_debug_level(3)`` is
    on. The formatting is now skipped below level 3; at level 3 the log lines
    are the same as before.
``quickack``
    TCP_QUICKACK re-armed on every receive until the connection is
    authenticated, and afterwards on every short read. OpenSSH leaves Nagle's
    algorithm on during the handshake and for sessions without a terminal;
    with the kernel's delayed ACKs on our side its next small write waits up
    to 40 ms for our ACK (after the channel open, between exit status and
    close, ...). Bulk reads skip it: full segments are never held by Nagle.
    Applies to the person's and the upstream leg; ``relay.py`` does the same
    (:func:`quickack`) on the bastion's own TCP connections for ``ssh -J``.
``coalesce_writes``
    Every packet was its own ``send()``: on loopback and fast networks the
    per-call kernel work (segment, wake the receiver) cost as much as the
    encryption. Packets produced in one turn of the event loop now go out in
    one ``write()`` at the start of the next turn (microseconds later),
    on the transport they were produced for, before any close that asyncssh
    schedules afterwards (its ``_force_close`` aborts with ``call_soon`` too,
    so it runs after the flush).
``exact_receive``
    asyncssh appends every read (up to 256 KiB, several packets) to one
    buffer and, after each packet it parses, copies the rest of the buffer
    to drop the packet: the copying grows with the square of the packets per
    read, and was 18 % of the relay's CPU. Reads are now handed to asyncssh
    in exactly the pieces its parser waits for (the rest of the header
    block, then the rest of the packet), so its buffer never holds more than
    the packet being parsed. The parser, its checks and its error handling
    are asyncssh's own; only the slicing moved (and the keepalive timer is
    still reset once per read, not once per piece). While asyncssh is in another
    state (version exchange, a packet handled asynchronously) or after a
    parse error or disconnect, the read goes to it whole, as before.
``reuse_aead``
    AES-GCM: asyncssh built a new ``AESGCM`` object, which sets up an OpenSSL
    context for the key, for every packet; it is now built once per key. The
    nonce handling (asyncssh's ``_update_iv``) is untouched.
    chacha20-poly1305@openssh.com: the Poly1305 key is the first 32 bytes of
    ChaCha20 block 0 and the payload is encrypted from block 1 with the same
    key and nonce; asyncssh set up two new ChaCha20 contexts for that per
    packet, a third for the length, and copied header and payload into one
    string to authenticate them. Now each cipher keeps one context per key
    and moves it to the packet's nonce (``reset_nonce``, block counter 0: the
    same key stream as a new context; cryptography >= 43, else new contexts
    as before); the payload context yields block 0 and then continues at
    block 1, and Poly1305 is fed header and payload in turn. Output is byte-identical
    (``tests/test_tuning.py`` compares against asyncssh's own functions), the
    tag is still checked before anything is decrypted.

The environment variable ``BASTION_TUNING`` picks the features at start:
unset or ``all`` for every one, ``none`` for plain asyncssh, or a comma-separated
list. It exists to compare with and without (``bench/``) and to rule the
patches out when chasing a problem; there is no reason to turn them off
otherwise.

``fast_channel_data``
    A channel data packet went through four layers (the channel's flush
    loop, its ``send_packet``, the IGNORE check, the connection's
    ``send_packet``), each concatenating the payload again: about eight
    copies of every 32 KiB. Once keys are in place, authentication is done,
    no rekey is due, compression is off and packet logging is not asked for,
    the flush loop now builds the packet in one join and has the cipher seal
    it, with the same padding (random bytes, the same length rule), sequence
    number and rekey byte count as asyncssh. Anything else (extended data,
    EOF, a rekey coming due, CBC ciphers, which still get their IGNORE) takes
    asyncssh's own path, packet by packet.

``fast_receive``
    The receiving twin of ``fast_channel_data``. A channel data packet went
    through asyncssh's general dispatch: payload copy, an ``SSHPacket``,
    the type checks, the packet log call, the channel's handler table,
    ``get_string`` (another copy) and ``check_end``. Once keys are in place,
    authentication is done and there is no compression and no debug
    logging, the packet is decrypted and MAC-checked exactly as asyncssh
    does it; if it is a well-formed MSG_CHANNEL_DATA for an open channel
    within its window, its data goes straight to asyncssh's own
    ``_accept_data`` (window accounting, pausing, delivery) and
    ``_finish_recv_packet`` (sequence number). Everything else (a padding
    or length that does not add up, an unknown or closed channel, a window
    overrun, every other packet type, key exchange included) is handed to
    asyncssh's ``_recv_packet`` with the plaintext already computed, so
    asyncssh's checks and errors apply to it unchanged.

``static_server_options``
    At the start of every login asyncssh rebuilds the server's options in a
    worker thread (``reload_config``) so that ``Match`` blocks of an
    sshd-style config file can be applied for this user and address. The
    bastion's listener has no config file (``config=None``) and no reverse
    DNS, so the rebuild yields the same values again; it is now skipped when
    the options carry no loaded config file and no reverse DNS lookup, and
    done as before otherwise (``tests/test_tuning.py`` checks a ``Match User``
    block still takes effect). Saves a thread round trip and an options
    object per login.

Every function a patch replaces or relies on is pinned by a fingerprint of
its source. On an asyncssh whose code differs from the verified one,
:func:`apply` changes nothing and logs a warning (the relay works, only
slower), and ``tests/test_tuning.py`` fails so that someone re-verifies.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import os
import socket
import time
from collections.abc import Callable, Collection
from typing import Any

import asyncssh
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.ciphers.algorithms import ChaCha20
from cryptography.hazmat.primitives.ciphers.modes import CTR
from cryptography.hazmat.primitives.poly1305 import Poly1305

log = logging.getLogger("bastion.tuning")

try:  # internals: a different asyncssh may have moved them
    from asyncssh.channel import SSHChannel
    from asyncssh.config import SSHConfig
    from asyncssh.connection import SSHConnection, SSHServerConnection, SSHServerConnectionOptions
    from asyncssh.constants import (
        MSG_CHANNEL_DATA,
        MSG_CHANNEL_EOF,
        MSG_CHANNEL_EXTENDED_DATA,
        MSG_CHANNEL_WINDOW_ADJUST,
        MSG_IGNORE,
    )
    from asyncssh.crypto.chacha import ChachaCipher
    from asyncssh.crypto.cipher import BasicCipher, GCMCipher
    from asyncssh.encryption import BasicEncryption, ChachaEncryption, GCMEncryption
    from asyncssh.logging import SSHLogger
    from asyncssh.misc import DisconnectError, MACError, ProtocolError
    from asyncssh.packet import SSHPacketLogger, String, UInt32
except ImportError as exc:  # pragma: no cover - only on an unverified asyncssh
    _IMPORT_PROBLEM: str | None = f"asyncssh internals not found: {exc}"
else:
    _IMPORT_PROBLEM = None

FEATURES = (
    "skip_ignore",
    "quiet_packet_log",
    "quickack",
    "coalesce_writes",
    "exact_receive",
    "reuse_aead",
    "fast_channel_data",
    "static_server_options",
    "fast_receive",
)

# asyncssh versions the patches were verified against, and the sha256 (first
# 16 hex digits) of the source of every function they replace or rely on
VERIFIED_VERSIONS = ("2.24.",)
FINGERPRINTS = {
    "SSHConnection.send_packet": "fb9da7bec6dd395a",
    "SSHConnection.data_received": "b2d14a83b2604db6",
    "SSHConnection._send": "c6698a37eb80f574",
    "SSHConnection._force_close": "264b4367525f4f86",
    "SSHPacketLogger._log_packet": "f3263d7da93663f1",
    "SSHPacketLogger.log_sent_packet": "d21306e3c6b2b2f5",
    "SSHPacketLogger.log_received_packet": "38e8df0c0c53ac0a",
    "SSHLogger.packet": "a4baf6329fa97dcf",
    "BasicEncryption.__init__": "4037a63eec54ea3e",
    "BasicCipher.__init__": "78d7970eba3ac6f8",
    "SSHConnection._recv_data": "fc4e0735191bb0fd",
    "SSHConnection._recv_pkthdr": "7adc4d88fe20593c",
    "SSHConnection._recv_packet": "b3daa22e9763eee9",
    "SSHConnection._finish_recv_packet": "e12d96db58b3524e",
    "SSHConnection._reset_keepalive_timer": "7a9157707c514524",
    "GCMCipher.__init__": "8dbe9e768f4ecf7a",
    "GCMCipher.encrypt_and_sign": "adb87dbdb4f9039a",
    "GCMCipher.verify_and_decrypt": "c09eb5b36d0f6a92",
    "ChachaCipher.__init__": "b9689bf565276ccb",
    "ChachaCipher.encrypt_and_sign": "f9b87e5614981c32",
    "ChachaCipher.verify_and_decrypt": "0ab7b7420976f2f6",
    "ChachaCipher.decrypt_header": "44feda66527a87d0",
    "chacha.chacha20": "8fd99dfce8c7c885",
    "chacha.poly1305_key": "c8627dfb53b0c702",
    "SSHChannel._flush_send_buf": "3f11e9dc27c58b18",
    "SSHChannel.send_packet": "00e81b763c8f3dd2",
    "SSHServerConnection.reload_config": "d78b0be8399d5491",
    "SSHServerConnectionOptions.prepare": "72d1b32ec5b11078",
    "SSHConfig.load": "aefeb793e46ab83a",
    "SSHConfig.__init__": "07f826d2967ce4c6",
    "SSHConnection._finish_userauth": "bd2146536318273d",
    "SSHChannel._process_data": "342490795c4b893c",
    "SSHChannel._accept_data": "33121e9e185c9850",
    "SSHPacketHandler.process_packet": "490a59d971d0ce03",
}

# the window fix (not a speed-up: installed whatever BASTION_TUNING says)
WINDOW_FIX_FINGERPRINTS = {
    "SSHChannel._deliver_data": "bd94ccbaa59ab510",
    "SSHChannel._accept_data": "33121e9e185c9850",
    "SSHChannel._flush_recv_buf": "22d7ff2363a4d38d",
}

# reads shorter than this re-arm TCP_QUICKACK after authentication: a peer
# with Nagle on may be holding its next small packet until we ACK this one;
# bulk reads are full segments, which Nagle never holds
QUICKACK_BELOW = 16 * 1024
# what asyncssh passes as the payload of its empty IGNORE: String(b'')
_EMPTY_STRING = b"\x00\x00\x00\x00"


def _functions() -> dict[str, Callable[..., Any]]:
    return {
        "SSHConnection.send_packet": SSHConnection.send_packet,
        "SSHConnection.data_received": SSHConnection.data_received,
        "SSHConnection._send": SSHConnection._send,
        "SSHConnection._force_close": SSHConnection._force_close,
        "SSHPacketLogger._log_packet": SSHPacketLogger._log_packet,
        "SSHPacketLogger.log_sent_packet": SSHPacketLogger.log_sent_packet,
        "SSHPacketLogger.log_received_packet": SSHPacketLogger.log_received_packet,
        "SSHLogger.packet": SSHLogger.packet,
        "BasicEncryption.__init__": BasicEncryption.__init__,
        "BasicCipher.__init__": BasicCipher.__init__,
        "SSHConnection._recv_data": SSHConnection._recv_data,
        "SSHConnection._recv_pkthdr": SSHConnection._recv_pkthdr,
        "SSHConnection._recv_packet": SSHConnection._recv_packet,
        "SSHConnection._finish_recv_packet": SSHConnection._finish_recv_packet,
        "SSHConnection._reset_keepalive_timer": SSHConnection._reset_keepalive_timer,
        "GCMCipher.__init__": GCMCipher.__init__,
        "GCMCipher.encrypt_and_sign": GCMCipher.encrypt_and_sign,
        "GCMCipher.verify_and_decrypt": GCMCipher.verify_and_decrypt,
        "ChachaCipher.__init__": ChachaCipher.__init__,
        "ChachaCipher.encrypt_and_sign": ChachaCipher.encrypt_and_sign,
        "ChachaCipher.verify_and_decrypt": ChachaCipher.verify_and_decrypt,
        "ChachaCipher.decrypt_header": ChachaCipher.decrypt_header,
        "chacha.chacha20": asyncssh.crypto.chacha.chacha20,
        "chacha.poly1305_key": asyncssh.crypto.chacha.poly1305_key,
        "SSHChannel._flush_send_buf": SSHChannel._flush_send_buf,
        "SSHChannel.send_packet": SSHChannel.send_packet,
        "SSHServerConnection.reload_config": SSHServerConnection.reload_config,
        "SSHServerConnectionOptions.prepare": SSHServerConnectionOptions.prepare,
        "SSHConfig.load": SSHConfig.__dict__["load"].__func__,
        "SSHConfig.__init__": SSHConfig.__init__,
        "SSHConnection._finish_userauth": SSHConnection._finish_userauth,
        "SSHChannel._process_data": SSHChannel._process_data,
        "SSHChannel._accept_data": SSHChannel._accept_data,
        "SSHPacketHandler.process_packet": asyncssh.packet.SSHPacketHandler.process_packet,
    }


class _State:
    """What is installed: feature names and the original attributes replaced."""

    features: frozenset[str] = frozenset()
    originals: dict[tuple[type, str], Any] = {}


def fingerprint(func: Callable[..., Any]) -> str:
    """First 16 hex digits of the sha256 of a function's source."""
    return hashlib.sha256(inspect.getsource(func).encode()).hexdigest()[:16]


def mismatches() -> list[str]:
    """Why the patches would not be safe on the running asyncssh (empty: they are)."""
    problems: list[str] = []
    if not asyncssh.__version__.startswith(VERIFIED_VERSIONS):
        problems.append(f"asyncssh {asyncssh.__version__} is not a verified version")
    if _IMPORT_PROBLEM is not None:
        return [*problems, _IMPORT_PROBLEM]
    current = _functions()
    for (owner, attr), original in _State.originals.items():
        current[f"{owner.__name__}.{attr}"] = original
    for name, expected in FINGERPRINTS.items():
        try:
            got = fingerprint(current[name])
        except (OSError, TypeError, KeyError) as exc:
            problems.append(f"{name}: source unavailable ({exc})")
            continue
        if got != expected:
            problems.append(f"{name} changed (source fingerprint {got}, verified {expected})")
    return problems


def ignore_is_redundant(encryption: object) -> bool:
    """True for ciphers without IV chaining (AEAD, CTR): the IGNORE adds nothing."""
    if isinstance(encryption, GCMEncryption | ChachaEncryption):
        return True
    if isinstance(encryption, BasicEncryption):  # also ETMEncryption
        basic = getattr(encryption, "_cipher", None)
        cipher = getattr(basic, "_cipher", None)
        return isinstance(getattr(cipher, "mode", None), CTR)
    return False


def quickack(transport: Any) -> None:
    """Have the kernel ACK what ``transport`` received at once (TCP only)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        # a Unix socket refuses: nothing to do there
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


# packets produced this turn of the event loop, per connection, with the
# transport they were produced for (asyncssh drops its reference on close)
_Pending = tuple[Any, list[bytes]]
_pending: dict[SSHConnection, _Pending] = {}


def _flush(conn: SSHConnection, pending: _Pending) -> None:
    if _pending.get(conn) is pending:
        del _pending[conn]
    transport, chunks = pending
    with contextlib.suppress(ConnectionError):
        # one write(): every transport asyncssh uses has it (not all have writelines)
        transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))


def _replace(owner: type, attr: str, new: Any) -> Any:
    original = owner.__dict__[attr]
    _State.originals.setdefault((owner, attr), original)
    setattr(owner, attr, new)
    return original


def _exact_receiver() -> Callable[..., None]:
    """``data_received`` that hands asyncssh's parser each read in the pieces it waits for.

    asyncssh's own ``data_received`` is ``self._inpbuf += data;
    self._recv_data()``, and ``_recv_data`` resets the keepalive timer, then
    runs the parser until it wants more. Here the timer is reset once per
    read as before, and the parser loop (:func:`_parse`, the rest of
    ``_recv_data``) runs once per piece.
    """
    recv_pkthdr = SSHConnection._recv_pkthdr
    recv_packet = SSHConnection._recv_packet

    def exact_data_received(self: SSHConnection, data: bytes, datatype: Any = None) -> None:
        self._reset_keepalive_timer()
        pos = 0
        end = len(data)
        while True:
            step = getattr(self._recv_handler, "__func__", None)
            if step is recv_pkthdr:
                # the first cipher block, which holds the packet length
                need = self._recv_blocksize - len(self._inpbuf)
            elif step is recv_packet:
                # the rest of the packet and its MAC (what _recv_packet checks for)
                need = (
                    4 + self._pktlen + self._recv_macsize - self._recv_blocksize - len(self._inpbuf)
                )
            else:
                need = 0
            if need <= 0 or end - pos <= need:
                self._inpbuf += data[pos:] if pos else data
                _parse(self)
                return
            self._inpbuf += data[pos : pos + need]
            pos += need
            _parse(self)
            if self._inpbuf or not self._transport:
                # asyncssh stopped short of its piece (an error, a disconnect):
                # keep the rest in its buffer, unparsed, as it would have
                self._inpbuf += data[pos:]
                return

    return exact_data_received


def _parse(self: SSHConnection) -> None:
    """asyncssh's ``_recv_data`` without its keepalive reset (fingerprinted)."""
    try:
        while self._inpbuf and self._recv_handler():
            pass
    except DisconnectError as exc:
        self._send_disconnect(exc.code, exc.reason, exc.lang)
        self._force_close(exc)
    except Exception:  # asyncssh's own catch-all, kept as is
        self.internal_error()


def _install_reuse_aead() -> None:
    gcm_init = _replace(GCMCipher, "__init__", None)
    _replace(GCMCipher, "encrypt_and_sign", None)
    _replace(GCMCipher, "verify_and_decrypt", None)
    gcm_mac_size = 16
    update_iv = GCMCipher._update_iv

    def gcm_init_once(self: GCMCipher, cipher_name: str, key: bytes, iv: bytes) -> None:
        gcm_init(self, cipher_name, key, iv)
        self._bastion_aead = AESGCM(self._key)  # type: ignore[attr-defined]

    def gcm_encrypt_and_sign(self: GCMCipher, header: bytes, data: bytes) -> tuple[bytes, bytes]:
        data = self._bastion_aead.encrypt(self._iv, data, header)  # type: ignore[attr-defined]
        update_iv(self)
        return header + data[:-gcm_mac_size], data[-gcm_mac_size:]

    def gcm_verify_and_decrypt(
        self: GCMCipher, header: bytes, data: bytes, mac: bytes
    ) -> bytes | None:
        try:
            decrypted: bytes | None = self._bastion_aead.decrypt(  # type: ignore[attr-defined]
                self._iv, data + mac, header
            )
        except InvalidTag:
            decrypted = None
        update_iv(self)
        return decrypted

    GCMCipher.__init__ = gcm_init_once  # type: ignore[method-assign]
    GCMCipher.encrypt_and_sign = gcm_encrypt_and_sign  # type: ignore[method-assign]
    GCMCipher.verify_and_decrypt = gcm_verify_and_decrypt  # type: ignore[method-assign]

    _replace(ChachaCipher, "encrypt_and_sign", None)
    _replace(ChachaCipher, "verify_and_decrypt", None)
    _replace(ChachaCipher, "decrypt_header", None)
    block0 = bytes(64)  # ChaCha20 block 0: its first 32 bytes are the Poly1305 key
    counter0 = bytes(8)  # asyncssh's ChaCha20 nonce: 64-bit block counter 0, then the seq
    # cryptography >= 43 re-starts a context at a new nonce (block counter 0),
    # the same key stream as a new context, without OpenSSL's cipher set-up
    resettable = hasattr(Cipher(ChaCha20(bytes(32), bytes(16)), None).encryptor(), "reset_nonce")

    def chacha_context(self: ChachaCipher, which: int, nonce: bytes) -> Any:
        """ChaCha20 at block 0 of ``nonce``, keyed with ``_adkey`` (0) or ``_key`` (1)."""
        key = self._adkey if which == 0 else self._key
        if not resettable:
            return Cipher(ChaCha20(key, counter0 + nonce), mode=None).encryptor()
        contexts = self.__dict__.get("_bastion_contexts")
        if contexts is None:
            contexts = tuple(
                Cipher(ChaCha20(k, bytes(16)), mode=None).encryptor()
                for k in (self._adkey, self._key)
            )
            self._bastion_contexts = contexts  # type: ignore[attr-defined]
        context = contexts[which]
        context.reset_nonce(counter0 + nonce)
        return context

    def chacha_stream(self: ChachaCipher, nonce: bytes) -> tuple[Any, bytes]:
        """The payload context at block 1 and the Poly1305 key from block 0."""
        stream = chacha_context(self, 1, nonce)
        return stream, stream.update(block0)[:32]

    def chacha_decrypt_header(self: ChachaCipher, header: bytes, nonce: bytes) -> bytes:
        return chacha_context(self, 0, nonce).update(header)  # type: ignore[no-any-return]

    def chacha_encrypt_and_sign(
        self: ChachaCipher, header: bytes, data: bytes, nonce: bytes
    ) -> tuple[bytes, bytes]:
        header = chacha_context(self, 0, nonce).update(header)
        stream, poly_key = chacha_stream(self, nonce)
        data = stream.update(data)
        mac = Poly1305(poly_key)
        mac.update(header)
        mac.update(data)
        return header + data, mac.finalize()

    def chacha_verify_and_decrypt(
        self: ChachaCipher, header: bytes, data: bytes, nonce: bytes, tag: bytes
    ) -> bytes | None:
        stream, poly_key = chacha_stream(self, nonce)
        mac = Poly1305(poly_key)
        mac.update(header)
        mac.update(data)
        try:
            mac.verify(tag)
        except InvalidSignature:
            return None
        return stream.update(data)  # type: ignore[no-any-return]

    ChachaCipher.encrypt_and_sign = chacha_encrypt_and_sign  # type: ignore[method-assign]
    ChachaCipher.verify_and_decrypt = chacha_verify_and_decrypt  # type: ignore[method-assign]
    ChachaCipher.decrypt_header = chacha_decrypt_header  # type: ignore[method-assign]


def _install_fast_channel_data(*, skip_ignore: bool, coalesced: bool) -> None:
    _replace(SSHChannel, "_flush_send_buf", None)

    def send_data_fast(conn: SSHConnection, chan: SSHChannel[Any], data: Any) -> bool:
        """Send ``data`` as one MSG_CHANNEL_DATA the way asyncssh's
        ``send_packet`` would; False when asyncssh has to do it itself."""
        enc = conn._send_encryption
        if (
            enc is None
            or chan._send_chan is None
            or not conn._auth_complete
            or not conn._kex_complete
            or conn._compressor is not None
            or conn._rekey_bytes_sent >= conn._rekey_bytes
            or (conn._rekey_seconds and time.monotonic() >= conn._rekey_time)
            or SSHLogger._debug_level >= 3
            # asyncssh would put an IGNORE first: only skipped where that is safe
            or not (skip_ignore and ignore_is_redundant(enc))
        ):
            return False
        n = len(data)
        # payload: type, recipient channel, data length, data (9 + n bytes)
        padlen = -(conn._send_enchdrlen + 9 + n) % conn._send_blocksize
        if padlen < 4:
            padlen += conn._send_blocksize
        packet = b"".join(
            (
                bytes((padlen, MSG_CHANNEL_DATA)),
                chan._send_chan.to_bytes(4, "big"),
                n.to_bytes(4, "big"),
                data,
                os.urandom(padlen),
            )
        )
        pktlen = len(packet)
        seq = conn._send_seq
        sealed, mac = enc.encrypt_packet(seq, pktlen.to_bytes(4, "big"), packet)
        if coalesced:
            conn._send(sealed)  # the pieces are joined into one write
            if mac:
                conn._send(mac)
        else:
            conn._send(sealed + mac)
        conn._send_seq = (seq + 1) & 0xFFFFFFFF
        conn._rekey_bytes_sent += pktlen
        return True

    def fast_flush_send_buf(self: SSHChannel[Any]) -> None:
        # asyncssh's _flush_send_buf, with send_data_fast for plain data
        conn = self._conn
        assert conn is not None
        while self._send_buf and self._send_window:
            pktsize = min(self._send_window, self._send_pktsize)
            buf, datatype = self._send_buf[0]
            if len(buf) > pktsize:
                data = buf[:pktsize]
                del buf[:pktsize]
            else:
                data = buf
                del self._send_buf[0]
            self._send_buf_len -= len(data)
            self._send_window -= len(data)
            if datatype is None:
                if not send_data_fast(conn, self, data):
                    self.send_packet(MSG_CHANNEL_DATA, String(data))  # type: ignore[arg-type]
            else:
                self.send_packet(
                    MSG_CHANNEL_EXTENDED_DATA,
                    UInt32(datatype),
                    String(data),  # type: ignore[arg-type]
                )
        self._pause_resume_writing()
        if not self._send_buf:
            if self._send_state == "eof_pending":
                self.send_packet(MSG_CHANNEL_EOF)
                self._send_state = "eof"
            elif self._send_state == "close_pending":
                self._close_send()

    SSHChannel._flush_send_buf = fast_flush_send_buf  # type: ignore[method-assign]


class _Plaintext:
    """Stands in for the receive cipher during one call of asyncssh's
    ``_recv_packet``: the packet has been decrypted and its MAC checked
    already (that advanced the cipher's nonce, so it cannot be done twice)."""

    __slots__ = ("plaintext",)

    def __init__(self, plaintext: bytes) -> None:
        self.plaintext = plaintext

    def decrypt_packet(
        self, seq: int, first: bytes, rest: bytes, header_len: int, mac: bytes
    ) -> bytes:
        return self.plaintext


def _install_fast_receive() -> None:
    recv_packet = _replace(SSHConnection, "_recv_packet", None)

    def fast_recv_packet(self: SSHConnection) -> bool:
        enc = self._recv_encryption
        if (
            enc is None
            or not self._auth_complete
            or self._decompressor
            # asyncssh logs each data packet at debug level 2 and up
            or SSHLogger._debug_level >= 2
        ):
            return recv_packet(self)  # type: ignore[no-any-return]
        # asyncssh's own first steps: wait for the whole packet, decrypt, verify
        macsize = self._recv_macsize
        rem = 4 + self._pktlen + macsize - self._recv_blocksize
        inpbuf = self._inpbuf
        if len(inpbuf) < rem:
            return False
        seq = self._recv_seq
        plain = enc.decrypt_packet(
            seq, self._packet, inpbuf[: rem - macsize], 4, inpbuf[rem - macsize : rem]
        )
        if not plain:
            raise MACError("MAC verification failed")
        # padding length, type, recipient channel, data length, data, padding
        end = len(plain) - plain[0]
        if plain[0] >= 4 and end >= 10 and plain[1] == MSG_CHANNEL_DATA:
            chan = self._channels.get(int.from_bytes(plain[2:6], "big"))
            datalen = int.from_bytes(plain[6:10], "big")
            if (
                chan is not None
                and 10 + datalen == end
                and chan._recv_state == "open"
                and datalen <= chan._recv_window
            ):
                self._inpbuf = inpbuf[rem:]
                self._packet = b""
                chan._accept_data(plain[10:end])
                self._finish_recv_packet(MSG_CHANNEL_DATA, seq)
                return True
        # anything else: asyncssh's own code, on the plaintext it would have made
        stand_in: Any = _Plaintext(plain)
        self._recv_encryption = stand_in
        try:
            return recv_packet(self)  # type: ignore[no-any-return]
        finally:
            if self._recv_encryption is stand_in:  # not replaced by new keys
                self._recv_encryption = enc

    SSHConnection._recv_packet = fast_recv_packet  # type: ignore[method-assign]


def _install_window_fix() -> bool:
    """Credit the peer's window only for data handed to the session.

    asyncssh's ``_deliver_data`` sends a window adjust of ``init - window``
    whenever the window is below half, counting data still queued in
    ``_recv_buf`` (received while reading was paused) as consumed. Each
    resume that delivers one packet re-opens the whole window, so a channel
    paused and resumed often (flow control towards a slower sink) buffers
    without bound. Here the adjust is the bytes actually delivered since the
    last one (OpenSSH's ``local_consumed``): received + buffered never exceeds
    the window. With nothing buffered the packets sent are the same as asyncssh's.
    """
    if (SSHChannel, "_deliver_data") in _State.originals:
        return True
    funcs: dict[str, Callable[..., Any]] = {
        "SSHChannel._deliver_data": SSHChannel._deliver_data,
        "SSHChannel._accept_data": SSHChannel._accept_data,
        "SSHChannel._flush_recv_buf": SSHChannel._flush_recv_buf,
    }
    changed = [n for n, f in WINDOW_FIX_FINGERPRINTS.items() if fingerprint(funcs[n]) != f]
    if changed:
        log.warning("asyncssh channel window fix not applied (%s changed)", ", ".join(changed))
        return False
    _replace(SSHChannel, "_deliver_data", None)
    SSHChannel._recv_consumed = 0  # type: ignore[attr-defined]

    def deliver_data(self: SSHChannel[Any], data: bytes, datatype: Any) -> None:
        # asyncssh's _deliver_data; only the adjust differs
        consumed = self._recv_consumed + len(data)  # type: ignore[attr-defined]
        if consumed > self._init_recv_window / 2:
            self._recv_window += consumed
            self.logger.debug2(
                "Sending window adjust of %d bytes, new window %d", consumed, self._recv_window
            )
            self.send_packet(MSG_CHANNEL_WINDOW_ADJUST, UInt32(consumed))
            consumed = 0
        self._recv_consumed = consumed  # type: ignore[attr-defined]
        decoded: Any = data
        if self._encoding:
            try:
                assert self._decoder is not None
                decoded = self._decoder.decode(data)
            except UnicodeDecodeError as exc:
                raise ProtocolError(str(exc)) from None
        if self._session is not None:
            self._session.data_received(decoded, datatype)

    SSHChannel._deliver_data = deliver_data  # type: ignore[method-assign]
    return True


def _install(features: frozenset[str]) -> None:
    if "fast_receive" in features:
        # first: exact_receive recognises the parser step it installs
        _install_fast_receive()

    if "skip_ignore" in features:
        send_packet = _replace(SSHConnection, "send_packet", None)

        def patched_send_packet(
            self: SSHConnection, pkttype: int, *args: bytes, handler: Any = None
        ) -> None:
            if (
                pkttype == MSG_IGNORE
                and args == (_EMPTY_STRING,)
                and ignore_is_redundant(self._send_encryption)
            ):
                return
            send_packet(self, pkttype, *args, handler=handler)

        SSHConnection.send_packet = patched_send_packet  # type: ignore[method-assign]

    if "quickack" in features or "exact_receive" in features:
        data_received = _replace(SSHConnection, "data_received", None)
        if "exact_receive" in features:
            # replaces asyncssh's data_received rather than wrapping it
            data_received = _exact_receiver()
        if "quickack" in features:
            receive = data_received

            def quickack_data_received(
                self: SSHConnection, data: bytes, datatype: Any = None
            ) -> None:
                if len(data) < QUICKACK_BELOW or not self._auth_complete:
                    quickack(self._transport)
                receive(self, data, datatype)

            data_received = quickack_data_received
        SSHConnection.data_received = data_received  # type: ignore[method-assign]

    if "reuse_aead" in features:
        _install_reuse_aead()

    if "fast_channel_data" in features:
        _install_fast_channel_data(
            skip_ignore="skip_ignore" in features, coalesced="coalesce_writes" in features
        )

    if "static_server_options" in features:
        reload_config = _replace(SSHServerConnection, "reload_config", None)

        async def reload_config_if_it_can_differ(self: SSHServerConnection) -> None:
            # only a loaded config file (its Match blocks) or a reverse DNS
            # name can make the rebuilt options differ from the listener's
            config = getattr(self._options, "config", None)
            if getattr(config, "loaded", True) or self._rdns_lookup:
                await reload_config(self)

        SSHServerConnection.reload_config = reload_config_if_it_can_differ  # type: ignore[method-assign]

    if "quiet_packet_log" in features:
        log_packet = SSHPacketLogger._log_packet
        _replace(SSHPacketLogger, "log_sent_packet", None)
        _replace(SSHPacketLogger, "log_received_packet", None)

        def log_sent_packet(
            self: SSHPacketLogger, pkttype: int, pktid: int | None, packet: Any, note: str = ""
        ) -> None:
            if SSHLogger._debug_level >= 3:
                log_packet(self, "Sent", pkttype, pktid, packet, note)

        def log_received_packet(
            self: SSHPacketLogger, pkttype: int, pktid: int | None, packet: Any, note: str = ""
        ) -> None:
            if SSHLogger._debug_level >= 3:
                log_packet(self, "Received", pkttype, pktid, packet, note)

        SSHPacketLogger.log_sent_packet = log_sent_packet  # type: ignore[method-assign]
        SSHPacketLogger.log_received_packet = log_received_packet  # type: ignore[method-assign]

    if "coalesce_writes" in features:
        _replace(SSHConnection, "_send", None)

        def patched_send(self: SSHConnection, data: bytes) -> None:
            transport = self._transport
            if not transport:
                return
            pending = _pending.get(self)
            if pending is None:
                _pending[self] = pending = (transport, [data])
                self._loop.call_soon(_flush, self, pending)
            else:
                pending[1].append(data)

        SSHConnection._send = patched_send  # type: ignore[method-assign]


def apply(features: Collection[str] = FEATURES) -> bool:
    """Install the speed-ups once; False (and a warning) where asyncssh differs."""
    wanted = frozenset(features)
    if _IMPORT_PROBLEM is None:
        _install_window_fix()
    if not wanted:
        log.info("asyncssh speed-ups off (BASTION_TUNING=none)")
        return True
    unknown = wanted - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown tuning features: {', '.join(sorted(unknown))}")
    if _State.features:
        return _State.features == wanted
    problems = mismatches()
    if problems:
        log.warning(
            "asyncssh speed-ups not applied (relaying still works, only slower): %s",
            "; ".join(problems),
        )
        return False
    _install(wanted)
    _State.features = wanted
    log.info("asyncssh %s speed-ups applied: %s", asyncssh.__version__, ", ".join(sorted(wanted)))
    return True


def features_from_env(value: str | None) -> tuple[str, ...]:
    """The features ``BASTION_TUNING`` asks for (see the module docstring)."""
    text = (value or "all").strip().lower()
    if text == "all":
        return FEATURES
    if text == "none":
        return ()
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(set(names) - set(FEATURES))
    if unknown:
        raise ValueError(
            f"BASTION_TUNING: unknown feature {', '.join(unknown)} "
            f"(known: all, none, {', '.join(FEATURES)})"
        )
    return names


def applied() -> frozenset[str]:
    """The features installed now (empty when none)."""
    return _State.features


def revert() -> None:
    """Put asyncssh back as it was (for tests); pending writes are flushed first."""
    for conn, pending in list(_pending.items()):
        _flush(conn, pending)
    for (owner, attr), original in _State.originals.items():
        setattr(owner, attr, original)
    _State.originals = {}
    if "_recv_consumed" in SSHChannel.__dict__:
        del SSHChannel._recv_consumed  # type: ignore[attr-defined]
    _State.features = frozenset()
