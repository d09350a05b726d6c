"""The channels a person's client opens, and the forwarding requests it makes.

Sessions are relayed to the routed host; ``direct-tcpip`` is a jump or local
forwarding as the policy layer decides; Unix-socket forwards, ``-R`` and
``tun`` follow docs/channels.md. Each channel reports through the events
(:mod:`bastion.events`), never to the audit log or metrics directly.

:class:`ChannelRequests` is the channel half of
:class:`~bastion.core.frontdoor.BastionConnection`; the other half holds the
connection's life, authentication and its upstream connection.
"""

from __future__ import annotations

import base64
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import asyncssh

from bastion.core.refusal import open_error
from bastion.core.relay import RelayStats, SessionRelay
from bastion.core.sshd_compat import transparent_channel
from bastion.core.tunnel import ChannelFar, TunnelRelay, open_tcp_tunnel
from bastion.errors import (
    BastionError,
    ClientRefused,
    ForwardDenied,
    HostUnreachable,
    RequestDenied,
    UpstreamRefused,
    printable,
)
from bastion.events import ChannelEnded, ChannelOpened, ChannelRefused, SessionStarted
from bastion.model import ForwardingPolicy, UpstreamPlan

if TYPE_CHECKING:
    from bastion.core.frontdoor import ServerContext
    from bastion.core.upstream import UpstreamLease

log = logging.getLogger("bastion.frontdoor")


def _shown(raw: bytes | None, limit: int = 4096) -> tuple[str | None, str | None]:
    """A command or subsystem name for the audit, unambiguous: (the text,
    None) when it is UTF-8, else (None, the bytes in base64); at most
    ``limit`` bytes of it (then "...")."""
    if raw is None:
        return None, None
    cut = raw[:limit]
    more = "..." if len(raw) > limit else ""
    try:
        return cut.decode("utf-8") + more, None
    except UnicodeDecodeError:
        return None, base64.b64encode(cut).decode() + more


def _no_nul(text: str, what: str) -> None:
    """sshd reads forwarding addresses as C strings and ends the connection on
    a NUL; passed upstream one would end the host's connection for everyone."""
    if "\0" in text:
        raise RequestDenied(f"the {what} holds a NUL byte")


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ChannelRequests(asyncssh.SSHServer):
    """asyncssh's channel callbacks for one person's connection."""

    # provided by the connection half (bastion.core.frontdoor)
    _ctx: ServerContext
    conn: asyncssh.SSHServerConnection | None
    conn_id: str
    user: str
    source: str
    _plan: UpstreamPlan | None
    _forwarding: ForwardingPolicy
    _lease: UpstreamLease | None
    _listeners: list[asyncssh.SSHListener]
    _channels: int
    _no_more_sessions: bool
    # the relays' counters of this connection's channels that are open now
    open_channels: set[RelayStats]
    # its session relays that are open now (for notices)
    open_sessions: dict[RelayStats, SessionRelay]

    async def upstream(self) -> asyncssh.SSHClientConnection:
        raise NotImplementedError

    async def private_upstream(
        self, refused: asyncssh.SSHClientConnection
    ) -> asyncssh.SSHClientConnection | None:
        raise NotImplementedError

    def _disconnect(self, exc: BastionError, code: int = asyncssh.DISC_BY_APPLICATION) -> None:
        raise NotImplementedError

    def _channel_stats(self, kind: str) -> RelayStats:
        self._channels += 1
        self._ctx.events.emit(ChannelOpened(self.conn_id, kind))
        stats = RelayStats(kind=kind)
        self.open_channels.add(stats)
        return stats

    def _channel_ended(self, stats: RelayStats) -> None:
        self.open_channels.discard(stats)
        self.open_sessions.pop(stats, None)
        err = stats.error
        plan = self._plan
        self._ctx.events.emit(
            ChannelEnded(
                conn=self.conn_id,
                kind=stats.kind,
                user=self.user,
                source=self.source,
                route=plan.route.raw if plan else None,
                upstream=plan.destination.label if plan else stats.detail.get("target"),
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
                session_id=stats.detail.get("session"),
            )
        )

    def _over_limit(self, kind: str) -> None:
        """Refuse a channel beyond ``max_sessions`` (sshd's MaxSessions) or
        ``max_channels``, as sshd does: administratively prohibited."""
        settings = self._ctx.settings
        sessions = sum(1 for st in self.open_channels if st.kind == "session")
        if kind == "session" and sessions >= settings.max_sessions:
            why = f"no more sessions on this connection (MaxSessions {settings.max_sessions})"
        elif len(self.open_channels) >= settings.max_channels:
            why = f"too many channels on this connection (max_channels {settings.max_channels})"
        else:
            return
        denied = RequestDenied(why)
        self._refuse_channel(denied, kind, "")
        raise open_error(denied)

    def session_requested(self) -> tuple[asyncssh.SSHServerChannel[bytes], SessionRelay]:
        assert self.conn is not None
        self._over_limit("session")
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
        stats = self._channel_stats("session")
        session_id = stats.detail["session"] = f"{self.conn_id}-{self._channels}"
        recorder = self._ctx.recorder
        relay = SessionRelay(
            self.upstream,
            self._ctx.settings.env_allow,
            stats,
            self._channel_ended,
            reopen_upstream=self.private_upstream,
            on_refused=self._request_refused,
            on_started=lambda command, subsystem, term: self._ctx.events.emit(
                SessionStarted(
                    conn=self.conn_id,
                    session_id=session_id,
                    user=self.user,
                    source=self.source,
                    request=str(stats.detail.get("request", "")),
                    command=_shown(command)[0],
                    command_base64=_shown(command)[1],
                    subsystem=_shown(subsystem)[0] or _shown(subsystem)[1],
                    term=None if term is None else printable(term, 64),
                )
            ),
            make_tap=(
                (lambda: recorder.open(self._plan, session_id, self.source) if self._plan else None)
                if recorder is not None
                else None
            ),
        )
        self.open_sessions[stats] = relay
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
        target = hostport(host, port)
        self._over_limit("tunnel")
        try:
            _no_nul(host, "host")
            tunnel = self._ctx.policy.tunnel(self.user, host, port)
        except BastionError as exc:
            self._refuse_channel(exc, "tunnel", target)
            raise open_error(exc) from None
        dest = tunnel.destination
        if dest is None:  # local forwarding, allowed by policy
            return await self._forward_via_upstream(
                "forward", target, lambda up, far: up.create_connection(far, host, port)
            )
        stats = self._channel_stats("tunnel")
        stats.detail["target"] = dest.label
        stats.detail["jump"] = (host, port)  # as asked: re-checked when access changes
        relay = TunnelRelay(stats, self._channel_ended)
        try:
            return await open_tcp_tunnel(relay, dest.host, dest.port, self._ctx.tunnel_timeout)
        except (OSError, TimeoutError) as exc:
            reason = getattr(exc, "strerror", None) or "timed out"
            err = HostUnreachable(f"cannot reach {dest.label}: {reason}")
            stats.error = err
            self._channel_ended(stats)
            raise open_error(err) from None

    def unix_connection_requested(self, dest_path: str) -> Awaitable[TunnelRelay]:
        """``ssh -L PORT:/path/to.sock``: the routed host connects to its socket."""
        return self._open_unix_tunnel(dest_path)

    async def _open_unix_tunnel(self, path: str) -> TunnelRelay:
        self._over_limit("forward")
        if "\0" in path:
            nul = RequestDenied("the socket path holds a NUL byte")
            self._refuse_channel(nul, "forward", path)
            raise open_error(nul)
        if not self._forwarding.local_forwarding:
            denied = ForwardDenied(
                f"{self.user} may not connect to the socket {path}: local forwarding is off"
            )
            self._refuse_channel(denied, "forward", path)
            raise open_error(denied)
        return await self._forward_via_upstream(
            "forward", path, lambda up, far: up.create_unix_connection(far, path)
        )

    def tun_requested(self, unit: int | None) -> bool:
        """``ssh -w``: refused as sshd refuses it with ``PermitTunnel no``."""
        denied = RequestDenied("tunnel device forwarding (ssh -w) is not carried by the bastion")
        self._refuse_channel(denied, "tun", "" if unit is None else f"tun{unit}")
        raise open_error(denied)

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
            raise open_error(exc) from None
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
            raise open_error(err) from None
        return relay

    def _refuse_channel(self, exc: BastionError, kind: str, target: str) -> None:
        log.warning(
            "%s of %s from %s to %s refused: %s",
            kind,
            self.user,
            self.source,
            printable(target) or "-",
            printable(exc.detail, 400),
        )
        self._ctx.events.emit(
            ChannelRefused(
                self.conn_id,
                kind,
                self.user,
                self.source,
                target or None,
                exc.reason,
                exc.user_message,
            )
        )

    def server_requested(
        self, listen_host: str, listen_port: int
    ) -> Awaitable[asyncssh.SSHListener | bool]:
        target = hostport(listen_host, listen_port)

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
            exc: BastionError = ForwardDenied(
                f"{self.user} may not forward remote ports or sockets"
            )
            self._refuse_channel(exc, "remote-forward", target)
            return False
        if "\0" in target:
            exc = RequestDenied("the listen address holds a NUL byte")
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
