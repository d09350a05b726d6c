"""Every host the directory routes to must have a host key the bastion can
verify: the bastion refuses a host it cannot verify (no trust on first use),
so a missing key is a login that fails, and a key added in a hurry later is a
key nobody checked.

The directory is loaded the way the bastion loads it (:class:`ConsulDirectory`
with the bastion's token) and each routed destination is put to the
bastion's own :class:`HostKeyPolicy` (known_hosts, ``@cert-authority`` lines
included, and ``host-keys/`` in Consul).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bastion.directory import ConsulDirectory
from bastion.directory.grammar import hostport
from bastion.doctor.api import ConsulAPI, kv_path
from bastion.doctor.checks import Context, Report
from bastion.errors import BastionError, ConfigError, MalformedRoute, NoRoute
from bastion.model import Destination
from bastion.trust import HostKeyPolicy


@dataclass
class _Routed:
    dest: Destination
    users: list[str] = field(default_factory=list)


async def _user_names(ctx: Context) -> list[str]:
    prefix = ctx.settings.consul.routes_prefix
    api = ConsulAPI(ctx.http, ctx.settings)
    a = await api.call("GET", kv_path(prefix), ctx.consul_token, params={"keys": "true"})
    keys = a.body if a.status == 200 and isinstance(a.body, list) else []
    return sorted(str(k)[len(prefix) :] for k in keys if str(k).startswith(prefix))


async def section(ctx: Context, report: Report) -> None:
    s = ctx.settings
    if ctx.consul_token is None:
        if ctx.consul_reachable:
            report.warn("host keys", "not checked: no usable bastion token for Consul", "")
        return
    directory = ConsulDirectory(s.consul, ctx.consul_token, s.upstream.default_port)
    await directory.start()
    try:
        try:
            await directory.wait_loaded(s.consul.request_timeout)
        except BastionError as exc:
            report.fail(
                "directory: load",
                exc.detail,
                "the bastion token must read the routes, keys, host keys, nodes and health",
            )
            return
        try:
            policy = HostKeyPolicy(
                s.upstream.known_hosts,
                directory.host_keys if s.upstream.host_keys_from_directory else None,
            )
        except ConfigError as exc:
            report.fail("host keys", exc.detail, "correct [upstream] known_hosts")
            return
        ctx.directory_loaded = True
        routed = _routes(ctx, report, directory, await _user_names(ctx))
        missing = [r for r in routed.values() if policy.trusted_for(r.dest).empty]
        for r in missing:
            _missing_key(ctx, report, r)
        if not missing:
            report.ok(
                "host keys",
                f"every routed host ({len(routed)}) has a key the bastion can verify",
            )
    finally:
        await directory.aclose()


def _routes(
    ctx: Context, report: Report, directory: ConsulDirectory, users: list[str]
) -> dict[tuple[str, str, int], _Routed]:
    """Every routed destination, with the users routed there; collects the
    upstream logins (for the Vault role checks)."""
    port0 = ctx.settings.upstream.default_port
    routed: dict[tuple[str, str, int], _Routed] = {}
    malformed: list[str] = []
    unknown: dict[str, list[str]] = {}
    routes = 0
    for user in users:
        try:
            route = directory.cached_route(user)
        except MalformedRoute:
            malformed.append(user)
            continue
        except NoRoute:
            continue
        routes += 1
        for target in route.targets:
            login = target.login or route.login
            ctx.logins.add(login)
            port = target.port or port0
            if target.is_node:
                node = directory.node(target.host)
                if node is None:
                    unknown.setdefault(target.host, []).append(user)
                    continue
                label = f"{node.name} ({hostport(node.address, port)})"
                dest = Destination(node.address, port, login, node.name, label)
            else:
                dest = Destination(target.host, port, login, None, hostport(target.host, port))
            entry = routed.setdefault((dest.node or "", dest.host, port), _Routed(dest))
            entry.users.append(user)
    problems = []
    if malformed:
        problems.append(f"malformed entries: {', '.join(malformed[:10])}")
    if unknown:
        problems += [
            f"{node} is not in the catalog (users: {', '.join(u[:5])})"
            for node, u in sorted(unknown.items())[:10]
        ]
    if problems:
        report.warn(
            "directory: routes",
            "; ".join(problems),
            "`bastion route USER --config FILE` explains each; those logins are refused",
        )
    else:
        report.ok("directory: routes", f"routes: {routes}, routed hosts: {len(routed)}")
    return routed


def _missing_key(ctx: Context, report: Report, r: _Routed) -> None:
    s = ctx.settings
    dest = r.dest
    name = hostport(dest.node or dest.host, dest.port)
    if dest.node and dest.port == s.upstream.default_port:
        name = dest.node
    where = [f"known_hosts {s.upstream.known_hosts}"] if s.upstream.known_hosts else []
    if s.upstream.host_keys_from_directory:
        where.append(f"{s.consul.host_keys_prefix} in Consul")
    users = ", ".join(r.users[:10]) + (" ..." if len(r.users) > 10 else "")
    if s.upstream.host_keys_from_directory:
        fix = (
            f"consul kv put {s.consul.host_keys_prefix}{dest.node or dest.host} "
            f'"$(cat ssh_host_ed25519_key.pub)"   (the host\'s /etc/ssh/ key, checked '
            "on the host itself)"
        )
    else:
        entry = dest.node or dest.host
        entry = entry if dest.port == 22 else f"[{entry}]:{dest.port}"
        fix = f"add '{entry} <the host's public key>' to {s.upstream.known_hosts}"
    report.fail(
        f"host key: {name}",
        f"{dest.label}: no key in {' or '.join(where)}: logins routed there are refused "
        f"(users: {users})",
        fix,
    )
