"""Connecting to the routed host: the bastion's own SSH client leg, and the
pool that reuses a person's authenticated upstream connection.

The connector acts on an :class:`~bastion.model.UpstreamPlan`: it resolves
the destination, accepts only the plan's host keys (always verified, see
:mod:`bastion.trust`), and logs in with a certificate minted for the login
or the person's relayed password.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from dataclasses import dataclass

import asyncssh

from bastion.config import UpstreamSettings
from bastion.credentials import CertificateSigner
from bastion.errors import (
    HostKeyMismatch,
    HostUnreachable,
    UpstreamAuthFailed,
    UpstreamError,
)
from bastion.model import UpstreamPlan

log = logging.getLogger("bastion.upstream")

# The ciphers the bastion offers upstream, fastest first for a Python relay:
# AES-GCM runs in OpenSSL with AES-NI; chacha20 costs about 1.65x the CPU.
UPSTREAM_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)


class _QuietClient(asyncssh.SSHClient):
    """Upstream client callbacks: nothing to do but note how auth ended."""

    def auth_banner_received(self, msg: str, lang: str) -> None:
        log.debug("upstream auth banner: %r", msg[:200])


class UpstreamConnector:
    """Opens the bastion's SSH connection to a routed host."""

    def __init__(self, settings: UpstreamSettings, signer: CertificateSigner | None) -> None:
        self._signer = signer
        self.reconfigure(settings)

    def reconfigure(self, settings: UpstreamSettings) -> None:
        """Use ``settings`` for the next connections (SIGHUP)."""
        self._settings = settings
        # built once: asyncssh.connect() would otherwise re-read ~/.ssh/config,
        # default keys and the agent for every login
        self._base_options = asyncssh.SSHClientConnectionOptions(
            config=None,
            agent_path=None,
            client_keys=None,
            known_hosts=None,
            encryption_algs=list(UPSTREAM_CIPHERS),
            compression_algs=["none"],
            keepalive_interval=settings.keepalive_interval,
            keepalive_count_max=3,
            connect_timeout=settings.connect_timeout,
            login_timeout=settings.connect_timeout * 2,
        )

    async def connect(
        self, plan: UpstreamPlan, *, password: str | None = None, agent_path: str | None = None
    ) -> tuple[asyncssh.SSHClientConnection, LoginDetails]:
        """Log in to the plan's destination as its login, accepting only the
        plan's host keys.

        With ``password`` the person's own password is relayed (passthrough
        mode); otherwise a fresh certificate is minted for this login.
        Returns the connection and how the login went (for the audit).
        Raises an :class:`UpstreamError` or :class:`CredentialError`.
        """
        dest = plan.destination
        sign_seconds: float | None = None
        serial: int | None = None
        trusted = plan.trust
        addr = await resolve(dest.host, dest.port, dest.label)
        known = (list(trusted.host_keys), list(trusted.ca_keys), list(trusted.revoked))
        kwargs: dict[str, object] = {}
        if password is not None:
            kwargs.update(
                password=password,
                client_keys=None,
                preferred_auth=["password", "keyboard-interactive"],
            )
        else:
            if self._signer is None:
                raise UpstreamError(
                    "no upstream credential is configured",
                    detail="neither [vault] nor [upstream] ca_key is set",
                )
            signing = time.monotonic()
            cred = await self._signer.issue(dest.login, plan.key_id)
            sign_seconds = time.monotonic() - signing
            serial = cred.serial
            kwargs.update(
                client_keys=[(cred.private_key, cred.certificate)], preferred_auth=["publickey"]
            )
        if agent_path is not None:
            kwargs.update(agent_forwarding=True, agent_path=agent_path)
        try:
            conn = await asyncssh.connect(
                addr,
                dest.port,
                username=dest.login,
                known_hosts=known,
                client_factory=_QuietClient,
                options=self._base_options,
                **kwargs,
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            raise HostKeyMismatch(
                f"host key of {dest.label} does not match the known key; refusing to connect",
                detail=f"{dest.label}: {exc.reason}",
            ) from None
        except asyncssh.PermissionDenied as exc:
            allowed = self._settings.source_address if password is None else ()
            raise UpstreamAuthFailed(
                f"{dest.label} refused the login for {dest.login}",
                detail=f"{dest.label}: {exc.reason}"
                + (  # sshd logs "not from a permitted source address" only on its side
                    f" (the certificate is valid from {', '.join(allowed)} only: "
                    "[upstream] source_address must hold the bastion's egress address)"
                    if allowed
                    else ""
                ),
            ) from None
        except asyncssh.DisconnectError as exc:
            raise HostUnreachable(f"{dest.label} closed the connection: {exc.reason}") from None
        except TimeoutError:
            raise HostUnreachable(f"{dest.label} did not answer in time") from None
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
            raise HostUnreachable(f"cannot reach {dest.label}: {reason}") from None
        return conn, LoginDetails(addr, sign_seconds, serial)


@dataclass(frozen=True)
class LoginDetails:
    """How the bastion logged in upstream: the address reached, the time spent
    minting the certificate and its serial (None for password logins)."""

    address: str
    sign_seconds: float | None
    serial: int | None


async def resolve(host: str, port: int, label: str) -> str:
    """The IP address to connect to for ``host`` (an IP literal or a DNS name),
    so that the host key is matched against the address actually reached.
    Raises :class:`HostUnreachable` when the name does not resolve."""
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise HostUnreachable(f"cannot resolve {label}: {reason}") from None
    if not infos:
        raise HostUnreachable(f"cannot resolve {label}: no address")
    return str(infos[0][4][0])


# --------------------------------------------------------------------------
# Reuse: one authenticated upstream connection for a person's repeated logins


@dataclass(eq=False)
class _Shared:
    """An upstream connection the pool may hand to the same person again."""

    key: tuple[str, str, int, str]  # person, host, port, login
    conn: asyncssh.SSHClientConnection
    opened: float  # time.monotonic() of its login to the host
    origin: str  # key id of the certificate it logged in with
    details: LoginDetails
    leases: int = 0
    idle_timer: asyncio.TimerHandle | None = None
    retired: bool = False


class UpstreamLease:
    """One person's connection's use of an upstream connection.

    ``release()`` when the person's connection ends: a private connection is
    closed, a shared one goes back to the pool (and closes once idle).
    """

    def __init__(
        self,
        pool: UpstreamPool | None,
        conn: asyncssh.SSHClientConnection,
        *,
        reused: bool,
        origin: str,
        details: LoginDetails,
        shared: _Shared | None = None,
    ) -> None:
        self.conn = conn
        #: how the connection logged in (its certificate's serial, ...)
        self.details = details
        #: True when this login found the connection already open
        self.reused = reused
        #: key id of the certificate the connection logged in with
        self.origin = origin
        self._pool = pool
        self._shared = shared
        self._released = False

    @property
    def shared(self) -> bool:
        """Whether the pool may hand this connection to another login."""
        return self._shared is not None and not self._shared.retired

    def retire(self) -> None:
        """No one else may use this connection (e.g. it now carries a remote forward)."""
        if self._shared is not None:
            self._shared.retired = True

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._pool is None or self._shared is None:
            self.conn.close()
        else:
            self._pool._release(self._shared)


class UpstreamPool:
    """Hands out upstream connections, reusing a person's recent one.

    A person who logs in again to the same host and account within
    ``idle`` seconds of their last connection ending (or while it is still
    open) gets a new channel on the same authenticated upstream connection
    instead of a new SSH handshake and certificate: the way OpenSSH's
    ``ControlPersist`` works, done by the bastion. The bastion still
    authenticates every login itself, and routes it afresh; only the
    bastion→host handshake is skipped. Never shared: password logins (the
    password is checked per login), connections that forward the person's
    agent (the agent belongs to one client connection) or carry a remote
    forward. A host that refuses a channel on a shared connection (sshd's
    ``MaxSessions``, 10 by default, 1 on some hardened hosts) stops it
    being shared, and the login gets a private connection instead. A
    connection is not handed out once ``max_age`` seconds old (at most the
    certificate lifetime), nor to more than ``max_shared`` person
    connections at once.
    """

    def __init__(
        self,
        connector: UpstreamConnector,
        *,
        idle: float,
        max_age: float,
        max_shared: int,
    ) -> None:
        self._connector = connector
        self.idle = idle
        self.max_age = max_age
        self.max_shared = max_shared
        self._shared: dict[tuple[str, str, int, str], list[_Shared]] = {}
        self._closed = False

    def configure(
        self, *, idle: float, max_age: float, max_shared: int, settings: UpstreamSettings
    ) -> None:
        """New reuse limits and connection settings for what comes next (SIGHUP);
        open connections keep theirs until they close."""
        self.idle, self.max_age, self.max_shared = idle, max_age, max_shared
        self._connector.reconfigure(settings)

    async def acquire(
        self,
        plan: UpstreamPlan,
        *,
        password: str | None = None,
        agent_path: str | None = None,
        private: bool = False,
    ) -> UpstreamLease:
        """A connection for ``plan``; raises like :meth:`UpstreamConnector.connect`.
        ``private``: a new connection that is never shared."""
        dest = plan.destination
        shareable = (
            self.idle > 0
            and not private
            and password is None
            and agent_path is None
            and not self._closed
        )
        key = (plan.user, dest.host, dest.port, dest.login)
        if shareable:
            found = self._pick(key)
            if found is not None:
                found.leases += 1
                if found.idle_timer is not None:
                    found.idle_timer.cancel()
                    found.idle_timer = None
                return UpstreamLease(
                    self,
                    found.conn,
                    reused=True,
                    origin=found.origin,
                    details=found.details,
                    shared=found,
                )
        conn, details = await self._connector.connect(
            plan, password=password, agent_path=agent_path
        )
        if not shareable or self._closed:
            return UpstreamLease(None, conn, reused=False, origin=plan.key_id, details=details)
        shared = _Shared(key, conn, time.monotonic(), plan.key_id, details, leases=1)
        self._shared.setdefault(key, []).append(shared)
        task = asyncio.ensure_future(conn.wait_closed())
        task.add_done_callback(lambda _t: self._forget(shared))
        return UpstreamLease(
            self, conn, reused=False, origin=plan.key_id, details=details, shared=shared
        )

    @property
    def shared_open(self) -> int:
        """Upstream connections the pool holds for reuse, in use or idle."""
        return sum(len(entries) for entries in self._shared.values())

    def _usable(self, s: _Shared) -> bool:
        return (
            not s.retired and not s.conn.is_closed() and time.monotonic() - s.opened < self.max_age
        )

    def _pick(self, key: tuple[str, str, int, str]) -> _Shared | None:
        for s in self._shared.get(key, ()):
            if self._usable(s) and s.leases < self.max_shared:
                return s
        return None

    def _release(self, s: _Shared) -> None:
        s.leases -= 1
        if s.leases > 0:
            return
        if self._closed or not self._usable(s):
            self._drop(s)
            return
        loop = asyncio.get_running_loop()
        # idle for `idle` seconds, and never past max_age
        wait = min(self.idle, self.max_age - (time.monotonic() - s.opened))
        s.idle_timer = loop.call_later(max(wait, 0.0), self._expire, s)

    def _expire(self, s: _Shared) -> None:
        s.idle_timer = None
        if s.leases == 0:
            self._drop(s)

    def _drop(self, s: _Shared) -> None:
        self._forget(s)
        s.conn.close()

    def _forget(self, s: _Shared) -> None:
        if s.idle_timer is not None:
            s.idle_timer.cancel()
            s.idle_timer = None
        entries = self._shared.get(s.key)
        if entries and s in entries:
            entries.remove(s)
            if not entries:
                del self._shared[s.key]

    def close(self) -> None:
        """Close idle connections now and the others as their last user leaves."""
        self._closed = True
        for entries in list(self._shared.values()):
            for s in list(entries):
                if s.leases == 0:
                    self._drop(s)
