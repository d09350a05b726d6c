"""The bastion's exception tree.

Every error that can end a login carries a ``reason`` (a stable code for the
audit record and metrics) and a ``user_message`` (one line, safe to show the
person logging in: no secrets, no internal addresses beyond the routed host)::

    BastionError
    ├── ConfigError                 settings file is wrong (never reaches a client)
    ├── RoutingError
    │   ├── NoRoute                 no directory entry for the user
    │   ├── MalformedRoute          the entry does not parse
    │   ├── UnknownHost             the node is not in the catalog
    │   ├── HostUnhealthy           the node's checks are not passing
    │   ├── DirectoryUnavailable    Consul unreachable and no usable table
    │   └── ForwardDenied           a -J / -L / -R / agent request outside policy
    ├── CredentialError
    │   ├── SigningFailed           the CA refused or could not be reached
    │   └── SecretUnavailable       Vault sealed / unreachable / token revoked
    └── UpstreamError
        ├── HostUnreachable         TCP connect failed or timed out
        ├── HostKeyMismatch         the host's key is unknown or differs
        └── UpstreamAuthFailed      the host refused the bastion's credential
"""

from __future__ import annotations


class BastionError(Exception):
    """Base class. ``reason`` is a stable code, ``user_message`` is client-safe."""

    reason = "internal-error"

    def __init__(self, user_message: str, *, detail: str | None = None) -> None:
        super().__init__(user_message)
        self.user_message = user_message
        # for the operator's log only; may name internals, never secrets
        self.detail = detail or user_message


class ConfigError(BastionError):
    reason = "config-error"


class RoutingError(BastionError):
    reason = "routing-error"


class NoRoute(RoutingError):
    reason = "no-route"


class MalformedRoute(RoutingError):
    reason = "malformed-route"


class UnknownHost(RoutingError):
    reason = "unknown-host"


class HostUnhealthy(RoutingError):
    reason = "host-unhealthy"


class DirectoryUnavailable(RoutingError):
    reason = "directory-unavailable"


class ForwardDenied(RoutingError):
    reason = "forward-denied"


class CredentialError(BastionError):
    reason = "credential-error"


class SigningFailed(CredentialError):
    reason = "signing-failed"


class SecretUnavailable(CredentialError):
    reason = "secret-unavailable"


class UpstreamError(BastionError):
    reason = "upstream-error"


class HostUnreachable(UpstreamError):
    reason = "host-unreachable"


class HostKeyMismatch(UpstreamError):
    reason = "host-key-mismatch"


class UpstreamAuthFailed(UpstreamError):
    reason = "upstream-auth-failed"
