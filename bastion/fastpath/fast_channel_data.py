"""``fast_channel_data``: a channel data packet built once and sealed directly.

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

Only with ``skip_ignore`` on does it skip the IGNORE asyncssh would send
first; with ``coalesce_writes`` on, the sealed packet and its MAC go to the
coalescing ``_send`` as two pieces.
"""

from __future__ import annotations

import os
import time
from typing import Any

from asyncssh.channel import SSHChannel
from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_CHANNEL_EOF, MSG_CHANNEL_EXTENDED_DATA
from asyncssh.logging import SSHLogger
from asyncssh.packet import String, UInt32

from bastion.fastpath import pins
from bastion.fastpath.skip_ignore import ignore_is_redundant


def install(*, skip_ignore: bool, coalesced: bool) -> None:
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

    pins.replace(SSHChannel, "_flush_send_buf", fast_flush_send_buf)
