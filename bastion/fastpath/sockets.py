"""TCP_QUICKACK on a transport's socket: plain socket code, no asyncssh.

Used by the :mod:`.quickack` patch on the SSH legs and by ``relay.py`` on
the bastion's own TCP connections for ``ssh -J``.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

# reads shorter than this re-arm TCP_QUICKACK after authentication: a peer
# with Nagle on may be holding its next small packet until we ACK this one;
# bulk reads are full segments, which Nagle never holds
QUICKACK_BELOW = 16 * 1024


def quickack(transport: Any) -> None:
    """Have the kernel ACK what ``transport`` received at once (TCP only)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        # a Unix socket refuses: nothing to do there
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
