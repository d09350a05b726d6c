"""Prometheus metrics, served on ``[metrics] listen`` when it is set."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from bastion.config import split_host_port
from bastion.events import (
    ChannelEnded,
    ChannelOpened,
    ConnectionAccepted,
    ConnectionClosed,
    Event,
    LoginAccepted,
    LoginRefused,
)


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
        self.upstream_shared = Gauge(
            "bastion_upstream_shared_connections",
            "Upstream connections held for reuse (in use or idle, see [upstream] reuse_idle)",
            registry=r,
        )
        self.directory_index = Gauge(
            "bastion_directory_index",
            "Consul index of each directory watch's last answer (X-Consul-Index)",
            ["watch"],
            registry=r,
        )
        self.fastpath = Gauge(
            "bastion_fastpath_active",
            "asyncssh speed-ups in force (1 per feature; none on an unverified asyncssh)",
            ["feature"],
            registry=r,
        )

    def directory_indexes(self, watches: Sequence[tuple[str, Callable[[], float]]]) -> None:
        """Report each directory watch's index (read at scrape time)."""
        for name, index in watches:
            self.directory_index.labels(name).set_function(index)

    def fastpath_features(self, features: list[str]) -> None:
        """Name the asyncssh speed-ups in force (bastion/fastpath)."""
        for name in features:
            self.fastpath.labels(name).set(1)

    def handle(self, event: Event) -> None:
        """The events subscriber."""
        if isinstance(event, ConnectionAccepted):
            self.connections.inc()
        elif isinstance(event, LoginAccepted):
            self.login_seconds.observe(event.seconds)
            self.logins.labels("accepted", "").inc()
            if event.reused:
                self.upstream_reused.inc()
        elif isinstance(event, LoginRefused):
            self.logins.labels("refused", event.reason).inc()
        elif isinstance(event, ChannelOpened):
            self.channels_active.labels(event.kind).inc()
        elif isinstance(event, ChannelEnded):
            self.channels_active.labels(event.kind).dec()
            self.bytes.labels("up").inc(event.bytes_up)
            self.bytes.labels("down").inc(event.bytes_down)
        elif isinstance(event, ConnectionClosed) and not event.authenticated:
            self.logins.labels("auth-failed", event.reason or "auth").inc()

    def serve(self, listen: str) -> None:
        host, port = split_host_port(listen, 9102)
        start_http_server(port, addr=host, registry=self.registry)
