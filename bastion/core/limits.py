"""A person's own limits from their directory entry, applied to a connection:

* ``"from"`` and ``"disabled"``: asked once when authentication completes
  (``Policy.admit``); a refusal is an SSH disconnect naming why ("bastion:
  alice may not log in from 192.0.2.7"), for routed sessions and ``ssh -J``
  alike, since both need the login;
* ``"max_sessions"``: session channels of the person across all their
  connections at this bastion; one more is refused as sshd refuses one over
  MaxSessions (open failure, administratively prohibited, with the reason);
* ``"channel_timeout"`` / ``"unused_connection_timeout"``: the person's
  values override ``[server]``'s (:mod:`bastion.core.idle`).

:class:`PersonLimits` is a layer of the connection's callbacks between
:class:`~bastion.core.channels.ChannelRequests` and
:class:`~bastion.core.frontdoor.BastionConnection`.
"""

from __future__ import annotations

import logging

import asyncssh

from bastion.core.channels import ChannelRequests
from bastion.core.idle import IdleTimers, shown
from bastion.core.refusal import open_error
from bastion.core.relay import RelayStats, SessionRelay
from bastion.errors import (
    AccessDenied,
    ChannelTimedOut,
    TooManySessions,
    UnusedConnectionTimedOut,
)
from bastion.events import LoginRefused
from bastion.model import AccessRules

log = logging.getLogger("bastion.frontdoor")


def source_ip(source: str) -> str:
    """The address of a ``host:port`` source (``[2001:db8::1]:22`` or
    ``2001:db8::1:22`` for IPv6)."""
    host = source.rpartition(":")[0] if ":" in source else source
    return host.strip("[]")


class SessionCounter:
    """Open session channels per person at this bastion (all their connections)."""

    def __init__(self) -> None:
        self._open: dict[str, set[RelayStats]] = {}

    def count(self, user: str) -> int:
        return len(self._open.get(user, ()))

    def add(self, user: str, stats: RelayStats) -> None:
        self._open.setdefault(user, set()).add(stats)

    def discard(self, user: str, stats: RelayStats) -> None:
        held = self._open.get(user)
        if held is not None:
            held.discard(stats)
            if not held:
                del self._open[user]


class PersonLimits(ChannelRequests):
    """The channel callbacks plus the person's limits (see the module doc)."""

    # the person's rules, read once when authentication completes
    access: AccessRules = AccessRules()
    _idle: IdleTimers | None = None

    # -- at the end of authentication ------------------------------------------

    def _admit(self) -> bool:
        """At the end of authentication: the policy's word (:meth:`may_log_in`),
        then the person's idle limits. False: refused."""
        if not self.may_log_in():
            return False
        self._start_idle_timers()
        return True

    def may_log_in(self) -> bool:
        """Ask the policy whether this login may go on (``"from"``,
        ``"disabled"``); False: refused (the connection is being closed with
        the reason, audited as ``refused``). Also asked when a first factor
        passes, so that no second factor is asked (nor a code spent) for a
        login that may not happen."""
        try:
            self.access = self._ctx.policy.admit(self.user, source_ip(self.source))
        except AccessDenied as exc:
            self._ctx.events.emit(
                LoginRefused(self.conn_id, self.user, self.source, exc.reason, exc.user_message)
            )
            log.info(
                "login of %s from %s refused: %s: %s",
                self.user,
                self.source,
                exc.reason,
                exc.detail,
            )
            self._disconnect(exc)
            return False
        return True

    def _start_idle_timers(self) -> None:
        settings = self._ctx.settings
        rules = self.access
        channel_timeout = rules.channel_timeout
        unused = rules.unused_connection_timeout
        channel_timeout = settings.channel_timeout if channel_timeout is None else channel_timeout
        unused = settings.unused_connection_timeout if unused is None else unused
        if channel_timeout or unused:  # none when both are off: ~1.7 KB per connection
            self._idle = IdleTimers(
                channel_timeout, unused, self._channel_idle, self._connection_unused
            )
            self._idle.start()

    def _limits_stop(self) -> None:
        """The connection is gone (its channels' ends may still follow)."""
        if self._idle is not None:
            self._idle.stop()

    # -- channels ----------------------------------------------------------------

    def session_requested(self) -> tuple[asyncssh.SSHServerChannel[bytes], SessionRelay]:
        limit = self.access.max_sessions
        if limit is not None and self._ctx.sessions.count(self.user) >= limit:
            many = f"{limit} session" + ("s" if limit != 1 else "")
            denied = TooManySessions(
                f"{self.user} has {many} open at this bastion (max_sessions {limit} "
                "in the directory); close one first"
            )
            self._refuse_channel(denied, "session", "")
            raise open_error(denied)
        return super().session_requested()

    def _channel_stats(self, kind: str) -> RelayStats:
        stats = super()._channel_stats(kind)
        if kind == "session":
            self._ctx.sessions.add(self.user, stats)
        if self._idle is not None:
            self._idle.opened(stats)
        return stats

    def _channel_ended(self, stats: RelayStats) -> None:
        self._ctx.sessions.discard(self.user, stats)
        if self._idle is not None:
            self._idle.closed(stats)
        super()._channel_ended(stats)

    # -- timeouts ----------------------------------------------------------------

    def _channel_idle(self, stats: RelayStats) -> None:
        assert self._idle is not None
        what = "session" if stats.kind == "session" else "channel"
        exc = ChannelTimedOut(
            f"no data for {shown(self._idle.channel_timeout)} on this {what} "
            "(ChannelTimeout); closed"
        )
        log.info(
            "%s of %s from %s idle: closed (ChannelTimeout)", stats.kind, self.user, self.source
        )
        if stats.end is not None:
            stats.end(exc)
        else:  # a relay that cannot be ended alone: not expected
            stats.error = stats.error or exc

    def _connection_unused(self) -> None:
        assert self._idle is not None
        log.info(
            "connection of %s from %s unused: closed (UnusedConnectionTimeout)",
            self.user,
            self.source,
        )
        self._disconnect(
            UnusedConnectionTimedOut(
                f"no open channels for {shown(self._idle.unused_timeout)} "
                "(UnusedConnectionTimeout); closing the connection"
            )
        )
