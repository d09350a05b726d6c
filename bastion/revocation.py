"""Access that ends when the directory says so.

When the directory changes, the live connections of the people whose entry,
keys or grants changed are checked again (and, at each grant's ``expires``,
those of the people whose grant ran out). A connection loses its access when

* ``disabled``: the person's entry now says ``"disabled": true``;
* ``key-removed``: the key it logged in with is no longer among the
  person's authorized keys (directory, local files), or no longer matches
  from its address (``from=``); for a certificate login, the user CA that
  signed it is no longer trusted;
* ``route-removed``: the person has neither an entry nor a grant in force;
* ``grant-ended``: it was routed by a grant, or holds a jump (``ssh -J``)
  to a host that only a grant allowed, and no grant in force covers that
  host any more.

A route moved to another host is not a revocation: the person keeps the
session they have, and their next login goes to the new host. A malformed
entry, or a directory that cannot be read, changes nothing for live
connections (new logins are refused as usual).

``[access] on_revoke = "close"`` (the default): each open session gets one
line on its terminal, then the connection ends with a disconnect the client
prints (exit 255). ``"keep"``: nothing closes; the log and the audit say the
connections were kept. Either way one ``revoke`` audit record per person and
cause (docs/audit.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from bastion.core.frontdoor import BastionConnection, ServerContext
from bastion.directory.grants import Grant, is_grant_route
from bastion.directory.store import norm_host
from bastion.errors import AccessRevoked, BastionError, NoRoute
from bastion.events import EventBus, Revoked
from bastion.model import Node, Route, Target

log = logging.getLogger("bastion.revocation")

# the notice goes out first: OpenSSH's client drops channel output still
# buffered when a disconnect arrives, so the disconnect follows a moment later
NOTICE_LEAD = 0.5

WHY = {
    "disabled": "your access was disabled in the directory",
    "key-removed": "the key you logged in with was removed from the directory",
    "route-removed": "your route was removed from the directory",
    "grant-ended": "your access grant ended",
}


class Directory(Protocol):
    """What the revoker reads (``ConsulDirectory`` answers)."""

    def route_for(self, user: str) -> Route: ...
    def grants_for(self, user: str) -> tuple[Grant, ...]: ...
    def all_grants(self, user: str) -> tuple[Grant, ...]: ...
    def next_grant_expiry(self) -> float | None: ...
    def node(self, name: str) -> Node | None: ...
    def add_listener(self, listener: Callable[[set[str]], None]) -> None: ...


def _address(source: str) -> str:
    """The address of ``host:port`` (``[v6]:port`` or ``v6:port``)."""
    host = source.rpartition(":")[0] or source
    return host.strip("[]")


class Revoker:
    """Re-checks live connections when the directory changes (module docstring).

    ``live`` gives the live connections (``ConnectionRegistry.live``); ``ctx``
    is the server's context (its ``keys`` and ``policy``, swapped on reload).
    """

    def __init__(
        self,
        directory: Directory,
        live: Callable[[], Iterable[BastionConnection]],
        ctx: ServerContext,
        events: EventBus,
        on_revoke: str = "close",
    ) -> None:
        self._directory = directory
        self._live = live
        self._ctx = ctx
        self._events = events
        self.on_revoke = on_revoke
        self._pending: set[str] = set()
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        # hosts each person's grants covered at the last check: a jump to one
        # of them that nothing allows now was allowed by a grant that ended
        self._granted: dict[str, set[str]] = {}
        self._kept: set[tuple[str, str]] = set()  # (conn, cause) reported as kept
        directory.add_listener(self.changed)

    def start(self, users: Iterable[str] = ()) -> None:
        """Note the grants in force now (``users``: those who have some) and
        arm the timer for the first grant to expire."""
        for user in users:
            self._note_grants(user)
        self._arm()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- when to check -----------------------------------------------------

    def changed(self, users: set[str]) -> None:
        """The directory changed for ``users`` (called by the directory's
        watches, on the event loop): check them once the change is applied."""
        self._pending |= users
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        users, self._pending = self._pending, set()
        try:
            self.check(users)
        finally:
            self._arm()

    def _arm(self) -> None:
        """A timer for the next grant to expire, which Consul may only notice
        up to twice its TTL later: the bastion ends it on time itself."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = self._directory.next_grant_expiry()
        if due is not None:
            delay = max(0.0, due - time.time()) + 0.01
            self._timer = asyncio.get_running_loop().call_later(delay, self._expired)

    def _expired(self) -> None:
        self._timer = None
        self.changed(set(self._granted))

    # -- the check ---------------------------------------------------------

    def check(self, users: set[str]) -> None:
        """Check the live connections of ``users``; close or keep those whose
        access is gone (one ``revoke`` event per person and cause)."""
        live = [c for c in self._live() if c.authenticated and c.user in users]
        verdicts: dict[tuple[str, str], list[BastionConnection]] = {}
        for conn in live:
            cause = self._cause(conn)
            if cause is not None:
                verdicts.setdefault((conn.user, cause), []).append(conn)
        for user in users:  # after the verdicts: they compare with the old grants
            self._note_grants(user)
        alive = {c.conn_id for c in self._live()}
        self._kept = {k for k in self._kept if k[0] in alive}
        for (user, cause), conns in verdicts.items():
            self._act(user, cause, conns)

    def _hosts(self, targets: Iterable[Target]) -> set[str]:
        """The hosts ``targets`` name, as a jump may name them: node names
        and their catalog addresses."""
        found = set()
        for target in targets:
            found.add(norm_host(target.host))
            node = self._directory.node(target.host) if target.is_node else None
            if node is not None:
                found.add(norm_host(node.address))
        return found

    def _note_grants(self, user: str) -> None:
        """Remember the hosts ``user``'s grants cover (expired ones too, while
        Consul still holds them): when a grant's key is deleted, this is what
        tells which of their jumps it allowed."""
        hosts = self._hosts(t for g in self._directory.all_grants(user) for t in g.targets)
        if hosts:
            self._granted[user] = hosts
        else:
            self._granted.pop(user, None)

    def _cause(self, conn: BastionConnection) -> str | None:
        """Why ``conn`` has lost its access (a key of :data:`WHY`), or None."""
        user = conn.user
        try:
            try:
                entry: Route | None = self._directory.route_for(user)
            except NoRoute:
                entry = None
            grants = self._directory.grants_for(user)
        except BastionError:
            return None  # malformed entry, directory unavailable: not a revocation
        if entry is not None and entry.access.disabled:
            return "disabled"
        key = conn.auth_key
        if key is not None:
            keys, problem = self._ctx.keys.authorized_keys(user)
            if problem is None and not key.still_authorized(keys, _address(conn.source)):
                return "key-removed"
        had = self._granted.get(user, set()) | self._hosts(
            t for g in self._directory.all_grants(user) for t in g.targets
        )
        plan = conn.plan
        by_grant = plan is not None and is_grant_route(plan.route)
        if entry is None and not grants:
            return "grant-ended" if by_grant or had else "route-removed"
        now = self._hosts(t for g in grants for t in g.targets)
        if entry is not None:
            now |= self._hosts((*entry.targets, *entry.policy.jump))
        if by_grant and plan is not None and not self._hosts(plan.route.targets) & now:
            return "grant-ended"
        for stats in list(conn.open_channels):
            jump = stats.detail.get("jump")
            if stats.kind != "tunnel" or jump is None:
                continue
            host = norm_host(str(jump[0]))
            if host in had and host not in now and not self._allowed(user, jump):
                return "grant-ended"
        return None

    def _allowed(self, user: str, jump: tuple[str, int]) -> bool:
        """Whether the policy still lets ``user`` jump to ``jump`` (an address
        of a granted node, say)."""
        try:
            self._ctx.policy.tunnel(user, jump[0], jump[1])
        except BastionError:
            return False
        return True

    def _act(self, user: str, cause: str, conns: list[BastionConnection]) -> None:
        why = WHY[cause]
        ids = tuple(c.conn_id for c in conns)
        if self.on_revoke == "keep":
            new = [c for c in conns if (c.conn_id, cause) not in self._kept]
            if not new:
                return  # said once already
            self._kept |= {(c.conn_id, cause) for c in new}
            ids = tuple(c.conn_id for c in new)
            log.warning(
                "access of %s withdrawn (%s); keeping %d live connection(s) "
                '([access] on_revoke = "keep"): %s',
                user,
                cause,
                len(new),
                ", ".join(ids),
            )
            self._events.emit(Revoked(user, cause, why, "kept", ids))
            return
        log.warning(
            "access of %s withdrawn (%s): closing %d live connection(s): %s",
            user,
            cause,
            len(conns),
            ", ".join(ids),
        )
        loop = asyncio.get_running_loop()
        for conn in conns:
            if conn.open_sessions:
                conn.notice(f"{why}; this session is being closed")
                loop.call_later(NOTICE_LEAD, conn.end, why, AccessRevoked)
            else:
                conn.end(why, AccessRevoked)
        self._events.emit(Revoked(user, cause, why, "closed", ids))
