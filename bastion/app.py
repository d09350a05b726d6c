"""The composition root: settings → secrets → directory → signer → server.

Shutdown sequence (SIGTERM or SIGINT): stop accepting, let live connections
finish within ``drain_timeout``, close the rest, stop the directory watches,
close the Vault client, report counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import signal
import time

from bastion import fastpath
from bastion.admin import AdminServer
from bastion.audit import AuditLog
from bastion.config import Settings, env_token, read_public_key_lines, read_secret_file
from bastion.core.frontdoor import BastionServer, ServerContext
from bastion.core.upstream import UpstreamConnector, UpstreamPool
from bastion.credentials import CertificateSigner, VaultClient, build_signer
from bastion.directory import ConsulDirectory
from bastion.directory.watch import Watch
from bastion.errors import BastionError, ConfigError
from bastion.events import EventBus, ServerStopped
from bastion.identity import KeyDirectory
from bastion.metrics import Metrics
from bastion.policy import LoginPolicy
from bastion.recording import Recorder
from bastion.trust import HostKeyPolicy

# the principal of the certificate minted at start to check signing works
SELF_CHECK_PRINCIPAL = "bastion-self-check"

log = logging.getLogger("bastion")


async def consul_token(settings: Settings, vault: VaultClient | None) -> str:
    """The bastion's Consul token from exactly the configured source.

    ``CONSUL_HTTP_TOKEN`` from an operator's shell is never consulted.
    """
    c = settings.consul
    if c.token_file is not None:
        return read_secret_file(c.token_file, "[consul] token_file")
    if c.token_env is not None:
        return env_token(c.token_env)
    if c.token_vault_path is not None:
        if vault is None:
            raise ConfigError("[consul] token_vault_path needs [vault]")
        data = await vault.read_kv(c.token_vault_path)
        token = data.get(c.token_vault_field, "").strip()
        if not token:
            raise ConfigError(
                f"[consul] token_vault_path: no field {c.token_vault_field!r} "
                f"at {c.token_vault_path}"
            )
        return token
    raise ConfigError(
        "[consul] needs token_file, token_env or token_vault_path: the bastion "
        "never runs with an anonymous or inherited token"
    )


class Application:
    """Owns every long-lived part and shuts them down in order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.vault: VaultClient | None = None
        self.directory: ConsulDirectory | None = None
        self.server: BastionServer | None = None
        self.pool: UpstreamPool | None = None
        self.admin: AdminServer | None = None
        self.metrics = Metrics()
        self.audit = AuditLog(
            settings.audit.file,
            syslog=settings.audit.syslog,
            on_error=self.metrics.audit_errors.inc,
        )
        self.events = EventBus()
        self.events.subscribe(self.audit.handle)
        self.events.subscribe(self.metrics.handle)
        self.draining = False
        self.recorder: Recorder | None = None

    async def start(self) -> None:
        s = self.settings
        # asyncssh speed-ups, version-guarded (bastion/fastpath); it logs
        # the features in force, the metric names them
        fastpath.apply(s.fastpath)
        self.metrics.fastpath_features(sorted(fastpath.applied()))
        if s.vault.enabled:
            self.vault = VaultClient(s.vault)
            await self.vault.start()
        token = await consul_token(s, self.vault)
        self.directory = ConsulDirectory(s.consul, token, s.upstream.default_port)
        directory = self.directory
        self.metrics.directory_watches(
            [
                (
                    w.name,
                    functools.partial(getattr, w, "index"),
                    functools.partial(_age, w),
                    functools.partial(getattr, w, "errors_total"),
                )
                for w in directory.watches.watches
            ],
            lambda: (directory.stats.routes, directory.stats.malformed_routes),
        )
        if self.vault is not None:
            self.metrics.vault_token(lambda: self.vault.token_ttl_left if self.vault else 0.0)
        await self.directory.start()
        try:
            await self.directory.wait_loaded(s.consul.request_timeout)
        except BastionError as exc:
            # keep going: the watch retries, logins are refused until it loads
            log.error("directory not loaded yet, logins are refused until it is: %s", exc.detail)
        signer = (
            build_signer(s, self.vault)
            if (s.vault.enabled or s.upstream.ca_key is not None)
            else None
        )
        if signer is not None:
            await _check_signing(signer)
        directory = self.directory
        host_keys = HostKeyPolicy(
            s.upstream.known_hosts,
            directory.host_keys if s.upstream.host_keys_from_directory else None,
        )
        self.pool = UpstreamPool(
            UpstreamConnector(s.upstream, signer),
            idle=s.upstream.reuse_idle,
            max_age=s.upstream.reuse_max_age_seconds,
            max_shared=s.upstream.reuse_max_shared,
        )
        pool = self.pool
        self.metrics.upstream_shared.set_function(lambda: pool.shared_open)
        ca_lines = (
            read_public_key_lines(s.server.user_ca_keys, "[server] user_ca_keys")
            if s.server.user_ca_keys is not None
            else ()
        )
        keys = KeyDirectory(directory.authorized_keys, s.server.authorized_keys_dir, ca_lines)
        if s.recording.enabled:  # session recordings (bastion/recording.py)
            self.recorder = Recorder(s.recording, self.metrics.registry)
            self.recorder.start()
        ctx = ServerContext(
            settings=s.server,
            policy=LoginPolicy(directory, host_keys),
            connector=self.pool,
            keys=keys,
            events=self.events,
            tunnel_timeout=s.upstream.connect_timeout,
            recorder=self.recorder,
        )
        self.server = BastionServer(ctx)
        registry = self.server.registry
        self.metrics.unauthenticated.set_function(lambda: registry.unauthenticated)
        self.metrics.live_connections.set_function(
            lambda: sum(1 for c in registry.live if c.authenticated)
        )
        await self.server.start()
        # bastion sessions / kill; after the listener, so that a bastion that
        # cannot start never touches another one's admin socket
        if s.admin.socket_path is not None:
            self.admin = AdminServer(s.admin, self.server, self.events)
            await self.admin.start()
        server = self.server
        self.metrics.health(lambda: (server.listening and directory.ready, self.draining))
        if s.metrics.listen:
            await self.metrics.start_server(s.metrics.listen)

    async def stop(self, drain_timeout: float = 10.0) -> None:
        self.draining = True
        if self.pool is not None:
            self.pool.close()  # idle upstream connections now, the rest after the drain
        if self.server is not None:
            counts = await self.server.stop(drain_timeout)
            self.events.emit(ServerStopped(counts["drained"], counts["closed"]))
        if self.recorder is not None:  # after the drain: every recorded session has ended
            await asyncio.to_thread(self.recorder.close)
        await self.metrics.stop_server()
        if self.admin is not None:
            await self.admin.stop()  # after the drain: sessions can be ended during it
        if self.directory is not None:
            await self.directory.aclose()
        if self.vault is not None:
            await self.vault.aclose()
        self.audit.close()


def _age(watch: Watch) -> float:
    """Seconds since ``watch`` last heard from Consul (inf before the first answer)."""
    if watch.last_success is None:
        return math.inf
    return time.monotonic() - watch.last_success


async def _check_signing(signer: CertificateSigner) -> None:
    """Mint one throwaway certificate at start, so that a signer that would
    refuse every login (a ``cert_ttl`` above the Vault role's ``max_ttl``, a
    policy without ``sign``, a wrong mount) is reported now, not at the first
    login. Not fatal: Vault may be down for a moment and come back."""
    try:
        await signer.issue(SELF_CHECK_PRINCIPAL, "bastion:self-check")
    except BastionError as exc:
        log.error(
            "certificate signing self-check failed, logins will fail until it is fixed: %s "
            "(the probe asks for principal %r; a role that restricts allowed_users refuses "
            "it even when logins would work)",
            exc.detail,
            SELF_CHECK_PRINCIPAL,
        )
    else:
        log.info("certificate signing self-check passed")


async def serve(settings: Settings, drain_timeout: float = 10.0) -> None:
    """Run until SIGTERM or SIGINT."""
    app = Application(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
        await stop.wait()
        log.info("shutting down")
    finally:
        with contextlib.suppress(Exception):
            await app.stop(drain_timeout)
