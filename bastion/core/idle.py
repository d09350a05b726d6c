"""Idle limits of one connection, with OpenSSH's semantics (sshd_config(5)):

* **ChannelTimeout**: a channel (a session, a tunnel, a forward) with no data
  either way for that many seconds is closed;
* **UnusedConnectionTimeout**: a connection with no open channels for that
  many seconds is closed (from the end of authentication, or from the moment
  its last channel closed). Listeners for ``ssh -R`` are not channels and do
  not keep a connection in use, as in sshd.

0 turns a limit off. The mechanism is one asyncio timer handle per open
channel (and one for the connection), never a task: a timer fires at the
earliest moment the limit can be reached; when data has moved meanwhile
(the relays keep ``RelayStats.last_activity``) it is re-armed for the new
deadline. A busy channel therefore costs one wake-up per timeout period,
an idle one a single wake-up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from bastion.core.relay import RelayStats


def shown(seconds: float) -> str:
    """``seconds`` for a person: "45 s", "5 min", "1 h 30 min"."""
    whole = round(seconds)
    if whole < 120:
        return f"{seconds:g} s" if whole < 10 else f"{whole} s"
    hours, minutes = divmod(whole // 60, 60)
    if not hours:
        return f"{minutes} min"
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


class IdleTimers:
    """ChannelTimeout and UnusedConnectionTimeout for one authenticated connection.

    ``on_channel_idle(stats)`` is called once for a channel idle for
    ``channel_timeout`` seconds (the caller closes it);
    ``on_unused()`` once when the connection had no channel for
    ``unused_timeout`` seconds. Times are seconds; 0 is off.
    """

    def __init__(
        self,
        channel_timeout: float,
        unused_timeout: float,
        on_channel_idle: Callable[[RelayStats], None],
        on_unused: Callable[[], None],
    ) -> None:
        self.channel_timeout = channel_timeout
        self.unused_timeout = unused_timeout
        self._on_channel_idle = on_channel_idle
        self._on_unused = on_unused
        self._loop = asyncio.get_running_loop()
        self._channels: dict[RelayStats, asyncio.TimerHandle | None] = {}
        self._unused: asyncio.TimerHandle | None = None
        self._stopped = False

    def start(self) -> None:
        """Authentication completed: the connection has no channels yet."""
        self._arm_unused()

    def opened(self, stats: RelayStats) -> None:
        """A channel started (its ``last_activity`` is now)."""
        if self._stopped:
            return
        if self._unused is not None:
            self._unused.cancel()
            self._unused = None
        self._channels[stats] = None
        if self.channel_timeout > 0:
            self._arm_channel(stats)

    def closed(self, stats: RelayStats) -> None:
        """A channel ended."""
        handle = self._channels.pop(stats, None)
        if handle is not None:
            handle.cancel()
        if not self._channels:
            self._arm_unused()

    def stop(self) -> None:
        """The connection is gone: no timer may fire for it any more."""
        self._stopped = True
        for handle in self._channels.values():
            if handle is not None:
                handle.cancel()
        self._channels.clear()
        if self._unused is not None:
            self._unused.cancel()
            self._unused = None

    # -- timers ----------------------------------------------------------------

    def _arm_channel(self, stats: RelayStats) -> None:
        # time.monotonic() is the event loop's clock (asyncio's default)
        delay = stats.last_activity + self.channel_timeout - time.monotonic()
        self._channels[stats] = self._loop.call_later(max(delay, 0.0), self._channel_due, stats)

    def _channel_due(self, stats: RelayStats) -> None:
        if self._stopped or stats not in self._channels:
            return
        if time.monotonic() - stats.last_activity < self.channel_timeout:
            self._arm_channel(stats)  # data moved since: wait for the new deadline
            return
        self._channels[stats] = None  # fires once; the channel's end removes it
        self._on_channel_idle(stats)

    def _arm_unused(self) -> None:
        if self._stopped or self.unused_timeout <= 0 or self._unused is not None:
            return
        self._unused = self._loop.call_later(self.unused_timeout, self._unused_due)

    def _unused_due(self) -> None:
        self._unused = None
        if not self._stopped and not self._channels:
            self._on_unused()
