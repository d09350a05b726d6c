"""The directory: who goes where, read from Consul.

``grammar`` parses entries (pure), ``watch`` keeps them current with Consul
blocking queries, ``store`` holds routes, keys, nodes and health in memory,
``explain`` answers ``bastion route``.
"""

from bastion.directory.grammar import RouteTable, parse_route
from bastion.directory.store import ConsulDirectory, DirectoryStats

__all__ = ["ConsulDirectory", "DirectoryStats", "RouteTable", "parse_route"]
