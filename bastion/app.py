"""The composition root: settings → secrets → directory → signer → server.

Shutdown sequence (SIGTERM or SIGINT): stop accepting, let live connections
finish within ``drain_timeout``, close the rest, stop the directory watches,
close the Vault client, report counts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import socket
import time
from collections.abc import Callable

from bastion import fastpath
from bastion.access_settings import AccessSettings
from bastion.admin import AdminServer
from bastion.audit import AuditLog
from bastion.config import Settings, load_settings
from bastion.core.frontdoor import ServerContext
from bastion.core.listener import BastionServer
from bastion.core.upstream import UpstreamConnector, UpstreamPool
from bastion.credentials import CertificateSigner, VaultClient, build_signer
from bastion.credentials.totp import TotpVerifier, WrongCodes
from bastion.directory import ConsulDirectory
from bastion.directory.watch import Watch
from bastion.errors import BastionError, ConfigError
from bastion.events import DrainStarted, EventBus, Reloaded, ServerStopped
from bastion.identity import KeyDirectory
from bastion.metrics import Metrics
from bastion.policy import LoginPolicy
from bastion.recording import Recorder
from bastion.revocation import Revoker
from bastion.secretfiles import env_token, read_public_key_lines, read_secret_file
from bastion.service import OwnService
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
        # the listening socket a supervisor handed over, and how this worker's
        # settings differ from the file's (bastion/workers.py)
        self.listen_sock: socket.socket | None = None
        self.as_worker: Callable[[Settings], Settings] = lambda settings: settings
        self.audit = AuditLog(
            settings.audit.file,
            syslog=settings.audit.syslog_socket if settings.audit.syslog else None,
            on_error=self.metrics.audit_errors.inc,
        )
        self.events = EventBus()
        self.events.subscribe(self.audit.handle)
        self.events.subscribe(self.metrics.handle)
        self.draining = False
        self.own_service: OwnService | None = None
        self.ctx: ServerContext | None = None
        self.signer: CertificateSigner | None = None
        self._stop_reported = False
        # asks the serving loop to drain (the admin socket's `drain`)
        self.on_drain: Callable[[], None] = lambda: None
        self.recorder: Recorder | None = None
        self.revoker: Revoker | None = None

    async def start(self) -> None:
        s = self.settings
        if s.server.log_level is not None:
            logging.getLogger("bastion").setLevel(s.server.log_level.upper())
        # asyncssh speed-ups, version-guarded (bastion/fastpath); it logs
        # the features in force, the metric names them
        fastpath.apply(s.fastpath)
        self.metrics.fastpath_features(sorted(fastpath.applied()))
        if s.vault.enabled:
            self.vault = VaultClient(s.vault)
            await self.vault.start()
        token = await consul_token(s, self.vault)
        self.own_service = OwnService(
            s.consul.address, token, s.consul.service_name, s.consul_service_id
        )
        self.directory = ConsulDirectory(
            s.consul,
            token,
            s.upstream.default_port,
            grants_prefix=s.access.grants_prefix,
            grant_max=s.access.grant_max,
        )
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
            policy=LoginPolicy(directory, host_keys, directory.grants_for, mfa=s.access.mfa),
            connector=self.pool,
            keys=keys,
            events=self.events,
            tunnel_timeout=s.upstream.connect_timeout,
            recorder=self.recorder,
            # the second factor's check (docs/mfa.md); without Vault a required one refuses
            second_factor=(
                TotpVerifier(
                    self.vault,
                    s.access.totp_mount,
                    WrongCodes(s.access.totp_max_wrong, s.access.totp_wrong_window),
                )
                if self.vault is not None
                else None
            ),
        )
        self.ctx = ctx
        self.signer = signer
        self.server = BastionServer(ctx, startups=s.startups, penalties=s.penalties)
        registry = self.server.registry
        self.metrics.penalised_sources.set_function(
            lambda: self.server.penalties.active if self.server else 0
        )
        self.metrics.unauthenticated.set_function(lambda: registry.unauthenticated)
        self.metrics.live_connections.set_function(
            lambda: sum(1 for c in registry.live if c.authenticated)
        )
        await self.server.start(self.listen_sock)
        # access that ends when the directory says so (bastion/revocation.py)
        self.revoker = Revoker(
            directory, lambda: registry.live, ctx, self.events, s.access.on_revoke
        )
        self.revoker.start(directory.grant_users())
        await self._leave_maintenance()
        # bastion sessions / kill; after the listener, so that a bastion that
        # cannot start never touches another one's admin socket
        if s.admin.socket_path is not None:
            self.admin = AdminServer(
                # late-bound: serve() sets on_drain after the start
                s.admin,
                self.server,
                self.events,
                on_drain=lambda: self.on_drain(),  # noqa: PLW0108
            )
            await self.admin.start()
        server = self.server
        self.metrics.health(lambda: (server.listening and directory.ready, self.draining))
        if s.metrics.listen:
            await self.metrics.start_server(s.metrics.listen)

    async def _leave_maintenance(self) -> None:
        """A bastion that starts serves: take its service out of maintenance
        mode, where a drain before a restart left it (best effort)."""
        if self.own_service is None:
            return
        try:
            if await self.own_service.maintenance(False):
                log.info("service %s is in service (maintenance mode off)", self.own_service.id)
        except BastionError as exc:
            log.warning("could not check maintenance mode in Consul: %s", exc.detail)

    def _apply_access(self, access: AccessSettings) -> None:
        """``[access]`` on a reload: on_revoke, the second factor's mode, mount
        and wrong-code limit (grants_prefix and grant_max need a restart)."""
        if self.revoker is not None:
            self.revoker.on_revoke = access.on_revoke
        check = self.ctx.second_factor if self.ctx is not None else None
        if isinstance(check, TotpVerifier):
            check.mount = access.totp_mount.strip("/")
            check.wrong_codes.limit = access.totp_max_wrong
            check.wrong_codes.window = access.totp_wrong_window

    async def reload(self) -> None:
        """SIGHUP: read the settings file again and apply what can change live.

        Live: ``[server]`` limits (the door's MaxStartups and per-source
        bounds too), methods, ``env_allow``, ``authorized_keys_dir``,
        ``user_ca_keys``, ``log_level``, ``drain_timeout`` and the timeouts;
        ``[penalties]``; ``[access]`` but ``grants_prefix`` and ``grant_max``; ``[upstream]``
        ``known_hosts``, ``host_keys_from_directory``, ``cert_ttl``,
        ``connect_timeout`` and the ``reuse_*`` settings; the Consul token file
        (``[consul] token_file``) and the Vault AppRole files. Everything else
        (the listener, host keys, the Consul and Vault addresses, audit,
        metrics, recording, admin) is reported as needing a restart, and the
        running value is kept. An invalid file changes nothing: one ERROR
        line, and the bastion goes on with the settings it has.
        """
        old = self.settings
        if old.source is None or self.ctx is None or self.directory is None:
            return
        try:
            new = self.as_worker(load_settings(old.source))
            ca_lines = (
                read_public_key_lines(new.server.user_ca_keys, "[server] user_ca_keys")
                if new.server.user_ca_keys is not None
                else ()
            )
            token = await consul_token(new, self.vault)
            host_keys = HostKeyPolicy(
                new.upstream.known_hosts,
                self.directory.host_keys if new.upstream.host_keys_from_directory else None,
            )
            secret_changed = (
                await self.vault.reload_credentials() if self.vault is not None else False
            )
        except BastionError as exc:
            log.error("reload: %s; still serving with the previous settings", exc.detail)
            self.events.emit(Reloaded((), (), exc.user_message))
            return
        except Exception as exc:  # a reload must never take the bastion down
            log.exception("reload failed; still serving with the previous settings")
            self.events.emit(Reloaded((), (), f"{type(exc).__name__}: {exc}"))
            return
        restart = _needs_restart(old, new)
        changed = _live_changes(old, new)
        if secret_changed:
            changed.append("[vault] AppRole credentials")
        if old.penalties != new.penalties:
            changed.append("[penalties]")
        access = dataclasses.replace(
            new.access, grants_prefix=old.access.grants_prefix, grant_max=old.access.grant_max
        )
        # keep what needs a restart as it runs; take everything else
        server = dataclasses.replace(
            new.server, listen=old.server.listen, host_keys=old.server.host_keys
        )
        upstream = new.upstream
        self.settings = dataclasses.replace(
            old,
            server=server,
            upstream=upstream,
            consul=dataclasses.replace(
                old.consul, token_file=new.consul.token_file, token_env=new.consul.token_env
            ),
            access=access,
        )
        self._apply_access(access)
        if server.log_level is not None:
            logging.getLogger("bastion").setLevel(server.log_level.upper())
        self.directory.watches.set_token(token)
        if self.own_service is not None:
            self.own_service.set_token(token)
        self.ctx.settings = server
        if self.server is not None:  # the door's bounds and [penalties] (core/gate)
            self.server.configure(server, new.startups, new.penalties)
            self.settings = dataclasses.replace(self.settings, penalties=new.penalties)
        self.ctx.tunnel_timeout = upstream.connect_timeout
        self.ctx.keys = KeyDirectory(
            self.directory.authorized_keys, server.authorized_keys_dir, ca_lines
        )
        self.ctx.policy = LoginPolicy(
            self.directory, host_keys, self.directory.grants_for, mfa=self.settings.access.mfa
        )
        if self.revoker is not None and self.server is not None:
            # local key files and the user CA may have changed: check everyone live
            self.revoker.changed({c.user for c in self.server.registry.live if c.authenticated})
        if self.pool is not None:
            self.pool.configure(
                idle=upstream.reuse_idle,
                max_age=upstream.reuse_max_age_seconds,
                max_shared=upstream.reuse_max_shared,
                settings=upstream,
            )
        if self.signer is not None:
            self.signer.ttl = upstream.cert_ttl
            self.signer.source_address = upstream.source_address
        log.info(
            "reload: %s%s",
            ("applied " + ", ".join(changed)) if changed else "nothing to apply",
            ("; needs a restart to take effect: " + ", ".join(restart)) if restart else "",
        )
        self.events.emit(Reloaded(tuple(changed), tuple(restart), None))

    async def drain(self, timeout: float | None = None, *, why: str) -> None:
        """Leave Consul (maintenance mode, until it no longer names this
        bastion), stop accepting, tell live sessions, let them finish within
        ``timeout`` (default ``[server] drain_timeout``), close the rest."""
        if self.server is None or self.draining:
            return
        self.draining = True
        timeout = self.settings.server.drain_timeout if timeout is None else timeout
        left: float | None = None
        if self.own_service is not None:
            service = self.own_service
            try:
                left = await service.leave()
            except BastionError as exc:
                log.error("draining: could not take the service out of Consul: %s", exc.detail)
            else:
                if left is None:
                    log.warning(
                        "draining: service %s is not registered on the local agent",
                        service.id,
                    )
                else:
                    log.info("draining: Consul no longer names %s (%.2f s)", service.id, left)
        self.events.emit(DrainStarted(len(self.server.registry.live), timeout, left, why))
        counts = await self.server.drain(timeout)
        self.events.emit(ServerStopped(counts["drained"], counts["closed"]))
        self._stop_reported = True

    async def stop(self, drain_timeout: float = 10.0) -> None:
        self.draining = True
        if self.pool is not None:
            self.pool.close()  # idle upstream connections now, the rest after the drain
        if self.server is not None:
            counts = await self.server.stop(drain_timeout)
            if not self._stop_reported:  # a drain reported its own counts
                self.events.emit(ServerStopped(counts["drained"], counts["closed"]))
        if self.recorder is not None:  # after the drain: every recorded session has ended
            await asyncio.to_thread(self.recorder.close)
        await self.metrics.stop_server()
        if self.admin is not None:
            await self.admin.stop()  # after the drain: sessions can be ended during it
        if self.revoker is not None:
            self.revoker.stop()
        if self.directory is not None:
            await self.directory.aclose()
        if self.vault is not None:
            await self.vault.aclose()
        self.audit.close()


# settings that only a restart applies (the running value is kept on reload)
_RESTART = {
    "server": ("listen", "host_keys", "workers", "worker_steering"),
    "access": ("grants_prefix", "grant_max"),
    "consul": (
        "address",
        "token_vault_path",
        "token_vault_field",
        "routes_prefix",
        "keys_prefix",
        "host_keys_prefix",
        "wait",
        "stale_after",
        "request_timeout",
        "service_name",
        "service_id",
    ),
    "upstream": ("ca_key", "default_port", "keepalive_interval"),
}
_RESTART_SECTIONS = ("vault", "audit", "metrics", "recording", "admin")


def _needs_restart(old: Settings, new: Settings) -> list[str]:
    """The changed settings that a reload cannot apply."""
    found = []
    for section, keys in _RESTART.items():
        a, b = getattr(old, section), getattr(new, section)
        found += [
            f"[{section}] {k}" for k in keys if hasattr(a, k) and getattr(a, k) != getattr(b, k)
        ]
    found += [
        f"[{name}]"
        for name in _RESTART_SECTIONS
        if getattr(old, name, None) != getattr(new, name, None)
    ]
    return found


def _live_changes(old: Settings, new: Settings) -> list[str]:
    """The changed settings a reload applies."""
    found = []
    for section in ("server", "upstream", "access"):
        a, b = getattr(old, section), getattr(new, section)
        skip = _RESTART.get(section, ())
        found += [
            f"[{section}] {f.name}"
            for f in dataclasses.fields(a)
            if f.name not in skip and getattr(a, f.name) != getattr(b, f.name)
        ]
    for key in ("token_file", "token_env"):
        if getattr(old.consul, key) != getattr(new.consul, key):
            found.append(f"[consul] {key}")
    return found


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
