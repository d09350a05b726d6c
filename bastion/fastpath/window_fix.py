"""Credit the peer's window only for data handed to the session.

Not a speed-up but a correctness fix: :func:`bastion.fastpath.apply`
installs it whatever ``BASTION_TUNING`` says, on an asyncssh whose functions
match ``pins.WINDOW_FIX_FINGERPRINTS``.

asyncssh's ``_deliver_data`` sends a window adjust of ``init - window``
whenever the window is below half, counting data still queued in
``_recv_buf`` (received while reading was paused) as consumed. Each
resume that delivers one packet re-opens the whole window, so a channel
paused and resumed often (flow control towards a slower sink) buffers
without bound. Here the adjust is the bytes actually delivered since the
last one (OpenSSH's ``local_consumed``): received + buffered never exceeds
the window. With nothing buffered the packets sent are the same as asyncssh's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from asyncssh.channel import SSHChannel
from asyncssh.constants import MSG_CHANNEL_WINDOW_ADJUST
from asyncssh.misc import ProtocolError
from asyncssh.packet import UInt32

from bastion.fastpath import pins

log = logging.getLogger("bastion.tuning")


def install() -> None:
    """Install the fix once; a warning instead where asyncssh's code differs."""
    if pins.State.window_fix:
        return
    funcs: dict[str, Callable[..., Any]] = {
        "SSHChannel._deliver_data": SSHChannel._deliver_data,
        "SSHChannel._accept_data": SSHChannel._accept_data,
        "SSHChannel._flush_recv_buf": SSHChannel._flush_recv_buf,
    }
    changed = [
        name
        for name, expected in pins.WINDOW_FIX_FINGERPRINTS.items()
        if pins.fingerprint(funcs[name]) != expected
    ]
    if changed:
        log.warning("asyncssh channel window fix not applied (%s changed)", ", ".join(changed))
        return

    def deliver_data(self: SSHChannel[Any], data: bytes, datatype: Any) -> None:
        # asyncssh's _deliver_data; only the adjust differs
        consumed = self._recv_consumed + len(data)  # type: ignore[attr-defined]
        if consumed > self._init_recv_window / 2:
            self._recv_window += consumed
            self.logger.debug2(
                "Sending window adjust of %d bytes, new window %d", consumed, self._recv_window
            )
            self.send_packet(MSG_CHANNEL_WINDOW_ADJUST, UInt32(consumed))
            consumed = 0
        self._recv_consumed = consumed  # type: ignore[attr-defined]
        decoded: Any = data
        if self._encoding:
            try:
                assert self._decoder is not None
                decoded = self._decoder.decode(data)
            except UnicodeDecodeError as exc:
                raise ProtocolError(str(exc)) from None
        if self._session is not None:
            self._session.data_received(decoded, datatype)

    pins.add(SSHChannel, "_recv_consumed", 0)
    pins.replace(SSHChannel, "_deliver_data", deliver_data)
    pins.State.window_fix = True
