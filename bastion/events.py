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
class DoorRefused:
    """A TCP connection closed at accept, before the SSH version line
    (bastion/core/gate.py): ``reason`` penalised, per-source-max-startups,
    max-startups, evicted (an unauthenticated connection closed later, to
    make room for a source holding none), proxy-untrusted, proxy-missing,
    proxy-invalid or proxy-timeout; ``source`` the client's address (the proxy's if no header
    was read). Counted in metrics, never audited one by one."""

    source: str
    reason: str


@dataclass(frozen=True)
class PenaltyStarted:
    """A source block's penalty became active (sshd_config(5)
    PerSourcePenalties): its new connections are refused for ``seconds``;
    ``reason`` is what tipped it over the minimum, ``earned`` counts each kind
    (authfail, noauth, grace_exceeded, refuseconnection). Once per penalty."""

    source: str
    seconds: float
    reason: str
    earned: dict[str, int]


@dataclass(frozen=True)
class Greeted:
    """The client finished the SSH handshake and names a user: a real login
    attempt, not a port probe (``client`` is its version string)."""

    conn: str
    source: str
    user: str
    client: str


@dataclass(frozen=True)
class AuthFailed:
    """One failed authentication attempt (``key`` is the offered key's SHA256
    fingerprint for publickey; never a secret)."""

    conn: str
    user: str
    source: str
    method: str
    key: str | None


@dataclass(frozen=True)
class SecondFactorChecked:
    """A second factor was asked after the first method succeeded: ``method``
    (``totp``) and ``outcome``, ``ok`` or the refusal's reason
    (``mfa-wrong-code``, ``mfa-code-reused``, ``mfa-not-enrolled``,
    ``secret-unavailable``). Never the code."""

    conn: str
    user: str
    source: str
    method: str
    outcome: str


@dataclass(frozen=True)
class LoginAccepted:
    """A login got its upstream connection (``reused``: an open one of the person's).

    ``upstream_login`` is the key id of the certificate the host saw (another
    login's when reused), ``serial`` that certificate's serial; times in seconds.
    """

    conn: str
    user: str
    source: str
    route: str
    upstream: str
    address: str
    login: str
    key_id: str
    serial: int | None
    reused: bool
    upstream_login: str
    seconds: float
    auth_seconds: float | None = None
    route_seconds: float = 0.0
    sign_seconds: float | None = None
    # the second factor passed at the front door ("totp"), None without one
    mfa: str | None = None


@dataclass(frozen=True)
class SessionStarted:
    """A session's upstream channel is open: what it runs (the command as sent)."""

    conn: str
    session_id: str
    user: str
    source: str
    request: str
    command: str | None
    subsystem: str | None
    term: str | None
    # a command that is not UTF-8, in base64 (then ``command`` is None)
    command_base64: str | None = None


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
    # False: it never got through the SSH handshake (a port probe, a health check)
    greeted: bool = True


@dataclass(frozen=True)
class OperatorAction:
    """An operator acted on live connections over the admin socket: ``action``
    (``kill``) on ``target`` (a connection id or ``user:alice``) by ``who``
    (``root (uid 0)``), ending the connections ``ended``; the people read ``why``."""

    action: str
    target: str
    ended: tuple[str, ...]
    who: str
    why: str | None = None


@dataclass(frozen=True)
class DrainStarted:
    """A drain began: ``live`` connections, ``timeout`` seconds for them;
    ``consul_seconds`` until Consul stopped naming this bastion (None: not
    registered, or Consul unreachable: see the log)."""

    live: int
    timeout: float
    consul_seconds: float | None
    why: str


@dataclass(frozen=True)
class Reloaded:
    """SIGHUP: the settings ``applied``, those that ``need_restart``, or the
    ``error`` that left everything as it was."""

    applied: tuple[str, ...]
    need_restart: tuple[str, ...]
    error: str | None


@dataclass(frozen=True)
class Revoked:
    """The directory withdrew ``user``'s access (``cause``: route-removed,
    key-removed, disabled, grant-ended; ``why`` as the person reads it): their
    live connections ``conns`` were ``closed``, or ``kept`` (``[access]
    on_revoke = "keep"``). One per person and change, not per connection."""

    user: str
    cause: str
    why: str
    action: str
    conns: tuple[str, ...]


@dataclass(frozen=True)
class ServerStopped:
    """The bastion stopped: connections that finished within the drain and those closed."""

    drained: int
    closed: int


Event = (
    ConnectionAccepted
    | Greeted
    | AuthFailed
    | SecondFactorChecked
    | LoginAccepted
    | SessionStarted
    | ServerStopped
    | LoginRefused
    | ChannelOpened
    | ChannelRefused
    | ChannelEnded
    | ConnectionClosed
    | OperatorAction
    | DrainStarted
    | Reloaded
    | Revoked
    | DoorRefused
    | PenaltyStarted
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
