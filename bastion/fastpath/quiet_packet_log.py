"""``quiet_packet_log``: no packet log text that nobody will read.

asyncssh formats a name and byte count for every packet it sends or
receives, then drops the text unless ``asyncssh.set_debug_level(3)`` is
on. The formatting is now skipped below level 3; at level 3 the log lines
are the same as before.
"""

from __future__ import annotations

from typing import Any

from asyncssh.logging import SSHLogger
from asyncssh.packet import SSHPacketLogger

from bastion.fastpath import pins


def install() -> None:
    log_packet = SSHPacketLogger._log_packet

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

    pins.replace(SSHPacketLogger, "log_sent_packet", log_sent_packet)
    pins.replace(SSHPacketLogger, "log_received_packet", log_received_packet)
