"""The gate: what happens to a TCP connection before asyncssh sees it.

The listener's sockets hand each accepted connection to a :class:`Gate`,
which decides at once, with no SSH version line sent and no key exchange:

1. From an address in ``[server] proxy_protocol_from`` it reads the PROXY
   protocol header (v1 or v2, :mod:`bastion.core.proxy`), bounded in size
   and in time (:data:`PROXY_DEADLINE` seconds, or the login grace time if
   shorter); a trusted proxy that sends no
   valid header is dropped. The header's address is the client's from then
   on: audit, penalties, limits and per-person ``from`` checks all see it.
2. A source block with an active penalty (:mod:`bastion.core.penalties`,
   sshd_config(5) PerSourcePenalties) is closed at once.
3. sshd_config(5) PerSourceMaxStartups: a source block that already holds
   ``per_source_max_startups`` unauthenticated connections (blocks by
   PerSourceNetBlockSize) is dropped, and earns the ``noauth`` penalty.
4. sshd_config(5) MaxStartups ``start:rate:full``: with ``start`` or more
   unauthenticated connections in all, a new one is dropped with a
   probability of ``rate`` % rising linearly to 100 % at ``full``
   ("random early drop"), so a flood cannot fill the door for good. At
   ``full`` the connection still reaches asyncssh, which is told to turn it
   away with a message the client prints ("too many unauthenticated
   connections"): a person who hits the bound learns why.
5. Fair share (not in sshd, docs/hostile-clients.md): a connection from a
   source block that holds *no* unauthenticated connection now skips the
   random early drop, and at ``full`` the oldest unauthenticated connection
   of the block holding the most (at least 2) is evicted to make room. Else
   ``full / per_source_max_startups`` sources (256 / 16: 16 addresses)
   holding idle connections would lock everybody else out, at no cost to
   them: sshd's drops fall on the newcomers, never on the holders.

What passes becomes an ``asyncssh.SSHServerConnection`` on the same
transport (built from options made once, as ``asyncssh.listen`` would).
Until a direct client's first bytes arrive the gate still peeks at them: a
PROXY header from an address not trusted to send one is dropped. Every drop
is counted (``DoorRefused``, the ``bastion_connections_refused_total``
metric) and logged at most every :data:`LOG_EVERY` seconds as a summary,
never once per connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import resource
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

import asyncssh

from bastion.access_settings import IPNetwork
from bastion.core import proxy
from bastion.core.penalties import PenaltyBox
from bastion.events import DoorRefused, EventBus

log = logging.getLogger("bastion.frontdoor")

PROXY_DEADLINE = 5.0  # seconds a trusted proxy has to send its header
LOG_EVERY = 10.0  # seconds between summaries of dropped connections


class UnauthCounts(Protocol):
    """The unauthenticated connections in all and per source block
    (``ConnectionRegistry`` answers)."""

    @property
    def unauthenticated(self) -> int: ...
    def unauth_in(self, block: str) -> int: ...
    def evict(self) -> str | None:
        """Close the oldest unauthenticated connection of the block holding
        the most (at least 2); its address, or None when no block holds 2."""
        ...


def max_startups_drop(count: int, start: int, rate: int, full: int, draw: float) -> bool:
    """sshd's ``drop_connection()`` (sshd.c): whether a new connection is
    dropped with ``count`` unauthenticated ones open, for MaxStartups
    ``start:rate:full``; ``draw`` is uniform in [0, 1). At ``full`` and over
    this answers False: the registry turns those away with a message."""
    if count < start or count >= full:
        return False
    p = rate + (100 - rate) * (count - start) / (full - start)
    return draw * 100 < p


def raise_fd_limit() -> None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit: each
    connection, held or being refused, is a file descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.info("open files limit raised from %d to %d", soft, hard)


class Gate:
    """The decisions at accept, and the hand-off to asyncssh."""

    def __init__(
        self,
        options: asyncssh.SSHServerConnectionOptions,
        counts: UnauthCounts,
        penalties: PenaltyBox,
        events: EventBus,
        *,
        startups: tuple[int, int, int],
        per_source_max: int,
        proxies: tuple[IPNetwork, ...] = (),
        header_deadline: float = PROXY_DEADLINE,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._options = options
        self._counts = counts
        self.penalties = penalties
        self._events = events
        self._startups = startups
        self._per_source_max = per_source_max
        self._proxies = proxies
        self.header_deadline = header_deadline
        self._rand = rand
        self.awaiting_header = 0  # trusted proxies' connections still sending a header
        self.refused: Counter[str] = Counter()  # since start, by reason
        self._unlogged: Counter[str] = Counter()
        self._logged = 0.0
        self._detail = ""  # the last bad header's error, for the summary

    def configure(
        self,
        *,
        startups: tuple[int, int, int],
        per_source_max: int,
        proxies: tuple[IPNetwork, ...],
        header_deadline: float,
    ) -> None:
        """New bounds for new connections (a reload)."""
        self._startups = startups
        self._per_source_max = per_source_max
        self._proxies = proxies
        self.header_deadline = header_deadline

    def protocol(self) -> asyncio.Protocol:
        """The protocol factory for ``loop.create_server``."""
        return _Arrival(self)

    def trusts_proxy(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._proxies)

    def verdict(self, address: str) -> str | None:
        """Why a connection from ``address`` is dropped now, or None to let it in."""
        if self.penalties.refuses(address) is not None:
            return "penalised"
        block = self.penalties.block(address)
        held = self._counts.unauth_in(block)
        if held >= self._per_source_max:
            self.penalties.penalise(address, "noauth")
            return "per-source-max-startups"
        start, rate, full = self._startups
        if held == 0:
            # fair share (docs/hostile-clients.md, "The door"): a newcomer is
            # never dropped at random, and at full the biggest holder pays
            if self._counts.unauthenticated >= full:
                evicted = self._counts.evict()
                if evicted is not None:
                    self._count(evicted, "evicted")
            return None
        count = self._counts.unauthenticated + self.awaiting_header
        if max_startups_drop(count, start, rate, full, self._rand()):
            return "max-startups"
        return None

    def headers_full(self) -> bool:
        """Whether MaxStartups' ``full`` connections from trusted proxies are
        waiting for their header. Bounded on their own, not with the
        unauthenticated ones: the client is not known before its header, and
        a door kept full by a few sources must still let a newcomer's header
        be read, for the fair share to apply to it (each waits at most
        ``header_deadline`` seconds)."""
        return self.awaiting_header >= self._startups[2]

    def drop(
        self, transport: asyncio.BaseTransport, address: str, reason: str, detail: str = ""
    ) -> None:
        """Close ``transport`` without a word (sshd drops these the same way);
        ``detail``: what was wrong, for the next summary line."""
        transport.close()
        if detail:
            self._detail = f"{reason}: {detail}"
        self._count(address, reason)

    def _count(self, address: str, reason: str) -> None:
        """Count a connection closed at the door: the metric, and a summary
        line at most every :data:`LOG_EVERY` seconds."""
        self.refused[reason] += 1
        self._events.emit(DoorRefused(address, reason))
        self._unlogged[reason] += 1
        now = time.monotonic()
        if now - self._logged >= LOG_EVERY:
            self._logged = now
            summary = ", ".join(f"{r} {n}" for r, n in sorted(self._unlogged.items()))
            if self._detail:
                summary += f" (the last {self._detail})"
                self._detail = ""
            log.warning("connections dropped at the door (the last from %s): %s", address, summary)
            self._unlogged.clear()

    def hand_off(
        self, transport: asyncio.Transport, address: str, port: int
    ) -> asyncssh.SSHServerConnection:
        """Make the SSH connection on ``transport``; the client is
        ``address``:``port`` (the PROXY header's, or the socket's)."""
        conn = asyncssh.SSHServerConnection(asyncio.get_running_loop(), self._options)
        # the connection's peername (what the front door reads) is the client's
        conn.set_extra_info(peername=(address, port))
        transport.set_protocol(conn)
        conn.connection_made(transport)
        return conn


class _Arrival(asyncio.Protocol):
    """One accepted connection until it is dropped or handed to asyncssh
    (and, for a direct client, until its first bytes show it is no PROXY
    header)."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        self._transport: asyncio.Transport | None = None
        self._address = "?"
        self._port = 0
        self._buf = b""
        self._header_timer: asyncio.TimerHandle | None = None
        self._via_proxy = False
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self._address, self._port = str(peer[0]), int(peer[1])
        gate = self._gate
        if gate.trusts_proxy(self._address):
            # the client is not known yet: only the bound on connections
            # waiting for a header applies (the rest once it is read)
            if gate.headers_full():
                gate.drop(transport, self._address, "max-startups")
                return
            gate.awaiting_header += 1
            self._via_proxy = True
            self._header_timer = asyncio.get_running_loop().call_later(
                gate.header_deadline, self._header_late
            )
            return
        self._admit(self._address, self._port, b"")

    def _admit(self, address: str, port: int, rest: bytes) -> None:
        assert self._transport is not None
        reason = self._gate.verdict(address)
        if reason is not None:
            self._gate.drop(self._transport, address, reason)
            return
        conn = self._gate.hand_off(self._transport, address, port)
        if self._via_proxy:
            # after a PROXY header: what follows is the client's, unchecked
            if rest:
                conn.data_received(rest)
        else:
            self._conn = conn
            self._transport.set_protocol(self)  # peek at the first bytes

    def _awaited(self) -> None:
        """The header arrived, failed, or the connection went: no longer awaited."""
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
            self._gate.awaiting_header -= 1

    def _header_late(self) -> None:
        self._awaited()
        assert self._transport is not None
        self._gate.drop(self._transport, self._address, "proxy-timeout")

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buf += data
        if self._conn is not None:
            seen = proxy.looks_like_proxy(self._buf)
            if seen is None:
                return
            if seen:  # a PROXY header from a source not trusted to send one
                self._gate.drop(self._transport, self._address, "proxy-untrusted")
                return
            self._transport.set_protocol(self._conn)
            buf, self._buf = self._buf, b""
            self._conn.data_received(buf)
            return
        try:
            header = proxy.parse(self._buf)
        except proxy.ProxyHeaderError as exc:
            self._awaited()
            reason = "proxy-invalid" if proxy.looks_like_proxy(self._buf) else "proxy-missing"
            # no line per connection: a bad proxy (or one that lets anything
            # through) would flood the log; the summary names the last error
            self._gate.drop(self._transport, self._address, reason, str(exc))
            return
        if header is None:
            return
        self._awaited()
        address = header.address or self._address
        port = header.port if header.port is not None else self._port
        self._admit(address, port, self._buf[header.length :])

    def eof_received(self) -> bool | None:
        if self._conn is not None:
            self._conn.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._awaited()
        if self._conn is not None:
            self._conn.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._conn is not None:
            self._conn.pause_writing()

    def resume_writing(self) -> None:
        if self._conn is not None:
            self._conn.resume_writing()
