"""The bastion's session with Vault/OpenBao: KV v2 reads and SSH signing
requests, made with a token :class:`VaultToken` keeps alive.

Everything runs on the event loop through :class:`VaultHTTP`, which turns
what goes wrong on the wire into SecretUnavailable or SigningFailed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from bastion.config import VaultSettings
from bastion.credentials.sshcert import check_key_id, check_principal
from bastion.credentials.vault_http import VaultAnswer, api_path
from bastion.credentials.vault_token import VaultToken
from bastion.errors import ConfigError, CredentialError, SecretUnavailable, SigningFailed

# the name operators' logging configuration and the tests know
log = logging.getLogger("bastion.credentials")


class VaultClient:
    """The bastion's session with Vault/OpenBao.

    Logs in with AppRole (role_id and secret_id read from mode-checked files)
    or uses a token file (re-read when Vault rejects the token, so a Vault
    Agent sink works). ``start()`` logs in and runs a task that renews the
    token at 2/3 of its lease and logs in again when renewal is refused or the
    token nears its max TTL. A request refused with 403 tells a policy denial
    from a dead token, and logs in again once for the latter.

    Nothing is taken from the environment (no ``VAULT_TOKEN``, proxies or
    netrc): an operator's shell must not decide which identity or which CA
    the bastion uses.
    """

    def __init__(self, settings: VaultSettings) -> None:
        assert settings.address is not None, "VaultClient is made only for [vault] address"
        self.address = settings.address.rstrip("/")
        self._auth = VaultToken(settings, self.address)
        self._http = self._auth.http
        self._closed = False

    async def reload_credentials(self) -> bool:
        """Re-read the AppRole files; log in again if they changed (SIGHUP)."""
        return await self._auth.reload_credentials()

    @property
    def token_ttl_left(self) -> float:
        """Seconds the bastion's Vault token has left (inf: never expires)."""
        return self._auth.ttl_left

    @property
    def auth_method(self) -> str:
        return self._auth.method

    @property
    def token_accessor(self) -> str:
        """The current token's accessor: names it in Vault's audit log and
        lets an operator revoke it, but cannot be used to authenticate."""
        return self._auth.accessor

    @property
    def logins(self) -> int:
        """Logins performed (for metrics and tests)."""
        return self._auth.logins

    @property
    def renewals(self) -> int:
        """Successful renewals (for metrics and tests)."""
        return self._auth.renewals

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("logged-in" if self._auth.token else "new")
        return f"VaultClient(address={self.address!r}, auth={self.auth_method}, {state})"

    async def start(self) -> None:
        """Log in (raising SecretUnavailable if that fails) and start renewing."""
        if self._closed:
            raise SecretUnavailable("Vault client is closed")
        await self._auth.start()

    async def aclose(self) -> None:
        """Stop renewing, revoke an AppRole token (best effort), close the session."""
        if self._closed:
            return
        self._closed = True
        await self._auth.aclose()

    async def read_kv(self, path: str) -> dict[str, str]:
        """The latest version of a KV v2 secret, ``path`` = ``<mount>/<secret path>``.

        ``secret/bastion/consul`` reads ``secret/data/bastion/consul``. A deleted
        or destroyed latest version counts as missing (Vault answers 404).
        """
        mount, _, sub = path.strip("/").partition("/")
        if not mount or not sub:
            raise ConfigError(f"Vault KV path {path!r}: expected <mount>/<path>")
        what = f"read of {mount}/{sub}"
        url = api_path("/v1/{mount}/data/{path}", mount=mount, path=sub)
        answer = await self._request("GET", url, what, SecretUnavailable)
        data = answer.section("data").get("data")
        if not isinstance(data, dict):
            raise SecretUnavailable(f"Vault returned no data for {mount}/{sub}")
        out: dict[str, str] = {}
        for key, value in data.items():
            if not isinstance(value, str):
                raise SecretUnavailable(
                    f"Vault secret {mount}/{sub}: field {key!r} is not a string"
                )
            out[str(key)] = value
        return out

    async def sign_ssh_key(
        self,
        mount: str,
        role: str,
        public_key_openssh: str,
        *,
        principal: str,
        key_id: str,
        ttl: int,
        critical_options: Mapping[str, str] | None = None,
    ) -> str:
        """Have the SSH secrets engine sign a user key; returns the OpenSSH
        certificate line (``ssh-ed25519-cert-v01@openssh.com AAAA...``).
        ``critical_options`` (``{"source-address": "10.0.0.5/32"}``) must be
        allowed by the role's ``allowed_critical_options``."""
        check_principal(principal)
        check_key_id(key_id)
        body: dict[str, object] = {
            "public_key": public_key_openssh,
            "ttl": f"{ttl}s",
            "valid_principals": principal,
            "cert_type": "user",
            "key_id": key_id,
        }
        if critical_options:
            body["critical_options"] = dict(critical_options)
        url = api_path("/v1/{mount}/sign/{role}", mount=mount, role=role)
        answer = await self._request(
            "POST", url, f"signing with {mount}/sign/{role}", SigningFailed, body
        )
        signed = answer.section("data").get("signed_key")
        if not isinstance(signed, str) or not signed:
            raise SigningFailed(
                "Vault returned no certificate",
                detail=f"{mount}/sign/{role}: no signed_key in the response",
            )
        return signed

    async def write(
        self, path: str, body: Mapping[str, object], what: str, *, accept: tuple[int, ...] = ()
    ) -> VaultAnswer:
        """``PUT /v1/<path>`` with ``body``: the answer when it succeeds or its
        status is in ``accept`` (the caller reads those, e.g. the TOTP engine's
        400 "code already used"); otherwise SecretUnavailable (sealed,
        unreachable, denied, not found)."""
        url = api_path("/v1/{path}", path=path)
        return await self._request("PUT", url, what, SecretUnavailable, body, accept=accept)

    async def _request(
        self,
        method: str,
        path: str,
        what: str,
        kind: type[CredentialError],
        body: Mapping[str, object] | None = None,
        *,
        accept: tuple[int, ...] = (),
    ) -> VaultAnswer:
        """A successful answer to ``method path`` (or one whose status is in
        ``accept``); on 403 tell a policy denial from a dead token, log in
        again once for the latter and retry."""
        if self._closed:
            raise SecretUnavailable("Vault client is closed")
        if self._auth.token is None:
            await self._auth.relogin(self._auth.generation)
        relogged = False
        while True:
            generation = self._auth.generation
            answer = await self._http.send(
                method, path, what=what, token=self._auth.token, body=body
            )
            if answer.ok or answer.status in accept:
                return answer
            if answer.status != 403:
                raise self._http.refusal(answer, what, kind)
            if not relogged and self._auth.generation != generation:
                # another task replaced the token while this call was in flight
                relogged = True
                continue
            if relogged or await self._auth.works():
                raise self._http.denied(answer, what)
            log.warning("vault: token rejected during %s; logging in again", what)
            await self._auth.relogin(generation)
            relogged = True
