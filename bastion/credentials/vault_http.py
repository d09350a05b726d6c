"""The HTTP side of the Vault/OpenBao client: one aiohttp session on the event
loop, and the one place where what goes wrong on the wire becomes a
:class:`~bastion.errors.SecretUnavailable` or
:class:`~bastion.errors.SigningFailed`.

:meth:`VaultHTTP.send` returns every answer Vault gives (:class:`VaultAnswer`,
error statuses included: the token lifecycle decides what a 403 means) and
raises only when there is no answer. :meth:`VaultHTTP.refusal` and
:meth:`VaultHTTP.denied` turn an error answer into the exception to raise.

Nothing is taken from the environment: no ``*_PROXY``, no ``~/.netrc``
(``trust_env=False``), no ``VAULT_TOKEN``; an operator's shell must not decide
which identity or which CA the bastion uses. TLS trusts ``[vault] ca_cert``
when set, else the system's CA store.
"""

from __future__ import annotations

import json
import ssl
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bastion.credentials.secrets import Secret
from bastion.errors import ConfigError, CredentialError, SecretUnavailable

# what aiohttp raises when a request got no answer from Vault (connection
# refused, DNS, TLS, timeouts, a connection cut mid-answer)
_NO_ANSWER = (aiohttp.ClientError, TimeoutError)


@dataclass(frozen=True)
class VaultAnswer:
    """One HTTP answer from Vault. ``body`` is the decoded JSON (None when
    empty or not JSON); ``errors`` is Vault's error text on one line."""

    status: int
    body: Any
    errors: str

    @property
    def ok(self) -> bool:
        return self.status < 400

    def section(self, name: str) -> dict[str, Any]:
        """``body[name]`` when it is an object (``auth``, ``data``), else ``{}``."""
        value = self.body.get(name) if isinstance(self.body, dict) else None
        return value if isinstance(value, dict) else {}


def api_path(template: str, **params: str) -> str:
    """``template`` with each parameter URL-quoted (``/`` kept) and ``//`` made
    ``/``, as the Vault CLI reads a path."""
    path = template.format(**{k: urllib.parse.quote(v) for k, v in params.items()})
    while "//" in path:
        path = path.replace("//", "/")
    return path


def _one_line(status: int, reason: str, body: Any, text: str) -> str:
    """Vault's error texts on one line (``1 error occurred:\n\t* permission
    denied\n\n`` becomes ``permission denied``)."""
    errors = body.get("errors") if isinstance(body, dict) else None
    if isinstance(errors, list) and errors:
        raw = [str(error) for error in errors]
    elif errors is None and text.strip():
        raw = [text]  # not Vault's JSON (a proxy's page, say)
    else:
        raw = [f"HTTP {status} {reason}".strip()]
    items: list[str] = []
    for error in raw:
        bullets = [line.strip()[2:] for line in error.splitlines() if line.strip().startswith("* ")]
        items.extend(bullets or [" ".join(error.split())])
    return "; ".join(items)


def tls_context(ca_cert: Path | None) -> ssl.SSLContext:
    """The CAs Vault's certificate must chain to; ConfigError for a bad file."""
    if ca_cert is None:
        return ssl.create_default_context()
    if not ca_cert.is_file():
        raise ConfigError(f"[vault] ca_cert: {ca_cert} is not a file")
    try:
        return ssl.create_default_context(cafile=str(ca_cert))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[vault] ca_cert: cannot load {ca_cert}: {exc}") from None


class VaultHTTP:
    """Requests to one Vault address on one aiohttp session (made on the
    event loop at first use). ``scrub`` removes secrets from Vault's error
    texts before they go into an exception."""

    def __init__(
        self, address: str, timeout: float, tls: ssl.SSLContext, scrub: Callable[[str], str]
    ) -> None:
        self.address = address
        self._timeout = timeout
        self._tls = tls
        self._scrub = scrub
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"VaultHTTP(address={self.address!r})"

    async def send(
        self,
        method: str,
        path: str,
        *,
        what: str,
        token: Secret | None,
        body: Mapping[str, object] | None = None,
    ) -> VaultAnswer:
        """``method path`` with ``body`` as JSON; Vault's answer, whatever its
        status. Raises SecretUnavailable when no answer came."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=32, ssl=self._tls),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                trust_env=False,
            )
        headers = {"X-Vault-Request": "true"}
        if token is not None:
            headers["X-Vault-Token"] = token.reveal()
        # redirects are followed (a standby Vault may send the client to the
        # active node with a 307, which keeps the method and the body)
        try:
            async with self._session.request(
                method, self.address + path, json=body, headers=headers
            ) as resp:
                status, reason, raw = resp.status, resp.reason or "", await resp.read()
        except _NO_ANSWER as exc:
            raise SecretUnavailable(
                "Vault unreachable",
                detail=f"Vault unreachable at {self.address} during {what}: {type(exc).__name__}",
            ) from exc
        text = raw.decode("utf-8", errors="replace")
        decoded: Any = None
        if text.strip():
            try:
                decoded = json.loads(text)
            except ValueError:
                decoded = None
        errors = "" if status < 400 else _one_line(status, reason, decoded, text)
        return VaultAnswer(status, decoded, errors)

    def refusal(
        self, answer: VaultAnswer, what: str, kind: type[CredentialError]
    ) -> CredentialError:
        """The exception for an error answer: SecretUnavailable when Vault is
        sealed, down or not initialized, else ``kind``."""
        text = self._scrub(answer.errors)
        if answer.status == 503:
            if "sealed" in text.lower():
                return SecretUnavailable(
                    "Vault is sealed", detail=f"Vault at {self.address} is sealed ({what})"
                )
            return SecretUnavailable(
                "Vault is unavailable", detail=f"Vault at {self.address}: {text} ({what})"
            )
        if answer.status == 501:
            return SecretUnavailable(
                "Vault is not initialized", detail=f"Vault at {self.address}: {text}"
            )
        if answer.status == 404:
            return kind(
                f"Vault: {what}: not found", detail=f"{what}: {text} (mount, role or path missing)"
            )
        return kind(f"Vault: {what} failed: {text}", detail=f"{what}: {text}")

    def denied(self, answer: VaultAnswer, what: str) -> SecretUnavailable:
        """A 403 for a token Vault still accepts: its policy does not allow ``what``."""
        return SecretUnavailable(
            f"Vault denied {what}: permission denied",
            detail=f"Vault denied {what}: {self._scrub(answer.errors)} "
            f"(the policy of the bastion's token does not allow it)",
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
