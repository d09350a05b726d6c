"""``quickack``: TCP_QUICKACK re-armed on every receive until the connection
is authenticated, and afterwards on every short read.

OpenSSH leaves Nagle's algorithm on during the handshake and for sessions
without a terminal; with the kernel's delayed ACKs on our side its next
small write waits up to 40 ms for our ACK (after the channel open, between
exit status and close, ...). Bulk reads skip it: full segments are never
held by Nagle. Applies to the person's and the upstream leg; ``relay.py``
does the same (:func:`bastion.fastpath.sockets.quickack`) on the bastion's
own TCP connections for ``ssh -J``.
"""

from __future__ import annotations

from typing import Any

from asyncssh.connection import SSHConnection

from bastion.fastpath import pins
from bastion.fastpath.sockets import QUICKACK_BELOW, quickack


def install() -> None:
    """Wrap ``data_received`` as it is now (exact_receive's, if that is on)."""
    receive = SSHConnection.data_received

    def quickack_data_received(self: SSHConnection, data: bytes, datatype: Any = None) -> None:
        if len(data) < QUICKACK_BELOW or not self._auth_complete:
            quickack(self._transport)
        receive(self, data, datatype)

    pins.replace(SSHConnection, "data_received", quickack_data_received)
