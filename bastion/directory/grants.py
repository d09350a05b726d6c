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
``[login@]host[:port]``, comma-separated); ``expires`` is epoch seconds, a
finite number no later than ``[access] grant_max`` (+ :data:`CLOCK_SLACK`)
after the bastion first reads the value (a later one, ``Infinity``, ``NaN``
or ``1e300`` would grant for ever); ``by`` and ``reason`` are one line of
free text each (at most 200 characters). The key's user is a user name and
its last part a name like a host's (``host-103``, ``INC-42``). What a grant
gives (see :class:`GrantTable`): its targets join the person's jump hosts
(``ssh -J alice@bastion host-103``), and a person without a ``users/``
entry is routed to the grant's route. A malformed grant gives nothing
(logged once per change).
"""

from __future__ import annotations

import json
import logging
import math
import re
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
MAX_TEXT = 200  # characters of "by" and "reason"
MAX_GRANT_SECONDS = 86400.0  # [access] grant_max's default and bound
CLOCK_SLACK = 60.0  # seconds an "expires" may exceed now + grant_max (clock skew)
GRANT_NAME_RULE = "letters, digits, '.', '_', '-', starting with a letter, digit or '_'"
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,252}\Z")


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


def valid_grant_name(name: str) -> bool:
    """Whether ``name`` is a grant's key name (the part after the user)."""
    return bool(_NAME_RE.match(name))


def parse_grant(
    key: str,
    user: str,
    name: str,
    value: bytes,
    *,
    now: float | None = None,
    longest: float = MAX_GRANT_SECONDS,
) -> Grant:
    """A grant from its key parts and value; BadGrant names the problem.

    ``expires`` must be a finite number no later than ``now + longest +``
    :data:`CLOCK_SLACK` (``longest``: ``[access] grant_max``)."""
    if not valid_user_name(user):
        raise BadGrant(f"{show(user)} is not a user name")
    if not name:
        raise BadGrant("no grant name after the user name")
    if not valid_grant_name(name):
        raise BadGrant(f"grant name {show(name)}: {GRANT_NAME_RULE}, at most 253")
    if len(value) > MAX_GRANT_BYTES:
        raise BadGrant(f"value is {len(value)} bytes (at most {MAX_GRANT_BYTES})")
    try:
        obj = json.loads(value)  # takes Infinity and NaN: "expires" is checked below
    except (ValueError, UnicodeDecodeError, RecursionError):
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
        raise BadGrant("'expires' must be epoch seconds (a finite number)")
    try:
        until = float(expires)  # a huge int: OverflowError
    except OverflowError:
        until = math.inf
    if not math.isfinite(until):
        raise BadGrant("'expires' must be epoch seconds (a finite number)")
    latest = (time.time() if now is None else now) + longest + CLOCK_SLACK
    if until > latest:
        raise BadGrant(
            f"'expires' {_epoch(until)} is more than [access] grant_max ({longest:g} s) ahead"
        )
    by, reason = obj.get("by", ""), obj.get("reason", "")
    if not isinstance(by, str) or not isinstance(reason, str):
        raise BadGrant("'by' and 'reason' must be strings")
    for field, words in (("by", by), ("reason", reason)):
        if len(words) > MAX_TEXT or not words.isprintable():
            raise BadGrant(f"{field!r}: one line of at most {MAX_TEXT} printable characters")
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
    return Grant(user, name, key, marked, until, by, reason)


def _epoch(value: float) -> str:
    """An epoch for a message (very large ones as a number)."""
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
    except (OverflowError, OSError, ValueError):
        return f"{value:g}"


def is_folder(rest: str, value: bytes) -> bool:
    """A Consul "folder" key (``grants/alice/``, empty): not a grant."""
    return rest.endswith("/") and not value


class GrantTable:
    """Every grant under the prefix, parsed once per change; queries filter
    by ``expires`` at the time of asking."""

    def __init__(
        self,
        entries: Mapping[str, bytes],
        prefix: str = "grants/",
        previous: GrantTable | None = None,
        *,
        longest: float = MAX_GRANT_SECONDS,
        now: float | None = None,
    ) -> None:
        now = time.time() if now is None else now
        self._by_user: dict[str, list[Grant]] = {}
        self.raw: dict[str, bytes] = dict(entries)
        # each value's verdict (a Grant, or the problem), judged when first
        # read: "expires" is bounded by the time the bastion first saw it
        self._verdicts: dict[str, tuple[bytes, Grant | str]] = {}
        old = previous._verdicts if previous is not None else {}
        for rest, value in sorted(entries.items()):
            if is_folder(rest, value):
                continue
            before = old.get(rest)
            verdict: Grant | str
            if before is not None and before[0] == value:
                verdict = before[1]  # unchanged: same verdict, logged once already
            else:
                user, _, name = rest.partition("/")
                key = prefix + rest
                try:
                    verdict = parse_grant(key, user, name, value, now=now, longest=longest)
                except BadGrant as exc:
                    verdict = str(exc)
                    log.warning("ignoring grant %s: %s", show(key, 120), exc)
            self._verdicts[rest] = (value, verdict)
            if isinstance(verdict, Grant):
                self._by_user.setdefault(verdict.user, []).append(verdict)

    @property
    def malformed(self) -> dict[str, str]:
        """The ignored keys (relative to the prefix) and their problems."""
        return {k: v for k, (_, v) in self._verdicts.items() if isinstance(v, str)}

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
