"""Directory entries: the pure grammar of ``users/<name>`` values.
Routing: where does user X's login go.

The relay and the server never talk to Consul; they ask this module.
``ConsulDirectory`` keeps the directory in memory (routes, users' keys,
upstream host keys, catalog node addresses, node health), each part refreshed
by its own Consul blocking query, so a login makes no Consul request.

Directory entries (KV)
======================

The key is ``<routes_prefix><user>`` (default ``users/alice``). Leading and
trailing blanks and line breaks (a file's final newline) are ignored. The
value is one of:

* **plain text**, one line: targets separated by commas, most preferred
  first; the first usable one is taken. A target is ``[login@]host[:port]``:

  - ``host`` without a dot is a Consul node name (``host-102``), resolved
    through the catalog and used only while its node checks pass;
  - an IP literal (``10.0.0.5``, ``[2001:db8::1]``) or a DNS name with a dot
    (``db1.example.com``) is used as is (no catalog, no health check);
  - ``login@`` sets the upstream login (default: the bastion user name);
  - ``:port`` defaults to ``[upstream] default_port`` (22).

  Examples: ``host-102``, ``host-102:2222``, ``admin@host-102``,
  ``host-102, host-101``, ``10.0.0.5:22``.

* **a JSON object** (the value starts with ``{``; it may span lines) for a
  route plus its forwarding policy::

    {"route": "host-102, host-101", "agent_forwarding": true,
     "local_forwarding": false, "remote_forwarding": false,
     "jump": ["host-103", "10.0.0.9:22"], "record": true}

  ``route`` is required (same grammar as the plain form); the flags default
  to false, ``record`` (session recordings, ``[recording]``) to the
  settings' default, and ``jump`` (extra ``host[:port]`` targets the user
  may reach with ``ssh -J``; no ``login@``) to empty. Unknown keys,
  duplicate keys and wrong types are errors.

  The person's own limits (:class:`~bastion.model.AccessRules`), all
  optional: ``from`` (addresses or CIDRs the person may log in from, like
  authorized_keys(5) ``from=``), ``max_sessions`` (concurrent sessions at
  this bastion, at least 1), ``channel_timeout`` and
  ``unused_connection_timeout`` (sshd_config(5) ChannelTimeout and
  UnusedConnectionTimeout: seconds as a number, or a TIME FORMATS string
  such as ``"30s"``, ``"5m"``, ``"1h30m"``; 0 turns the limit off for the
  person), ``mfa`` (``"totp"``) and ``disabled`` (true refuses every login).

Everything else is malformed and refused (fail closed), with a message that
names the problem: an empty value, more than 1024 bytes, invalid UTF-8,
control characters, an empty target between commas, more than 8 targets, a
bad port (not 1-65535 in ASCII digits), a bad host (allowed: ``A-Z a-z 0-9 . _
-``, not starting with ``-`` or ``.``, no ``..``; dotted all-digit hosts must
be valid IPv4; bare IPv6 needs brackets), a bad login.

User names and logins follow the one grammar of :mod:`bastion.identity`
(``[a-z_][a-z0-9_.-]*``, at most 32 characters); a key under the routes
prefix that is not a user name (``users/Alice``) is ignored, with a warning.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from bastion.access_settings import parse_networks
from bastion.errors import MalformedRoute, NoRoute, printable
from bastion.identity import USER_NAME_RULE, valid_user_name
from bastion.model import AccessRules, ForwardingPolicy, Route, Target

log = logging.getLogger("bastion.directory")

MAX_VALUE_BYTES = 1024
MAX_TARGETS = 8
MAX_HOST_LEN = 253
JSON_KEYS = frozenset(
    {"route", "agent_forwarding", "local_forwarding", "remote_forwarding", "jump", "record"}
    | {"from", "max_sessions", "channel_timeout", "unused_connection_timeout", "mfa", "disabled"}
)
MAX_SOURCES = 32  # CIDRs in "from"
MAX_TIMEOUT = 366 * 86400.0  # seconds; a longer idle limit is a typo, not a policy

_HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\Z")
_DOTTED_DIGITS_RE = re.compile(r"[0-9.]+\Z")


def plain(text: str, limit: int = 40) -> str:
    """``text`` safe for a message or a log line: escaped, ASCII, bounded."""
    return printable(text, limit)


def show(text: str, limit: int = 40) -> str:
    """``text`` quoted for a message."""
    return f"'{plain(text, limit)}'"


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Bad(Exception):
    """A grammar problem; becomes a MalformedRoute naming the user and key."""


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or not 0 < int(text) < 65536:
        raise _Bad(f"bad port {show(text)}")
    return int(text)


def _parse_target(text: str) -> Target:
    login: str | None = None
    if "@" in text:
        login, _, text = text.rpartition("@")
        if not login:
            raise _Bad(f"empty login before '@' in {show('@' + text)}")
        if not valid_user_name(login):
            raise _Bad(f"bad login {show(login)}")
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep:
            raise _Bad(f"unclosed '[' in {show(text)}")
        try:
            host = ipaddress.IPv6Address(inner).compressed
        except ValueError:
            raise _Bad(f"bad IPv6 address {show(inner)}") from None
        if rest and not rest.startswith(":"):
            raise _Bad(f"unexpected {show(rest)} after ']'")
        port = _port(rest[1:]) if rest else None
        return Target(host, port, login, is_node=False)
    if text.count(":") > 1:
        raise _Bad(f"bad target {show(text)}: an IPv6 address needs brackets ([2001:db8::1]:22)")
    host, sep, port_s = text.partition(":")
    port = _port(port_s) if sep else None
    if not host:
        raise _Bad(f"empty host in {show(text)}")
    if len(host) > MAX_HOST_LEN or not _HOST_RE.match(host) or ".." in host:
        raise _Bad(f"bad host name {show(host)}")
    if _DOTTED_DIGITS_RE.match(host) and "." in host:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise _Bad(f"bad IPv4 address {show(host)}") from None
    return Target(host, port, login, is_node="." not in host)


def _parse_targets(text: str, what: str) -> tuple[Target, ...]:
    for pos, ch in enumerate(text):
        if unicodedata.category(ch) == "Cc":
            raise _Bad(f"control character U+{ord(ch):04X} at position {pos} of the {what}")
    parts = text.split(",")
    if len(parts) > MAX_TARGETS:
        raise _Bad(f"{len(parts)} targets in the {what} (at most {MAX_TARGETS})")
    targets = []
    for number, chunk in enumerate(parts, 1):
        part = chunk.strip(" ")
        if not part:
            raise _Bad(
                f"target {number} of the {what} is empty"
                if len(parts) > 1
                else f"the {what} is empty"
            )
        targets.append(_parse_target(part))
    return tuple(targets)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {show(key)}")
        seen[key] = value
    return seen


_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_TIME_RE = re.compile(r"([0-9]+)([smhdwSMHDW]?)")


def parse_time(value: object, name: str) -> float:
    """A duration in seconds from a JSON number (``90``, ``2.5``) or a string
    in sshd_config(5) TIME FORMATS (``"90"``, ``"30s"``, ``"5m"``, ``"1h30m"``;
    units s m h d w, either case). Raises _Bad naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Bad(f'{name!r} must be seconds (a number) or a time like "30s", "5m", "1h30m"')
    if isinstance(value, str):
        text = value.strip()
        if not text or not (text.isascii() and _TIME_RE.sub("", text) == ""):
            raise _Bad(
                f"{name!r}: bad time {show(value)} (sshd_config(5) TIME FORMATS: 30s, 5m, 1h30m)"
            )
        seconds = float(sum(int(n) * _TIME_UNITS[u.lower()] for n, u in _TIME_RE.findall(text)))
    else:
        seconds = float(value)
    if not 0 <= seconds <= MAX_TIMEOUT:  # also NaN and inf
        raise _Bad(f"{name!r} must be between 0 (off) and {MAX_TIMEOUT:.0f} seconds")
    return seconds


def _parse_access(obj: dict[str, Any]) -> AccessRules:
    """The person's own limits: "from", "max_sessions", the two timeouts,
    "mfa", "disabled" (docs/routing.md)."""
    sources_raw = obj.get("from", [])
    if isinstance(sources_raw, str):  # one CIDR, or a comma list as authorized_keys(5) from=
        sources_raw = [part for part in sources_raw.split(",") if part.strip()]
    if not isinstance(sources_raw, list) or not all(isinstance(v, str) for v in sources_raw):
        raise _Bad("'from' must be a list of addresses or CIDRs (\"10.0.0.0/8\")")
    if "from" in obj and not sources_raw:
        raise _Bad("'from' is empty (leave it out to allow every source)")
    if len(sources_raw) > MAX_SOURCES:
        raise _Bad(f"{len(sources_raw)} entries in 'from' (at most {MAX_SOURCES})")
    try:
        networks = parse_networks(tuple(sources_raw))
    except ValueError as exc:
        raise _Bad(f"'from': {plain(str(exc), 80)}") from None
    max_sessions = obj.get("max_sessions")
    if "max_sessions" in obj and (
        isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1
    ):
        raise _Bad("'max_sessions' must be a whole number of at least 1")
    timeouts = {
        name: parse_time(obj[name], name) if name in obj else None
        for name in ("channel_timeout", "unused_connection_timeout")
    }
    mfa = obj.get("mfa")
    if "mfa" in obj and mfa != "totp":
        raise _Bad("'mfa' must be \"totp\" (leave it out for no second factor)")
    disabled = obj.get("disabled", False)
    if not isinstance(disabled, bool):
        raise _Bad("'disabled' must be true or false")
    return AccessRules(
        sources=tuple(str(n) for n in networks),
        max_sessions=max_sessions,
        channel_timeout=timeouts["channel_timeout"],
        unused_connection_timeout=timeouts["unused_connection_timeout"],
        mfa=mfa,
        disabled=disabled,
    )


def _parse_json(
    text: str,
) -> tuple[tuple[Target, ...], ForwardingPolicy, bool | None, AccessRules]:
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise _Bad(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:
        raise _Bad(f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _Bad("a JSON entry must be an object")
    unknown = sorted(set(obj) - JSON_KEYS)
    if unknown:
        raise _Bad(
            f"unknown key(s) {', '.join(show(k) for k in unknown)} "
            f"(known: {', '.join(sorted(JSON_KEYS))})"
        )
    if "route" not in obj:
        raise _Bad("the JSON object has no 'route'")
    route = obj["route"]
    if not isinstance(route, str):
        raise _Bad("'route' must be a string")
    targets = _parse_targets(route.strip(" "), "route")
    flags: dict[str, bool] = {}
    for name in ("agent_forwarding", "local_forwarding", "remote_forwarding"):
        value = obj.get(name, False)
        if not isinstance(value, bool):
            raise _Bad(f"{name!r} must be true or false")
        flags[name] = value
    jump_raw = obj.get("jump", [])
    if not isinstance(jump_raw, list) or not all(isinstance(j, str) for j in jump_raw):
        raise _Bad("'jump' must be a list of strings")
    if len(jump_raw) > MAX_TARGETS:
        raise _Bad(f"{len(jump_raw)} jump entries (at most {MAX_TARGETS})")
    jump = []
    for entry in jump_raw:
        if "," in entry:
            raise _Bad(f"jump entry {show(entry)} must name one host")
        (target,) = _parse_targets(entry.strip(" "), "jump entry")
        if target.login is not None:
            raise _Bad(f"jump entry {show(entry)} must not name a login")
        jump.append(target)
    record = obj.get("record")
    if "record" in obj and not isinstance(record, bool):
        raise _Bad("'record' must be true or false")
    return targets, ForwardingPolicy(jump=tuple(jump), **flags), record, _parse_access(obj)


def parse_route(
    user: str, value: bytes | str, default_port: int = 22, *, routes_prefix: str = "users/"
) -> Route:
    """Parse ``user``'s directory entry; any problem is a MalformedRoute.

    ``default_port`` is not stored in the route (a target without a port keeps
    ``port=None``); it is accepted so callers can pass their settings alike.
    """
    del default_port  # resolved later, so a settings change needs no re-parse
    key = f"{routes_prefix}{user}"
    try:
        try:
            data = value if isinstance(value, bytes) else value.encode()
        except UnicodeEncodeError:
            raise _Bad("value is not valid UTF-8") from None
        if len(data) > MAX_VALUE_BYTES:
            raise _Bad(f"value is {len(data)} bytes (at most {MAX_VALUE_BYTES})")
        try:
            text = data.decode()
        except UnicodeDecodeError as exc:
            raise _Bad(f"value is not valid UTF-8 (byte {exc.start})") from None
        text = text.strip(" \t\r\n")
        if not text:
            raise _Bad("value is empty")
        record: bool | None = None
        access = AccessRules()
        if text.startswith("{"):
            targets, policy, record, access = _parse_json(text)
        else:
            targets, policy = _parse_targets(text, "value"), ForwardingPolicy()
        if not valid_user_name(user):
            raise _Bad(f"{show(user)} is not a user name ({USER_NAME_RULE})")
    except _Bad as exc:
        raise MalformedRoute(
            f"directory entry for {plain(user)} is malformed: {exc} "
            f"(ask an operator to fix {plain(key, 120)})",
            detail=f"{plain(key, 120)}: {exc}",
        ) from None
    return Route(
        user=user,
        login=user,
        targets=targets,
        policy=policy,
        raw=text,
        record=record,
        access=access,
    )


# --------------------------------------------------------------------------
# route table


class RouteTable:
    """An immutable snapshot of every user's entry, parsed once per change.

    A malformed entry is stored as its error: it affects only that user.
    """

    def __init__(
        self,
        entries: Mapping[str, bytes],
        *,
        default_port: int = 22,
        routes_prefix: str = "users/",
        previous: RouteTable | None = None,
        indexes: Mapping[str, int] | None = None,
    ) -> None:
        # indexes: each entry's Consul ModifyIndex, kept as Route.index
        self.routes_prefix = routes_prefix
        self._raw: dict[str, bytes] = {}
        self._routes: dict[str, Route] = {}
        self._errors: dict[str, MalformedRoute] = {}
        ignored = []
        for user, raw in entries.items():
            if not valid_user_name(user):
                if user:
                    ignored.append(user)
                continue
            self._raw[user] = raw
            try:
                self._routes[user] = parse_route(
                    user, raw, default_port, routes_prefix=routes_prefix
                )
                if indexes is not None and indexes.get(user):
                    self._routes[user] = replace(self._routes[user], index=indexes[user])
            except MalformedRoute as exc:
                self._errors[user] = exc
                # once per change of the entry, not once per login
                if previous is None or previous.raw(user) != raw:
                    log.warning("malformed directory entry %s", exc.detail)
        old_ignored = set(previous.ignored) if previous is not None else set()
        for name in ignored:
            if name not in old_ignored:
                log.warning(
                    "ignoring directory key %s: not a user name", show(routes_prefix + name, 120)
                )
        self.ignored: tuple[str, ...] = tuple(sorted(ignored))

    def route_for(self, user: str) -> Route:
        route = self._routes.get(user)
        if route is not None:
            return route
        error = self._errors.get(user)
        if error is not None:
            raise error
        who = plain(user)
        raise NoRoute(f"no route for {who}: ask an operator to add {self.routes_prefix}{who}")

    def raw(self, user: str) -> bytes | None:
        return self._raw.get(user)

    @property
    def errors(self) -> Mapping[str, MalformedRoute]:
        return dict(self._errors)

    def __len__(self) -> int:
        return len(self._routes)
