"""Connecting to the routed host: the bastion's own SSH client leg.

The upstream host key is always verified, against a known_hosts file (plain
keys and ``@cert-authority`` lines) and/or host keys published in the
directory. A host with no known key is refused before any connection is
made: there is no trust on first use.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from bastion.config import UpstreamSettings
from bastion.credentials import CertificateSigner
from bastion.errors import (
    ConfigError,
    HostKeyMismatch,
    HostUnreachable,
    UpstreamAuthFailed,
    UpstreamError,
)
from bastion.routing import Destination

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


@dataclass(frozen=True)
class TrustedHostKeys:
    """What the bastion will accept from one upstream host."""

    host_keys: tuple[asyncssh.SSHKey, ...]
    ca_keys: tuple[asyncssh.SSHKey, ...]
    revoked: tuple[asyncssh.SSHKey, ...]

    @property
    def empty(self) -> bool:
        return not (self.host_keys or self.ca_keys)


class HostKeyPolicy:
    """Upstream host keys from a known_hosts file and/or the directory.

    The file is re-read when its modification time changes, so an operator's
    edit takes effect without a restart.
    """

    def __init__(
        self, known_hosts: Path | None, directory_keys: Callable[[list[str]], list[str]] | None
    ) -> None:
        self._path = known_hosts
        self._directory_keys = directory_keys
        self._mtime: float | None = None
        self._known: asyncssh.SSHKnownHosts | None = None
        if known_hosts is not None:
            self._reload()

    def _reload(self) -> None:
        assert self._path is not None
        try:
            mtime = self._path.stat().st_mtime
            if mtime != self._mtime:
                self._known = asyncssh.import_known_hosts(self._path.read_text())
                self._mtime = mtime
        except (OSError, ValueError) as exc:
            if self._known is None:
                raise ConfigError(
                    f"[upstream] known_hosts: cannot load {self._path}: {exc}",
                ) from None
            log.error("known_hosts %s unreadable, keeping the previous copy: %s", self._path, exc)

    def trusted_for(self, dest: Destination) -> TrustedHostKeys:
        host_keys: list[asyncssh.SSHKey] = []
        ca_keys: list[asyncssh.SSHKey] = []
        revoked: list[asyncssh.SSHKey] = []
        port = None if dest.port == 22 else dest.port
        if self._path is not None:
            self._reload()
            assert self._known is not None
            for name in {dest.node or dest.host, dest.host}:
                matched = self._known.match(name, dest.host, port)
                host_keys += matched[0]
                ca_keys += matched[1]
                revoked += matched[2]
        if self._directory_keys is not None:
            names = [n for n in (dest.node, dest.host) if n]
            for line in self._directory_keys(names):
                try:
                    host_keys.append(asyncssh.import_public_key(line))
                except (asyncssh.KeyImportError, ValueError):
                    log.warning(
                        "ignoring an unparsable host key for %s in the directory", dest.label
                    )
        return TrustedHostKeys(tuple(host_keys), tuple(ca_keys), tuple(revoked))


class _QuietClient(asyncssh.SSHClient):
    """Upstream client callbacks: nothing to do but note how auth ended."""

    def auth_banner_received(self, msg: str, lang: str) -> None:
        log.debug("upstream auth banner: %r", msg[:200])


class UpstreamConnector:
    """Opens the bastion's SSH connection to a routed host."""

    def __init__(
        self, settings: UpstreamSettings, signer: CertificateSigner | None, host_keys: HostKeyPolicy
    ) -> None:
        self._settings = settings
        self._signer = signer
        self._host_keys = host_keys
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
        self,
        dest: Destination,
        *,
        key_id: str,
        password: str | None = None,
        agent_path: str | None = None,
    ) -> asyncssh.SSHClientConnection:
        """Log in to ``dest`` as ``dest.login``.

        With ``password`` the person's own password is relayed (passthrough
        mode); otherwise a fresh certificate is minted for this login.
        Raises an :class:`UpstreamError` or :class:`CredentialError`.
        """
        trusted = self._host_keys.trusted_for(dest)
        if trusted.empty:
            raise HostKeyMismatch(
                f"no known host key for {dest.label}; refusing to connect",
                detail=f"add the host key of {dest.label} to known_hosts or the directory",
            )
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
            cred = await self._signer.issue(dest.login, key_id)
            kwargs.update(
                client_keys=[(cred.private_key, cred.certificate)], preferred_auth=["publickey"]
            )
        if agent_path is not None:
            kwargs.update(agent_forwarding=True, agent_path=agent_path)
        try:
            conn = await asyncssh.connect(
                dest.host,
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
            raise UpstreamAuthFailed(
                f"{dest.label} refused the login for {dest.login}",
                detail=f"{dest.label}: {exc.reason}",
            ) from None
        except asyncssh.DisconnectError as exc:
            raise HostUnreachable(f"{dest.label} closed the connection: {exc.reason}") from None
        except TimeoutError:
            raise HostUnreachable(f"{dest.label} did not answer in time") from None
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise HostUnreachable(f"cannot reach {dest.label}: {reason}") from None
        _tune_socket(conn)
        return conn


def _tune_socket(conn: asyncssh.SSHClientConnection) -> None:
    sock = conn.get_extra_info("socket")
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
