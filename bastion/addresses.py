"""Addresses in settings: ``host:port`` with IPv6 brackets, and Consul's
base URL. Pure; ValueError names the problem."""

from __future__ import annotations

import urllib.parse


def split_host_port(value: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` → (host, port)."""
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep:
            raise ValueError(f"unclosed '[' in {value!r}")
        if not rest:
            return host, default_port
        if not rest.startswith(":"):
            raise ValueError(f"junk after ']' in {value!r}")
        port_s = rest[1:]
    elif value.count(":") == 1:
        host, _, port_s = value.partition(":")
    else:
        return value, default_port
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"bad port in {value!r}")
    return host, int(port_s)


def consul_base_url(address: str) -> str:
    """``http://127.0.0.1:8500``, ``https://consul:8501`` or ``host:port`` → base URL.

    Without a port: 8500 for http, 8501 for https (Consul's conventions).
    Raises ValueError naming the problem.
    """
    text = address.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    problem = None
    try:
        port = parts.port
    except ValueError:
        problem = "bad port"
    if parts.scheme not in ("http", "https"):
        problem = f"scheme must be http or https, not {parts.scheme!r}"
    elif not parts.hostname:
        problem = "no host"
    elif parts.username or parts.password or parts.query or parts.path not in ("", "/"):
        problem = "only scheme://host:port is allowed"
    if problem:
        raise ValueError(f"{problem}: {address!r}")
    assert parts.hostname is not None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is None:
        port = 8501 if parts.scheme == "https" else 8500
    return f"{parts.scheme}://{host}:{port}"
