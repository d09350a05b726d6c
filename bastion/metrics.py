"""Prometheus metrics, served on ``[metrics] listen`` when it is set."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from bastion.config import split_host_port


class Metrics:
    """The bastion's counters, on a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Counter("bastion_connections", "TCP connections accepted", registry=r)
        self.logins = Counter("bastion_logins", "Login outcomes", ["outcome", "reason"], registry=r)
        self.login_seconds = Histogram(
            "bastion_upstream_connect_seconds",
            "Route, sign and connect upstream",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.upstream_reused = Counter(
            "bastion_upstream_reused",
            "Logins served by a person's already open upstream connection",
            registry=r,
        )
        self.channels_active = Gauge(
            "bastion_channels_active", "Open relayed channels", ["kind"], registry=r
        )
        self.bytes = Counter("bastion_relayed_bytes", "Bytes relayed", ["direction"], registry=r)
        self.unauthenticated = Gauge(
            "bastion_unauthenticated_connections", "Connections not yet authenticated", registry=r
        )

    def serve(self, listen: str) -> None:
        host, port = split_host_port(listen, 9102)
        start_http_server(port, addr=host, registry=self.registry)
