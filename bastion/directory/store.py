"""The directory in memory: routes, people's keys, upstream host keys,
catalog nodes and node health, each kept current by its own Consul watch,
so that a login makes no Consul request.

Health: a node is healthy iff it has at least one node-level check (empty
ServiceID) and all of them are passing. A node with no node checks is treated
as down: nothing vouches for it (fail closed). A node in Consul's
``maintenance mode`` (the ``_node_maintenance`` check) is not used.

Every query first checks freshness (:meth:`ConsulWatches.check_fresh`) and
raises ``DirectoryUnavailable`` when the cached data may not be used.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bastion.addresses import consul_base_url
from bastion.config import ConsulSettings
from bastion.directory.grammar import RouteTable, hostport, show
from bastion.directory.grants import MAX_GRANT_SECONDS, Grant, GrantTable
from bastion.directory.watch import ConsulError, ConsulWatches, Watch
from bastion.errors import (
    ConfigError,
    DirectoryUnavailable,
    HostUnhealthy,
    RoutingError,
    UnknownHost,
)
from bastion.model import Destination, Node, Route, Target

log = logging.getLogger("bastion.directory")


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


def norm_host(host: str) -> str:
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
        raise ConsulError("unexpected KV listing")
    entries: dict[str, bytes] = {}
    for item in body:
        key = item.get("Key") if isinstance(item, dict) else None
        if not isinstance(key, str) or not key.startswith(prefix):
            raise ConsulError("unexpected KV listing entry")
        value = item.get("Value")
        try:
            entries[key[len(prefix) :]] = base64.b64decode(value, validate=True) if value else b""
        except (binascii.Error, TypeError):
            raise ConsulError(f"undecodable value for {show(key, 120)}") from None
    return entries


def _kv_indexes(body: Any, prefix: str) -> dict[str, int]:
    """Each entry's ModifyIndex in a KV listing _kv_entries accepted (certificates'
    key ids name it: the directory state that let a login in)."""
    found: dict[str, int] = {}
    for item in body or ():
        index = item.get("ModifyIndex")
        if isinstance(index, int) and not isinstance(index, bool):
            found[str(item["Key"])[len(prefix) :]] = index
    return found


def _json_list(body: Any) -> list[dict[str, Any]]:
    """A catalog/health answer: a list of objects (``null`` = nothing visible)."""
    if body is None:
        return []
    if not isinstance(body, list) or not all(isinstance(x, dict) for x in body):
        raise ConsulError("unexpected answer (not a list of objects)")
    return body


def _kv_path(prefix: str) -> str:
    return "/v1/kv/" + urllib.parse.quote(prefix, safe="/")


class ConsulDirectory:
    """The directory in memory, kept current by five Consul blocking queries
    (routes, users' keys, host keys, catalog nodes, node health), and a sixth
    for time-bound grants when ``grants_prefix`` is given (docs/access.md).
    Listeners (:meth:`add_listener`) hear which people's entries, keys or
    grants changed."""

    def __init__(
        self,
        settings: ConsulSettings,
        token: str,
        default_port: int = 22,
        grants_prefix: str | None = None,
        grant_max: float = MAX_GRANT_SECONDS,
    ) -> None:
        if not token.strip():
            raise ConfigError("[consul] the token is empty; the bastion needs its own token")
        self._settings = settings
        self._base = consul_base_url(settings.address)
        self.default_port = default_port
        self._table = RouteTable(
            {}, default_port=default_port, routes_prefix=settings.routes_prefix
        )
        self._keys: dict[str, tuple[str, ...]] = {}
        self._host_keys: dict[str, tuple[str, ...]] = {}
        self._nodes: dict[str, Node] = {}
        self._health: dict[str, tuple[tuple[str, str], ...]] = {}
        # access grants (bastion.directory.grants); called with the users whose
        # entries, keys or grants changed (bastion.revocation listens)
        self._grants_prefix = grants_prefix
        self._grant_max = grant_max  # [access] grant_max: the latest "expires" taken
        self._grants = GrantTable({}, grants_prefix or "")
        self._listeners: list[Callable[[set[str]], None]] = []
        self._route_entries: dict[str, bytes] = {}
        s = settings
        kv = {"recurse": "true"}
        grants = (
            [Watch("grants", _kv_path(grants_prefix), kv, self._apply_grants)]
            if grants_prefix
            else []
        )
        self.watches = ConsulWatches(
            settings,
            self._base,
            token,
            [
                Watch("routes", _kv_path(s.routes_prefix), kv, self._apply_routes),
                Watch("keys", _kv_path(s.keys_prefix), kv, self._apply_keys),
                Watch("host_keys", _kv_path(s.host_keys_prefix), kv, self._apply_host_keys),
                Watch("nodes", "/v1/catalog/nodes", {}, self._apply_nodes),
                Watch(
                    "health",
                    "/v1/health/state/any",
                    {"filter": 'ServiceID == ""'},
                    self._apply_health,
                ),
                *grants,
            ],
            self._summary,
        )

    def __repr__(self) -> str:
        return f"<ConsulDirectory {self._base} token=<redacted>>"

    @property
    def ready(self) -> bool:
        """Whether logins can be routed now (loaded, and fresh enough)."""
        try:
            self.watches.check_fresh()
        except DirectoryUnavailable:
            return False
        return True

    @property
    def base_url(self) -> str:
        return self._base

    @property
    def routes_prefix(self) -> str:
        return self._settings.routes_prefix

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Start the watches (returns at once)."""
        await self.watches.start()

    async def wait_loaded(self, timeout: float) -> None:
        """Wait until every watch has answered once; DirectoryUnavailable after ``timeout``."""
        await self.watches.wait_loaded(timeout)

    async def aclose(self) -> None:
        await self.watches.aclose()

    def _summary(self) -> str:
        return (
            f"{len(self._table)} routes ({len(self._table.errors)} malformed), keys for "
            f"{len(self._keys)} users, {len(self._host_keys)} host key entries, "
            f"{len(self._nodes)} nodes"
        )

    # -- answers from Consul ---------------------------------------------

    def add_listener(self, listener: Callable[[set[str]], None]) -> None:
        """Call ``listener`` with the users whose entry, keys or grants
        changed, after each change (not on the first load)."""
        self._listeners.append(listener)

    def _changed(self, users: set[str], loaded: bool, emptied: str | None = None) -> None:
        if emptied is not None and users and loaded:
            # a denied listing is a 404 too: a token that lost its read
            # looks like an empty directory; never end every session on that
            log.error(
                "%s is now empty (deleted, or the bastion's token may no longer read it): "
                "new logins are refused, live sessions are kept",
                emptied,
            )
            return
        if users and loaded:
            for listener in self._listeners:
                try:
                    listener(users)
                except Exception:  # a listener must not fail the watch
                    log.exception("directory change listener failed")

    def _apply_routes(self, body: Any) -> None:
        entries = _kv_entries(body, self._settings.routes_prefix)
        self._table = RouteTable(
            entries,
            default_port=self.default_port,
            routes_prefix=self._settings.routes_prefix,
            previous=self._table,
            indexes=_kv_indexes(body, self._settings.routes_prefix),
        )
        before, self._route_entries = self._route_entries, entries
        users = {u for u in set(entries) | set(before) if before.get(u) != entries.get(u)}
        emptied = self._settings.routes_prefix if before and not entries else None
        self._changed(users, self.watches.watches[0].loaded, emptied)

    def _apply_grants(self, body: Any) -> None:
        prefix = self._grants_prefix or ""
        old = self._grants
        self._grants = GrantTable(
            _kv_entries(body, prefix), prefix, previous=old, longest=self._grant_max
        )
        # also on the first load: the revoker notes who holds grants and
        # arms its timer for the first to expire, whenever that load comes
        self._changed(self._grants.changed_users(old), True)

    def _key_map(
        self, body: Any, prefix: str, norm: Callable[[str], str]
    ) -> dict[str, tuple[str, ...]]:
        result: dict[str, tuple[str, ...]] = {}
        for name, raw in _kv_entries(body, prefix).items():
            lines = _key_lines(raw)
            if lines is None:
                log.warning("ignoring %s: not UTF-8 text", show(prefix + name, 120))
                continue
            result[norm(name)] = lines
        return result

    def _apply_keys(self, body: Any) -> None:
        old, self._keys = self._keys, self._key_map(body, self._settings.keys_prefix, str)
        users = {u for u in set(old) | set(self._keys) if old.get(u) != self._keys.get(u)}
        emptied = self._settings.keys_prefix if old and not self._keys else None
        self._changed(users, self.watches.watches[1].loaded, emptied)

    def _apply_host_keys(self, body: Any) -> None:
        self._host_keys = self._key_map(body, self._settings.host_keys_prefix, norm_host)

    def _apply_nodes(self, body: Any) -> None:
        nodes: dict[str, Node] = {}
        for item in _json_list(body):
            name, address = item.get("Node"), item.get("Address")
            if isinstance(name, str) and isinstance(address, str) and address:
                nodes[name.lower()] = Node(name, address)
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

    def route_for(self, user: str) -> Route:
        """``user``'s route; NoRoute, MalformedRoute or DirectoryUnavailable."""
        self.watches.check_fresh()
        return self._table.route_for(user)

    def cached_route(self, user: str) -> Route:
        """``user``'s route as last loaded, fresh or not (for ``bastion route``)."""
        return self._table.route_for(user)

    def raw_entry(self, user: str) -> bytes | None:
        """``user``'s entry as stored (for ``bastion route``); no freshness check."""
        return self._table.raw(user)

    def grants_for(self, user: str) -> tuple[Grant, ...]:
        """``user``'s grants in force now (their ``expires`` is ahead)."""
        self.watches.check_fresh()
        return self._grants.for_user(user)

    def all_grants(self, user: str) -> tuple[Grant, ...]:
        """``user``'s grants as stored, expired or not; no freshness check."""
        return self._grants.all_for(user)

    def grant_users(self) -> set[str]:
        """The people with a grant under the prefix (in force or not)."""
        return self._grants.users()

    def next_grant_expiry(self) -> float | None:
        """The earliest grant ``expires`` still ahead (epoch seconds), or None."""
        return self._grants.next_expiry()

    def node(self, name: str) -> Node | None:
        return self._nodes.get(name.lower())

    def _health_problem(self, node: Node) -> str | None:
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

    def resolve_target(self, route: Route, target: Target) -> Destination | RoutingError:
        """Where ``target`` of ``route`` is now, or why it cannot be used."""
        login = target.login or route.login
        port = target.port or self.default_port
        if not target.is_node:
            return Destination(target.host, port, login, None, hostport(target.host, port))
        node = self.node(target.host)
        if node is None:
            return UnknownHost(f"{target.host} is not a known host in the directory")
        problem = self._health_problem(node)
        if problem:
            return HostUnhealthy(f"{target.host} {problem}")
        return Destination(
            node.address, port, login, node.name, f"{node.name} ({hostport(node.address, port)})"
        )

    def authorized_keys(self, user: str) -> list[str]:
        """``user``'s authorized_keys lines from the directory (may be empty)."""
        self.watches.check_fresh()
        return list(self._keys.get(user, ()))

    def host_keys(self, names: list[str]) -> list[str]:
        """Host key lines published for any of ``names`` (node names or addresses)."""
        self.watches.check_fresh()
        lines: dict[str, None] = {}
        for name in names:
            for line in self._host_keys.get(norm_host(name), ()):
                lines[line] = None
        return list(lines)

    @property
    def stats(self) -> DirectoryStats:
        watches = self.watches.watches
        walls = [w.last_success_wall for w in watches if w.last_success_wall is not None]
        last_sync = min(walls) if len(walls) == len(watches) else None
        since = self.watches.outage_since
        down = None if since is None else time.monotonic() - since
        return DirectoryStats(
            routes=len(self._table),
            malformed_routes=len(self._table.errors),
            users_with_keys=len(self._keys),
            host_key_entries=len(self._host_keys),
            nodes=len(self._nodes),
            loaded=self.watches.loaded,
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
                for w in watches
            ),
        )
