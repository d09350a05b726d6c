"""Credentials for the upstream leg: one fresh key and one short-lived SSH user
certificate per login, and the Vault/OpenBao client that signs them.

The bastion never holds a user's private key. After it has authenticated a
person it asks a :class:`CertificateSigner` for an :class:`UpstreamCredential`
(a new ed25519 key plus a certificate naming exactly one principal, valid for
minutes) and logs in to the routed host with it; the hosts trust the CA
(``TrustedUserCAKeys``). Two signers exist (:mod:`.signers`):

* :class:`VaultCertificateSigner`: the CA key stays in Vault/OpenBao's SSH
  secrets engine; :class:`VaultClient` (:mod:`.vault`) logs in with AppRole and
  keeps its token renewed, on the event loop; :mod:`.vault_http` is the one
  place aiohttp's exceptions and Vault's error answers become
  :class:`~bastion.errors.SigningFailed` or
  :class:`~bastion.errors.SecretUnavailable`.
* :class:`LocalCASigner`: a CA private key file, for deployments without Vault.

Certificates are read and requests checked in :mod:`.sshcert`. Secrets held in
memory are :class:`Secret` values, whose ``repr`` is redacted.
"""

from bastion.credentials.secrets import Secret
from bastion.credentials.signers import (
    CertificateSigner,
    LocalCASigner,
    UpstreamCredential,
    VaultCertificateSigner,
    build_signer,
)
from bastion.credentials.sshcert import BACKDATE_SECONDS, CERT_EXTENSIONS
from bastion.credentials.vault import VaultClient

__all__ = [
    "BACKDATE_SECONDS",
    "CERT_EXTENSIONS",
    "CertificateSigner",
    "LocalCASigner",
    "Secret",
    "UpstreamCredential",
    "VaultCertificateSigner",
    "VaultClient",
    "build_signer",
]
