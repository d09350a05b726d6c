"""Settings for hostile clients and access control: ``[penalties]``,
``[access]``, and the parsing and validation of the ``[server]`` and
``[upstream]`` keys that name OpenSSH options (``max_startups``,
``per_source_net_block_size``, CIDR lists).

:mod:`bastion.config` builds these sections like the others and calls
:func:`validate` once at load; everything here is pure.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bastion.errors import ConfigError

if TYPE_CHECKING:
    from bastion.config import Settings

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ON_REVOKE = ("close", "keep")
MFA_MODES = ("off", "per-person", "required")
OVERFLOW = ("permissive", "deny-all")


@dataclass(frozen=True)
class PenaltySettings:
    """``[penalties]``: sshd_config(5) PerSourcePenalties (OpenSSH 9.8+).

    Each event adds its seconds to the source's penalty (capped at ``max``);
    new connections from a source are refused at once while its penalty is
    above ``min``. ``exempt`` is PerSourcePenaltyExemptList (CIDRs). Sources
    are grouped by ``[server] per_source_net_block_size``.
    """

    enabled: bool = True
    authfail: float = 5.0  # a connection that failed authentication and closed
    noauth: float = 1.0  # a connection closed before it authenticated
    grace_exceeded: float = 10.0  # LoginGraceTime ran out
    refuseconnection: float = 10.0  # a login refused by policy (source not allowed, ...)
    max: float = 600.0
    min: float = 15.0
    max_sources: int = 65536  # max-sources4 / max-sources6
    overflow: str = "permissive"  # when the table is full: "permissive" or "deny-all"
    # the bastion's own host: its local health check (`bastion register`'s
    # script check connects from 127.0.0.1 and hangs up after the banner,
    # a noauth every interval) and local monitoring; [] exempts nobody
    exempt: tuple[str, ...] = ("127.0.0.1/32", "::1/128")


@dataclass(frozen=True)
class AccessSettings:
    """``[access]``: what ends access, grants, and the second factor."""

    # when the directory withdraws a person's access (route or key removed,
    # "disabled": true, a grant expired): close their live sessions, or keep them
    on_revoke: str = "close"
    # temporary grants (bastion grant), keys bound to a Consul session
    grants_prefix: str = "grants/"
    # the longest grant `bastion grant` writes (Consul's session TTL limit)
    grant_max: float = 86400.0
    # "off", "per-person" ("mfa": "totp" in an entry) or "required" (everyone)
    mfa: str = "per-person"
    totp_mount: str = "totp"
    # wrong codes per person within totp_wrong_window seconds before their
    # codes are not checked for the rest of the window (per bastion process)
    totp_max_wrong: int = 5
    totp_wrong_window: float = 300.0


def parse_max_startups(value: str) -> tuple[int, int, int]:
    """``"start:rate:full"`` (or ``"full"``) → (start, rate %, full), as
    sshd_config(5) MaxStartups. Raises ValueError naming the problem."""
    parts = value.split(":")
    if len(parts) == 1:
        parts = [parts[0], "100", parts[0]]
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts):
        raise ValueError(f"must be start:rate:full in whole numbers, not {value!r}")
    start, rate, full = (int(p) for p in parts)
    if not 1 <= start <= full:
        raise ValueError(f"needs 1 <= start <= full: {value!r}")
    if not 1 <= rate <= 100:
        raise ValueError(f"rate must be 1-100 (percent): {value!r}")
    return start, rate, full


def parse_net_block_size(value: str) -> tuple[int, int]:
    """``"32:64"`` → (IPv4 prefix, IPv6 prefix), as sshd_config(5)
    PerSourceNetBlockSize (``"32"`` alone sets IPv4 only; IPv6 stays 128)."""
    v4, _, v6 = value.partition(":")
    try:
        p4, p6 = int(v4), int(v6 or "128")
    except ValueError:
        raise ValueError(f"must be v4bits[:v6bits], not {value!r}") from None
    if not (0 <= p4 <= 32 and 0 <= p6 <= 128):
        raise ValueError(f"bits out of range (0-32, 0-128): {value!r}")
    return p4, p6


def parse_networks(values: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """CIDRs (``10.0.0.0/8``, ``2001:db8::/32``; a bare address is /32 or
    /128) → networks. Raises ValueError naming the bad entry."""
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an address or CIDR: {value!r}") from None
    return tuple(out)


def validate(s: Settings, label: str) -> None:
    """The checks for these keys (part of the validation at load)."""

    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{label}: {msg}")

    srv = s.server
    for key in ("channel_timeout", "unused_connection_timeout"):  # sshd_config(5), 0: off
        if not 0 <= getattr(srv, key) <= 366 * 86400:  # also NaN
            raise bad(f"[server] {key}: must be between 0 (off) and 31622400 seconds")
    try:
        s.startups  # noqa: B018 (parses [server] max_startups)
    except ValueError as exc:
        raise bad(f"[server] max_startups: {exc}") from None
    if srv.per_source_max_startups < 1:
        raise bad("[server] per_source_max_startups: must be at least 1")
    try:
        parse_net_block_size(srv.per_source_net_block_size)
    except ValueError as exc:
        raise bad(f"[server] per_source_net_block_size: {exc}") from None
    for key in ("proxy_protocol_from",):
        try:
            parse_networks(getattr(srv, key))
        except ValueError as exc:
            raise bad(f"[server] {key}: {exc}") from None
    try:
        parse_networks(s.upstream.source_address)
    except ValueError as exc:
        raise bad(f"[upstream] source_address: {exc}") from None
    p = s.penalties
    try:
        parse_networks(p.exempt)
    except ValueError as exc:
        raise bad(f"[penalties] exempt: {exc}") from None
    if p.max < p.min:
        raise bad("[penalties] max: must be at least min")
    if p.max_sources < 1:
        raise bad("[penalties] max_sources: must be at least 1")
    if p.overflow not in OVERFLOW:
        raise bad(f"[penalties] overflow: one of {', '.join(OVERFLOW)}")
    a = s.access
    if a.on_revoke not in ON_REVOKE:
        raise bad(f"[access] on_revoke: one of {', '.join(ON_REVOKE)}")
    if a.mfa not in MFA_MODES:
        raise bad(f"[access] mfa: one of {', '.join(MFA_MODES)}")
    if a.mfa != "off" and not s.vault.enabled and a.mfa == "required":
        raise bad('[access] mfa = "required" needs a [vault] address (the TOTP engine)')
    if a.totp_max_wrong < 1:
        raise bad("[access] totp_max_wrong: must be at least 1")
    if not 30 <= a.totp_wrong_window <= 86400:
        raise bad("[access] totp_wrong_window: must be between 30 and 86400 seconds")
    prefix = a.grants_prefix
    if not prefix.endswith("/") or prefix.startswith("/"):
        raise bad(f"[access] grants_prefix: must end with '/' and not start with it: {prefix!r}")
    if not 10 <= a.grant_max <= 86400:
        raise bad("[access] grant_max: must be between 10 and 86400 seconds (Consul's TTL range)")
