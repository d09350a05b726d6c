"""``fast_receive``: the receiving twin of ``fast_channel_data``.

A channel data packet went through asyncssh's general dispatch: payload copy,
an ``SSHPacket``, the type checks, the packet log call, the channel's handler
table, ``get_string`` (another copy) and ``check_end``. Once keys are in place,
authentication is done and there is no compression and no debug logging, the
packet is decrypted and MAC-checked exactly as asyncssh does it; if it is a
well-formed MSG_CHANNEL_DATA for an open channel within its window, its data
goes straight to asyncssh's own ``_accept_data`` (window accounting, pausing,
delivery) and ``_finish_recv_packet`` (sequence number). Everything else (a
padding or length that does not add up, an unknown or closed channel, a window
overrun, every other packet type, key exchange included) is handed to
asyncssh's ``_recv_packet`` with the plaintext already computed, so asyncssh's
checks and errors apply to it unchanged.

Installed before ``exact_receive``, which recognises the parser step by the
function it finds on the class.
"""

from __future__ import annotations

from typing import Any

from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_CHANNEL_DATA
from asyncssh.logging import SSHLogger
from asyncssh.misc import MACError

from bastion.fastpath import pins


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


def install() -> None:
    recv_packet = SSHConnection._recv_packet

    def fast_recv_packet(self: SSHConnection) -> bool:
        enc = self._recv_encryption
        if (
            enc is None
            or not self._auth_complete
            or self._decompressor
            # asyncssh logs each data packet at debug level 2 and up
            or SSHLogger._debug_level >= 2
        ):
            return recv_packet(self)
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
            return recv_packet(self)
        finally:
            if self._recv_encryption is stand_in:  # not replaced by new keys
                self._recv_encryption = enc

    pins.replace(SSHConnection, "_recv_packet", fast_recv_packet)
