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

from typing import Protocol

from bastion.directory.grammar import hostport, plain
from bastion.directory.store import norm_host
from bastion.errors import (
    BastionError,
    ForwardDenied,
    HostKeyUnknown,
    HostUnhealthy,
    RoutingError,
)
from bastion.model import (
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

    def __init__(self, directory: Directory, host_keys: HostKeyPolicy) -> None:
        self._directory = directory
        self._host_keys = host_keys

    def decide(self, user: str, key_id: str) -> UpstreamPlan:
        """The plan for ``user``'s login, whose certificate will carry ``key_id``.

        Raises a RoutingError (NoRoute, MalformedRoute, UnknownHost,
        HostUnhealthy, DirectoryUnavailable) or HostKeyUnknown when no host
        key is known for the destination (no trust on first use).
        """
        route = self._directory.route_for(user)
        dest = first_usable(self._directory, route)
        trust = self._host_keys.trusted_for(dest)
        if trust.empty:
            raise HostKeyUnknown(
                f"no known host key for {dest.label}; refusing to connect",
                detail=f"add the host key of {dest.label} to known_hosts or the directory",
            )
        return UpstreamPlan(user=user, route=route, destination=dest, trust=trust, key_id=key_id)

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
        route = self._directory.route_for(user)
        wanted = norm_host(host)
        other_ports: list[int] = []  # the host is a jump host, on these ports
        for target in (*route.targets, *route.policy.jump):
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
