"""The listener: start, stop accepting, drain, close; the registry of live
connections and the bounds on unauthenticated ones (in all and per source);
listing and ending live connections (``bastion sessions``, ``bastion kill``).

Accepted connections pass the gate (:mod:`bastion.core.gate`: PROXY
protocol, PerSourcePenalties, PerSourceMaxStartups, MaxStartups) before
asyncssh sees them; each connection's end is weighed for a penalty here
(:func:`penalty_kind`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import asyncssh

from bastion.access_settings import PenaltySettings, parse_net_block_size, parse_networks
from bastion.config import ServerSettings
from bastion.core.frontdoor import BastionConnection, ServerContext
from bastion.core.gate import PROXY_DEADLINE, Gate, raise_fd_limit
from bastion.core.penalties import PenaltyBox, PenaltyStart
from bastion.core.sshd_compat import turn_away
from bastion.errors import AccessDenied, ConfigError, Drained, ShutDown, TooManyConnections
from bastion.events import PenaltyStarted

log = logging.getLogger("bastion.frontdoor")


class ConnectionRegistry:
    """Live connections; the unauthenticated ones in all and per source block
    (the bound at ``full`` and PerSourceMaxStartups); where each one's end
    earns its source a penalty (PerSourcePenalties)."""

    def __init__(self, max_unauthenticated: int, penalties: PenaltyBox | None = None) -> None:
        self.max_unauth = max_unauthenticated
        self._unauth = 0
        self._per_block: Counter[str] = Counter()
        self._blocks: dict[BastionConnection, tuple[str, str]] = {}  # unauth: (address, block)
        self._penalties = (
            penalties if penalties is not None else PenaltyBox(PenaltySettings(enabled=False))
        )
        self._dropped = 0  # turned away since the last log line
        self._dropped_logged = -1.0
        self.live: set[BastionConnection] = set()
        self.empty = asyncio.Event()
        self.empty.set()

    def admit(self, conn: BastionConnection) -> bool:
        """Count ``conn`` as unauthenticated; False at MaxStartups ``full``."""
        if self._unauth >= self.max_unauth:
            return False
        self._unauth += 1
        address = _address(conn)
        block = self._penalties.block(address)
        self._per_block[block] += 1
        self._blocks[conn] = (address, block)
        self.live.add(conn)
        self.empty.clear()
        return True

    def turn_away(self, conn: asyncssh.SSHServerConnection, source: str) -> TooManyConnections:
        """Turn away a connection over MaxStartups ``full`` with a message the
        client prints; the error, for the connection's record.

        Sent after asyncssh's version line (it is sent when connection_made
        returns): a disconnect packet before it is garbage to the client
        ("banner line contains invalid characters"); after it, OpenSSH prints
        "Received disconnect ...: too many ..." and exits 255."""
        dropped = self.note_dropped()
        if dropped:  # at most once a second, with the count since the last line
            log.warning(
                "dropped %d connection(s) (the last from %s): %d unauthenticated "
                "connections already",
                dropped,
                source,
                self.max_unauth,  # MaxStartups full
            )
        error = TooManyConnections("too many unauthenticated connections, try again later")
        asyncio.get_running_loop().call_soon(
            turn_away, conn, asyncssh.DISC_TOO_MANY_CONNECTIONS, f"bastion: {error.user_message}"
        )
        return error

    def note_dropped(self) -> int:
        """Count a turned-away connection; the count to log now (0: not yet)."""
        self._dropped += 1
        now = time.monotonic()
        if now - self._dropped_logged < 1.0:
            return 0
        count, self._dropped, self._dropped_logged = self._dropped, 0, now
        return count

    def left_unauth(self, conn: BastionConnection) -> None:
        """``conn`` authenticated or ended; a no-op once it was evicted."""
        found = self._blocks.pop(conn, None)
        if found is None:
            return
        self._unauth -= 1
        self._per_block[found[1]] -= 1
        if not self._per_block[found[1]]:
            del self._per_block[found[1]]

    def evict(self) -> str | None:
        """Make room at MaxStartups ``full`` for a source holding none (the
        gate's fair share, docs/hostile-clients.md): close the oldest
        unauthenticated connection of the block that holds the most, if it
        holds at least 2 (one person's single login is never evicted). Its
        slot is free at once; its end earns its source the penalty any
        unauthenticated end does (:func:`penalty_kind`: ``noauth``). Returns
        its address, or None when no block holds 2."""
        if not self._per_block:
            return None
        block, held = max(self._per_block.items(), key=lambda item: item[1])
        if held < 2:
            return None
        # dicts keep insertion order: the first of the block is its oldest
        victim = next(c for c, (_, b) in self._blocks.items() if b == block)
        address = self._blocks[victim][0]
        self.left_unauth(victim)
        if victim.conn is not None:
            turn_away(
                victim.conn,
                asyncssh.DISC_TOO_MANY_CONNECTIONS,
                "bastion: too many unauthenticated connections from your address; "
                "the oldest is closed to let another address in",
            )
        return address

    @property
    def unauthenticated(self) -> int:
        """Connections admitted and not yet authenticated (a metrics gauge reads it)."""
        return self._unauth

    def unauth_in(self, block: str) -> int:
        """Unauthenticated connections from source block ``block``."""
        return self._per_block.get(block, 0)

    def remove(self, conn: BastionConnection, exc: Exception | None = None) -> None:
        admitted = conn in self.live
        self.live.discard(conn)
        if not self.live:
            self.empty.set()
        if admitted:
            kind = penalty_kind(conn, exc)
            if kind is not None:
                self._penalties.penalise(_address(conn), kind)


def penalty_kind(conn: BastionConnection, exc: Exception | None) -> str | None:
    """What a connection's end earns its source (sshd_config(5)
    PerSourcePenalties), None for a clean login. Called once, at its end."""
    if isinstance(conn.refusal, AccessDenied):
        return "refuseconnection"
    if conn.authenticated:
        return None
    # asyncssh ends a login that outlived login_timeout with this ConnectionLost
    if isinstance(exc, asyncssh.ConnectionLost) and "Login timeout" in str(exc.reason):
        return "grace_exceeded"
    return "authfail" if conn.auth_failures else "noauth"


def _address(conn: BastionConnection) -> str:
    peer = conn.conn.get_extra_info("peername") if conn.conn is not None else None
    return str(peer[0]) if peer else "?"


@dataclass(frozen=True)
class LiveConnection:
    """One authenticated connection as ``bastion sessions`` lists it."""

    conn: str
    user: str
    source: str
    route: str | None
    upstream: str | None
    since: float  # epoch seconds
    channels: int  # open now
    bytes_up: int  # of the open channels
    bytes_down: int
    idle: float  # seconds since the last byte either way (0 without channels)


class BastionServer:
    """The listener: start, stop accepting, drain, close; list and end live
    connections."""

    def __init__(
        self,
        ctx: ServerContext,
        *,
        startups: tuple[int, int, int] | None = None,
        penalties: PenaltySettings | None = None,
    ) -> None:
        """``startups``: MaxStartups (start, rate %, full), by default
        ``max_unauthenticated`` with no early drop; ``penalties``:
        PerSourcePenalties, off by default (the application passes both from
        its settings)."""
        self._ctx = ctx
        s = ctx.settings
        mu = s.max_unauthenticated
        self._startups = startups or (mu, 100, mu)
        v4, v6 = parse_net_block_size(s.per_source_net_block_size)
        self.penalties = PenaltyBox(
            penalties or PenaltySettings(enabled=False),
            v4,
            v6,
            on_start=self._penalty_started,
            # a load balancer's own connections (its health checks) name no client
            also_exempt=parse_networks(s.proxy_protocol_from),
        )
        self.registry = ConnectionRegistry(self._startups[2], self.penalties)
        self.gate: Gate | None = None
        self._acceptor: asyncio.Server | None = None
        self._stopping = False
        self._drained = False

    def _penalty_started(self, p: PenaltyStart) -> None:
        self._ctx.events.emit(PenaltyStarted(p.block, p.seconds, p.reason, p.earned))

    def configure(
        self, server: ServerSettings, startups: tuple[int, int, int], penalties: PenaltySettings
    ) -> None:
        """SIGHUP: new bounds and penalty settings for new connections; the
        penalties in force are kept (as sshd keeps them across a reload)."""
        self._startups = startups
        self.registry.max_unauth = startups[2]
        v4, v6 = parse_net_block_size(server.per_source_net_block_size)
        proxies = parse_networks(server.proxy_protocol_from)
        self.penalties.configure(penalties, v4, v6, also_exempt=proxies)
        if self.gate is not None:
            self.gate.configure(
                startups=startups,
                per_source_max=server.per_source_max_startups,
                proxies=proxies,
                header_deadline=min(PROXY_DEADLINE, server.login_grace_time),
            )

    @property
    def port(self) -> int:
        assert self._acceptor is not None
        return int(self._acceptor.sockets[0].getsockname()[1])

    @property
    def listening(self) -> bool:
        return self._acceptor is not None and not self._stopping

    def live(self) -> list[LiveConnection]:
        """The authenticated connections, oldest first."""
        now = time.monotonic()
        out = []
        for c in self.registry.live:
            if not c.authenticated:
                continue
            chans = list(c.open_channels)
            last = max((st.last_activity for st in chans), default=now)
            plan = c.plan
            out.append(
                LiveConnection(
                    conn=c.conn_id,
                    user=c.user,
                    source=c.source,
                    route=plan.route.raw if plan else None,
                    upstream=plan.destination.label if plan else None,
                    since=c.started_wall,
                    channels=len(chans),
                    bytes_up=sum(st.bytes_up for st in chans),
                    bytes_down=sum(st.bytes_down for st in chans),
                    idle=round(now - last, 1),
                )
            )
        return sorted(out, key=lambda x: x.since)

    def end(self, *, conn: str | None = None, user: str | None = None, why: str) -> list[str]:
        """End the live connections with id ``conn`` or of ``user``: each
        person gets ``why`` in a disconnect message. Returns the ids ended."""
        ended = []
        for c in list(self.registry.live):
            if c.authenticated and (c.conn_id == conn or (user is not None and c.user == user)):
                c.end(why)
                ended.append(c.conn_id)
        return ended

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on ``[server] listen``, or serve ``sock`` (a listening
        socket a supervisor handed over, bastion/workers.py)."""
        s = self._ctx.settings
        raise_fd_limit()
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
        try:
            # made once, as asyncssh.listen() would; the gate makes each
            # connection with them (bastion/core/gate.py)
            options = await asyncssh.SSHServerConnectionOptions.construct(
                config=None,
                server_factory=factory,
                server_host_keys=host_keys,
                # no GSSAPI here; asyncssh would otherwise look up the machine's
                # FQDN (gethostname, then a resolver query) for every login
                gss_host=None,
                login_timeout=s.login_grace_time,
                line_editor=False,
                encoding=None,
                allow_scp=False,
                x11_forwarding=False,
                # the person's agent is only ever passed upstream when their policy
                # says so (see _connect_upstream); the listener lives in a 0700 temp dir
                agent_forwarding=True,
                server_version=s.banner_version,
                keepalive_interval=60,
            )
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise ConfigError(f"[server]: {exc}") from exc
        self.gate = Gate(
            options,
            self.registry,
            self.penalties,
            self._ctx.events,
            startups=self._startups,
            per_source_max=s.per_source_max_startups,
            proxies=parse_networks(s.proxy_protocol_from),
            header_deadline=min(PROXY_DEADLINE, s.login_grace_time),
        )
        try:
            loop = asyncio.get_running_loop()
            # a flood's connections wait in the backlog to be refused; a person's with them
            if sock is not None:
                self._acceptor = await loop.create_server(
                    self.gate.protocol, sock=sock, backlog=1024
                )
            else:
                self._acceptor = await loop.create_server(
                    self.gate.protocol,
                    s.listen_host or None,
                    s.listen_port,
                    reuse_address=True,
                    backlog=1024,
                )
        except OSError as exc:
            raise ConfigError(f"[server] listen: cannot listen on {s.listen}: {exc}") from exc
        log.info("listening on %s", s.listen)

    def stop_accepting(self) -> None:
        """Close the listener; live connections go on."""
        if self._acceptor is not None and not self._stopping:
            self._stopping = True
            self._acceptor.close()
            log.info("no longer accepting connections")

    async def drain(self, timeout: float, warn_before: float | None = None) -> dict[str, int]:
        """Stop accepting, tell every live session, let them finish within
        ``timeout`` seconds (a second notice ``warn_before`` seconds before the
        end), then close the rest with a disconnect that says why. Returns
        how many finished and how many were closed."""
        self.stop_accepting()
        before = len(self.registry.live)
        minutes = f"{timeout / 60:.0f} min" if timeout >= 120 else f"{timeout:.0f} s"
        for c in list(self.registry.live):
            c.notice(
                f"this bastion is being drained for maintenance; your session may go on "
                f"for up to {minutes}, new logins go to another bastion"
            )
        # the second notice a minute before the end (half-way for short drains)
        warn = min(60.0, timeout / 2) if warn_before is None else warn_before
        first = max(timeout - warn, 0.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.registry.empty.wait(), first)
        if self.registry.live and timeout > first:
            for c in list(self.registry.live):
                c.notice(f"this session will be closed in {timeout - first:.0f} s (drain)")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.registry.empty.wait(), timeout - first)
        left = [c for c in self.registry.live if c.conn is not None]
        for c in left:
            c.end("this bastion was drained; log in again to reach another one", Drained)
        # the disconnects are on their way; let the connections go
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.registry.empty.wait(), 5)
        counts = {"drained": before - len(left), "closed": len(left)}
        self._drained = True
        log.info("drained: %(drained)d connections finished, %(closed)d closed", counts)
        return counts

    async def stop(self, drain_timeout: float = 10.0) -> dict[str, int]:
        """Stop accepting, let sessions finish within ``drain_timeout``, then close."""
        if self._acceptor is None:
            return {"drained": 0, "closed": 0}
        # newer Pythons' wait_closed() also waits for live connections: only
        # close the listener here and wait for it after the drain
        self._stopping = True
        self._acceptor.close()
        before = len(self.registry.live)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.registry.empty.wait(), drain_timeout)
        left = list(self.registry.live)
        for bconn in left:
            if bconn.conn is not None:
                bconn.end("the bastion is shutting down; log in again", ShutDown)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._acceptor.wait_closed(), 5)
        counts = {"drained": before - len(left), "closed": len(left)}
        if before or not self._drained:  # after a drain, its own line said it all
            log.info("stopped: %(drained)d connections finished, %(closed)d closed", counts)
        return counts
