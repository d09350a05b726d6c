"""``bastion grant``: time-bound access grants, written with an operator's
Consul token.

    bastion grant alice host-103 --for 2h --reason INC-42 --config FILE --consul-token-file FILE
    bastion grant --list --config FILE --consul-token-file FILE
    bastion grant --revoke alice host-103 --config FILE --consul-token-file FILE
    bastion grant --revoke alice NAME --config FILE ...   # NAME as --list shows it

A grant is the key ``<[access] grants_prefix><user>/<host>`` (JSON value:
:mod:`bastion.directory.grants`) acquired by a Consul session created with
``TTL`` = the grant's duration (10 s to 24 h, Consul's range; at most
``[access] grant_max``) and ``Behavior = "delete"``: when the session ends
(its TTL runs out, or ``--revoke`` destroys it) Consul deletes the key.
Consul's HTTP API (1.8 and current):
``PUT /v1/session/create``, ``PUT /v1/kv/<key>?acquire=<session>``,
``PUT /v1/session/destroy/<id>``
(https://developer.hashicorp.com/consul/api-docs/session). The session is
never renewed. It carries the default ``serfHealth`` check of the agent it
was created on: if that agent's node fails, the grant ends early (fails
closed).

The token comes from ``--consul-token-file`` only (never the bastion's
token, never ``CONSUL_HTTP_TOKEN``): it needs write on the grants prefix and
session write (acl-policies/operator.hcl).
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from bastion.errors import BastionError, printable

MIN_GRANT = 10.0  # seconds: Consul's shortest session TTL
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)\Z")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class GrantError(BastionError):
    reason = "grant-error"


def parse_duration(text: str, longest: float) -> float:
    """``"90s"``, ``"15m"``, ``"2h"``, ``"1d"`` or plain seconds → seconds,
    between 10 s and ``longest``; GrantError otherwise."""
    match = _DURATION_RE.match(text.strip().lower())
    if match is None:
        raise GrantError(f"--for {text!r}: a duration like 90s, 15m, 2h or 1d")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not MIN_GRANT <= seconds <= longest:
        raise GrantError(
            f"--for {text}: between {MIN_GRANT:g} s and {longest:g} s "
            "(Consul's session TTL range, [access] grant_max)"
        )
    return seconds


def grant_name(route: str) -> str:
    """The key's last part for a route: its first target's host
    (``admin@host-103:22`` → ``host-103``)."""
    first = route.split(",", maxsplit=1)[0].strip()
    host = first.rpartition("@")[2]
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.replace(":", "_")


class ConsulHTTP:
    """Consul's HTTP API with one token; no proxies, nothing from the environment."""

    def __init__(self, base: str, token: str, timeout: float = 10.0) -> None:
        self._base = base.rstrip("/")
        self._token = token.strip()
        self._timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"<ConsulHTTP {self._base} token=<redacted>>"

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, decoded JSON or None); GrantError when Consul does not answer."""
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        # the base URL is http(s) only (config.consul_base_url checks it)
        req = urllib.request.Request(self._base + path, data=data, method=method)  # noqa: S310
        req.add_header("X-Consul-Token", self._token)
        try:
            with self._opener.open(req, timeout=self._timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise GrantError(f"consul {self._base} does not answer: {reason}") from None
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace").strip()[:200]

    def ok(self, method: str, path: str, body: Any = None, what: str = "") -> Any:
        status, answer = self.call(method, path, body)
        if status == 403:
            raise GrantError(
                f"{what}: consul refused (403 {answer}): the token needs write on the "
                "grants prefix and session write (acl-policies/operator.hcl)"
            )
        if status >= 400:
            raise GrantError(f"{what}: consul answered {status} {answer}")
        return answer


def _kv(prefix: str, rest: str = "") -> str:
    return "/v1/kv/" + urllib.parse.quote(prefix + rest, safe="/")


def create(
    consul: ConsulHTTP,
    prefix: str,
    user: str,
    route: str,
    seconds: float,
    *,
    by: str,
    reason: str = "",
    now: float | None = None,
) -> dict[str, Any]:
    """Grant ``user`` ``route`` for ``seconds``; returns what was written
    (key, session, expires, value). A grant of the same host is replaced."""
    from bastion.directory.grammar import parse_route
    from bastion.directory.grants import BadGrant, parse_grant
    from bastion.identity import valid_user_name

    if not valid_user_name(user):
        raise GrantError(f"{user!r} is not a user name")
    if route.strip().startswith("{"):
        raise GrantError("the route is a plain route (host-103, admin@host-103:22), not JSON")
    try:
        parse_route(user, route)
    except BastionError as exc:
        raise GrantError(f"route {route!r}: {exc.detail.partition(': ')[2]}") from None
    name = grant_name(route)
    key = f"{user}/{name}"
    now = time.time() if now is None else now
    expires = round(now + seconds)
    value = {"route": route.strip(), "expires": expires, "by": by, "reason": reason}
    data = json.dumps(value).encode()
    try:  # what the bastion will read: the same grammar
        parse_grant(prefix + key, user, name, data, now=now, longest=max(seconds, MIN_GRANT))
    except BadGrant as exc:
        raise GrantError(f"{prefix}{key}: {exc}") from None
    revoke(consul, prefix, user, name, missing_ok=True)  # replace, never stack
    ttl = f"{round(seconds)}s"
    session = consul.ok(
        "PUT",
        "/v1/session/create",
        {"Name": f"bastion grant {key}", "TTL": ttl, "Behavior": "delete", "LockDelay": "0s"},
        what="creating the grant's session",
    )["ID"]
    acquired = consul.ok(
        "PUT",
        _kv(prefix, key) + "?acquire=" + urllib.parse.quote(session),
        data,
        what=f"writing {prefix}{key}",
    )
    if acquired is not True:
        consul.call("PUT", f"/v1/session/destroy/{session}")
        raise GrantError(f"{prefix}{key} is held by another session; try again")
    return {"key": prefix + key, "session": session, "expires": expires, "value": value}


def revoke(
    consul: ConsulHTTP, prefix: str, user: str, name: str, *, missing_ok: bool = False
) -> bool:
    """End ``user``'s grant ``name`` now: destroy its session (Consul deletes
    the key), or delete a key that has none. False if there was no grant."""
    path = _kv(prefix, f"{user}/{name}")
    status, entries = consul.call("GET", path)
    if status == 404:
        if missing_ok:
            return False
        raise GrantError(f"no grant {prefix}{user}/{name}")
    if status >= 400 or not isinstance(entries, list) or not entries:
        raise GrantError(f"reading {prefix}{user}/{name}: consul answered {status} {entries}")
    session = entries[0].get("Session")
    if session:
        consul.ok("PUT", f"/v1/session/destroy/{session}", what="destroying the grant's session")
    status, _ = consul.call("GET", path)
    if status != 404:  # no session, or Consul kept the key: delete it
        consul.ok("DELETE", path, what=f"deleting {prefix}{user}/{name}")
    return True


def _entries(consul: ConsulHTTP, prefix: str, rest: str = "") -> list[dict[str, Any]]:
    """The KV entries under ``prefix + rest`` (``?recurse``); [] if none."""
    status, entries = consul.call("GET", _kv(prefix, rest) + "?recurse=true")
    if status == 404:
        return []
    if status >= 400 or not isinstance(entries, list):
        raise GrantError(f"listing {prefix}{rest}: consul answered {status} {entries}")
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("Key"), str)]


def listing(
    consul: ConsulHTTP,
    prefix: str,
    now: float | None = None,
    longest: float = 86400.0,
    user: str | None = None,
) -> list[dict[str, Any]]:
    """The grants under ``prefix`` (only ``user``'s if given), judged as the
    bastion judges them (:func:`bastion.directory.grants.parse_grant`): key,
    user, name, route, expires, left (seconds), by, reason, session, and
    ``problem`` (None, or why the bastion ignores it; then no route, expires
    or left). One bad entry never hides the others."""
    from bastion.directory.grants import BadGrant, is_folder, parse_grant

    now = time.time() if now is None else now
    out = []
    for entry in _entries(consul, prefix, "" if user is None else user + "/"):
        key = entry["Key"]
        rest = key[len(prefix) :] if key.startswith(prefix) else key
        try:
            value = base64.b64decode(entry.get("Value") or "", validate=True)
        except (ValueError, TypeError):
            value = None
        if value is not None and is_folder(rest, value):
            continue
        who, _, name = rest.partition("/")
        row: dict[str, Any] = {
            "key": key,
            "user": who,
            "name": name,
            "route": None,
            "expires": None,
            "left": None,
            "by": "",
            "reason": "",
            "session": entry.get("Session"),
            "problem": None,
        }
        try:
            if value is None:
                raise BadGrant("value is not base64 (as Consul stores it)")
            grant = parse_grant(key, who, name, value, now=now, longest=longest)
        except BadGrant as exc:
            row["problem"] = str(exc)
        else:
            row.update(
                route=grant.route.raw.partition(": ")[2],
                expires=grant.expires,
                left=round(grant.expires - now),
                by=grant.by,
                reason=grant.reason,
            )
        out.append(row)
    return out


def resolve(consul: ConsulHTTP, prefix: str, user: str, what: str) -> str:
    """The name of ``user``'s grant that ``what`` designates: a key name as
    ``--list`` shows it, or a route (its host's name, or a grant whose route
    is exactly ``what``). GrantError naming ``user``'s grants if none does."""
    if not user or "/" in user or not user.isprintable():
        raise GrantError(f"{printable(user)!r} is not a user as --list shows one")
    rows = listing(consul, prefix, user=user)
    names: list[str] = [str(r["name"]) for r in rows if r["user"] == user]
    if what in names:
        return what
    by_host = grant_name(what)
    if by_host in names:
        return by_host
    routes = sorted({str(r["name"]) for r in rows if r["route"] == what.strip()})
    if len(routes) == 1:
        return routes[0]
    if routes:
        raise GrantError(
            f"several grants of {user} have route {printable(what)!r}: "
            f"{', '.join(map(printable, routes))}; name one"
        )
    known = ", ".join(printable(n) for n in sorted(names)) if names else "none"
    raise GrantError(
        f"no grant of {user} named {printable(what)!r} (nor for that route); "
        f"{user}'s grants under {prefix}: {known}"
    )


def _left(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds <= 0:
        return "expired"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def run(args: argparse.Namespace) -> int:
    """``bastion grant``; exit 0, or 1 with one line on stderr (cli.main)."""
    from bastion.addresses import consul_base_url
    from bastion.config import load_settings
    from bastion.secretfiles import read_secret_file

    settings = load_settings(args.config)
    token = read_secret_file(args.consul_token_file, "--consul-token-file")
    consul = ConsulHTTP(consul_base_url(settings.consul.address), token)
    prefix = settings.access.grants_prefix
    if args.list:
        grants = listing(consul, prefix, longest=settings.access.grant_max)
        if not grants:
            print("no grants")
        else:
            print(f"{'USER':<12} {'NAME':<16} {'ROUTE':<24} {'LEFT':>8}  BY (REASON)")
        for g in grants:
            who, name = printable(g["user"], 40), printable(g["name"], 80)
            if g["problem"] is not None:
                print(f"{who:<12} {name:<16} malformed, ignored: {printable(g['problem'])}")
                continue
            line = f"{who:<12} {name:<16} {g['route']:<24} {_left(g['left']):>8}"
            line += f"  by {printable(g['by'])}"
            print(line + (f"  ({printable(g['reason'])})" if g["reason"] else ""))
        return 0
    if args.user is None or args.route is None:
        raise GrantError(
            "bastion grant USER ROUTE --for DURATION (or --list, --revoke USER ROUTE|NAME)"
        )
    if args.revoke:
        name = resolve(consul, prefix, args.user, args.route)
        revoke(consul, prefix, args.user, name)
        print(f"revoked: {prefix}{args.user}/{printable(name)} (its session destroyed)")
        return 0
    if args.duration is None:
        raise GrantError("--for DURATION is required (e.g. --for 2h)")
    seconds = parse_duration(args.duration, settings.access.grant_max)
    done = create(
        consul,
        prefix,
        args.user,
        args.route,
        seconds,
        by=args.by or getpass.getuser(),
        reason=args.reason or "",
    )
    print(
        f"granted {args.user} {args.route} until {_when(done['expires'])} "
        f"({_left(seconds)}): {done['key']} (session {done['session']})"
    )
    return 0


def add_parser(sub: Any) -> None:
    """The ``grant`` subcommand on ``bastion``'s subparsers."""
    p = sub.add_parser(
        "grant",
        help="grant a person temporary access (a Consul key that expires), list or revoke",
    )
    p.add_argument("user", nargs="?", help="the person (user name)")
    p.add_argument("route", nargs="?", help="host-103, admin@host-103:22 (the plain route form)")
    p.add_argument("--for", dest="duration", help="how long: 90s, 15m, 2h, 1d (10 s to 24 h)")
    p.add_argument("--reason", help="why (shown in --list and the bastion's log)")
    p.add_argument("--by", help="who grants (default: your login name)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="list the grants")
    what.add_argument(
        "--revoke",
        action="store_true",
        help="end USER's grant now: ROUTE, or the grant's NAME as --list shows it",
    )
    p.add_argument("--config", type=Path, required=True, help="the bastion's settings")
    p.add_argument(
        "--consul-token-file",
        type=Path,
        required=True,
        help="an operator token (write on the grants prefix, session write)",
    )
    p.set_defaults(func=run)
