"""The policy layer, as pure logic: one plan per login, one decision per tunnel.

The directory here is the real route grammar and route table over entries
held in memory (no Consul: these are unit tests of the decisions; the same
decisions against the real Consul are in test_directory.py and end to end
in test_forwarding.py and test_field_faults.py).
"""

from __future__ import annotations

from pathlib import Path

import asyncssh
import pytest

from bastion.directory.grammar import RouteTable, hostport
from bastion.errors import (
    DirectoryUnavailable,
    ForwardDenied,
    HostKeyMismatch,
    HostUnhealthy,
    MalformedRoute,
    NoRoute,
    RoutingError,
    UnknownHost,
)
from bastion.model import Destination, ForwardingPolicy, Node, Route, Target
from bastion.policy import LoginPolicy
from bastion.trust import HostKeyPolicy


class MemoryDirectory:
    """Routes parsed by the real grammar; nodes and their health in dicts."""

    default_port = 22

    def __init__(self, entries: dict[str, str], nodes: dict[str, tuple[str, bool]]) -> None:
        self.table = RouteTable({k: v.encode() for k, v in entries.items()})
        self.nodes = {name: Node(name, addr) for name, (addr, _) in nodes.items()}
        self.healthy = {name for name, (_, ok) in nodes.items() if ok}
        self.available = True

    def route_for(self, user: str) -> Route:
        if not self.available:
            raise DirectoryUnavailable("the directory is unavailable: test")
        return self.table.route_for(user)

    def node(self, name: str) -> Node | None:
        return self.nodes.get(name.lower())

    def resolve_target(self, route: Route, target: Target) -> Destination | RoutingError:
        port = target.port or self.default_port
        login = target.login or route.login
        if not target.is_node:
            return Destination(target.host, port, login, None, hostport(target.host, port))
        node = self.node(target.host)
        if node is None:
            return UnknownHost(f"{target.host} is not a known host in the directory")
        if node.name not in self.healthy:
            return HostUnhealthy(f"{target.host} is down (health checks failing)")
        return Destination(
            node.address, port, login, node.name, f"{node.name} ({hostport(node.address, port)})"
        )


KEY = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


@pytest.fixture
def known_hosts(tmp_path: Path) -> Path:
    path = tmp_path / "known_hosts"
    path.write_text(f"host-101,host-102,10.0.0.9,db.example.test {KEY}\n")
    return path


def policy_for(directory: MemoryDirectory, known_hosts: Path | None) -> LoginPolicy:
    return LoginPolicy(directory, HostKeyPolicy(known_hosts, None))


NODES = {"host-101": ("10.0.1.101", True), "host-102": ("10.0.1.102", False)}


def test_plan_takes_the_first_usable_target(known_hosts: Path) -> None:
    directory = MemoryDirectory({"alice": "host-102, admin@host-101:2200"}, NODES)
    plan = policy_for(directory, known_hosts).decide("alice", "bastion:alice:c1")
    assert plan.destination == Destination(
        "10.0.1.101", 2200, "admin", "host-101", "host-101 (10.0.1.101:2200)"
    )
    assert plan.user == "alice" and plan.key_id == "bastion:alice:c1"
    assert plan.policy == ForwardingPolicy()
    assert len(plan.trust.host_keys) == 1 and not plan.trust.empty


@pytest.mark.parametrize(
    ("entries", "error", "message"),
    [
        ({}, NoRoute, "no route for alice"),
        ({"alice": "host-,"}, MalformedRoute, "directory entry for alice is malformed"),
        ({"alice": "host-999"}, UnknownHost, "host-999 is not a known host"),
        # a known host that is down says more than an unknown one
        ({"alice": "host-999, host-102"}, HostUnhealthy, "host-102 is down"),
        ({"alice": "10.0.0.77"}, HostKeyMismatch, "no known host key for 10.0.0.77:22"),
    ],
)
def test_refusals(
    known_hosts: Path, entries: dict[str, str], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        policy_for(MemoryDirectory(entries, NODES), known_hosts).decide("alice", "k")


def test_directory_unavailable_fails_closed(known_hosts: Path) -> None:
    directory = MemoryDirectory({"alice": '{"route": "host-101", "agent_forwarding": true}'}, NODES)
    policy = policy_for(directory, known_hosts)
    assert policy.forwarding("alice").agent_forwarding
    directory.available = False
    with pytest.raises(DirectoryUnavailable):
        policy.decide("alice", "k")
    assert policy.forwarding("alice") == ForwardingPolicy()  # everything off
    with pytest.raises(DirectoryUnavailable):
        policy.tunnel("alice", "host-101", 22)


def test_dns_names_are_trusted_by_name_only(known_hosts: Path) -> None:
    directory = MemoryDirectory({"alice": "db.example.test", "bob": "other.example.test"}, NODES)
    policy = policy_for(directory, known_hosts)
    assert policy.decide("alice", "k").destination.host == "db.example.test"
    with pytest.raises(HostKeyMismatch):
        policy.decide("bob", "k")


def test_tunnel_decisions() -> None:
    entry = '{"route": "host-101", "jump": ["10.0.0.9:2222", "host-102"]}'
    directory = MemoryDirectory(
        {"alice": entry, "bob": '{"route": "host-101", "local_forwarding": true}'}, NODES
    )
    policy = policy_for(directory, None)
    # jumps: the route's target by name or address, and the jump list
    assert policy.tunnel("alice", "host-101", 22).destination is not None
    assert policy.tunnel("alice", "10.0.1.101", 22).destination is not None
    jump = policy.tunnel("alice", "10.0.0.9", 2222).destination
    assert jump is not None and jump.label == "10.0.0.9:2222"
    with pytest.raises(HostUnhealthy):
        policy.tunnel("alice", "host-102", 22)  # listed, but down
    # anything else: refused without local forwarding ...
    with pytest.raises(ForwardDenied, match="alice may not connect to db:5432") as denied:
        policy.tunnel("alice", "db", 5432)
    assert denied.value.open_code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
    with pytest.raises(ForwardDenied):
        policy.tunnel("alice", "host-101", 2222)  # the right host, another port
    # ... and through the routed host with it
    through = policy.tunnel("bob", "db", 5432)
    assert through.destination is None and through.target == "db:5432"
