"""The policy layer: one decision per login, and one per tunnel.

:meth:`LoginPolicy.decide` answers the one question the SSH core asks
("where does this login go, with which credential?", sshpiper's contract)
with an :class:`~bastion.model.UpstreamPlan`: the first usable target of the
person's route, the upstream login, the host keys to trust and the
forwarding policy. The core acts on the plan and never reads the directory.

:meth:`LoginPolicy.tunnel` decides a ``direct-tcpip`` channel: a jump
(``ssh -J``/``-W``) to a host the directory routes the person to, local
forwarding through the routed host where the policy allows it, or a refusal.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Protocol

from bastion.directory.grammar import hostport, plain
from bastion.directory.grants import Grant
from bastion.directory.store import norm_host
from bastion.errors import (
    AccountDisabled,
    BastionError,
    ForwardDenied,
    HostKeyUnknown,
    HostUnhealthy,
    MalformedRoute,
    NoRoute,
    RoutingError,
    SourceNotAllowed,
)
from bastion.model import (
    AccessRules,
    Destination,
    ForwardingPolicy,
    Node,
    Route,
    Target,
    TunnelPlan,
    UpstreamPlan,
)
from bastion.trust import HostKeyPolicy


class Directory(Protocol):
    """What the policy reads (``bastion.directory.ConsulDirectory`` answers)."""

    default_port: int

    def route_for(self, user: str) -> Route: ...
    def resolve_target(self, route: Route, target: Target) -> Destination | RoutingError: ...
    def node(self, name: str) -> Node | None: ...


def first_usable(directory: Directory, route: Route) -> Destination:
    """The first usable target of ``route``; UnknownHost or HostUnhealthy if none."""
    problems: list[RoutingError] = []
    for target in route.targets:
        result = directory.resolve_target(route, target)
        if isinstance(result, Destination):
            return result
        problems.append(result)
    # a known host that is down says more than a name the catalog lacks
    best = next((p for p in problems if isinstance(p, HostUnhealthy)), problems[0])
    raise type(best)(
        best.user_message,
        detail=f"{route.user}: " + "; ".join(p.user_message for p in problems),
    )


class LoginPolicy:
    """Decides logins and tunnels from the directory and the host-key trust."""

    def __init__(
        self,
        directory: Directory,
        host_keys: HostKeyPolicy,
        grants: Callable[[str], tuple[Grant, ...]] | None = None,
        *,
        mfa: str = "per-person",
    ) -> None:
        self._directory = directory
        self._host_keys = host_keys
        # [access] mfa: "off", "per-person" (the entry's "mfa") or "required"
        self._mfa = mfa
        # the person's access grants in force (docs/access.md)
        self._grants = grants or (lambda user: ())

    def _route(self, user: str) -> Route:
        """``user``'s entry; without one, the route of their longest grant in force."""
        try:
            return self._directory.route_for(user)
        except NoRoute:
            grants = self._grants(user)
            if not grants:
                raise
            return grants[0].route

    def decide(self, user: str, key_id: str) -> UpstreamPlan:
        """The plan for ``user``'s login, whose certificate will carry ``key_id``
        (followed by ``:kv=<index>``, the Consul ModifyIndex of the entry the
        route came from, when it came from Consul).

        Raises a RoutingError (NoRoute, MalformedRoute, UnknownHost,
        HostUnhealthy, DirectoryUnavailable) or HostKeyUnknown when no host
        key is known for the destination (no trust on first use).
        """
        route = self._route(user)
        dest = first_usable(self._directory, route)
        trust = self._host_keys.trusted_for(dest)
        if trust.empty:
            raise HostKeyUnknown(
                f"no known host key for {dest.label}; refusing to connect",
                detail=f"add the host key of {dest.label} to known_hosts or the directory",
            )
        if route.index:  # the directory state that let the login in (docs/mfa.md)
            key_id = f"{key_id}:kv={route.index}"
        return UpstreamPlan(user=user, route=route, destination=dest, trust=trust, key_id=key_id)

    def admit(self, user: str, source_ip: str) -> AccessRules:
        """May ``user``, authenticated, log in from ``source_ip`` (the client's
        address, after PROXY protocol)? Returns the person's AccessRules (their
        limits and timeouts); raises AccountDisabled (``"disabled": true``) or
        SourceNotAllowed (outside ``"from"``, as authorized_keys(5) ``from=``).

        Without a usable entry the defaults apply: the routing decision that
        follows refuses the login with its own reason (NoRoute, ...).
        """
        try:
            rules = self._route(user).access
        except BastionError:
            return AccessRules()
        if rules.disabled:
            raise AccountDisabled(
                f"{user} is disabled in the directory",
                detail=f'{user}: the entry says "disabled": true',
            )
        if rules.sources:
            try:
                ip = ipaddress.ip_address(source_ip)
            except ValueError:
                ip = None
            if ip is not None and ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped  # ::ffff:192.0.2.7 is 192.0.2.7 (a dual-stack listener)
            if ip is None or not any(ip in ipaddress.ip_network(cidr) for cidr in rules.sources):
                raise SourceNotAllowed(
                    f"{user} may not log in from {plain(source_ip, 60)}",
                    detail=f'{user} from {plain(source_ip, 60)}: not in "from" '
                    f"({', '.join(rules.sources)})",
                )
        return rules

    def second_factor(self, user: str) -> str | None:
        """The second factor ``user`` must give after their key or password
        (``"totp"``), or None; asked when the first factor has succeeded.

        ``[access] mfa = "required"``: everyone; ``"per-person"``: those
        whose entry says ``"mfa": "totp"`` (docs/mfa.md); ``"off"``: nobody.
        Fails closed: when the directory cannot be read now, it is required.
        No entry, or a malformed one, requires nothing here: the login is
        refused for want of a usable route, with that message (and the front
        door asks again when the plan is made: SecondFactorRequired).
        """
        if self._mfa == "off":
            return None
        if self._mfa == "required":
            return "totp"
        try:
            return self._route(user).access.mfa
        except (NoRoute, MalformedRoute):
            return None
        except BastionError:
            return "totp"

    def forwarding(self, user: str) -> ForwardingPolicy:
        """``user``'s forwarding policy; everything off when there is no usable
        entry (fails closed)."""
        try:
            return self._directory.route_for(user).policy
        except BastionError:
            return ForwardingPolicy()

    def tunnel(self, user: str, host: str, port: int) -> TunnelPlan:
        """May ``user`` open a TCP stream to ``host:port``?

        A jump goes only to a target of the route or of its ``jump`` policy,
        named as the node name or as the node's catalog address, on the
        target's port; it must be known and healthy, like a routed login.
        Anything else is local forwarding through the routed host where the
        policy allows it. Raises ForwardDenied (administratively prohibited)
        or the target's RoutingError (also NoRoute, DirectoryUnavailable).
        """
        route = self._route(user)
        granted = [t for g in self._grants(user) for t in g.targets]
        wanted = norm_host(host)
        other_ports: list[int] = []  # the host is a jump host, on these ports
        for target in (*route.targets, *route.policy.jump, *granted):
            names = {norm_host(target.host)}
            if target.is_node:
                node = self._directory.node(target.host)
                if node is not None:
                    names.add(norm_host(node.address))
            if wanted not in names:
                continue
            if (target.port or self._directory.default_port) != port:
                other_ports.append(target.port or self._directory.default_port)
                continue
            result = self._directory.resolve_target(route, target)
            if isinstance(result, Destination):
                return TunnelPlan(result.label, result)
            raise result
        shown = hostport(plain(host, 100), port)
        if route.policy.local_forwarding:
            return TunnelPlan(hostport(host, port), None)
        if other_ports:
            ports = ", ".join(str(p) for p in sorted(set(other_ports)))
            raise ForwardDenied(
                f"{route.user} may not connect to {shown}: {plain(host, 100)} is a jump "
                f"host on port {ports} only"
            )
        raise ForwardDenied(
            f"{route.user} may not connect to {shown}: not a jump host in the directory, "
            "and local forwarding (-L, -D) is off"
        )
