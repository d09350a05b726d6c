"""The listener: start, stop accepting, drain, close; the registry of live
connections and the bound on unauthenticated ones; listing and ending live
connections (``bastion sessions``, ``bastion kill``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncssh

from bastion.core.frontdoor import BastionConnection, ServerContext
from bastion.errors import ConfigError, Drained, ShutDown

log = logging.getLogger("bastion.frontdoor")


class ConnectionRegistry:
    """Live connections, and the bound on unauthenticated ones."""

    def __init__(self, max_unauthenticated: int) -> None:
        self._max_unauth = max_unauthenticated
        self._unauth = 0
        self._dropped = 0  # turned away since the last log line
        self._dropped_logged = -1.0
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

    def note_dropped(self) -> int:
        """Count a turned-away connection; the count to log now (0: not yet)."""
        self._dropped += 1
        now = time.monotonic()
        if now - self._dropped_logged < 1.0:
            return 0
        count, self._dropped, self._dropped_logged = self._dropped, 0, now
        return count

    def left_unauth(self) -> None:
        self._unauth -= 1

    @property
    def unauthenticated(self) -> int:
        """Connections admitted and not yet authenticated (a metrics gauge reads it)."""
        return self._unauth

    def remove(self, conn: BastionConnection) -> None:
        self.live.discard(conn)
        if not self.live:
            self.empty.set()


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

    def __init__(self, ctx: ServerContext) -> None:
        self._ctx = ctx
        self.registry = ConnectionRegistry(ctx.settings.max_unauthenticated)
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._stopping = False
        self._drained = False

    @property
    def port(self) -> int:
        assert self._acceptor is not None
        return int(self._acceptor.get_port())

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
