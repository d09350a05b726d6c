"""``coalesce_writes``: the packets of one turn of the event loop in one write.

Every packet was its own ``send()``: on loopback and fast networks the
per-call kernel work (segment, wake the receiver) cost as much as the
encryption. Packets produced in one turn of the event loop now go out in
one ``write()`` at the start of the next turn (microseconds later),
on the transport they were produced for, before any close that asyncssh
schedules afterwards (its ``_force_close`` aborts with ``call_soon`` too,
so it runs after the flush).
"""

from __future__ import annotations

import contextlib
from typing import Any

from asyncssh.connection import SSHConnection

from bastion.fastpath import pins

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


def _flush_all() -> None:
    for conn, pending in list(_pending.items()):
        _flush(conn, pending)


def install() -> None:
    def coalescing_send(self: SSHConnection, data: bytes) -> None:
        transport = self._transport
        if not transport:
            return
        pending = _pending.get(self)
        if pending is None:
            _pending[self] = pending = (transport, [data])
            self._loop.call_soon(_flush, self, pending)
        else:
            pending[1].append(data)

    pins.replace(SSHConnection, "_send", coalescing_send)
    # what is pending goes out before asyncssh's own _send is back
    pins.State.on_revert.append(_flush_all)
