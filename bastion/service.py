"""The bastion's own service in Consul: maintenance mode for a drain.

A drain first takes the bastion out of Consul, so that
``ssh-bastion.service.consul`` and the catalog's passing list stop naming it,
and only then stops accepting: people who resolve "the bastion" reach
another one, nobody is refused.

It uses the bastion's own token, whose policy (``acl-policies/bastion.hcl``,
``service "ssh-bastion" write``) allows exactly this: maintenance of its own
service through the local agent (``PUT /v1/agent/service/maintenance/<id>``,
https://developer.hashicorp.com/consul/api-docs/agent/service), not of other
services or the node. Errors become :class:`ServiceUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse

import aiohttp

from bastion.addresses import consul_base_url
from bastion.errors import BastionError

log = logging.getLogger("bastion.service")


class ServiceUnavailable(BastionError):
    """The local agent did not do what was asked of the bastion's service."""

    reason = "consul-service"


class OwnService:
    """Maintenance mode and health of one service instance on the local agent."""

    def __init__(self, address: str, token: str, service_name: str, service_id: str) -> None:
        self._base = consul_base_url(address)
        self._headers = {"X-Consul-Token": token}
        self.name = service_name
        self.id = service_id

    def set_token(self, token: str) -> None:
        """Use ``token`` from now on (a rotated token file, SIGHUP)."""
        self._headers = {"X-Consul-Token": token}

    async def _call(
        self, method: str, path: str, params: dict[str, str], timeout: float = 5.0
    ) -> tuple[int, object]:
        try:
            async with (
                aiohttp.ClientSession(
                    trust_env=False, timeout=aiohttp.ClientTimeout(total=timeout)
                ) as session,
                session.request(
                    method, self._base + path, params=params, headers=self._headers
                ) as resp,
            ):
                body: object = None
                if resp.content_type == "application/json":
                    body = await resp.json()
                else:
                    body = (await resp.text())[:200]
                return resp.status, body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ServiceUnavailable(f"consul {self._base}: {type(exc).__name__}: {exc}") from None

    async def maintenance(self, enable: bool, reason: str = "drain") -> bool:
        """Put the service into (or take it out of) maintenance mode. False when
        the agent has no such service (not registered: nothing to take out)."""
        path = "/v1/agent/service/maintenance/" + urllib.parse.quote(self.id, safe="")
        params = {"enable": "true" if enable else "false", "reason": reason}
        status, body = await self._call("PUT", path, params)
        # Consul 1.8 answers an unregistered service ID with 500 "Unknown
        # service" (newer versions with 404): not registered yet, not a failure
        if status == 404 or (status == 500 and "Unknown service" in str(body)):
            return False
        if status != 200:
            raise ServiceUnavailable(f"maintenance mode for {self.id}: HTTP {status} {body}")
        return True

    async def passing(self) -> bool:
        """Whether the catalog's passing list (what DNS answers) names this instance."""
        path = "/v1/health/service/" + urllib.parse.quote(self.name, safe="")
        status, body = await self._call("GET", path, {"passing": "1"})
        if status != 200 or not isinstance(body, list):
            raise ServiceUnavailable(f"health of {self.name}: HTTP {status}")
        return any(
            isinstance(entry, dict) and (entry.get("Service") or {}).get("ID") == self.id
            for entry in body
        )

    async def leave(self, timeout: float = 30.0) -> float | None:
        """Maintenance mode on, then wait until Consul no longer lists this
        instance as passing; seconds it took, or None when not registered."""
        started = time.monotonic()
        if not await self.maintenance(True, "bastion draining"):
            return None
        deadline = started + timeout
        while time.monotonic() < deadline:
            if not await self.passing():
                return time.monotonic() - started
            await asyncio.sleep(0.1)
        raise ServiceUnavailable(f"{self.id} still passing in Consul after {timeout:g} s")
