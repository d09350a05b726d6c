"""Time-bound access grants: the pure grammar of ``grants/<user>/<name>``
values, and the table of grants in force.

An operator grants a person temporary access (``bastion grant alice
host-103 --for 2h``, :mod:`bastion.grants`) by writing a key under
``[access] grants_prefix`` (default ``grants/``) acquired by a Consul
session with a TTL and ``Behavior = "delete"``: when the session expires
(or is destroyed), Consul deletes the key. Consul may take up to twice the
TTL to do so (https://developer.hashicorp.com/consul/docs/dynamic-app-config/sessions),
so the value also carries ``expires`` and the bastion enforces it itself,
to the second.

The key is ``<grants_prefix><user>/<name>``; the value is a JSON object::

    {"route": "host-103", "expires": 1767225600, "by": "ops", "reason": "INC-42"}

``route`` uses the plain form of a route (:mod:`bastion.directory.grammar`:
``[login@]host[:port]``, comma-separated); ``expires`` is epoch seconds;
``by`` and ``reason`` are free text for the audit. What a grant gives (see
:class:`GrantTable`): its targets join the person's jump hosts (``ssh -J
alice@bastion host-103``), and a person without a ``users/`` entry is
routed to the grant's route. A malformed grant gives nothing (logged once).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from bastion.directory.grammar import parse_route, show
from bastion.errors import MalformedRoute
from bastion.identity import valid_user_name
from bastion.model import Route, Target

log = logging.getLogger("bastion.directory")

# how a grant's route is marked: its ``raw`` (the audit's "route") starts so
GRANT_MARK = "grant "
MAX_GRANT_BYTES = 4096


@dataclass(frozen=True)
class Grant:
    """One grant in force until ``expires`` (epoch seconds)."""

    user: str
    name: str  # the last part of the key (grants/alice/<name>)
    key: str  # the whole key
    route: Route  # raw: "grant <key>: <route>"
    expires: float
    by: str = ""
    reason: str = ""

    @property
    def targets(self) -> tuple[Target, ...]:
        return self.route.targets

    def active(self, now: float | None = None) -> bool:
        return self.expires > (time.time() if now is None else now)


class BadGrant(ValueError):
    """A grant value that gives nothing; the message names the problem."""


def is_grant_route(route: Route) -> bool:
    """Whether ``route`` came from a grant (not from the person's entry)."""
    return route.raw.startswith(GRANT_MARK)


def parse_grant(key: str, user: str, name: str, value: bytes) -> Grant:
    """A grant from its key parts and value; BadGrant names the problem."""
    if not valid_user_name(user):
        raise BadGrant(f"{show(user)} is not a user name")
    if not name:
        raise BadGrant("no grant name after the user name")
    if len(value) > MAX_GRANT_BYTES:
        raise BadGrant(f"value is {len(value)} bytes (at most {MAX_GRANT_BYTES})")
    try:
        obj = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        raise BadGrant("value is not JSON") from None
    if not isinstance(obj, dict):
        raise BadGrant("value is not a JSON object")
    unknown = set(obj) - {"route", "expires", "by", "reason"}
    if unknown:
        raise BadGrant(f"unknown keys: {', '.join(sorted(map(show, unknown)))}")
    text, expires = obj.get("route"), obj.get("expires")
    if not isinstance(text, str) or text.strip().startswith("{"):
        raise BadGrant("'route' must be a route in the plain form (host-103, admin@host-103:22)")
    if isinstance(expires, bool) or not isinstance(expires, (int, float)):
        raise BadGrant("'expires' must be epoch seconds")
    by, reason = obj.get("by", ""), obj.get("reason", "")
    if not isinstance(by, str) or not isinstance(reason, str):
        raise BadGrant("'by' and 'reason' must be strings")
    try:
        route = parse_route(user, text)
    except MalformedRoute as exc:
        raise BadGrant(exc.detail.partition(": ")[2] or exc.detail) from None
    marked = Route(
        user=user,
        login=route.login,
        targets=route.targets,
        policy=route.policy,
        raw=f"{GRANT_MARK}{key}: {route.raw}",
    )
    return Grant(user, name, key, marked, float(expires), by[:200], reason[:200])


class GrantTable:
    """Every grant under the prefix, parsed once per change; queries filter
    by ``expires`` at the time of asking."""

    def __init__(
        self,
        entries: Mapping[str, bytes],
        prefix: str = "grants/",
        previous: GrantTable | None = None,
    ) -> None:
        self._by_user: dict[str, list[Grant]] = {}
        self.raw: dict[str, bytes] = dict(entries)
        old = previous.raw if previous is not None else {}
        for rest, value in sorted(entries.items()):
            user, _, name = rest.partition("/")
            key = prefix + rest
            try:
                grant = parse_grant(key, user, name, value)
            except BadGrant as exc:
                if old.get(rest) != value:  # once per change, not per answer
                    log.warning("ignoring grant %s: %s", show(key, 120), exc)
                continue
            self._by_user.setdefault(user, []).append(grant)

    def users(self) -> set[str]:
        return set(self._by_user)

    def for_user(self, user: str, now: float | None = None) -> tuple[Grant, ...]:
        """``user``'s grants in force now, the one that lasts longest first."""
        now = time.time() if now is None else now
        found = [g for g in self._by_user.get(user, ()) if g.active(now)]
        return tuple(sorted(found, key=lambda g: (-g.expires, g.key)))

    def all_for(self, user: str) -> tuple[Grant, ...]:
        """``user``'s grants as stored, expired or not."""
        return tuple(self._by_user.get(user, ()))

    def next_expiry(self, now: float | None = None) -> float | None:
        """The earliest ``expires`` still ahead (epoch seconds), or None."""
        now = time.time() if now is None else now
        ahead = [g.expires for gs in self._by_user.values() for g in gs if g.expires > now]
        return min(ahead, default=None)

    def changed_users(self, other: GrantTable) -> set[str]:
        """Users whose grants differ between ``other`` and this table."""
        users = self.users() | other.users()
        return {u for u in users if self._by_user.get(u) != other._by_user.get(u)}

    def __len__(self) -> int:
        return sum(len(g) for g in self._by_user.values())
