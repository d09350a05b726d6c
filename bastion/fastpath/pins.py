"""What the patches stand on: fingerprints of asyncssh's code, and what they replaced.

Every function a patch replaces or relies on is pinned by the sha256 (first
16 hex digits) of its source. If asyncssh is upgraded and one of them
changes, :func:`mismatches` says so, :func:`bastion.fastpath.apply` installs
nothing and ``tests/test_fastpath.py`` fails: re-read the changed functions,
re-check the patches, then update ``FINGERPRINTS`` (:func:`fingerprint`
prints the new values) and ``VERIFIED_VERSIONS``.

Every attribute a patch sets goes through :func:`replace` or :func:`add`,
which keep what was there for :func:`revert`.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from typing import Any

import asyncssh

from bastion.fastpath import VERIFIED_VERSIONS

try:  # internals: a different asyncssh may have moved them
    from asyncssh.channel import SSHChannel
    from asyncssh.config import SSHConfig
    from asyncssh.connection import SSHConnection, SSHServerConnection, SSHServerConnectionOptions
    from asyncssh.crypto import chacha
    from asyncssh.crypto.chacha import ChachaCipher
    from asyncssh.crypto.cipher import BasicCipher, GCMCipher
    from asyncssh.encryption import BasicEncryption
    from asyncssh.logging import SSHLogger
    from asyncssh.packet import SSHPacketHandler, SSHPacketLogger
except ImportError as exc:  # pragma: no cover - only on an unverified asyncssh
    IMPORT_PROBLEM: str | None = f"asyncssh internals not found: {exc}"
else:
    IMPORT_PROBLEM = None

# the sha256 (first 16 hex digits) of the source of every function the
# speed-ups replace or rely on
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

# the window fix's (checked on its own: it is installed whatever the features)
WINDOW_FIX_FINGERPRINTS = {
    "SSHChannel._deliver_data": "bd94ccbaa59ab510",
    "SSHChannel._accept_data": "33121e9e185c9850",
    "SSHChannel._flush_recv_buf": "22d7ff2363a4d38d",
}

# stands for "no such attribute before" among the originals
_ABSENT = object()


class State:
    """What is installed: feature names, the window fix, the originals replaced."""

    features: frozenset[str] = frozenset()
    window_fix = False
    originals: dict[tuple[type, str], Any] = {}
    # run by revert() before the originals are put back
    on_revert: list[Callable[[], None]] = []


def fingerprint(func: Callable[..., Any]) -> str:
    """First 16 hex digits of the sha256 of a function's source."""
    return hashlib.sha256(inspect.getsource(func).encode()).hexdigest()[:16]


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
        "chacha.chacha20": chacha.chacha20,
        "chacha.poly1305_key": chacha.poly1305_key,
        "SSHChannel._flush_send_buf": SSHChannel._flush_send_buf,
        "SSHChannel.send_packet": SSHChannel.send_packet,
        "SSHServerConnection.reload_config": SSHServerConnection.reload_config,
        "SSHServerConnectionOptions.prepare": SSHServerConnectionOptions.prepare,
        "SSHConfig.load": SSHConfig.__dict__["load"].__func__,
        "SSHConfig.__init__": SSHConfig.__init__,
        "SSHConnection._finish_userauth": SSHConnection._finish_userauth,
        "SSHChannel._process_data": SSHChannel._process_data,
        "SSHChannel._accept_data": SSHChannel._accept_data,
        "SSHPacketHandler.process_packet": SSHPacketHandler.process_packet,
    }


def mismatches() -> list[str]:
    """Why the patches would not be safe on the running asyncssh (empty: they are)."""
    problems: list[str] = []
    if not asyncssh.__version__.startswith(VERIFIED_VERSIONS):
        problems.append(f"asyncssh {asyncssh.__version__} is not a verified version")
    if IMPORT_PROBLEM is not None:
        return [*problems, IMPORT_PROBLEM]
    current = _functions()
    for (owner, attr), original in State.originals.items():
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


def replace(owner: type, attr: str, new: Any) -> None:
    """Set ``owner.attr`` (its own, not inherited) to ``new`` until :func:`revert`."""
    original = owner.__dict__[attr]
    State.originals.setdefault((owner, attr), original)
    setattr(owner, attr, new)


def add(owner: type, attr: str, value: Any) -> None:
    """Give ``owner`` an attribute it did not have, until :func:`revert`."""
    State.originals.setdefault((owner, attr), owner.__dict__.get(attr, _ABSENT))
    setattr(owner, attr, value)


def revert() -> None:
    """Put asyncssh back as it was: the revert hooks first, then the originals."""
    hooks, State.on_revert = State.on_revert, []
    for hook in hooks:
        hook()
    for (owner, attr), original in State.originals.items():
        if original is _ABSENT:
            delattr(owner, attr)
        else:
            setattr(owner, attr, original)
    State.originals = {}
    State.features = frozenset()
    State.window_fix = False
