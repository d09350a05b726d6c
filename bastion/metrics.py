"""Prometheus metrics and the health check, served on ``[metrics] listen``.

The metrics subscribe to the lifecycle events (:mod:`bastion.events`); the
gauges that describe state (directory, Vault token, upstream pool, fast
path) read it when scraped. ``GET /metrics`` is the Prometheus text format;
``GET /health`` answers 200 with ``{"ready": true, "draining": false}`` when
the bastion serves logins and 503 otherwise (directory not loaded, listener
not up, or draining), for a load balancer or Consul HTTP check.

The series (deploy/grafana/bastion.json is built on exactly these, and
tests/test_metrics.py checks it):

``bastion_connections_total``, ``bastion_probes_total``,
``bastion_connections_refused_total{reason}``, ``bastion_penalties_total{reason}``,
``bastion_penalised_sources``,
``bastion_logins_total{outcome,reason}``,
``bastion_auth_failures_total{method}``, ``bastion_auth_seconds``,
``bastion_second_factor_total{method,outcome}``,
``bastion_route_seconds``, ``bastion_sign_seconds``,
``bastion_upstream_connect_seconds``, ``bastion_upstream_reused_total``,
``bastion_upstream_shared_connections``, ``bastion_channels_active{kind}``,
``bastion_channels_refused_total{kind,reason}``,
``bastion_relayed_bytes_total{direction}``,
``bastion_unauthenticated_connections``, ``bastion_live_connections``,
``bastion_directory_index{watch}``, ``bastion_directory_age_seconds{watch}``,
``bastion_directory_errors{watch}``, ``bastion_directory_entries{state}``,
``bastion_vault_token_ttl_seconds``, ``bastion_signing_errors_total{reason}``,
``bastion_audit_write_errors_total``, ``bastion_fastpath_active{feature}``,
``bastion_ready``, ``bastion_draining``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from bastion.events import (
    AuthFailed,
    ChannelEnded,
    ChannelOpened,
    ChannelRefused,
    ConnectionAccepted,
    ConnectionClosed,
    DoorRefused,
    Event,
    LoginAccepted,
    LoginRefused,
    PenaltyStarted,
    Revoked,
    SecondFactorChecked,
)
from bastion.httpd import Answer, SmallHTTP

# the HTTP endpoint's bounds: clients at once, seconds per connection, and
# the longest request line or header and how many headers are read

# seconds: a login's steps take milliseconds; a slow Vault or host seconds
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# the reasons that mean certificate signing failed (bastion/errors.py)
_SIGNING_REASONS = frozenset({"signing-failed", "secret-unavailable", "credential-error"})


class Metrics:
    """The bastion's series, on a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Counter("bastion_connections", "TCP connections accepted", registry=r)
        self.logins = Counter(
            "bastion_logins",
            "Login outcomes and refusal reasons",
            ["outcome", "reason"],
            registry=r,
        )
        self.probes = Counter(
            "bastion_probes",
            "Connections closed before the SSH handshake named a user (health checks, scans)",
            registry=r,
        )
        self.auth_failures = Counter(
            "bastion_auth_failures", "Failed authentication attempts", ["method"], registry=r
        )
        # the door (bastion/core/gate.py): drops before the SSH version line,
        # and unauthenticated connections evicted by its fair share
        self.refused = Counter(
            "bastion_connections_refused",
            "Connections dropped at accept or evicted, by reason (penalised, evicted, proxy-...)",
            ["reason"],
            registry=r,
        )
        self.penalties = Counter(
            "bastion_penalties",
            "Penalties that became active (PerSourcePenalties), by what tipped them",
            ["reason"],
            registry=r,
        )
        self.penalised_sources = Gauge(
            "bastion_penalised_sources",
            "Source blocks whose new connections are refused now",
            registry=r,
        )
        self.second_factor = Counter(
            "bastion_second_factor",
            "Second-factor checks (docs/mfa.md) by outcome: ok or the refusal's reason",
            ["method", "outcome"],
            registry=r,
        )
        self.revoked = Counter(
            "bastion_revoked_connections",
            "Live connections whose access the directory withdrew (docs/access.md), "
            "by cause and action (closed or kept)",
            ["cause", "action"],
            registry=r,
        )
        self.auth_seconds = Histogram(
            "bastion_auth_seconds",
            "From TCP accept to authentication done",
            buckets=(*_STEP_BUCKETS, 30),
            registry=r,
        )
        self.route_seconds = Histogram(
            "bastion_route_seconds", "Deciding a login's plan", buckets=_STEP_BUCKETS, registry=r
        )
        self.sign_seconds = Histogram(
            "bastion_sign_seconds",
            "Minting a login's certificate (Vault or local CA)",
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.login_seconds = Histogram(
            "bastion_upstream_connect_seconds",
            "Route, sign and connect upstream (a reused connection: route only)",
            buckets=_STEP_BUCKETS,
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
        self.channels_refused = Counter(
            "bastion_channels_refused",
            "Channels and requests refused",
            ["kind", "reason"],
            registry=r,
        )
        self.bytes = Counter("bastion_relayed_bytes", "Bytes relayed", ["direction"], registry=r)
        self.unauthenticated = Gauge(
            "bastion_unauthenticated_connections", "Connections not yet authenticated", registry=r
        )
        self.live_connections = Gauge(
            "bastion_live_connections", "Authenticated connections open now", registry=r
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
        self.directory_age = Gauge(
            "bastion_directory_age_seconds",
            "Seconds since each directory watch last heard from Consul",
            ["watch"],
            registry=r,
        )
        self.directory_errors = Gauge(
            "bastion_directory_errors",
            "Failed Consul requests per directory watch since start",
            ["watch"],
            registry=r,
        )
        self.directory_entries = Gauge(
            "bastion_directory_entries",
            "Directory entries (users/<name>) loaded and malformed",
            ["state"],
            registry=r,
        )
        self.vault_ttl = Gauge(
            "bastion_vault_token_ttl_seconds",
            "Seconds the bastion's Vault token has left (-1: no Vault, or never expires)",
            registry=r,
        )
        self.signing_errors = Counter(
            "bastion_signing_errors",
            "Logins refused because signing failed",
            ["reason"],
            registry=r,
        )
        self.audit_errors = Counter(
            "bastion_audit_write_errors", "Audit records that could not be written", registry=r
        )
        self.fastpath = Gauge(
            "bastion_fastpath_active",
            "asyncssh speed-ups in force (1 per feature; none on an unverified asyncssh)",
            ["feature"],
            registry=r,
        )
        self.ready = Gauge("bastion_ready", "1 while the bastion serves logins", registry=r)
        self.draining = Gauge("bastion_draining", "1 while the bastion drains", registry=r)
        self.vault_ttl.set(-1)
        self._http: SmallHTTP | None = None
        self._health: Callable[[], tuple[bool, bool]] = lambda: (False, False)

    # -- state read at scrape time ---------------------------------------

    def directory_watches(
        self,
        watches: Sequence[
            tuple[str, Callable[[], float], Callable[[], float], Callable[[], float]]
        ],
        entries: Callable[[], tuple[int, int]],
    ) -> None:
        """Per watch: name, index, age in seconds, errors; and (loaded, malformed)."""
        for name, index, age, errors in watches:
            self.directory_index.labels(name).set_function(index)
            self.directory_age.labels(name).set_function(age)
            self.directory_errors.labels(name).set_function(errors)
        self.directory_entries.labels("loaded").set_function(lambda: entries()[0])
        self.directory_entries.labels("malformed").set_function(lambda: entries()[1])

    def vault_token(self, ttl_left: Callable[[], float]) -> None:
        self.vault_ttl.set_function(lambda: -1 if math.isinf(ttl_left()) else ttl_left())

    def fastpath_features(self, features: list[str]) -> None:
        """Name the asyncssh speed-ups in force (bastion/fastpath)."""
        for name in features:
            self.fastpath.labels(name).set(1)

    def health(self, probe: Callable[[], tuple[bool, bool]]) -> None:
        """``probe()`` answers (ready, draining) for /health and the gauges."""
        self._health = probe
        self.ready.set_function(lambda: float(probe()[0]))
        self.draining.set_function(lambda: float(probe()[1]))

    # -- events ------------------------------------------------------------

    def handle(self, event: Event) -> None:
        """The events subscriber."""
        if isinstance(event, ConnectionAccepted):
            self.connections.inc()
        elif isinstance(event, DoorRefused):
            self.refused.labels(event.reason).inc()
        elif isinstance(event, PenaltyStarted):
            self.penalties.labels(event.reason).inc()
        elif isinstance(event, AuthFailed):
            self.auth_failures.labels(event.method).inc()
        elif isinstance(event, SecondFactorChecked):
            self.second_factor.labels(event.method, event.outcome).inc()
        elif isinstance(event, Revoked):
            self.revoked.labels(event.cause, event.action).inc(len(event.conns))
        elif isinstance(event, LoginAccepted):
            self.login_seconds.observe(event.seconds)
            self.logins.labels("accepted", "").inc()
            if event.auth_seconds is not None:
                self.auth_seconds.observe(event.auth_seconds)
            self.route_seconds.observe(event.route_seconds)
            if event.sign_seconds is not None:
                self.sign_seconds.observe(event.sign_seconds)
            if event.reused:
                self.upstream_reused.inc()
        elif isinstance(event, LoginRefused):
            self.logins.labels("refused", event.reason).inc()
            if event.reason in _SIGNING_REASONS:
                self.signing_errors.labels(event.reason).inc()
        elif isinstance(event, ChannelOpened):
            self.channels_active.labels(event.kind).inc()
        elif isinstance(event, ChannelRefused):
            self.channels_refused.labels(event.kind, event.reason).inc()
        elif isinstance(event, ChannelEnded):
            self.channels_active.labels(event.kind).dec()
            self.bytes.labels("up").inc(event.bytes_up)
            self.bytes.labels("down").inc(event.bytes_down)
        elif isinstance(event, ConnectionClosed) and not event.greeted:
            self.probes.inc()
        elif isinstance(event, ConnectionClosed) and not event.authenticated:
            self.logins.labels("auth-failed", event.reason or "auth").inc()

    # -- the HTTP endpoint -------------------------------------------------

    async def start_server(self, listen: str) -> None:
        """Serve /metrics and /health on ``listen`` (host:port, or a Unix
        socket path for a worker's supervisor) from the event loop, through
        :class:`bastion.httpd.SmallHTTP` (deadlines, bounded clients)."""
        self._http = SmallHTTP({"/metrics": self._metrics_page, "/health": self._health_page})
        await self._http.start(listen)

    async def stop_server(self) -> None:
        if self._http is not None:
            await self._http.stop()
            self._http = None

    async def _metrics_page(self) -> Answer:
        return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)

    async def _health_page(self) -> Answer:
        ready, draining = self._health()
        status = "200 OK" if ready and not draining else "503 Service Unavailable"
        return (
            status,
            "application/json",
            json.dumps({"ready": ready, "draining": draining}).encode(),
        )
