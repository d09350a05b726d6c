"""``bastion route USER``: where a person would go right now, and why."""

from __future__ import annotations

from bastion.directory.grammar import plain, show
from bastion.directory.store import ConsulDirectory
from bastion.errors import DirectoryUnavailable, MalformedRoute, NoRoute
from bastion.model import Destination, Route


def describe(directory: ConsulDirectory, user: str) -> str:
    """A multi-line explanation of where ``user`` would go, and why."""
    key = plain(f"{directory.routes_prefix}{user}", 120)
    out = [f"user: {plain(user)}"]
    try:
        directory.watches.check_fresh()
    except DirectoryUnavailable as exc:
        out.append(f"directory: UNAVAILABLE ({exc.detail}); logins are refused")
    raw = directory.raw_entry(user)
    if raw is None:
        out.append(f"entry: {key} does not exist: no route")
    else:
        out.append(f"entry: {key} = {show(raw.decode(errors='replace'), 1100)}")
        try:
            route = directory.cached_route(user)
        except MalformedRoute as exc:
            out.append(f"malformed: {exc.detail}")
        except NoRoute:
            pass
        else:
            out += _describe_route(directory, route)
    out.append(directory.watches.describe_age())
    return "\n".join(out)


def _describe_route(directory: ConsulDirectory, route: Route) -> list[str]:
    out = ["targets (first usable wins):"]
    chosen = False
    for number, target in enumerate(route.targets, 1):
        kind = "node" if target.is_node else "address"
        result = directory.resolve_target(route, target)
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
