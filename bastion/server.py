"""The SSH server people connect to: listener lifecycle, per-connection
callbacks, the live-session registry and drain.

This is the one place where a :class:`BastionError` becomes what the person
sees (a stderr line and exit status 255, an auth banner, or a channel-open
refusal) and an audit record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import asyncssh

from bastion.audit import AuditLog
from bastion.config import ServerSettings
from bastion.errors import (
    BastionError,
    ClientRefused,
    ConfigError,
    DirectoryUnavailable,
    ForwardDenied,
    HostUnreachable,
    RequestDenied,
    TooManyAuthFailures,
    TooManyConnections,
    UpstreamAuthFailed,
    UpstreamRefused,
)
from bastion.identity import KeyDirectory, valid_user_name
from bastion.metrics import Metrics
from bastion.model import ForwardingPolicy, TunnelPlan, UpstreamPlan
from bastion.relay import (
    ChannelFar,
    RelayStats,
    SessionRelay,
    TunnelRelay,
    open_tcp_tunnel,
)
from bastion.sshd_compat import (
    count_auth_failures,
    handle_no_more_sessions,
    transparent_channel,
)
from bastion.upstream import UpstreamLease

log = logging.getLogger("bastion.server")


class Policy(Protocol):
    """The narrow questions the front door asks (``bastion.policy.LoginPolicy`` answers)."""

    def decide(self, user: str, key_id: str) -> UpstreamPlan: ...
    def forwarding(self, user: str) -> ForwardingPolicy: ...
    def tunnel(self, user: str, host: str, port: int) -> TunnelPlan: ...


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
    audit: AuditLog
    metrics: Metrics
    tunnel_timeout: float = 10.0


class BastionConnection(asyncssh.SSHServer):
    """Callbacks for one person's connection."""

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
        self._no_more_sessions = False
        self._sessions = 0
        self._started = time.monotonic()

    # -- connection lifecycle ------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("?", 0)
        self.source = f"{peer[0]}:{peer[1]}"
        self._ctx.metrics.connections.inc()
        if not self._registry.admit(self):
            log.warning(
                "dropping %s: %d unauthenticated connections already",
                self.source,
                self._ctx.settings.max_unauthenticated,
            )
            # after asyncssh has sent its version line (it does so when this
            # returns): a disconnect packet before it is garbage to the client
            # ("banner line contains invalid characters"); after it, OpenSSH
            # prints "Received disconnect ...: too many ..." and exits 255
            asyncio.get_running_loop().call_soon(
                self._disconnect,
                TooManyConnections("too many unauthenticated connections, try again later"),
                asyncssh.DISC_TOO_MANY_CONNECTIONS,
            )
            return
        self._counted_unauth = True
        self._ctx.metrics.unauthenticated.inc()
        count_auth_failures(conn, self._auth_failed)
        handle_no_more_sessions(conn, self._set_no_more_sessions)

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave_unauth()
        self._registry.remove(self)
        for listener in self._listeners:
            listener.close()
        # channels relayed for this connection close with it; a shared
        # upstream connection lives on for the person's next login
        for lease in [*self._spent_leases, self._lease]:
            if lease is not None:
                lease.release()
        # one record per connection, also after channels had theirs: how it
        # ended, and (for a refusal) why
        outcome = (
            "refused"
            if self._refusal
            else ("authenticated" if self._authenticated else "auth-failed")
        )
        reason = self._refusal.reason if self._refusal else None
        if isinstance(self._refusal, TooManyConnections):
            return  # turned away at the door: a flood must not flood the audit log
        if not self._authenticated:
            self._ctx.metrics.logins.labels("auth-failed", reason or "auth").inc()
        self._ctx.audit.record(
            "connection",
            conn=self.conn_id,
            user=self.user or None,
            source=self.source,
            outcome=outcome,
            reason=reason,
            message=self._refusal.user_message if self._refusal else None,
            route=self._plan.route.raw if self._plan else None,
            channels=self._channels,
            auth_failures=self._auth_failures or None,
            closed_by=_closed_by(exc),
            duration_ms=round((time.monotonic() - self._started) * 1000),
        )

    def _disconnect(self, exc: BastionError, code: int = asyncssh.DISC_BY_APPLICATION) -> None:
        """End the connection with ``exc``'s message, which OpenSSH clients print
        at every log level but QUIET ("Received disconnect from ...: bastion: ...")
        and exit 255; the connection's audit record names the reason."""
        if self._refusal is None or isinstance(exc, TooManyAuthFailures):
            self._refusal = exc
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.disconnect(code, f"bastion: {exc.user_message}")

    def _auth_failed(self, counted: bool) -> bool:
        """Before each auth failure is sent: sshd's MaxAuthTries, which disconnects
        with "Too many authentication failures" instead of the last failure
        (sshd_config(5), auth2.c userauth_finish). False: disconnected."""
        if not counted:
            return True
        self._auth_failures += 1
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
        self._refusal = TooManyAuthFailures("Too many authentication failures")
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.disconnect(
                    asyncssh.DISC_PROTOCOL_ERROR, "Too many authentication failures"
                )
        return False

    def _set_no_more_sessions(self) -> None:
        self._no_more_sessions = True

    def _leave_unauth(self) -> None:
        if self._counted_unauth:
            self._counted_unauth = False
            self._registry.left_unauth()
            self._ctx.metrics.unauthenticated.dec()

    # -- authentication ------------------------------------------------------

    def begin_auth(self, username: str) -> bool:
        self.user = username
        self._forwarding = self._ctx.policy.forwarding(username)
        keys, problem = self._ctx.keys.authorized_keys(
            username, agent_forwarding=self._forwarding.agent_forwarding
        )
        if self.conn is None:
            return True
        if keys is not None:
            self.conn.set_authorized_keys(keys)
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

    async def validate_password(self, username: str, password: str) -> bool:
        return await self._passthrough(username, password)

    def get_kbdint_challenge(
        self, username: str, lang: str, submethods: str
    ) -> tuple[str, str, str, list[tuple[str, bool]]]:
        return "", "", "", [("Password: ", False)]

    async def validate_kbdint_response(self, username: str, responses: Sequence[str]) -> bool:
        if len(responses) != 1:
            return False
        return await self._passthrough(username, responses[0])

    async def _passthrough(self, username: str, password: str) -> bool:
        """Relay the person's password upstream; the host's answer decides."""
        if not valid_user_name(username):
            return False
        try:
            async with self._upstream_lock:
                if self._upstream is None:
                    await self._connect_upstream(password=password)
            return True
        except UpstreamAuthFailed:
            return False
        except BastionError as exc:
            # the person learns why (e.g. host down) instead of a bare "denied";
            # no other method could route the login either
            self._disconnect(exc)
            return False

    def auth_completed(self) -> None:
        self._authenticated = True
        self._leave_unauth()

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
            self._ctx.metrics.logins.labels("refused", exc.reason).inc()
            log.warning(
                "login of %s from %s refused: %s: %s",
                self.user,
                self.source,
                exc.reason,
                exc.detail,
            )
            raise
        self._lease = lease
        self._ctx.metrics.login_seconds.observe(time.monotonic() - started)
        self._ctx.metrics.logins.labels("accepted", "").inc()
        if lease.reused:
            self._ctx.metrics.upstream_reused.inc()
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

    # -- channels ------------------------------------------------------------

    def _channel_stats(self, kind: str) -> RelayStats:
        self._channels += 1
        self._ctx.metrics.channels_active.labels(kind).inc()
        return RelayStats(kind=kind)

    def _channel_ended(self, stats: RelayStats) -> None:
        m = self._ctx.metrics
        m.channels_active.labels(stats.kind).dec()
        m.bytes.labels("up").inc(stats.bytes_up)
        m.bytes.labels("down").inc(stats.bytes_down)
        err = stats.error
        self._ctx.audit.record(
            stats.kind,
            conn=self.conn_id,
            user=self.user,
            source=self.source,
            route=self._plan.route.raw if self._plan else None,
            upstream=self._plan.destination.label if self._plan else stats.detail.get("target"),
            outcome="error" if err else "ok",
            reason=err.reason if err else None,
            message=err.user_message if err else None,
            bytes_up=stats.bytes_up,
            bytes_down=stats.bytes_down,
            duration_ms=round(stats.duration * 1000),
            exit_status=stats.exit_status,
            exit_signal=stats.exit_signal,
            request=stats.detail.get("request"),
            # which login's certificate the host saw (differs when reused)
            upstream_login=self._lease.origin if self._lease else None,
        )

    def session_requested(self) -> tuple[asyncssh.SSHServerChannel[bytes], SessionRelay]:
        assert self.conn is not None
        if self._no_more_sessions:
            # sshd's answer (session.c session_open)
            self._refuse_channel(
                RequestDenied("a session after no-more-sessions@openssh.com"), "session", ""
            )
            self._disconnect(
                RequestDenied(
                    "Possible attack: attempt to open a session after additional sessions disabled"
                ),
                asyncssh.DISC_PROTOCOL_ERROR,
            )
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "no more sessions"
            )
        self._sessions += 1
        relay = SessionRelay(
            self.upstream,
            self._ctx.settings.env_allow,
            self._channel_stats("session"),
            self._channel_ended,
            reopen_upstream=self.private_upstream,
            on_refused=self._request_refused,
        )
        return transparent_channel(self.conn), relay

    def _request_refused(self, request: str, why: str) -> None:
        """A request on a session channel refused by the bastion (X11, agent)."""
        self._refuse_channel(RequestDenied(why), request, "")

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Awaitable[TunnelRelay]:
        return self._open_tunnel(dest_host, dest_port)

    async def _open_tunnel(self, host: str, port: int) -> TunnelRelay:
        """A ``direct-tcpip`` channel: ``ssh -J``/``-W`` or ``ssh -L``/``-D``.

        A destination the directory routes this user to is a jump: the
        bastion connects to it itself. Anything else is local forwarding
        through the routed host, only where the user's policy allows it.
        """
        target = _hostport(host, port)
        try:
            tunnel = self._ctx.policy.tunnel(self.user, host, port)
        except BastionError as exc:
            self._refuse_channel(exc, "tunnel", target)
            raise _open_error(exc) from None
        dest = tunnel.destination
        if dest is None:  # local forwarding, allowed by policy
            return await self._forward_via_upstream(
                "forward", target, lambda up, far: up.create_connection(far, host, port)
            )
        stats = self._channel_stats("tunnel")
        stats.detail["target"] = dest.label
        relay = TunnelRelay(stats, self._channel_ended)
        try:
            return await open_tcp_tunnel(relay, dest.host, dest.port, self._ctx.tunnel_timeout)
        except (OSError, TimeoutError) as exc:
            reason = getattr(exc, "strerror", None) or "timed out"
            err = HostUnreachable(f"cannot reach {dest.label}: {reason}")
            stats.error = err
            self._channel_ended(stats)
            raise _open_error(err) from None

    def unix_connection_requested(self, dest_path: str) -> Awaitable[TunnelRelay]:
        """``ssh -L PORT:/path/to.sock``: the routed host connects to its socket."""
        return self._open_unix_tunnel(dest_path)

    async def _open_unix_tunnel(self, path: str) -> TunnelRelay:
        if not self._forwarding.local_forwarding:
            denied = ForwardDenied(
                f"{self.user} may not connect to the socket {path}: local forwarding is off"
            )
            self._refuse_channel(denied, "forward", path)
            raise _open_error(denied)
        return await self._forward_via_upstream(
            "forward", path, lambda up, far: up.create_unix_connection(far, path)
        )

    def tun_requested(self, unit: int | None) -> bool:
        """``ssh -w``: refused as sshd refuses it with ``PermitTunnel no``."""
        denied = RequestDenied("tunnel device forwarding (ssh -w) is not carried by the bastion")
        self._refuse_channel(denied, "tun", "" if unit is None else f"tun{unit}")
        raise _open_error(denied)

    def tap_requested(self, unit: int | None) -> bool:
        return self.tun_requested(unit)

    async def _forward_via_upstream(
        self,
        kind: str,
        target: str,
        open_far: Callable[
            [asyncssh.SSHClientConnection, Callable[[], ChannelFar]], Awaitable[object]
        ],
    ) -> TunnelRelay:
        """``ssh -L``: the routed host opens the connection, as if logged in there."""
        try:
            upstream = await self.upstream()
        except BastionError as exc:
            self._refuse_channel(exc, kind, target)
            raise _open_error(exc) from None
        stats = self._channel_stats(kind)
        stats.detail["target"] = target
        relay = TunnelRelay(stats, self._channel_ended)
        try:
            await open_far(upstream, lambda: ChannelFar(relay))
        except asyncssh.ChannelOpenError as exc:
            # the host's own words, with its code: the client prints them as
            # it would for a direct login ("connect failed: Connection refused")
            stats.error = UpstreamRefused(f"{target} via the host: {exc.reason}")
            self._channel_ended(stats)
            raise
        except (OSError, asyncssh.Error) as exc:
            err = UpstreamRefused(f"{target} via the host: {exc}")
            stats.error = err
            self._channel_ended(stats)
            raise _open_error(err) from None
        return relay

    def _refuse_channel(self, exc: BastionError, kind: str, target: str) -> None:
        log.warning(
            "%s of %s from %s to %s refused: %s", kind, self.user, self.source, target, exc.detail
        )
        self._ctx.audit.record(
            kind,
            conn=self.conn_id,
            user=self.user,
            source=self.source,
            upstream=target or None,
            outcome="refused",
            reason=exc.reason,
            message=exc.user_message,
        )

    def server_requested(
        self, listen_host: str, listen_port: int
    ) -> Awaitable[asyncssh.SSHListener | bool]:
        target = _hostport(listen_host, listen_port)

        def listen(up: asyncssh.SSHClientConnection, incoming: Any) -> Awaitable[Any]:
            return up.create_server(incoming, listen_host, listen_port, encoding=None)

        def back(
            front: asyncssh.SSHServerConnection, far: Any, port: int, *orig: Any
        ) -> Awaitable[Any]:
            # the port the host allocated for `-R 0:...`: the client matches
            # forwarded-tcpip channels by it ("unknown listen_port 0" otherwise)
            return front.create_connection(far, listen_host, port, *orig, encoding=None)

        return self._remote_forward(target, listen, back)

    def unix_server_requested(self, listen_path: str) -> Awaitable[asyncssh.SSHListener | bool]:
        def listen(up: asyncssh.SSHClientConnection, incoming: Any) -> Awaitable[Any]:
            return up.create_unix_server(incoming, listen_path, encoding=None)

        def back(
            front: asyncssh.SSHServerConnection, far: Any, port: int, *orig: Any
        ) -> Awaitable[Any]:
            return front.create_unix_connection(far, listen_path, encoding=None)

        return self._remote_forward(listen_path, listen, back)

    async def _remote_forward(
        self,
        target: str,
        listen: Callable[[asyncssh.SSHClientConnection, Any], Awaitable[Any]],
        back: Callable[..., Awaitable[Any]],
    ) -> asyncssh.SSHListener | bool:
        """``ssh -R``: the routed host listens; its connections come back to the person."""
        if not self._forwarding.remote_forwarding:
            exc = ForwardDenied(f"{self.user} may not forward remote ports or sockets")
            self._refuse_channel(exc, "remote-forward", target)
            return False
        try:
            upstream = await self.upstream()
        except BastionError as exc:
            self._refuse_channel(exc, "remote-forward", target)
            return False
        front = self.conn
        assert front is not None
        ports: list[int] = [0]

        async def incoming(*orig: object) -> TunnelRelay:
            # open the person's side first, so the host's connection is
            # accepted only once there is somewhere for its bytes to go
            stats = self._channel_stats("remote-forward")
            stats.detail["target"] = target
            relay = TunnelRelay(stats, self._channel_ended)
            try:
                await back(front, lambda: ChannelFar(relay), ports[0], *orig)
            except (asyncssh.ChannelOpenError, OSError) as exc:
                stats.error = ClientRefused(f"the client refused {target}: {exc}")
                self._channel_ended(stats)
                raise asyncssh.ChannelOpenError(
                    asyncssh.OPEN_CONNECT_FAILED, "the client refused the connection"
                ) from None
            return relay

        if self._lease is not None:
            # the listener is this connection's: no one else gets this upstream
            self._lease.retire()
        try:
            listener = await listen(upstream, incoming)
        except (asyncssh.ChannelListenError, OSError) as exc:
            refused = UpstreamRefused(f"the host refused: {exc}")
            self._refuse_channel(refused, "remote-forward", target)
            return False
        with contextlib.suppress(Exception):
            ports[0] = int(listener.get_port())
        self._listeners.append(listener)
        return cast(asyncssh.SSHListener, listener)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _closed_by(exc: Exception | None) -> str:
    """Who ended a connection, for its audit record."""
    if exc is None:
        return "bastion"
    if isinstance(exc, asyncssh.ConnectionLost):
        return "client"
    if isinstance(exc, asyncssh.DisconnectError):
        return f"client: {exc.reason}"[:200]
    return f"error: {type(exc).__name__}"


def _open_error(exc: BastionError) -> asyncssh.ChannelOpenError:
    """The channel-open failure a person's client sees for ``exc``."""
    return asyncssh.ChannelOpenError(exc.open_code, exc.user_message)


class ConnectionRegistry:
    """Live connections, and the bound on unauthenticated ones."""

    def __init__(self, max_unauthenticated: int) -> None:
        self._max_unauth = max_unauthenticated
        self._unauth = 0
        self.live: set[BastionConnection] = set()
        self.empty = asyncio.Event()
        self.empty.set()

    def admit(self, conn: BastionConnection) -> bool:
        if self._unauth >= self._max_unauth:
            return False
        self._unauth += 1
        self.live.add(conn)
        self.empty.clear()
        return True

    def left_unauth(self) -> None:
        self._unauth -= 1

    def remove(self, conn: BastionConnection) -> None:
        self.live.discard(conn)
        if not self.live:
            self.empty.set()


class BastionServer:
    """The listener: start, stop accepting, drain, close."""

    def __init__(self, ctx: ServerContext) -> None:
        self._ctx = ctx
        self.registry = ConnectionRegistry(ctx.settings.max_unauthenticated)
        self._acceptor: asyncssh.SSHAcceptor | None = None

    @property
    def port(self) -> int:
        assert self._acceptor is not None
        return int(self._acceptor.get_port())

    async def start(self) -> None:
        s = self._ctx.settings
        factory: Callable[[], asyncssh.SSHServer] = lambda: BastionConnection(  # noqa: E731
            self._ctx, self.registry
        )
        # loaded once: asyncssh re-reads its options at the start of every
        # login, and paths would make it read and decode the key files (and
        # look for their -cert.pub) each time
        host_keys: list[asyncssh.SSHKeyPair] = []
        for path in s.host_keys:
            try:
                host_keys += asyncssh.load_keypairs(str(path))
            except (OSError, asyncssh.KeyImportError, ValueError) as exc:
                raise ConfigError(f"[server] host_keys: cannot load {path}: {exc}") from exc
        options: dict[str, Any] = {
            "server_host_keys": host_keys,
            # no GSSAPI here; asyncssh would otherwise look up the machine's
            # FQDN (gethostname, then a resolver query) for every login
            "gss_host": None,
            "login_timeout": s.login_grace_time,
            "line_editor": False,
            "encoding": None,
            "allow_scp": False,
            "x11_forwarding": False,
            # the person's agent is only ever passed upstream when their policy says so
            # (see _connect_upstream); the listener lives in a 0700 temp dir
            "agent_forwarding": True,
            "server_version": s.banner_version,
            "keepalive_interval": 60,
            "config": None,
        }
        try:
            self._acceptor = await asyncssh.create_server(
                factory, s.listen_host or None, s.listen_port, reuse_address=True, **options
            )
        except (OSError, asyncssh.KeyImportError, ValueError) as exc:
            raise ConfigError(f"[server] listen: cannot listen on {s.listen}: {exc}") from exc
        log.info("listening on %s", s.listen)

    async def stop(self, drain_timeout: float = 10.0) -> dict[str, int]:
        """Stop accepting, let sessions finish within ``drain_timeout``, then close."""
        if self._acceptor is None:
            return {"drained": 0, "closed": 0}
        # newer Pythons' wait_closed() also waits for live connections: only
        # close the listener here and wait for it after the drain
        self._acceptor.close()
        before = len(self.registry.live)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.registry.empty.wait(), drain_timeout)
        left = list(self.registry.live)
        for bconn in left:
            if bconn.conn is not None:
                bconn.conn.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._acceptor.wait_closed(), 5)
        counts = {"drained": before - len(left), "closed": len(left)}
        log.info("stopped: %(drained)d connections finished, %(closed)d closed", counts)
        return counts
