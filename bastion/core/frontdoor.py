"""The front door: the SSH listener people connect to, each connection's
life and authentication, and its upstream connection.

Limits at the door: ``[server] max_unauthenticated`` connections waiting to
authenticate (more are turned away after the version exchange, with a
message the client prints), ``login_grace_time``, and sshd's MaxAuthTries
(``max_auth_attempts``). Errors become what the person sees in
:mod:`bastion.core.refusal`; everything observable goes out as events
(:mod:`bastion.events`). The front door holds no policy: it asks the policy
layer for a plan (:class:`~bastion.model.UpstreamPlan`) and acts on it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import asyncssh

from bastion.config import ServerSettings
from bastion.core import refusal
from bastion.core.keywitness import AuthKey, KeyWitness
from bastion.core.limits import PersonLimits, SessionCounter
from bastion.core.relay import SessionTap
from bastion.core.second_factor import FactorCheck, SecondFactorGate
from bastion.core.sshd_compat import count_auth_failures, handle_no_more_sessions
from bastion.core.upstream import UpstreamLease
from bastion.errors import (
    BastionError,
    DirectoryUnavailable,
    RoutingError,
    SessionEnded,
    TooManyAuthFailures,
    TooManyConnections,
    UserChanged,
)
from bastion.events import (
    AuthFailed,
    ConnectionAccepted,
    ConnectionClosed,
    EventBus,
    Greeted,
    LoginAccepted,
    LoginRefused,
)
from bastion.identity import KeyDirectory, valid_user_name
from bastion.model import AccessRules, ForwardingPolicy, TunnelPlan, UpstreamPlan

if TYPE_CHECKING:
    from bastion.core.listener import ConnectionRegistry

log = logging.getLogger("bastion.frontdoor")


class Policy(Protocol):
    """The narrow questions the front door asks (``bastion.policy.LoginPolicy`` answers)."""

    def decide(self, user: str, key_id: str) -> UpstreamPlan: ...
    def forwarding(self, user: str) -> ForwardingPolicy: ...
    def tunnel(self, user: str, host: str, port: int) -> TunnelPlan: ...
    def second_factor(self, user: str) -> str | None: ...
    def admit(self, user: str, source_ip: str) -> AccessRules: ...


class Connector(Protocol):
    """Hands out upstream connections (``UpstreamPool`` answers)."""

    async def acquire(
        self,
        plan: UpstreamPlan,
        *,
        password: str | None = None,
        agent_path: str | None = None,
        private: bool = False,
    ) -> UpstreamLease: ...


@dataclass
class ServerContext:
    """Everything a connection needs, built once by the application."""

    settings: ServerSettings
    policy: Policy
    connector: Connector
    keys: KeyDirectory
    events: EventBus
    tunnel_timeout: float = 10.0
    # opens a tap (e.g. a recording) for a session, or None not to tap it
    recorder: Recorder | None = None
    # checks second-factor codes (credentials/totp), None without [vault]
    second_factor: FactorCheck | None = None
    # open sessions per person at this bastion ("max_sessions"; core/limits)
    sessions: SessionCounter = field(default_factory=SessionCounter)


class Recorder(Protocol):
    """Decides whether a session is tapped (``bastion.recording`` answers)."""

    def open(self, plan: UpstreamPlan, session_id: str, source: str) -> SessionTap | None: ...


class BastionConnection(PersonLimits):
    """Callbacks for one person's connection (its channels: :class:`ChannelRequests`)."""

    def __init__(self, ctx: ServerContext, registry: ConnectionRegistry) -> None:
        self._ctx = ctx
        self._registry = registry
        self.conn: asyncssh.SSHServerConnection | None = None
        self.conn_id = secrets.token_hex(6)
        self.user = ""
        self.source = ""
        self._authenticated = False
        self._counted_unauth = False
        self._plan: UpstreamPlan | None = None
        # the person's forwarding policy, read once when their login begins
        self._forwarding = ForwardingPolicy()
        self._lease: UpstreamLease | None = None
        # leases given up for a private connection, released with this connection
        self._spent_leases: list[UpstreamLease] = []
        self._listeners: list[asyncssh.SSHListener] = []
        self._upstream_lock = asyncio.Lock()
        self._channels = 0
        self._refusal: BastionError | None = None
        self._auth_failures = 0
        self._keys_seen: KeyWitness | None = None  # which key logged in (revocation)
        # the method (and offered key's fingerprint) of the attempt under way
        self._attempt: tuple[str, str | None] = ("publickey", None)
        self._factor: SecondFactorGate | None = None
        self._auth_seconds: float | None = None
        self._no_more_sessions = False
        self._sessions = 0
        self._started = time.monotonic()
        self.started_wall = time.time()
        self.open_channels = set()
        self.open_sessions = {}

    # -- connection lifecycle ------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("?", 0)
        self.source = f"{peer[0]}:{peer[1]}"
        admitted = self._registry.admit(self)
        self._ctx.events.emit(ConnectionAccepted(self.conn_id, self.source, admitted))
        if not admitted:  # MaxStartups full: told why (ConnectionRegistry.turn_away)
            self._refusal = self._registry.turn_away(conn, self.source)
            return
        self._counted_unauth = True
        count_auth_failures(conn, self._auth_failed)
        # a TOTP code after the key, when policy says so (core/second_factor)
        self._factor = SecondFactorGate(conn, self, self._ctx, self._disconnect)
        handle_no_more_sessions(conn, self._set_no_more_sessions)

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave_unauth()
        self._limits_stop()
        self._registry.remove(self, exc)  # its end may earn its source a penalty
        for listener in self._listeners:
            listener.close()
        # channels relayed for this connection close with it; a shared
        # upstream connection lives on for the person's next login
        for lease in [*self._spent_leases, self._lease]:
            if lease is not None:
                lease.release()
        # one record per connection, also after channels had theirs: how it
        # ended, and (for a refusal) why
        if isinstance(self._refusal, SessionEnded):
            outcome = "ended"  # authenticated, then ended by an operator or a drain
        elif self._refusal:
            outcome = "refused"
        else:
            outcome = "authenticated" if self._authenticated else "auth-failed"
        if isinstance(self._refusal, TooManyConnections):
            return  # turned away at the door: a flood must not flood the audit log
        self._ctx.events.emit(
            ConnectionClosed(
                authenticated=self._authenticated,
                greeted=bool(self.user),
                conn=self.conn_id,
                user=self.user or None,
                source=self.source,
                outcome=outcome,
                reason=self._refusal.reason if self._refusal else None,
                message=self._refusal.user_message if self._refusal else None,
                route=self._plan.route.raw if self._plan else None,
                channels=self._channels,
                auth_failures=self._auth_failures,
                closed_by=_closed_by(exc),
                duration_ms=round((time.monotonic() - self._started) * 1000),
            )
        )

    def _disconnect(self, exc: BastionError, code: int = asyncssh.DISC_BY_APPLICATION) -> None:
        """End the connection with ``exc``'s message, which OpenSSH clients print
        at every log level but QUIET ("Received disconnect from ...: bastion: ...")
        and exit 255; the connection's audit record names the reason."""
        if self._refusal is None or isinstance(exc, TooManyAuthFailures):
            self._refusal = exc
        if self.conn is not None:
            refusal.disconnect(self.conn, exc, code)

    def _auth_failed(self, counted: bool) -> bool:
        """Before each auth failure is sent: sshd's MaxAuthTries, which disconnects
        with "Too many authentication failures" instead of the last failure
        (sshd_config(5), auth2.c userauth_finish). False: disconnected."""
        if not counted:
            return True
        self._auth_failures += 1
        method, key = self._attempt
        self._attempt = ("publickey", None)
        self._ctx.events.emit(AuthFailed(self.conn_id, self.user, self.source, method, key))
        limit = self._ctx.settings.max_auth_attempts
        if self._auth_failures < limit:
            return True
        log.warning(
            "%s from %s: %d failed authentication attempts, disconnecting",
            self.user or "?",
            self.source,
            self._auth_failures,
        )
        # sshd's own wording and code (packet.c: SSH2_DISCONNECT_PROTOCOL_ERROR)
        self._disconnect(
            TooManyAuthFailures("Too many authentication failures"), asyncssh.DISC_PROTOCOL_ERROR
        )
        return False

    @property
    def authenticated(self) -> bool:
        return self._authenticated

    @property
    def plan(self) -> UpstreamPlan | None:
        return self._plan

    @property
    def refusal(self) -> BastionError | None:
        """Why the connection was refused or ended, if it was (penalties read it)."""
        return self._refusal

    @property
    def auth_failures(self) -> int:
        return self._auth_failures

    @property
    def auth_key(self) -> AuthKey | None:
        """The key (or user CA key) this connection logged in with; None before
        authentication or after a password login."""
        seen = self._keys_seen
        return seen.matched if seen is not None and self._authenticated else None

    def end(self, why: str, error: type[SessionEnded] = SessionEnded) -> None:
        """End this connection on an operator's word; the person reads ``why``.
        Its open channels' records say so (not "ok")."""
        exc = error(why)
        for stats in self.open_channels:
            stats.error = stats.error or exc
        self._disconnect(exc)

    def notice(self, text: str) -> None:
        """One line on the terminal of each of its open sessions."""
        for relay in list(self.open_sessions.values()):
            relay.notice(text)

    def _set_no_more_sessions(self) -> None:
        self._no_more_sessions = True

    def _leave_unauth(self) -> None:
        if self._counted_unauth:
            self._counted_unauth = False
            self._registry.left_unauth(self)

    # -- authentication ------------------------------------------------------

    def begin_auth(self, username: str) -> bool:
        if self.user and username != self.user:
            # sshd refuses it outright (auth2.c); here it would also mix one
            # name's first factor, second factor and upstream login with another's
            self._disconnect(
                UserChanged(f"Change of username not allowed: {self.user} -> {username}"),
                asyncssh.DISC_PROTOCOL_ERROR,
            )
            return True
        if not self.user and self.conn is not None:
            client = self.conn.get_extra_info("client_version") or ""
            self._ctx.events.emit(Greeted(self.conn_id, self.source, username, str(client)))
        self.user = username
        self._forwarding = self._ctx.policy.forwarding(username)
        keys, problem = self._ctx.keys.authorized_keys(
            username, agent_forwarding=self._forwarding.agent_forwarding
        )
        if self.conn is None:
            return True
        if keys is not None:
            self._keys_seen = KeyWitness(keys)
            self.conn.set_authorized_keys(self._keys_seen)
        if isinstance(problem, DirectoryUnavailable):
            # no login can be routed now, so none is authenticated: say why in
            # a disconnect, which the client shows whatever its LogLevel (an
            # auth banner is hidden below INFO). The same for every user name,
            # so it reveals no accounts.
            self._disconnect(problem, asyncssh.DISC_SERVICE_NOT_AVAILABLE)
        elif problem is not None:
            self._refusal = problem
        return True

    def public_key_auth_supported(self) -> bool:
        return "publickey" in self._ctx.settings.auth_methods

    def password_auth_supported(self) -> bool:
        return "password" in self._ctx.settings.auth_methods

    def kbdint_auth_supported(self) -> bool:
        return "keyboard-interactive" in self._ctx.settings.auth_methods

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Called for a key that none of the person's authorized keys match:
        noted (its fingerprint, for the audit) and refused."""
        self._attempt = ("publickey", key.get_fingerprint())
        return False

    async def validate_password(self, username: str, password: str) -> bool:
        self._attempt = ("password", None)
        return await self._passthrough(username, password)

    def get_kbdint_challenge(
        self, username: str, lang: str, submethods: str
    ) -> tuple[str, str, str, list[tuple[str, bool]]] | bool:
        if self._factor is not None and self._factor.pending_for(username):
            return self._factor.challenge()
        if "keyboard-interactive" not in self._ctx.settings.auth_methods:
            return False  # offered only for a pending second factor
        return "", "", "", [("Password: ", False)]

    async def validate_kbdint_response(self, username: str, responses: Sequence[str]) -> bool:
        if self._factor is not None and self._factor.pending_for(username):
            self._attempt = ("totp", None)
            return await self._factor.check_response(username, responses)
        self._attempt = ("keyboard-interactive", None)
        if len(responses) != 1 or "keyboard-interactive" not in self._ctx.settings.auth_methods:
            return False
        return await self._passthrough(username, responses[0])

    async def _passthrough(self, username: str, password: str) -> bool:
        """Relay the person's password upstream; the host's answer decides."""
        if not valid_user_name(username):
            return False
        try:
            async with self._upstream_lock:
                if self._upstream is not None:
                    return False  # the host checked a password already: never True unchecked
                await self._connect_upstream(password=password)
            return True
        except DirectoryUnavailable as exc:
            # the same for everyone: say why (the client shows a disconnect)
            self._disconnect(exc, asyncssh.DISC_SERVICE_NOT_AVAILABLE)
            return False
        except BastionError as exc:
            # no route, a host down, ...: before the host has checked the
            # password, saying so would tell anyone which user names exist;
            # the operator's log has the reason
            log.info("password login of %s refused: %s", self.user, exc.detail)
            return False

    def auth_completed(self) -> None:
        self._authenticated = True
        self._refusal = None  # an earlier failed method does not make this a refusal
        self._auth_seconds = time.monotonic() - self._started
        self._leave_unauth()
        self._admit()  # "disabled", "from", the person's limits (core/limits)

    # -- the upstream connection (one per person's connection) ---------------

    @property
    def _upstream(self) -> asyncssh.SSHClientConnection | None:
        return self._lease.conn if self._lease is not None else None

    async def _connect_upstream(self, password: str | None = None, private: bool = False) -> None:
        """Decide the plan, then take an upstream connection (sets ``_lease``)."""
        started = time.monotonic()
        try:
            if self._plan is None:
                self._plan = self._ctx.policy.decide(
                    self.user, f"bastion:{self.user}:{self.conn_id}"
                )
            plan = self._plan
            if self._factor is not None and self._authenticated:  # entry changed since?
                self._factor.recheck(self.user)
            route_seconds = time.monotonic() - started
            agent_path = None
            if plan.policy.agent_forwarding and self.conn is not None:
                agent_path = self.conn.get_agent_path()
            lease = await self._ctx.connector.acquire(
                plan,
                password=password,
                agent_path=agent_path,
                private=private,
            )
        except BastionError as exc:
            self._refusal = exc
            self._ctx.events.emit(
                LoginRefused(self.conn_id, self.user, self.source, exc.reason, exc.user_message)
            )
            # a directory entry's own problem was logged (WARNING) once per change
            # of the entry; each login it refuses is INFO, anything else WARNING
            log.log(
                logging.INFO if isinstance(exc, RoutingError) else logging.WARNING,
                "login of %s from %s refused: %s: %s",
                self.user,
                self.source,
                exc.reason,
                exc.detail,
            )
            raise
        self._lease = lease
        details = lease.details
        self._ctx.events.emit(
            LoginAccepted(
                conn=self.conn_id,
                user=self.user,
                source=self.source,
                route=plan.route.raw,
                upstream=plan.destination.label,
                address=details.address,
                login=plan.destination.login,
                key_id=plan.key_id,
                serial=details.serial,
                reused=lease.reused,
                upstream_login=lease.origin,
                seconds=time.monotonic() - started,
                auth_seconds=self._auth_seconds,
                route_seconds=route_seconds,
                sign_seconds=None if lease.reused else details.sign_seconds,
                mfa=self._factor.passed if self._factor is not None else None,
            )
        )
        if lease.reused:
            log.info(
                "login of %s from %s to %s (upstream connection of %s reused)",
                self.user,
                self.source,
                plan.destination.label,
                lease.origin,
            )
        else:
            log.info("login of %s from %s to %s", self.user, self.source, plan.destination.label)

    async def upstream(self) -> asyncssh.SSHClientConnection:
        """The upstream connection, opened on first use and shared by channels."""
        async with self._upstream_lock:
            if self._upstream is None:
                await self._connect_upstream()
            assert self._upstream is not None
            return self._upstream

    async def private_upstream(
        self, refused: asyncssh.SSHClientConnection
    ) -> asyncssh.SSHClientConnection | None:
        """A private upstream connection after ``refused`` (a shared one)
        refused to open a channel; None when there is nothing better to try."""
        async with self._upstream_lock:
            if self._upstream is not None and self._upstream is not refused:
                return self._upstream  # another channel replaced it already
            lease = self._lease
            if lease is None or not lease.shared:
                return None
            lease.retire()
            self._spent_leases.append(lease)
            self._lease = None
            log.info(
                "%s refused a channel on a shared connection for %s; opening a private one",
                self._plan.destination.label if self._plan else "the host",
                self.user,
            )
            await self._connect_upstream(private=True)
            assert self._upstream is not None
            return self._upstream


def _closed_by(exc: Exception | None) -> str:
    """Who ended a connection, for its audit record."""
    if exc is None:
        return "bastion"
    if isinstance(exc, asyncssh.ConnectionLost):
        return "client"
    if isinstance(exc, asyncssh.ProtocolError):  # raised here, on what the client sent
        return f"protocol error: {exc.reason}"[:200]
    if isinstance(exc, asyncssh.DisconnectError):
        return f"client: {exc.reason}"[:200]
    return f"error: {type(exc).__name__}"
