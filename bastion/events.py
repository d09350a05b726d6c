"""Lifecycle events: the one seam between the SSH core and what observes it.

The front door emits an event at each step of a connection's life; the audit
log and the metrics (and, later, recordings) subscribe. Nothing in the core
calls the audit log or a metric directly.

A subscriber that raises is logged and skipped: observing must never break
a login or a relay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("bastion.events")


@dataclass(frozen=True)
class ConnectionAccepted:
    """A TCP connection was admitted (``admitted`` False: turned away at the bound)."""

    conn: str
    source: str
    admitted: bool


@dataclass(frozen=True)
class LoginAccepted:
    """A login got its upstream connection (``reused``: an open one of the person's)."""

    conn: str
    user: str
    source: str
    upstream: str
    reused: bool
    upstream_login: str
    seconds: float


@dataclass(frozen=True)
class LoginRefused:
    """Deciding or connecting a login failed with ``reason``."""

    conn: str
    user: str
    source: str
    reason: str
    message: str


@dataclass(frozen=True)
class ChannelOpened:
    """A channel of ``kind`` (session, tunnel, forward, remote-forward) started relaying."""

    conn: str
    kind: str


@dataclass(frozen=True)
class ChannelRefused:
    """A channel or request of ``kind`` was refused (never relayed)."""

    conn: str
    kind: str
    user: str
    source: str
    target: str | None
    reason: str
    message: str


@dataclass(frozen=True)
class ChannelEnded:
    """A relayed channel ended; ``outcome`` is ``ok`` or ``error`` (with ``reason``)."""

    conn: str
    kind: str
    user: str
    source: str
    route: str | None
    upstream: str | None
    outcome: str
    reason: str | None
    message: str | None
    bytes_up: int
    bytes_down: int
    duration_ms: int
    exit_status: int | None
    exit_signal: str | None
    request: str | None
    upstream_login: str | None
    # sessions only: "<conn>-<n>", also the recording's name
    session_id: str | None = None


@dataclass(frozen=True)
class ConnectionClosed:
    """A connection ended: ``outcome`` authenticated, auth-failed or refused
    (``authenticated`` tells whether the person had authenticated first)."""

    authenticated: bool
    conn: str
    user: str | None
    source: str
    outcome: str
    reason: str | None
    message: str | None
    route: str | None
    channels: int
    auth_failures: int
    closed_by: str
    duration_ms: int


Event = (
    ConnectionAccepted
    | LoginAccepted
    | LoginRefused
    | ChannelOpened
    | ChannelRefused
    | ChannelEnded
    | ConnectionClosed
)


class EventBus:
    """Delivers each event to every subscriber, in subscription order."""

    def __init__(self) -> None:
        self._subscribers: list[Callable[[Event], None]] = []

    def subscribe(self, handler: Callable[[Event], None]) -> None:
        self._subscribers.append(handler)

    def emit(self, event: Event) -> None:
        for handler in self._subscribers:
            try:
                handler(event)
            except Exception:  # an observer must never break the core
                log.exception("event subscriber %r failed on %s", handler, type(event).__name__)
