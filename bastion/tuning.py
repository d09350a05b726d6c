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
import socket
from collections.abc import Callable, Collection
from typing import Any

import asyncssh
from cryptography.hazmat.primitives.ciphers.modes import CTR

log = logging.getLogger("bastion.tuning")

try:  # internals: a different asyncssh may have moved them
    from asyncssh.connection import SSHConnection
    from asyncssh.constants import MSG_IGNORE
    from asyncssh.crypto.cipher import BasicCipher
    from asyncssh.encryption import BasicEncryption, ChachaEncryption, GCMEncryption
    from asyncssh.logging import SSHLogger
    from asyncssh.packet import SSHPacketLogger
except ImportError as exc:  # pragma: no cover - only on an unverified asyncssh
    _IMPORT_PROBLEM: str | None = f"asyncssh internals not found: {exc}"
else:
    _IMPORT_PROBLEM = None

FEATURES = ("skip_ignore", "quiet_packet_log", "quickack", "coalesce_writes")

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


def _install(features: frozenset[str]) -> None:
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

    if "quickack" in features:
        data_received = _replace(SSHConnection, "data_received", None)

        def patched_data_received(self: SSHConnection, data: bytes, datatype: Any = None) -> None:
            if len(data) < QUICKACK_BELOW or not self._auth_complete:
                quickack(self._transport)
            data_received(self, data, datatype)

        SSHConnection.data_received = patched_data_received  # type: ignore[method-assign]

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
    _State.features = frozenset()
