"""``bastion check ADDRESS``: does an SSH server answer on ADDRESS?

Run by Consul as a local script check (``deploy/consul.d/ssh-bastion.hcl``):
it connects, reads the server's SSH identification line (RFC 4253 4.2) and
prints one line for the check's output. Exit code 0 means passing, 2 means
critical (Consul treats any code other than 0 and 1 as critical).

The whole check -- connect, and read up to the identification line -- is
bounded by ``timeout``. Name resolution is done by the system resolver and
is not bounded by it; checks normally name a literal address.

Also runnable as ``python -m bastion.check ADDRESS [--timeout S]``.
"""

from __future__ import annotations

import argparse
import socket
import time
from collections.abc import Sequence

OK = 0
CRITICAL = 2

# RFC 4253: the identification line is at most 255 characters including CR LF;
# a server may send other lines before it. Bound what a peer can make us read.
MAX_LINE = 255
MAX_PREAMBLE = 8192
OWN_IDENT = b"SSH-2.0-bastion_check\r\n"


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port`` -> (host, port). Raises ValueError."""
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("expected [IPv6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep:
            raise ValueError("expected HOST:PORT")
        if ":" in host:
            raise ValueError("an IPv6 address needs brackets: [ADDR]:PORT")
    if not host:
        raise ValueError("empty host")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r}")
    return host, int(port_text)


def _printable(raw: bytes) -> str:
    text = raw.decode("ascii", errors="replace")
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:MAX_LINE]


def _read_ident(sock: socket.socket, deadline: float, address: str) -> tuple[str | None, str]:
    """(identification line, "") or (None, reason)."""
    buf = b""
    received = 0
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            line = line.rstrip(b"\r")
            if line.startswith(b"SSH-"):
                if len(line) > MAX_LINE - 2:
                    return None, f"identification line from {address} is too long"
                return _printable(line), ""
            # other lines may precede the identification line (RFC 4253 4.2)
        if len(buf) > MAX_LINE:
            if buf.startswith(b"SSH-"):
                return None, f"identification line from {address} is too long"
            return None, f"{address} is not an SSH server: got {_printable(buf[:60])!r}"
        if received > MAX_PREAMBLE:
            return None, (
                f"{address} is not an SSH server: no identification line "
                f"in the first {MAX_PREAMBLE} bytes"
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(1024)
        if not chunk:
            if buf:
                return None, (
                    f"{address} closed the connection after "
                    f"{_printable(buf[:60])!r}, not an SSH server"
                )
            return None, f"{address} closed the connection without an SSH banner"
        received += len(chunk)
        buf += chunk


def check_ssh_banner(address: str, timeout: float) -> tuple[int, str]:
    """Connect to ``address`` and read the SSH banner within ``timeout`` seconds.

    Returns ``(0, "OK: <banner> from <address> in N ms")`` or
    ``(2, "CRITICAL: <reason>")``.
    """
    try:
        host, port = parse_address(address)
    except ValueError as err:
        return CRITICAL, f"CRITICAL: invalid address {address!r}: {err}"
    if not timeout > 0:
        return CRITICAL, f"CRITICAL: invalid timeout {timeout!r}"
    start = time.monotonic()
    deadline = start + timeout
    phase = "connect to"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            phase = "SSH banner from"
            banner, reason = _read_ident(sock, deadline, address)
            if banner is None:
                return CRITICAL, f"CRITICAL: {reason}"
            elapsed_ms = round((time.monotonic() - start) * 1000)
            # Say who we are before closing, so the server logs a clean
            # disconnect rather than a peer that never identified itself.
            try:
                sock.settimeout(max(deadline - time.monotonic(), 0.05))
                sock.sendall(OWN_IDENT)
            except OSError:
                pass
    except TimeoutError:
        return CRITICAL, f"CRITICAL: no {phase} {address} within {timeout:g} s"
    except ConnectionRefusedError:
        return CRITICAL, f"CRITICAL: connection refused by {address}"
    except ConnectionResetError:
        return CRITICAL, f"CRITICAL: connection reset by {address} before an SSH banner"
    except socket.gaierror as err:
        return CRITICAL, f"CRITICAL: cannot resolve {host!r}: {err.strerror}"
    except OSError as err:
        return CRITICAL, f"CRITICAL: cannot {phase} {address}: {err.strerror or err}"
    if not banner.startswith(("SSH-2.0-", "SSH-1.99-")):
        return CRITICAL, f"CRITICAL: {address} speaks an unsupported protocol: {banner}"
    return OK, f"OK: {banner} from {address} in {elapsed_ms} ms"


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def build_parser(prog: str = "bastion check") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Connect to ADDRESS and read its SSH banner (a Consul script check: "
        "exit 0 = passing, 2 = critical).",
    )
    parser.add_argument("address", metavar="ADDRESS", help="HOST:PORT or [IPv6]:PORT")
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=2.0,
        metavar="S",
        help="give up after S seconds (default 2)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Print the check's one line; return its exit code."""
    args = build_parser().parse_args(argv)
    code, line = check_ssh_banner(args.address, args.timeout)
    print(line, flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
