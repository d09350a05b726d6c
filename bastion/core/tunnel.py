"""Tunnels: a ``direct-tcpip`` (or ``direct-streamlocal``) channel of the
person relayed to a TCP stream the bastion opens itself (``ssh -J``/``-W``),
to a channel on the upstream connection (``-L``), or, for ``-R``, a channel
the routed host opens relayed back to the person.

Flow control is symmetric: each side's ``pause_writing`` pauses reading on
the other. The end of one tunnel (EOF either way, close, a far side that
fails) ends that tunnel only, never its connection or other channels.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol, cast

import asyncssh

from bastion.core.relay import RelayStats
from bastion.errors import BastionError
from bastion.fastpath.sockets import QUICKACK_BELOW, quickack

log = logging.getLogger("bastion.relay")


class _Endpoint(Protocol):
    """What both asyncio transports and asyncssh channels offer."""

    def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def is_closing(self) -> bool: ...


class TunnelRelay(asyncssh.SSHTCPSession[bytes], asyncssh.SSHUNIXSession[bytes]):
    """A TCP channel from the person, relayed to a stream.

    The far side is attached with :meth:`attach` once it is connected; data
    it sends before the person's channel is open is held and its reading
    paused. Nothing is written to a side that is already closing: asyncssh
    would raise and tear down the whole SSH connection.
    """

    def __init__(self, stats: RelayStats, on_end: Callable[[RelayStats], None]) -> None:
        self.stats = stats
        stats.end = self.end
        self._on_end = on_end
        # direct-tcpip / forwarded-tcpip, or their streamlocal twins (sockets)
        self._chan: asyncssh.SSHTCPChannel[bytes] | asyncssh.SSHUNIXChannel[bytes] | None = None
        self._far: _Endpoint | None = None
        self._held_down: list[bytes] = []
        self._far_eof = False
        self._person_eof = False
        self._done = False

    def attach(self, far: _Endpoint) -> None:
        self._far = far
        if self._chan is None:
            far.pause_reading()

    # -- person side ---------------------------------------------------------

    def connection_made(
        self, chan: asyncssh.SSHTCPChannel[bytes] | asyncssh.SSHUNIXChannel[bytes]
    ) -> None:
        self._chan = chan

    def session_started(self) -> None:
        chan = self._chan
        assert chan is not None
        for data in self._held_down:
            chan.write(data)
        self._held_down.clear()
        if self._far_eof:
            chan.write_eof()
        if self._far is not None:
            self._far.resume_reading()

    # These run inside asyncssh's packet handling, where any exception makes
    # asyncssh drop the person's whole connection (every channel, no
    # DISCONNECT): a far side that fails ends this tunnel only.

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        far = self._far
        if far is not None and not far.is_closing():
            self.stats.bytes_up += len(data)
            self.stats.last_activity = time.monotonic()
            self._to_far(far.write, data)

    def eof_received(self) -> bool:
        self._person_eof = True
        far = self._far
        if far is not None and not far.is_closing():
            # a TCP far side whose EOF came first is no longer read, so a
            # reset after it goes unnoticed until asyncio's write_eof()
            # (a bare shutdown()) raises ENOTCONN
            self._to_far(far.write_eof)
        self._close_if_both_ended()
        return True

    def _to_far(self, action: Callable[..., None], *args: bytes) -> None:
        try:
            action(*args)
        except (OSError, asyncssh.Error) as exc:
            log.debug("tunnel far side failed: %s", exc)
            assert self._far is not None
            self._far.close()  # its connection_lost ends this tunnel

    def pause_writing(self) -> None:
        if self._far is not None:
            self._far.pause_reading()

    def resume_writing(self) -> None:
        if self._far is not None:
            self._far.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._far is not None:
            self._far.close()
        self._finish()

    # -- far side (called by the far protocol) -------------------------------

    def far_data(self, data: bytes) -> None:
        chan = self._chan
        if chan is None:
            self.stats.bytes_down += len(data)
            self._held_down.append(data)
        elif not chan.is_closing():
            self.stats.bytes_down += len(data)
            self.stats.last_activity = time.monotonic()
            chan.write(data)

    def far_eof(self) -> None:
        self._far_eof = True
        if self._chan is not None and not self._chan.is_closing():
            self._chan.write_eof()
        self._close_if_both_ended()

    def _close_if_both_ended(self) -> None:
        # EOF both ways: close, as sshd does. `ssh -W` waits for the server's
        # CLOSE, and a half-closed TCP far side never reports connection_lost.
        if self._person_eof and self._far_eof and self._chan is not None:
            self._chan.close()
            if self._far is not None:
                self._far.close()

    def far_pause(self, pause: bool) -> None:
        if self._chan is None:
            return
        if pause:
            self._chan.pause_reading()
        else:
            self._chan.resume_reading()

    def end(self, exc: BastionError) -> None:
        """Close the tunnel both ways (a ChannelTimeout, a revocation); its
        record names ``exc``'s reason. The bytes are the person's own SSH, so
        there is no place for a notice."""
        self.stats.error = self.stats.error or exc
        if self._chan is not None:
            self._chan.close()
        if self._far is not None:
            self._far.close()
        if self._chan is None:
            self._finish()

    def far_closed(self) -> None:
        if self._chan is not None:
            self._chan.close()
        self._finish()

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self.stats.ended = time.monotonic()
            self._on_end(self.stats)


class _FarEvents:
    """Far-side callbacks shared by TCP and SSH-channel far sides."""

    def __init__(self, relay: TunnelRelay) -> None:
        self._relay = relay

    def eof_received(self) -> bool:
        self._relay.far_eof()
        return True  # half-close: the person may still send

    def pause_writing(self) -> None:
        self._relay.far_pause(True)

    def resume_writing(self) -> None:
        self._relay.far_pause(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay.far_closed()


class _TcpFar(_FarEvents, asyncio.Protocol):
    """A TCP connection made by the bastion, as the far side of a TunnelRelay."""

    _transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        # a cast, not isinstance(asyncio.Transport): uvloop's transports are not subclasses
        self._relay.attach(cast(_Endpoint, transport))

    def data_received(self, data: bytes) -> None:
        if len(data) < QUICKACK_BELOW:
            # the host's sshd keeps Nagle on: ACK its small packets at once
            quickack(self._transport)
        self._relay.far_data(data)


class ChannelFar(_FarEvents, asyncssh.SSHTCPSession[bytes], asyncssh.SSHUNIXSession[bytes]):
    """An SSH TCP or socket channel (upstream ``direct-tcpip``, or
    ``forwarded-tcpip`` back to the person for ``-R``, and their
    ``streamlocal`` twins) as the far side of a TunnelRelay."""

    def connection_made(
        self, chan: asyncssh.SSHTCPChannel[bytes] | asyncssh.SSHUNIXChannel[bytes]
    ) -> None:
        self._relay.attach(chan)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._relay.far_data(data)


async def open_tcp_tunnel(relay: TunnelRelay, host: str, port: int, timeout: float) -> TunnelRelay:
    """Connect the bastion itself to ``host:port`` and attach it to ``relay``."""
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.create_connection(lambda: _TcpFar(relay), host, port), timeout)
    return relay
