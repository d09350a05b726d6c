"""``exact_receive``: reads handed to asyncssh's parser in the pieces it waits for.

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
"""

from __future__ import annotations

from typing import Any

from asyncssh.connection import SSHConnection
from asyncssh.misc import DisconnectError

from bastion.fastpath import pins


def install() -> None:
    """Replace asyncssh's ``data_received`` (rather than wrap it).

    asyncssh's own is ``self._inpbuf += data; self._recv_data()``, and
    ``_recv_data`` resets the keepalive timer, then runs the parser until it
    wants more. Here the timer is reset once per read as before, and the
    parser loop (:func:`_parse`, the rest of ``_recv_data``) runs once per
    piece. Installed after fast_receive, whose parser step it recognises.
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

    pins.replace(SSHConnection, "data_received", exact_data_received)


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
