"""The Consul and Vault/OpenBao endpoints the doctor talks to, on its one
HTTP client (:mod:`.http`), with the bastion's addresses and timeouts."""

from __future__ import annotations

import ipaddress
import urllib.parse
from typing import Any

from bastion.addresses import consul_base_url
from bastion.config import Settings
from bastion.credentials.vault_http import tls_context
from bastion.doctor.http import Answer, DoctorHTTP


def kv_path(key: str) -> str:
    return "/v1/kv/" + urllib.parse.quote(key, safe="/")


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plain_remote(url: str) -> bool:
    """Whether ``url`` is plain HTTP to another host (secrets in clear text)."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme != "https" and not is_loopback(parts.hostname or "")


class ConsulAPI:
    """Requests to ``[consul] address``; ``token`` None sends none (what an
    anonymous client gets)."""

    def __init__(self, http: DoctorHTTP, settings: Settings) -> None:
        self.http = http
        self.base = consul_base_url(settings.consul.address)
        self.timeout = settings.consul.request_timeout

    async def call(
        self,
        method: str,
        path: str,
        token: str | None,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
    ) -> Answer:
        headers = {"X-Consul-Token": token} if token else {}
        return await self.http.call(
            method,
            self.base + path,
            headers=headers,
            params=params,
            body=body,
            timeout=self.timeout,
        )


class VaultAPI:
    """Requests to ``[vault] address`` (TLS trusting ``[vault] ca_cert``)."""

    def __init__(self, http: DoctorHTTP, settings: Settings) -> None:
        assert settings.vault.address is not None
        self.http = http
        self.base = settings.vault.address.rstrip("/")
        self.timeout = settings.vault.timeout
        self.tls = tls_context(settings.vault.ca_cert) if self.base.startswith("https") else None

    async def call(self, method: str, path: str, token: str | None, *, body: Any = None) -> Answer:
        headers = {"X-Vault-Request": "true"}
        if token:
            headers["X-Vault-Token"] = token
        return await self.http.call(
            method,
            self.base + path,
            headers=headers,
            body=body,
            timeout=self.timeout,
            tls=self.tls,
        )
