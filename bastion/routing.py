"""Routing: where does user X's login go.

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
     "jump": ["host-103", "10.0.0.9:22"]}

  ``route`` is required (same grammar as the plain form); the flags default
  to false and ``jump`` (extra ``host[:port]`` targets the user may reach with
  ``ssh -J``; no ``login@``) to empty. Unknown keys, duplicate keys and wrong
  types are errors.

Everything else is malformed and refused (fail closed), with a message that
names the problem: an empty value, more than 1024 bytes, invalid UTF-8,
control characters, an empty target between commas, more than 8 targets, a
bad port (not 1-65535 in ASCII digits), a bad host (allowed: ``A-Z a-z 0-9 . _
-``, not starting with ``-`` or ``.``, no ``..``; dotted all-digit hosts must
be valid IPv4; bare IPv6 needs brackets), a bad login (``[a-z_][a-z0-9_.-]*``,
at most 32 characters). A user name that is not a valid login needs an explicit
``login@`` on each target.

Health: a node is healthy iff it has at least one node-level check (empty
ServiceID) and all of them are passing. A node with no node checks is treated
as down: nothing vouches for it (fail closed).

Freshness: until every watch has loaded once, lookups raise
``DirectoryUnavailable``. While Consul is unreachable (errors, timeouts, or a
403 from a revoked token) the cached directory is served for up to
``[consul] stale_after`` seconds, with a WARNING at the start of the outage and
a reminder every minute; after that, lookups raise ``DirectoryUnavailable``
until Consul answers again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import logging
import random
import re
import time
import unicodedata
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bastion.config import ConsulSettings
from bastion.errors import (
    ConfigError,
    DirectoryUnavailable,
    ForwardDenied,
    HostUnhealthy,
    MalformedRoute,
    NoRoute,
    RoutingError,
    UnknownHost,
)

log = logging.getLogger("bastion.routing")

MAX_VALUE_BYTES = 1024
MAX_TARGETS = 8
MAX_HOST_LEN = 253
JSON_KEYS = frozenset(
    {"route", "agent_forwarding", "local_forwarding", "remote_forwarding", "jump"}
)

_LOGIN_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}\Z")
_HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\Z")
_DOTTED_DIGITS_RE = re.compile(r"[0-9.]+\Z")
# the names a KV key may route; anything else under the prefix is ignored
_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")

BACKOFF_START = 0.1
BACKOFF_CAP = 5.0
REMINDER_EVERY = 60.0


# --------------------------------------------------------------------------
# value objects


@dataclass(frozen=True)
class Target:
    """One ``[login@]host[:port]`` of a route."""

    host: str
    port: int | None
    login: str | None
    is_node: bool

    def __str__(self) -> str:
        login = f"{self.login}@" if self.login else ""
        port = f":{self.port}" if self.port is not None else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{login}{host}{port}"


@dataclass(frozen=True)
class ForwardingPolicy:
    agent_forwarding: bool = False
    local_forwarding: bool = False
    remote_forwarding: bool = False
    jump: tuple[Target, ...] = ()


@dataclass(frozen=True)
class Route:
    """A parsed directory entry. ``login`` is the default upstream login."""

    user: str
    login: str
    targets: tuple[Target, ...]
    policy: ForwardingPolicy
    raw: str


@dataclass(frozen=True)
class Destination:
    """Where to connect: ``host`` is the address, ``node`` the Consul node name if any."""

    host: str
    port: int
    login: str
    node: str | None
    label: str


# --------------------------------------------------------------------------
# grammar


def _plain(text: str, limit: int = 40) -> str:
    """``text`` safe for a message or a log line: escaped, ASCII, bounded."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return "".join(
        ch if ch.isascii() and ch.isprintable() else ch.encode("unicode_escape").decode()
        for ch in text
    )


def _show(text: str, limit: int = 40) -> str:
    """``text`` quoted for a message."""
    return f"'{_plain(text, limit)}'"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Bad(Exception):
    """A grammar problem; becomes a MalformedRoute naming the user and key."""


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or not 0 < int(text) < 65536:
        raise _Bad(f"bad port {_show(text)}")
    return int(text)


def _parse_target(text: str) -> Target:
    login: str | None = None
    if "@" in text:
        login, _, text = text.rpartition("@")
        if not login:
            raise _Bad(f"empty login before '@' in {_show('@' + text)}")
        if not _LOGIN_RE.match(login):
            raise _Bad(f"bad login {_show(login)}")
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep:
            raise _Bad(f"unclosed '[' in {_show(text)}")
        try:
            host = ipaddress.IPv6Address(inner).compressed
        except ValueError:
            raise _Bad(f"bad IPv6 address {_show(inner)}") from None
        if rest and not rest.startswith(":"):
            raise _Bad(f"unexpected {_show(rest)} after ']'")
        port = _port(rest[1:]) if rest else None
        return Target(host, port, login, is_node=False)
    if text.count(":") > 1:
        raise _Bad(f"bad target {_show(text)}: an IPv6 address needs brackets ([2001:db8::1]:22)")
    host, sep, port_s = text.partition(":")
    port = _port(port_s) if sep else None
    if not host:
        raise _Bad(f"empty host in {_show(text)}")
    if len(host) > MAX_HOST_LEN or not _HOST_RE.match(host) or ".." in host:
        raise _Bad(f"bad host name {_show(host)}")
    if _DOTTED_DIGITS_RE.match(host) and "." in host:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise _Bad(f"bad IPv4 address {_show(host)}") from None
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
            raise ValueError(f"duplicate key {_show(key)}")
        seen[key] = value
    return seen


def _parse_json(text: str) -> tuple[tuple[Target, ...], ForwardingPolicy]:
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
            f"unknown key(s) {', '.join(_show(k) for k in unknown)} "
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
            raise _Bad(f"jump entry {_show(entry)} must name one host")
        (target,) = _parse_targets(entry.strip(" "), "jump entry")
        if target.login is not None:
            raise _Bad(f"jump entry {_show(entry)} must not name a login")
        jump.append(target)
    return targets, ForwardingPolicy(jump=tuple(jump), **flags)


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
        if text.startswith("{"):
            targets, policy = _parse_json(text)
        else:
            targets, policy = _parse_targets(text, "value"), ForwardingPolicy()
        if not _LOGIN_RE.match(user) and any(t.login is None for t in targets):
            raise _Bad(
                f"{_show(user)} is not a valid upstream login; "
                "name one with login@host on every target"
            )
    except _Bad as exc:
        raise MalformedRoute(
            f"directory entry for {_plain(user)} is malformed: {exc} "
            f"(ask an operator to fix {_plain(key, 120)})",
            detail=f"{_plain(key, 120)}: {exc}",
        ) from None
    return Route(user=user, login=user, targets=targets, policy=policy, raw=text)


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
    ) -> None:
        self.routes_prefix = routes_prefix
        self._raw: dict[str, bytes] = {}
        self._routes: dict[str, Route] = {}
        self._errors: dict[str, MalformedRoute] = {}
        ignored = []
        for user, raw in entries.items():
            if not _USER_RE.match(user):
                if user:
                    ignored.append(user)
                continue
            self._raw[user] = raw
            try:
                self._routes[user] = parse_route(
                    user, raw, default_port, routes_prefix=routes_prefix
                )
            except MalformedRoute as exc:
                self._errors[user] = exc
                # once per change of the entry, not once per login
                if previous is None or previous.raw(user) != raw:
                    log.warning("malformed directory entry %s", exc.detail)
        old_ignored = set(previous.ignored) if previous is not None else set()
        for name in ignored:
            if name not in old_ignored:
                log.warning(
                    "ignoring directory key %s: not a user name", _show(routes_prefix + name, 120)
                )
        self.ignored: tuple[str, ...] = tuple(sorted(ignored))

    def route_for(self, user: str) -> Route:
        route = self._routes.get(user)
        if route is not None:
            return route
        error = self._errors.get(user)
        if error is not None:
            raise error
        who = _plain(user)
        raise NoRoute(f"no route for {who}: ask an operator to add {self.routes_prefix}{who}")

    def raw(self, user: str) -> bytes | None:
        return self._raw.get(user)

    @property
    def errors(self) -> Mapping[str, MalformedRoute]:
        return dict(self._errors)

    def __len__(self) -> int:
        return len(self._routes)


# --------------------------------------------------------------------------
# Consul plumbing


def next_index(previous: int, returned: int) -> int:
    """The index for the next blocking query (Consul's rules).

    An index that went backwards (a new cluster, a snapshot restore) resets to
    0 so the next query reads the current state; an index is never below 1.
    """
    if returned < previous:
        return 0
    return max(returned, 1)


def consul_base_url(address: str) -> str:
    """``http://127.0.0.1:8500``, ``https://consul:8501`` or ``host:port`` → base URL.

    Without a port: 8500 for http, 8501 for https (Consul's conventions).
    """
    text = address.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    problem = None
    try:
        port = parts.port
    except ValueError:
        problem = "bad port"
    if parts.scheme not in ("http", "https"):
        problem = f"scheme must be http or https, not {parts.scheme!r}"
    elif not parts.hostname:
        problem = "no host"
    elif parts.username or parts.password or parts.query or parts.path not in ("", "/"):
        problem = "only scheme://host:port is allowed"
    if problem:
        raise ConfigError(f"[consul] address: {problem}: {address!r}")
    assert parts.hostname is not None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is None:
        port = 8501 if parts.scheme == "https" else 8500
    return f"{parts.scheme}://{host}:{port}"


class _ConsulError(Exception):
    def __init__(self, message: str, *, denied: bool = False, timed_out: bool = False) -> None:
        super().__init__(message)
        self.denied = denied
        self.timed_out = timed_out


@dataclass
class _Watch:
    name: str
    path: str
    params: dict[str, str]
    apply: Callable[[Any], None]
    index: int = 0
    loaded: bool = False
    requests: int = 0
    errors_total: int = 0
    consecutive_errors: int = 0
    failing_since: float | None = None
    last_error: str = ""
    last_success: float | None = None  # monotonic
    last_success_wall: float | None = None
    last_change_wall: float | None = None


@dataclass(frozen=True)
class WatchStats:
    name: str
    index: int
    requests: int
    errors_total: int
    consecutive_errors: int
    last_success: float | None  # epoch seconds


@dataclass(frozen=True)
class DirectoryStats:
    routes: int
    malformed_routes: int
    users_with_keys: int
    host_key_entries: int
    nodes: int
    loaded: bool
    last_sync: float | None  # epoch seconds when every watch had last answered
    unreachable_for: float | None
    watches: tuple[WatchStats, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class _Node:
    name: str
    address: str


def _norm_host(host: str) -> str:
    """A host as a lookup key: canonical IP text, else lower-case name."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        return text.lower()


def _key_lines(raw: bytes) -> tuple[str, ...] | None:
    """Non-blank, non-comment lines of a key listing; None if not UTF-8."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return None
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def _kv_entries(body: Any, prefix: str) -> dict[str, bytes]:
    """A KV ``?recurse`` listing (None = 404 = empty or denied) → {name: value}."""
    if body is None:
        return {}
    if not isinstance(body, list):
        raise _ConsulError("unexpected KV listing")
    entries: dict[str, bytes] = {}
    for item in body:
        key = item.get("Key") if isinstance(item, dict) else None
        if not isinstance(key, str) or not key.startswith(prefix):
            raise _ConsulError("unexpected KV listing entry")
        value = item.get("Value")
        try:
            entries[key[len(prefix) :]] = base64.b64decode(value, validate=True) if value else b""
        except (binascii.Error, TypeError):
            raise _ConsulError(f"undecodable value for {_show(key, 120)}") from None
    return entries


def _json_list(body: Any) -> list[dict[str, Any]]:
    """A catalog/health answer: a list of objects (``null`` = nothing visible)."""
    if body is None:
        return []
    if not isinstance(body, list) or not all(isinstance(x, dict) for x in body):
        raise _ConsulError("unexpected answer (not a list of objects)")
    return body


class ConsulDirectory:
    """The directory in memory, kept current by Consul blocking queries.

    Five watches (routes, users' keys, host keys, catalog nodes, node
    health), one aiohttp session. Every request carries the configured token
    in ``X-Consul-Token``; nothing is read from ``CONSUL_*`` environment
    variables.
    """

    def __init__(self, settings: ConsulSettings, token: str, default_port: int = 22) -> None:
        if not token.strip():
            raise ConfigError("[consul] the token is empty; the bastion needs its own token")
        self._settings = settings
        self._base = consul_base_url(settings.address)
        self._headers = {"X-Consul-Token": token.strip()}
        self._default_port = default_port
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loaded = asyncio.Event()
        self._table = RouteTable(
            {}, default_port=default_port, routes_prefix=settings.routes_prefix
        )
        self._keys: dict[str, tuple[str, ...]] = {}
        self._host_keys: dict[str, tuple[str, ...]] = {}
        self._nodes: dict[str, _Node] = {}
        self._health: dict[str, tuple[tuple[str, str], ...]] = {}
        self._outage_since: float | None = None
        self._last_reminder = 0.0
        self._stale_logged = False
        self._denied_logged = False
        s = settings
        kv = {"recurse": "true"}
        self._watches = [
            _Watch("routes", self._kv_path(s.routes_prefix), kv, self._apply_routes),
            _Watch("keys", self._kv_path(s.keys_prefix), kv, self._apply_keys),
            _Watch("host_keys", self._kv_path(s.host_keys_prefix), kv, self._apply_host_keys),
            _Watch("nodes", "/v1/catalog/nodes", {}, self._apply_nodes),
            _Watch(
                "health", "/v1/health/state/any", {"filter": 'ServiceID == ""'}, self._apply_health
            ),
        ]

    def __repr__(self) -> str:
        return f"<ConsulDirectory {self._base} token=<redacted>>"

    @staticmethod
    def _kv_path(prefix: str) -> str:
        return "/v1/kv/" + urllib.parse.quote(prefix, safe="/")

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Open the session and start the watches (returns at once)."""
        if self._session is not None:
            return
        self._session = aiohttp.ClientSession(
            trust_env=False, timeout=aiohttp.ClientTimeout(total=None)
        )
        self._tasks = [
            asyncio.create_task(self._run(w), name=f"consul-watch-{w.name}") for w in self._watches
        ]

    async def wait_loaded(self, timeout: float) -> None:
        """Wait until every watch has answered once; DirectoryUnavailable after ``timeout``."""
        try:
            await asyncio.wait_for(self._loaded.wait(), timeout)
        except TimeoutError:
            missing = [
                f"{w.name}: {w.last_error or 'no answer yet'}"
                for w in self._watches
                if not w.loaded
            ]
            raise DirectoryUnavailable(
                "the directory is unavailable: no routing table loaded yet",
                detail=f"consul {self._base} not loaded after {timeout:g} s ({'; '.join(missing)})",
            ) from None

    async def aclose(self) -> None:
        """Stop the watches and close the session."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- watches -----------------------------------------------------------

    async def _run(self, w: _Watch) -> None:
        wait = self._settings.wait
        attempt = 0
        while True:
            params = dict(w.params)
            started = time.monotonic()
            if w.index:
                params["index"] = str(w.index)
                params["wait"] = f"{max(1, round(wait * 1000))}ms"
                # Consul adds up to wait/16 of jitter to the wait
                due = started + wait + wait / 16
                timeout = wait + wait / 16 + 5.0
            else:
                due = started
                timeout = self._settings.request_timeout
            before = w.index
            try:
                index, body = await self._get(w, params, timeout)
                # always applied: after a restart the same index can carry other data
                w.apply(body)  # before moving the index: a bad answer is retried
                if index != before:
                    w.last_change_wall = time.time()
                w.index = next_index(before, index)
                if w.index == 0 and before:
                    log.info(
                        "consul watch %s: index went backwards (%d -> %d), re-reading",
                        w.name,
                        before,
                        index,
                    )
            except Exception as exc:  # a watch must never die silently
                if not isinstance(exc, _ConsulError):
                    log.exception("consul watch %s: unexpected error", w.name)
                    exc = _ConsulError(f"{type(exc).__name__}: {exc}")
                attempt += 1
                # after an error, re-read from scratch: it may be another cluster by then
                w.index = 0
                # a silent Consul has been gone since its answer was due, not since now
                self._on_failure(w, exc, min(due, time.monotonic()) if exc.timed_out else None)
                delay = min(BACKOFF_CAP, BACKOFF_START * 2 ** (attempt - 1))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter
                continue
            attempt = 0
            self._on_success(w)
            if index == before and time.monotonic() - started < 0.01:
                # an unchanged index answered at once would spin: pace it
                await asyncio.sleep(0.1)

    async def _get(self, w: _Watch, params: dict[str, str], timeout: float) -> tuple[int, Any]:
        assert self._session is not None
        w.requests += 1
        try:
            async with self._session.get(
                self._base + w.path,
                params=params,
                headers=self._headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                status = resp.status
                raw = await resp.read()
                index_h = resp.headers.get("X-Consul-Index", "")
        except TimeoutError:
            raise _ConsulError(f"no answer within {timeout:g} s", timed_out=True) from None
        except aiohttp.ClientError as exc:
            raise _ConsulError(f"{type(exc).__name__}: {exc}") from None
        if status == 403:
            raise _ConsulError(f"403 {raw[:200].decode(errors='replace')}", denied=True)
        if status not in (200, 404) or (status == 404 and not w.path.startswith("/v1/kv/")):
            raise _ConsulError(f"HTTP {status} {raw[:200].decode(errors='replace')}")
        if not index_h.isdigit():
            raise _ConsulError("response without X-Consul-Index")
        if status == 404:
            return int(index_h), None
        try:
            return int(index_h), json.loads(raw)
        except ValueError:
            raise _ConsulError("response is not JSON") from None

    def _on_failure(self, w: _Watch, exc: _ConsulError, since: float | None) -> None:
        now = time.monotonic()
        since = now if since is None else since
        w.consecutive_errors += 1
        w.errors_total += 1
        w.last_error = str(exc)
        if w.failing_since is None:
            w.failing_since = since
        log.debug("consul watch %s failed: %s", w.name, exc)
        if exc.denied and not self._denied_logged:
            self._denied_logged = True
            log.error("token rejected by Consul (revoked?): %s answered %s", self._base, exc)
        if self._outage_since is None:
            self._outage_since, self._last_reminder = since, now
            if self._loaded.is_set():
                log.warning(
                    "consul %s unreachable (%s: %s); serving the cached directory for up to %g s",
                    self._base,
                    w.name,
                    exc,
                    self._settings.stale_after,
                )
            else:
                log.warning(
                    "cannot load the directory from consul %s (%s: %s); logins are "
                    "refused until it answers",
                    self._base,
                    w.name,
                    exc,
                )
            return
        self._outage_since = min(self._outage_since, since)
        down = now - self._outage_since
        if self._loaded.is_set() and down > self._settings.stale_after:
            self._note_stale(down)
        elif now - self._last_reminder >= REMINDER_EVERY:
            self._last_reminder = now
            log.warning(
                "consul %s still unreachable after %.0f s (%s: %s)", self._base, down, w.name, exc
            )

    def _note_stale(self, down: float) -> None:
        if not self._stale_logged:
            self._stale_logged = True
            log.error(
                "consul %s unreachable for %.0f s (stale_after %g s): the cached "
                "directory is no longer used, logins are refused",
                self._base,
                down,
                self._settings.stale_after,
            )

    def _on_success(self, w: _Watch) -> None:
        now = time.monotonic()
        w.consecutive_errors = 0
        w.failing_since = None
        w.last_error = ""
        w.last_success = now
        w.last_success_wall = time.time()
        if not w.loaded:
            w.loaded = True
            if all(x.loaded for x in self._watches):
                self._loaded.set()
                log.info(
                    "directory loaded from %s: %d routes (%d malformed), keys for %d "
                    "users, %d host key entries, %d nodes",
                    self._base,
                    len(self._table),
                    len(self._table.errors),
                    len(self._keys),
                    len(self._host_keys),
                    len(self._nodes),
                )
        if self._outage_since is not None and all(x.failing_since is None for x in self._watches):
            log.warning(
                "consul %s reachable again after %.1f s", self._base, now - self._outage_since
            )
            self._outage_since = None
            self._stale_logged = self._denied_logged = False

    def _apply_routes(self, body: Any) -> None:
        entries = _kv_entries(body, self._settings.routes_prefix)
        self._table = RouteTable(
            entries,
            default_port=self._default_port,
            routes_prefix=self._settings.routes_prefix,
            previous=self._table,
        )

    def _key_map(
        self, body: Any, prefix: str, norm: Callable[[str], str]
    ) -> dict[str, tuple[str, ...]]:
        result: dict[str, tuple[str, ...]] = {}
        for name, raw in _kv_entries(body, prefix).items():
            lines = _key_lines(raw)
            if lines is None:
                log.warning("ignoring %s: not UTF-8 text", _show(prefix + name, 120))
                continue
            result[norm(name)] = lines
        return result

    def _apply_keys(self, body: Any) -> None:
        self._keys = self._key_map(body, self._settings.keys_prefix, str)

    def _apply_host_keys(self, body: Any) -> None:
        self._host_keys = self._key_map(body, self._settings.host_keys_prefix, _norm_host)

    def _apply_nodes(self, body: Any) -> None:
        nodes: dict[str, _Node] = {}
        for item in _json_list(body):
            name, address = item.get("Node"), item.get("Address")
            if isinstance(name, str) and isinstance(address, str) and address:
                nodes[name.lower()] = _Node(name, address)
        self._nodes = nodes

    def _apply_health(self, body: Any) -> None:
        checks: dict[str, list[tuple[str, str]]] = {}
        for item in _json_list(body):
            if item.get("ServiceID"):
                continue
            node = str(item.get("Node", "")).lower()
            checks.setdefault(node, []).append(
                (str(item.get("CheckID", "")), str(item.get("Status", "")))
            )
        self._health = {node: tuple(found) for node, found in checks.items()}

    # -- queries (no I/O) --------------------------------------------------

    def _check_fresh(self) -> None:
        if not self._loaded.is_set():
            raise DirectoryUnavailable("the directory is unavailable: no routing table loaded yet")
        since = self._outage_since
        if since is not None:
            down = time.monotonic() - since
            if down > self._settings.stale_after:
                self._note_stale(down)  # once per outage, whichever notices first
                errors = "; ".join(
                    f"{w.name}: {w.last_error}" for w in self._watches if w.last_error
                )
                raise DirectoryUnavailable(
                    f"the directory is unavailable: directory unreachable for {down:.0f} s",
                    detail=f"consul {self._base} unreachable for {down:.0f} s "
                    f"(stale_after {self._settings.stale_after:g} s): {errors}",
                )

    def route_for(self, user: str) -> Route:
        """``user``'s route; NoRoute, MalformedRoute or DirectoryUnavailable."""
        self._check_fresh()
        return self._table.route_for(user)

    def _health_problem(self, node: _Node) -> str | None:
        checks = self._health.get(node.name.lower(), ())
        if not checks:
            return "has no health checks (treated as down)"
        if any(cid == "_node_maintenance" for cid, _ in checks):
            return "is in maintenance"
        if any(status == "critical" for _, status in checks):
            return "is down (health checks failing)"
        if any(status != "passing" for _, status in checks):
            return "is unhealthy (health checks not passing)"
        return None

    def _resolve_target(self, route: Route, target: Target) -> Destination | RoutingError:
        login = target.login or route.login
        port = target.port or self._default_port
        if not target.is_node:
            return Destination(target.host, port, login, None, _hostport(target.host, port))
        node = self._nodes.get(target.host.lower())
        if node is None:
            return UnknownHost(f"{target.host} is not a known host in the directory")
        problem = self._health_problem(node)
        if problem:
            return HostUnhealthy(f"{target.host} {problem}")
        return Destination(
            node.address, port, login, node.name, f"{node.name} ({_hostport(node.address, port)})"
        )

    def resolve(self, route: Route) -> Destination:
        """The first usable target of ``route``; UnknownHost or HostUnhealthy if none."""
        self._check_fresh()
        problems: list[RoutingError] = []
        for target in route.targets:
            result = self._resolve_target(route, target)
            if isinstance(result, Destination):
                return result
            problems.append(result)
        # a known host that is down says more than a name the catalog lacks
        best = next((p for p in problems if isinstance(p, HostUnhealthy)), problems[0])
        raise type(best)(
            best.user_message,
            detail=f"{route.user}: " + "; ".join(p.user_message for p in problems),
        )

    def jump_destination(self, user: str, host: str, port: int) -> Destination:
        """May ``user`` open a TCP stream (``ssh -J``) to ``host:port``?

        Only to a target of the user's route or ``jump`` policy, named as the
        node name or as the node's catalog address, on the target's port.
        """
        route = self.route_for(user)
        wanted = _norm_host(host)
        for target in (*route.targets, *route.policy.jump):
            if (target.port or self._default_port) != port:
                continue
            names = {_norm_host(target.host)}
            if target.is_node:
                node = self._nodes.get(target.host.lower())
                if node is not None:
                    names.add(_norm_host(node.address))
            if wanted in names:
                result = self._resolve_target(route, target)
                if isinstance(result, Destination):
                    return result
                raise result
        shown = _plain(host, 100)
        raise ForwardDenied(f"{route.user} may not jump to {_hostport(shown, port)}")

    def authorized_keys(self, user: str) -> list[str]:
        """``user``'s authorized_keys lines from the directory (may be empty)."""
        self._check_fresh()
        return list(self._keys.get(user, ()))

    def host_keys(self, names: list[str]) -> list[str]:
        """Host key lines published for any of ``names`` (node names or addresses)."""
        self._check_fresh()
        lines: dict[str, None] = {}
        for name in names:
            for line in self._host_keys.get(_norm_host(name), ()):
                lines[line] = None
        return list(lines)

    # -- operators ---------------------------------------------------------

    def describe(self, user: str) -> str:
        """A multi-line explanation of where ``user`` would go, and why."""
        key = _plain(f"{self._settings.routes_prefix}{user}", 120)
        out = [f"user: {_plain(user)}"]
        try:
            self._check_fresh()
        except DirectoryUnavailable as exc:
            out.append(f"directory: UNAVAILABLE ({exc.detail}); logins are refused")
        raw = self._table.raw(user)
        if raw is None:
            out.append(f"entry: {key} does not exist: no route")
        else:
            out.append(f"entry: {key} = {_show(raw.decode(errors='replace'), 1100)}")
            try:
                route = self._table.route_for(user)
            except MalformedRoute as exc:
                out.append(f"malformed: {exc.detail}")
            else:
                out += self._describe_route(route)
        out.append(self._describe_age())
        return "\n".join(out)

    def _describe_route(self, route: Route) -> list[str]:
        out = ["targets (first usable wins):"]
        chosen = False
        for number, target in enumerate(route.targets, 1):
            kind = "node" if target.is_node else "address"
            result = self._resolve_target(route, target)
            if isinstance(result, Destination):
                verdict = "skipped: an earlier target is used" if chosen else "WOULD BE USED"
                line = f"-> {result.login}@{result.label}; {verdict}"
                chosen = True
            else:
                line = f"skipped: {result.user_message}"
            out.append(f"  {number}. {target} ({kind}) {line}")
        if not chosen:
            out.append("  no usable target: the login would be refused")
        p = route.policy

        def yn(flag: bool) -> str:
            return "yes" if flag else "no"

        jump = ", ".join(str(t) for t in p.jump) or "(route targets only)"
        out.append(
            f"policy: agent forwarding {yn(p.agent_forwarding)}, local forwarding "
            f"{yn(p.local_forwarding)}, remote forwarding {yn(p.remote_forwarding)}, "
            f"jump to {jump}"
        )
        return out

    def _describe_age(self) -> str:
        w = self._watches[0]
        if w.last_success_wall is None:
            return "routing table: never loaded"
        now = time.time()
        changed = (
            f", last change {now - w.last_change_wall:.1f} s ago" if w.last_change_wall else ""
        )
        state = (
            "reachable"
            if self._outage_since is None
            else (f"UNREACHABLE for {time.monotonic() - self._outage_since:.0f} s")
        )
        return (
            f"routing table: index {w.index}, last sync {now - w.last_success_wall:.1f} s "
            f"ago{changed}; consul {self._base} {state}"
        )

    @property
    def stats(self) -> DirectoryStats:
        walls = [w.last_success_wall for w in self._watches if w.last_success_wall is not None]
        last_sync = min(walls) if len(walls) == len(self._watches) else None
        down = None if self._outage_since is None else time.monotonic() - self._outage_since
        return DirectoryStats(
            routes=len(self._table),
            malformed_routes=len(self._table.errors),
            users_with_keys=len(self._keys),
            host_key_entries=len(self._host_keys),
            nodes=len(self._nodes),
            loaded=self._loaded.is_set(),
            last_sync=last_sync,
            unreachable_for=down,
            watches=tuple(
                WatchStats(
                    w.name,
                    w.index,
                    w.requests,
                    w.errors_total,
                    w.consecutive_errors,
                    w.last_success_wall,
                )
                for w in self._watches
            ),
        )
