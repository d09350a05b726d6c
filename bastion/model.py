"""Value objects with no I/O: what the directory says, and the plan for one login.

The policy layer (:mod:`bastion.policy`) builds an :class:`UpstreamPlan` for
each login from who is connecting and the directory; the SSH core acts on it
and never consults the directory again (sshpiper's ``Upstream`` contract).
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncssh


@dataclass(frozen=True)
class Target:
    """One ``[login@]host[:port]`` of a route (docs/routing.md)."""

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
    """What a person may forward; everything off unless their entry says so."""

    agent_forwarding: bool = False
    local_forwarding: bool = False
    remote_forwarding: bool = False
    jump: tuple[Target, ...] = ()


@dataclass(frozen=True)
class AccessRules:
    """A person's own limits from the JSON form of their entry; None means
    the deployment's setting applies (docs/routing.md)."""

    # "from": CIDRs the person may connect from (authorized_keys(5) from=);
    # empty: anywhere
    sources: tuple[str, ...] = ()
    # "max_sessions": concurrent sessions (all their connections, this bastion)
    max_sessions: int | None = None
    # "channel_timeout" / "unused_connection_timeout", seconds (0: off)
    channel_timeout: float | None = None
    unused_connection_timeout: float | None = None
    # "mfa": "totp" asks for a TOTP code after the key
    mfa: str | None = None
    # "disabled": true refuses every login and ends live sessions
    disabled: bool = False


@dataclass(frozen=True)
class Route:
    """A parsed directory entry. ``login`` is the default upstream login."""

    user: str
    login: str
    targets: tuple[Target, ...]
    policy: ForwardingPolicy
    raw: str
    # "record" in the JSON form: True/False, or None to follow [recording] default
    record: bool | None = None
    access: AccessRules = AccessRules()
    # the Consul ModifyIndex of the entry (0: not from Consul); certificates'
    # key ids name it, so a host's log line tells which directory state let
    # the login in
    index: int = 0


@dataclass(frozen=True)
class Node:
    """A catalog node: its name as registered and its address."""

    name: str
    address: str


@dataclass(frozen=True)
class Destination:
    """Where to connect: ``host`` is an IP address or a DNS name, ``node`` the
    Consul node name if any; ``label`` is how messages name it."""

    host: str
    port: int
    login: str
    node: str | None
    label: str


@dataclass(frozen=True)
class TrustedHostKeys:
    """What the bastion accepts from one upstream host: keys, CA keys
    (``@cert-authority``) and revoked keys (``@revoked``), as known_hosts(5)."""

    host_keys: tuple[asyncssh.SSHKey, ...] = ()
    ca_keys: tuple[asyncssh.SSHKey, ...] = ()
    revoked: tuple[asyncssh.SSHKey, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.host_keys or self.ca_keys)


@dataclass(frozen=True)
class UpstreamPlan:
    """The one decision for a login: where it goes, as whom, trusting which
    host keys, with which forwarding policy.

    ``key_id`` names the person and the login in the certificate minted for
    it (the host's auth log shows it). ``agent_forwarding`` is the policy's
    flag; the core still needs the person's agent socket to use it.
    """

    user: str
    route: Route
    destination: Destination
    trust: TrustedHostKeys
    key_id: str

    @property
    def policy(self) -> ForwardingPolicy:
        return self.route.policy


@dataclass(frozen=True)
class TunnelPlan:
    """A ``direct-tcpip`` channel's decision: ``destination`` set for a jump
    (the bastion connects itself); None for local forwarding through the
    routed host (allowed by policy)."""

    target: str
    destination: Destination | None
