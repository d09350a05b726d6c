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
    ├── UpstreamError
    │   ├── HostUnreachable         TCP connect failed, timed out, or the name does not resolve
    │   ├── HostKeyMismatch         the host's key differs from the known one
    │   │   └── HostKeyUnknown      no key is known for the host
    │   ├── UpstreamAuthFailed      the host refused the bastion's credential
    │   ├── UpstreamRefused         the host refused a channel or a forward
    │   └── UpstreamLost            the host's connection ended mid-session
    └── ClientError                 what the person's client asked for or did
        ├── RequestDenied           a request the bastion does not carry (X11, tun)
        ├── ClientRefused           the client refused a channel the bastion opened to it
        ├── TooManyAuthFailures     MaxAuthTries reached (sshd_config(5))
        ├── TooManyConnections      the unauthenticated-connection bound is full
        ├── SecondFactorFailed      a wrong TOTP code (second factor)
        │   ├── CodeReused          a TOTP code given a second time
        │   ├── NotEnrolled         no TOTP key enrolled for the person
        │   └── SecondFactorRequired  required since the person authenticated without one
        └── TooManySessions         the person's max_sessions (directory entry) is reached
    AccessDenied                    authenticated, but the directory refuses the login
    ├── SourceNotAllowed            connecting from outside the entry's "from"
    └── AccountDisabled             the entry says "disabled": true
    SessionEnded                    an operator ended a live connection
    ├── ChannelTimedOut             a channel idle past ChannelTimeout
    └── UnusedConnectionTimedOut    no channels open for UnusedConnectionTimeout

``open_code`` is the SSH channel-open failure code (RFC 4254 section 5.1) a
refused channel carries; OpenSSH clients print "administratively
prohibited" for 1 and "connect failed" for 2.
"""

from __future__ import annotations


def printable(text: str, limit: int = 200) -> str:
    """``text`` safe for a message or a log line: non-printable and non-ASCII
    characters escaped (a client's newline cannot forge a log line), at most
    ``limit`` characters (then "...")."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return "".join(
        ch if ch.isascii() and ch.isprintable() else ch.encode("unicode_escape").decode()
        for ch in text
    )


# RFC 4254 section 5.1 channel-open failure codes
OPEN_ADMINISTRATIVELY_PROHIBITED = 1
OPEN_CONNECT_FAILED = 2


class BastionError(Exception):
    """Base class. ``reason`` is a stable code, ``user_message`` is client-safe."""

    reason = "internal-error"
    open_code = OPEN_CONNECT_FAILED
    # the message is sshd's own wording, shown without the "bastion:" prefix
    verbatim = False

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
    open_code = OPEN_ADMINISTRATIVELY_PROHIBITED


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


class HostKeyUnknown(HostKeyMismatch):
    """No key is known for the host at all (no trust on first use)."""

    reason = "host-key-unknown"


class UpstreamAuthFailed(UpstreamError):
    reason = "upstream-auth-failed"


class UpstreamRefused(UpstreamError):
    reason = "upstream-refused"


class UpstreamLost(UpstreamError):
    reason = "upstream-lost"


class ClientError(BastionError):
    reason = "client-error"


class RequestDenied(ClientError):
    reason = "request-denied"
    open_code = OPEN_ADMINISTRATIVELY_PROHIBITED


class ClientRefused(ClientError):
    reason = "client-refused"


class TooManyAuthFailures(ClientError):
    reason = "max-auth-tries"
    verbatim = True


class TooManyConnections(ClientError):
    reason = "max-unauthenticated"


class SecondFactorFailed(ClientError):
    """The second factor (a TOTP code) was not accepted: a wrong code."""

    reason = "mfa-wrong-code"


class CodeReused(SecondFactorFailed):
    """A TOTP code that was already accepted once (the engine refuses a replay)."""

    reason = "mfa-code-reused"


class TooManyWrongCodes(SecondFactorFailed):
    """Too many wrong codes for one person lately: checks are refused for a
    while, whoever asks (a per-account limit, as Warpgate's user lockout)."""

    reason = "mfa-locked"


class UserChanged(ClientError):
    """The client changed the user name between authentication requests,
    which sshd refuses with a disconnect (auth2.c, "Change of username or
    service not allowed")."""

    reason = "user-changed"


class NotEnrolled(SecondFactorFailed):
    """The person must give a second factor but has none enrolled."""

    reason = "mfa-not-enrolled"


class SecondFactorRequired(SecondFactorFailed):
    """The directory asks a second factor this connection did not give (the
    entry changed after the person authenticated)."""

    reason = "mfa-required"


class TooManySessions(ClientError):
    """The person has ``max_sessions`` sessions open (all their connections,
    this bastion): refused like sshd's MaxSessions, administratively prohibited."""

    reason = "max-sessions"
    open_code = OPEN_ADMINISTRATIVELY_PROHIBITED


class AccessDenied(BastionError):
    """The person authenticated, but their directory entry refuses the login.
    Counts as PerSourcePenalties' ``refuseconnection`` (sshd_config(5))."""

    reason = "access-denied"
    open_code = OPEN_ADMINISTRATIVELY_PROHIBITED


class SourceNotAllowed(AccessDenied):
    """The source address is outside the entry's ``"from"`` (authorized_keys(5) from=)."""

    reason = "source-not-allowed"


class AccountDisabled(AccessDenied):
    """The entry says ``"disabled": true``."""

    reason = "disabled"


class SessionEnded(BastionError):
    """An operator (or a drain, or the directory) ended a live connection."""

    reason = "ended-by-operator"


class Drained(SessionEnded):
    """A drain ended a live connection at the end of ``drain_timeout``."""

    reason = "drained"


class ShutDown(SessionEnded):
    """The bastion stopped at once (SIGINT, a second SIGTERM) with the connection open."""

    reason = "shutdown"


class ChannelTimedOut(SessionEnded):
    """No data either way on a channel for ChannelTimeout seconds (sshd_config(5))."""

    reason = "channel-timeout"


class UnusedConnectionTimedOut(SessionEnded):
    """No open channels for UnusedConnectionTimeout seconds (sshd_config(5))."""

    reason = "unused-connection-timeout"


class AccessRevoked(SessionEnded):
    """The directory withdrew the person's access while connected (route or
    key removed, ``"disabled": true``, a grant ended) and ``[access]
    on_revoke = "close"``."""

    reason = "revoked"
