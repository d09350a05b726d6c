"""The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2)
a load balancer sends before the client's bytes, naming the client's address.

Framing is done here, bounded: a v1 header is one text line of at most
:data:`V1_MAX` bytes (``PROXY TCP4 198.51.100.7 192.0.2.1 50000 22\\r\\n``);
a v2 header is a 16-byte fixed part whose last two bytes give the length of
what follows (addresses and TLVs), accepted up to :data:`V2_MAX` bytes in
all. The ``proxyprotocol`` package (PyPI ``proxy-protocol``) decodes a
complete header: addresses, ``LOCAL``/``UNKNOWN``, and a CRC32C TLV if the
proxy sent one.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the longest v1 line, CRLF included (proxy-protocol.txt 2.1)
V2_MAX = 16 + 2048  # fixed part + addresses and TLVs we accept (the spec allows 64 KiB)

_V1 = ProxyProtocolV1()
_V2 = ProxyProtocolV2()


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY header (the connection is dropped)."""


@dataclass(frozen=True)
class ProxyHeader:
    """A complete header: the client's ``address`` and ``port`` (None for a
    ``LOCAL`` or ``UNKNOWN`` header, e.g. the proxy's own health check: the
    socket's peer stands), ``version`` 1 or 2, and ``length`` in bytes (what
    follows it is the client's SSH traffic)."""

    address: str | None
    port: int | None
    version: int
    length: int


def looks_like_proxy(data: bytes) -> bool | None:
    """Whether ``data`` (the first bytes of a connection) start a PROXY header:
    True, False, or None when too few bytes arrived to tell."""
    for sig in (V1_SIGNATURE, V2_SIGNATURE):
        n = min(len(data), len(sig))
        if data[:n] == sig[:n]:
            return True if n == len(sig) else None
    return False


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``, or None if more bytes are needed.

    Raises :class:`ProxyHeaderError` for anything else: no PROXY signature
    (a client that skipped its proxy), a header longer than allowed, a
    syntax error, or a v2 checksum that does not match."""
    if data[: len(V1_SIGNATURE)] == V1_SIGNATURE[: len(data)]:
        end = data.find(b"\n", 0, V1_MAX)
        if end < 0:
            if len(data) >= V1_MAX:
                raise ProxyHeaderError(f"no end of line in the first {V1_MAX} bytes (v1)")
            return None
        return _decode(1, data[: end + 1])
    if data[: len(V2_SIGNATURE)] == V2_SIGNATURE[: len(data)]:
        if len(data) < 16:
            return None
        total = 16 + int.from_bytes(data[14:16], "big")
        if total > V2_MAX:
            raise ProxyHeaderError(f"a v2 header of {total} bytes (at most {V2_MAX})")
        if len(data) < total:
            return None
        return _decode(2, data[:total])
    raise ProxyHeaderError("no PROXY protocol header")


def _decode(version: int, header: bytes) -> ProxyHeader:
    """Decode a framed header with the third-party decoder; every exception
    it raises is mapped here, once, to :class:`ProxyHeaderError`. It is not
    only its own syntax errors: a v2 address block shorter than its family
    needs raises ``struct.error`` from inside it (an uncaught traceback per
    connection before this mapping), and the bytes come from the network."""
    try:
        result = (_V1 if version == 1 else _V2).unpack(header)
    except Exception as exc:  # any failure of the decoder is a bad header
        raise ProxyHeaderError(f"bad v{version} header: {exc or type(exc).__name__}") from None
    if isinstance(result, ProxyResultIPv4 | ProxyResultIPv6):
        ip, port = result.source
        # stricter than the decoder: proxy-protocol.txt 2.1 writes ports as
        # [0..65535], but no TCP connection comes from port 0 (RFC 6335 6:
        # reserved; no kernel assigns it), so such a header is forged or
        # broken; and its IPv6 text form has no zone, which would name an
        # interface of the proxy's ("fe80::1%eth0", RFC 4007 11), meaningless
        # here as a penalty's source block or in a "from" check
        if port == 0:
            raise ProxyHeaderError(f"bad v{version} header: source port 0")
        if getattr(ip, "scope_id", None):
            raise ProxyHeaderError(f"bad v{version} header: a scoped address ({ip})")
        return ProxyHeader(str(ip), port, version, len(header))
    return ProxyHeader(None, None, version, len(header))
