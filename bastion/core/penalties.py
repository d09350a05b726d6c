"""Per-source penalties: sshd_config(5) PerSourcePenalties (OpenSSH 9.8+).

A source that misbehaves earns a penalty, in seconds, for its address block
(PerSourceNetBlockSize: a /32 for IPv4 and a /64 for IPv6 by default):

===================  ===========================================================
``authfail``         the connection failed authentication and closed
``noauth``           the connection closed without authenticating (a probe, a
                     flood, a drop past PerSourceMaxStartups, an eviction by
                     the door's fair share)
``grace_exceeded``   LoginGraceTime ran out before authentication
``refuseconnection`` a login the directory refused (``AccessDenied``: source
                     not allowed, account disabled)
===================  ===========================================================

Penalties add up per block, capped at ``max`` seconds from now; a block whose
penalty exceeds ``min`` is *active*: its new connections are refused at once,
before the SSH version line. A penalty expires when its time is up (lazily,
as in OpenSSH's ``srclimit.c``; nothing runs on a timer). Blocks in the
exempt list (PerSourcePenaltyExemptList) are never penalised. The table holds
at most ``max_sources`` blocks; when it is full, ``overflow`` decides:
``permissive`` records no new penalty, ``deny-all`` refuses every new
connection from a source not exempt until entries expire.

Everything here is pure and takes its clock from the caller, so the unit
tests run on a fake clock.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bastion.access_settings import IPNetwork, PenaltySettings, parse_networks

log = logging.getLogger("bastion.penalties")

KINDS = ("authfail", "noauth", "grace_exceeded", "refuseconnection")
_SWEEP_EVERY = 10.0  # seconds between sweeps of expired entries from the table


def source_block(address: str, v4_bits: int, v6_bits: int) -> str:
    """The source block (PerSourceNetBlockSize) ``address`` belongs to, as a
    CIDR: ``"192.0.2.7"`` → ``"192.0.2.7/32"``, ``"2001:db8::1"`` with 64
    bits → ``"2001:db8::/64"``. An IPv4-mapped IPv6 address counts as IPv4.
    A string that is not an address (a test transport, a UNIX socket) is
    its own block."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    bits = v4_bits if ip.version == 4 else v6_bits
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


@dataclass
class Penalty:
    """One block's penalty: until ``expiry`` (clock seconds); ``active`` once
    above ``min``; what earned it and how many connections it refused."""

    block: str
    expiry: float
    active: bool
    started: float  # when it became active (clock seconds), or when recorded
    earned: dict[str, int] = field(default_factory=dict)
    refused: int = 0


@dataclass(frozen=True)
class PenaltyStart:
    """A penalty just became active: ``block``, ``seconds`` it has left,
    ``reason`` (the kind that tipped it over ``min``) and ``earned`` (counts
    of each kind so far)."""

    block: str
    seconds: float
    reason: str
    earned: dict[str, int]


class PenaltyBox:
    """The penalties of every source block, and the question asked at accept.

    ``on_start`` hears of each penalty once, when it becomes active (the
    listener emits the audit event); ``clock`` is monotonic seconds."""

    def __init__(
        self,
        settings: PenaltySettings,
        v4_bits: int = 32,
        v6_bits: int = 64,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_start: Callable[[PenaltyStart], None] | None = None,
        also_exempt: tuple[IPNetwork, ...] = (),
    ) -> None:
        """``also_exempt``: networks never penalised besides ``exempt`` (the
        PROXY protocol sources: their own connections carry no client)."""
        self._s = settings
        self._v4, self._v6 = v4_bits, v6_bits
        self._exempt: tuple[IPNetwork, ...] = parse_networks(settings.exempt) + also_exempt
        self._clock = clock
        self._on_start = on_start
        self._table: dict[str, Penalty] = {}
        self._swept = clock()
        self._full_refused = 0

    def configure(
        self,
        settings: PenaltySettings,
        v4_bits: int,
        v6_bits: int,
        also_exempt: tuple[IPNetwork, ...] = (),
    ) -> None:
        """New settings (a reload); the penalties in force are kept."""
        self._s = settings
        self._v4, self._v6 = v4_bits, v6_bits
        self._exempt = parse_networks(settings.exempt) + also_exempt

    def block(self, address: str) -> str:
        return source_block(address, self._v4, self._v6)

    def exempt(self, address: str) -> bool:
        """Whether ``address`` is in PerSourcePenaltyExemptList."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._exempt)

    def refuses(self, address: str) -> str | None:
        """Asked for each new connection: the block whose active penalty
        refuses it (``"*"``: the table is full and ``overflow = "deny-all"``),
        or None to let it in."""
        if not self._s.enabled or self.exempt(address):
            return None
        now = self._clock()
        self._sweep(now)
        block = self.block(address)
        entry = self._table.get(block)
        if entry is not None:
            if entry.expiry <= now:
                self._expire(entry, now)
            elif entry.active:
                entry.refused += 1
                return block
        if self._s.overflow == "deny-all" and len(self._table) >= self._s.max_sources:
            self._full_refused += 1
            return "*"
        return None

    def penalise(self, address: str, kind: str) -> None:
        """Add ``kind``'s seconds (one of :data:`KINDS`) to ``address``'s block."""
        seconds = float(getattr(self._s, kind))
        if not self._s.enabled or seconds <= 0 or self.exempt(address):
            return
        now = self._clock()
        block = self.block(address)
        entry = self._table.get(block)
        if entry is not None and entry.expiry <= now:
            self._expire(entry, now)
            entry = None
        if entry is None:
            if len(self._table) >= self._s.max_sources:
                self._sweep(now, force=True)
            if len(self._table) >= self._s.max_sources:
                log.warning(
                    "penalty table full (%d sources): %s not penalised", len(self._table), block
                )
                return
            entry = Penalty(block, now + min(seconds, self._s.max), False, now)
            self._table[block] = entry
        else:
            entry.expiry = min(entry.expiry + seconds, now + self._s.max)
        entry.earned[kind] = entry.earned.get(kind, 0) + 1
        # OpenSSH: a new penalty is active at >= min, an accumulating one above it
        if not entry.active and entry.expiry - now >= self._s.min:
            entry.active = True
            entry.started = now
            left = round(entry.expiry - now, 1)
            log.warning("penalty: %s refused for %.0f s (%s)", block, left, _summary(entry.earned))
            if self._on_start is not None:
                self._on_start(PenaltyStart(block, left, kind, dict(entry.earned)))

    @property
    def active(self) -> int:
        """Blocks whose new connections are refused now (a metrics gauge)."""
        now = self._clock()
        return sum(1 for e in self._table.values() if e.active and e.expiry > now)

    def penalised(self) -> dict[str, float]:
        """Active penalties: block → seconds left."""
        now = self._clock()
        return {
            b: round(e.expiry - now, 1)
            for b, e in self._table.items()
            if e.active and e.expiry > now
        }

    def __len__(self) -> int:
        return len(self._table)

    def _sweep(self, now: float, force: bool = False) -> None:
        if not force and now - self._swept < _SWEEP_EVERY:
            return
        self._swept = now
        for entry in [e for e in self._table.values() if e.expiry <= now]:
            self._expire(entry, now)

    def _expire(self, entry: Penalty, now: float) -> None:
        del self._table[entry.block]
        if entry.active:
            log.info(
                "penalty of %s ended after %.0f s: %d connection(s) refused",
                entry.block,
                entry.expiry - entry.started,
                entry.refused,
            )


def _summary(earned: dict[str, int]) -> str:
    return ", ".join(f"{kind} x{n}" for kind, n in sorted(earned.items()))
