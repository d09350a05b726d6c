"""The doctor's HTTP client for Consul and Vault/OpenBao: one aiohttp session,
every answer returned whatever its status, and the one place where a request
that got no answer becomes :class:`Unreachable`.

Nothing comes from the environment (``trust_env=False``: no proxies, no
netrc; no ``CONSUL_HTTP_TOKEN`` or ``VAULT_TOKEN``): the doctor looks at the
deployment with the bastion's own settings and tokens.
"""

from __future__ import annotations

import email.utils
import json
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

# what aiohttp raises when a request got no answer (refused, DNS, TLS, timeout)
_NO_ANSWER = (aiohttp.ClientError, TimeoutError, OSError)


class Unreachable(Exception):
    """No answer from ``url``; the message says why, on one line."""


@dataclass(frozen=True)
class Answer:
    """One HTTP answer. ``body`` is decoded JSON (None when empty or not JSON);
    ``skew`` is the server's clock minus ours in seconds (None without a
    ``Date`` header)."""

    status: int
    body: Any
    text: str
    skew: float | None

    @property
    def ok(self) -> bool:
        return self.status < 400

    @property
    def denied(self) -> bool:
        """Consul's 403 (``Permission denied``), Vault's 403 too."""
        return self.status == 403

    def error(self, limit: int = 160) -> str:
        """The error text on one line: Vault's ``errors`` list, else the body."""
        errors = self.body.get("errors") if isinstance(self.body, dict) else None
        if isinstance(errors, list) and errors:
            text = "; ".join(str(e) for e in errors)
        else:
            text = self.text
        text = " ".join(text.replace("*", " ").split())
        text = text[:limit] + ("..." if len(text) > limit else "")
        return f"HTTP {self.status}" + (f": {text}" if text else "")


def _skew(date: str | None, sent: float, received: float) -> float | None:
    """The server's clock minus ours: ``Date`` has whole seconds, so its middle
    (+0.5 s) against the middle of the request."""
    if not date:
        return None
    try:
        server = email.utils.parsedate_to_datetime(date).timestamp() + 0.5
    except (TypeError, ValueError, IndexError):
        return None
    return server - (sent + received) / 2


class DoctorHTTP:
    """Requests on one aiohttp session, made at first use on the event loop."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def call(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        timeout: float = 5.0,
        tls: ssl.SSLContext | None = None,
    ) -> Answer:
        """``method url``; a dict or list ``body`` goes as JSON, bytes as they
        are. Raises Unreachable when no answer came."""
        if self._session is None:
            self._session = aiohttp.ClientSession(trust_env=False)
        kwargs: dict[str, Any] = {
            "headers": dict(headers or {}),
            "params": dict(params or {}),
            "timeout": aiohttp.ClientTimeout(total=timeout),
            "allow_redirects": False,
        }
        if isinstance(body, bytes):
            kwargs["data"] = body
        elif body is not None:
            kwargs["json"] = body
        if tls is not None:
            kwargs["ssl"] = tls
        sent = time.time()
        try:
            async with self._session.request(method, url, **kwargs) as resp:
                status, raw, date = resp.status, await resp.read(), resp.headers.get("Date")
        except _NO_ANSWER as exc:
            why = str(exc) or type(exc).__name__
            raise Unreachable(f"no answer from {url.split('?', maxsplit=1)[0]}: {why}") from None
        received = time.time()
        text = raw.decode("utf-8", errors="replace")
        decoded: Any = None
        if text.strip():
            try:
                decoded = json.loads(text)
            except ValueError:
                decoded = None
        return Answer(status, decoded, text.strip(), _skew(date, sent, received))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
