"""Who mints the upstream certificate: Vault/OpenBao's SSH engine or a local CA key.

After the bastion has authenticated a person it asks a
:class:`CertificateSigner` for an :class:`UpstreamCredential` (a new ed25519
key plus a certificate naming exactly one principal, valid for minutes) and
logs in to the routed host with it; the hosts trust the CA
(``TrustedUserCAKeys``).
"""

from __future__ import annotations

import ipaddress
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import asyncssh

from bastion.access_settings import IPNetwork
from bastion.config import Settings
from bastion.credentials.sshcert import (
    BACKDATE_SECONDS,
    CERT_TYPE_USER,
    check_key_id,
    check_principal,
    new_ephemeral_key,
    parse_ed25519_cert,
    parse_ed25519_key,
)
from bastion.credentials.vault import VaultClient
from bastion.errors import ConfigError, SigningFailed
from bastion.secretfiles import read_secret_file


@dataclass(frozen=True)
class UpstreamCredential:
    """A one-login credential for the upstream host.

    Use as ``asyncssh.connect(..., client_keys=[(cred.private_key,
    cred.certificate)])``. ``valid_before`` is the certificate's expiry (unix
    time); the credential is worthless afterwards and is never stored.
    """

    private_key: asyncssh.SSHKey = field(repr=False)
    certificate: asyncssh.SSHCertificate = field(repr=False)
    principal: str
    key_id: str
    valid_before: int
    serial: int = 0  # sshd logs it: "Accepted certificate ID ... serial N"


class CertificateSigner(Protocol):
    """Mints an :class:`UpstreamCredential` for one login."""

    ttl: int  # seconds each certificate is valid ([upstream] cert_ttl)
    # the source-address critical option (PROTOCOL.certkeys): CIDRs the host
    # accepts the certificate from ([upstream] source_address); () for none
    source_address: tuple[str, ...]

    async def issue(self, principal: str, key_id: str) -> UpstreamCredential:
        """A fresh key and a user certificate valid for ``principal`` only.

        Raises SigningFailed (the CA refused) or SecretUnavailable (Vault is
        sealed, unreachable or will not let the bastion in).
        """
        ...

    async def aclose(self) -> None:
        """Release what the signer owns (not a VaultClient it was given)."""
        ...


class LocalCASigner:
    """Signs with a CA private key file (OpenSSH format; ed25519, RSA or ECDSA).

    The key is read once, at construction: a missing, world-readable or
    garbled file is a ConfigError naming it, not a failure at the first login.
    Issuing is pure CPU and takes well under a millisecond.
    """

    def __init__(
        self, ca_key_file: Path, ttl: int, *, source_address: tuple[str, ...] = ()
    ) -> None:
        what = "[upstream] ca_key"
        text = read_secret_file(ca_key_file, what)
        try:
            self._ca = asyncssh.import_private_key(text)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise ConfigError(
                f"{what}: {ca_key_file} is not a usable OpenSSH private key ({exc})"
            ) from None
        # ttl: [upstream] cert_ttl, checked by the settings (30-3600 s)
        self.ca_key_file = ca_key_file
        self.ttl = ttl
        self.source_address = source_address

    def __repr__(self) -> str:
        return f"LocalCASigner(ca_key_file={str(self.ca_key_file)!r}, ttl={self.ttl})"

    async def issue(self, principal: str, key_id: str) -> UpstreamCredential:
        check_principal(principal)
        check_key_id(key_id)
        key = new_ephemeral_key()
        now = int(time.time())
        valid_before = now + self.ttl
        serial = secrets.randbits(63)
        cert = self._ca.generate_user_certificate(
            key,
            key_id,
            # a random serial ties sshd's "Accepted certificate ID ... serial N" to one login
            serial=serial,
            principals=[principal],
            valid_after=now - BACKDATE_SECONDS,
            valid_before=valid_before,
            source_address=list(self.source_address) or None,
            permit_x11_forwarding=False,
            permit_agent_forwarding=True,
            permit_port_forwarding=True,
            permit_pty=True,
            permit_user_rc=True,
        )
        return UpstreamCredential(
            private_key=key,
            certificate=cert,
            principal=principal,
            key_id=key_id,
            valid_before=valid_before,
            serial=serial,
        )

    async def aclose(self) -> None:
        return None


class VaultCertificateSigner:
    """Signs with the Vault/OpenBao SSH secrets engine (``<mount>/sign/<role>``).

    The role must allow user certificates and user key ids, and its max_ttl
    must be at least ``ttl``: Vault refuses a longer ttl rather than clamping.
    The VaultClient is shared (the bastion also reads KV through it) and is
    not closed by :meth:`aclose`.
    """

    def __init__(
        self,
        client: VaultClient,
        mount: str,
        role: str,
        ttl: int,
        *,
        source_address: tuple[str, ...] = (),
    ) -> None:
        # ttl: [upstream] cert_ttl, checked by the settings (30-3600 s)
        self.client = client
        self.mount = mount
        self.role = role
        self.ttl = ttl
        self.source_address = source_address

    def __repr__(self) -> str:
        return (
            f"VaultCertificateSigner({self.client!r}, mount={self.mount!r}, "
            f"role={self.role!r}, ttl={self.ttl})"
        )

    async def issue(self, principal: str, key_id: str) -> UpstreamCredential:
        key = new_ephemeral_key()
        public_line = key.export_public_key("openssh").decode().strip()
        # the role must list it in allowed_critical_options (deploy/bootstrap-vault.sh)
        options = {"source-address": ",".join(self.source_address)} if self.source_address else {}
        signed = await self.client.sign_ssh_key(
            self.mount,
            self.role,
            public_line,
            principal=principal,
            key_id=key_id,
            ttl=self.ttl,
            critical_options=options,
        )
        where = f"{self.mount}/sign/{self.role}"
        try:
            cert = asyncssh.import_certificate(signed)
            fields = parse_ed25519_cert(cert.public_data)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise SigningFailed(
                "Vault returned an unreadable certificate", detail=f"{where}: {exc}"
            ) from exc
        # trust, but verify: a misconfigured role must not widen what the bastion asked for
        expected_key = key.convert_to_public().public_data
        if (
            fields.public_key != parse_ed25519_key(expected_key)
            or fields.cert_type != CERT_TYPE_USER
            or fields.principals != (principal,)
            or _source_address(cert) != _networks(self.source_address)
        ):
            raise SigningFailed(
                "Vault returned a certificate that does not match the request",
                detail=f"{where}: got type {fields.cert_type}, "
                f"principals {list(fields.principals)}, "
                f"source-address {sorted(map(str, _source_address(cert)))}",
            )
        return UpstreamCredential(
            private_key=key,
            certificate=cert,
            principal=principal,
            key_id=fields.key_id,
            valid_before=fields.valid_before,
            serial=fields.serial,
        )

    async def aclose(self) -> None:
        return None


def _networks(cidrs: tuple[str, ...]) -> set[IPNetwork]:
    return {ipaddress.ip_network(c.strip(), strict=False) for c in cidrs}


def _source_address(cert: asyncssh.SSHCertificate) -> set[IPNetwork]:
    """The certificate's source-address critical option as networks (empty: none)."""
    options = getattr(cert, "options", {})
    return set(options.get("source-address") or ())


def build_signer(settings: Settings, vault: VaultClient | None) -> CertificateSigner:
    """Vault's SSH engine when ``[vault]`` is configured, else the local CA key."""
    up = settings.upstream
    if settings.vault.enabled:
        assert vault is not None, "the application starts the Vault client first"
        return VaultCertificateSigner(
            vault,
            settings.vault.ssh_mount,
            settings.vault.ssh_role,
            up.cert_ttl,
            source_address=up.source_address,
        )
    # the settings require ca_key without [vault] (bastion.config._validate)
    assert up.ca_key is not None
    return LocalCASigner(up.ca_key, up.cert_ttl, source_address=up.source_address)
