"""The bastion's Vault/OpenBao token and its lifecycle: AppRole login (or a
token file), renewal at 2/3 of the lease, a new login when renewal is refused
or the token nears its max TTL, and revocation at close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from typing import Any

from bastion.config import VaultSettings
from bastion.credentials.secrets import Secret
from bastion.credentials.vault_http import VaultAnswer, VaultHTTP, api_path, tls_context
from bastion.errors import ConfigError, CredentialError, SecretUnavailable
from bastion.secretfiles import read_secret_file

# the name operators' logging configuration and the tests know
log = logging.getLogger("bastion.credentials")

# Token maintenance: renew at this fraction of the lease; on failure retry
# with exponential back-off (jittered) between these bounds.
_RENEW_FRACTION = 2 / 3
_BACKOFF_MIN = 1.0
_BACKOFF_MAX = 60.0

# statuses with which Vault refuses an AppRole login (bad or spent credentials)
_LOGIN_REFUSED = (400, 401, 403)
# statuses that say Vault itself is not serving (a fresh login would not help)
_NOT_SERVING = (501, 503)


class VaultToken:
    """The token the bastion's requests carry, kept alive.

    AppRole (role_id and secret_id read from mode-checked files), or a token
    file re-read at every login (so a Vault Agent sink works). Owns the
    :class:`VaultHTTP` adapter, whose error texts it scrubs of its secrets.
    ``generation`` grows with every new token, so that concurrent requests
    that saw the same dead token log in again only once.
    """

    def __init__(self, settings: VaultSettings, address: str) -> None:
        self._settings = settings
        self._address = address
        self._role_id: Secret | None = None
        self._secret_id: Secret | None = None
        if settings.role_id_file is not None and settings.secret_id_file is not None:
            self._role_id = Secret(read_secret_file(settings.role_id_file, "[vault] role_id_file"))
            self._secret_id = Secret(
                read_secret_file(settings.secret_id_file, "[vault] secret_id_file")
            )
        elif settings.token_file is not None:
            # read now so that a bad file fails at start-up, not at the first login
            read_secret_file(settings.token_file, "[vault] token_file")
        else:
            raise ConfigError(
                "[vault] needs role_id_file and secret_id_file (AppRole), or token_file"
            )
        self.http = VaultHTTP(address, settings.timeout, tls_context(settings.ca_cert), self.scrub)

        self.token: Secret | None = None
        self.generation = 0
        self._login_lease = 0  # seconds, as granted at login
        self._expires_at = 0.0  # time.monotonic() when the token's lease ends
        self._renewable = False
        self._renew_at = math.inf  # time.monotonic() deadline
        self._token_changed = asyncio.Event()
        self._login_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        #: the current token's accessor: names it in Vault's audit log and
        #: lets an operator revoke it, but cannot be used to authenticate
        self.accessor = ""
        #: logins performed (for metrics and tests)
        self.logins = 0
        #: successful renewals (for metrics and tests)
        self.renewals = 0

    @property
    def method(self) -> str:
        return "approle" if self._role_id is not None else "token_file"

    def __repr__(self) -> str:
        return f"VaultToken(auth={self.method}, logins={self.logins}, renewals={self.renewals})"

    def scrub(self, text: str) -> str:
        """Vault does not echo credentials, but an error text is never trusted to."""
        for secret in (self.token, self._secret_id, self._role_id):
            if secret is not None and secret.reveal() in text:
                text = text.replace(secret.reveal(), "***")
        return text

    async def start(self) -> None:
        """Log in (raising SecretUnavailable if that fails) and start renewing."""
        async with self._login_lock:
            await self._login()
        if self._task is None:
            self._task = asyncio.create_task(self._maintain(), name="vault-token-renewal")

    async def aclose(self) -> None:
        """Stop renewing, revoke an AppRole token (best effort), close the session."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.token is not None and self._role_id is not None:
            # a token nobody uses any more should not stay valid for its TTL;
            # a token_file token belongs to whoever wrote the file
            failed = ""
            try:
                answer = await self.http.send(
                    "POST", "/v1/auth/token/revoke-self", what="token revocation", token=self.token
                )
                failed = "" if answer.ok else f"HTTP {answer.status}"
            except CredentialError as exc:
                failed = type(exc).__name__
            if failed:
                log.debug("vault: revoking the token on close failed: %s", failed)
        self.token = None
        await self.http.aclose()

    async def reload_credentials(self) -> bool:
        """Read the AppRole files again (a rotated secret_id); log in with them
        when they changed. True when they had. Raises ConfigError for a file
        that is unreadable or too open, CredentialError if Vault refuses."""
        if self._settings.role_id_file is None or self._settings.secret_id_file is None:
            return False
        role_id = Secret(read_secret_file(self._settings.role_id_file, "[vault] role_id_file"))
        secret_id = Secret(
            read_secret_file(self._settings.secret_id_file, "[vault] secret_id_file")
        )
        if role_id == self._role_id and secret_id == self._secret_id:
            return False
        self._role_id, self._secret_id = role_id, secret_id
        await self.relogin(self.generation)
        return True

    async def relogin(self, seen_generation: int) -> None:
        """A new token, unless another task replaced ``seen_generation``'s already."""
        async with self._login_lock:
            if self.generation != seen_generation and self.token is not None:
                return  # another task logged in while this one waited
            await self._login()

    async def works(self) -> bool:
        """Whether the current token is still accepted (then a 403 was policy)."""
        answer = await self._lookup_self(self.token)
        if answer.status == 403:
            return False
        if not answer.ok:
            raise self.http.refusal(answer, "token lookup", SecretUnavailable)
        return True

    async def _lookup_self(self, token: Secret | None) -> VaultAnswer:
        return await self.http.send(
            "GET", "/v1/auth/token/lookup-self", what="token lookup", token=token
        )

    async def _login(self) -> None:
        """A new token: AppRole login, or the token file read again. Caller holds the lock."""
        if self._role_id is not None and self._secret_id is not None:
            mount = self._settings.approle_mount
            answer = await self.http.send(
                "POST",
                api_path("/v1/auth/{mount}/login", mount=mount),
                what="AppRole login",
                token=None,
                body={"role_id": self._role_id.reveal(), "secret_id": self._secret_id.reveal()},
            )
            if answer.status in _LOGIN_REFUSED:
                text = self.scrub(answer.errors)
                raise SecretUnavailable(
                    f"Vault AppRole login failed: {text}",
                    detail=f"AppRole login at {self._address} (auth/{mount}) failed: {text}; "
                    "check role_id_file/secret_id_file (the secret id may have been "
                    "destroyed or expired)",
                )
            if not answer.ok:
                raise self.http.refusal(answer, "AppRole login", SecretUnavailable)
            auth = answer.section("auth")
            token = auth.get("client_token")
            if not isinstance(token, str):
                raise SecretUnavailable("Vault AppRole login returned no token")
            self._install(
                Secret(token),
                int(auth.get("lease_duration") or 0),
                bool(auth.get("renewable")),
                str(auth.get("accessor") or ""),
            )
            log.info(
                "vault: logged in with AppRole (token ttl %ss, accessor %s)",
                self._login_lease,
                self.accessor,
            )
        else:
            assert self._settings.token_file is not None
            file_token = Secret(read_secret_file(self._settings.token_file, "[vault] token_file"))
            answer = await self._lookup_self(file_token)
            if answer.status == 403:
                raise SecretUnavailable(
                    "Vault rejected the bastion's token",
                    detail=f"the token in {self._settings.token_file} is invalid, "
                    "expired or revoked",
                )
            if not answer.ok:
                raise self.http.refusal(answer, "token lookup", SecretUnavailable)
            data = answer.section("data")
            self._install(
                file_token,
                int(data.get("ttl") or 0),
                bool(data.get("renewable")),
                str(data.get("accessor") or ""),
            )
            log.info(
                "vault: using the token from %s (ttl %ss)",
                self._settings.token_file,
                self._login_lease,
            )

    def _install(self, token: Secret, lease: int, renewable: bool, accessor: str) -> None:
        self.token = token
        self.accessor = accessor
        self.generation += 1
        self.logins += 1
        self._login_lease = lease
        self._renewable = renewable
        self._schedule(lease)

    @property
    def ttl_left(self) -> float:
        """Seconds the current token has left (inf for one that never expires)."""
        if self._login_lease <= 0:
            return math.inf
        return max(0.0, self._expires_at - time.monotonic())

    def _schedule(self, lease: int) -> None:
        self._expires_at = time.monotonic() + lease
        # lease 0 means a token that never expires (e.g. a root token)
        self._renew_at = (time.monotonic() + lease * _RENEW_FRACTION) if lease > 0 else math.inf
        self._token_changed.set()

    async def _refresh(self) -> None:
        """Renew the token, or log in again when renewal cannot keep it alive."""
        generation = self.generation
        if not self._renewable:
            await self.relogin(generation)
            return
        answer = await self.http.send(
            "POST", "/v1/auth/token/renew-self", what="token renewal", token=self.token, body={}
        )
        if not answer.ok:
            # Vault answered but will not renew: 403 when the token was revoked
            # or expired, 500 "past the max TTL, cannot renew". A fresh login
            # is the cure; a sealed Vault is not, and waits for the back-off.
            if self._role_id is None or answer.status in _NOT_SERVING:
                raise self.http.refusal(answer, "token renewal", SecretUnavailable)
            log.info(
                "vault: token renewal refused (%s); logging in again", self.scrub(answer.errors)
            )
            await self.relogin(generation)
            return
        lease = int(answer.section("auth").get("lease_duration") or 0)
        warnings: Any = answer.body.get("warnings") if isinstance(answer.body, dict) else None
        capped = any("capped" in str(w) for w in warnings or ())
        self.renewals += 1
        if self._role_id is not None and (capped or lease < self._login_lease * 0.9):
            # Vault capped the renewal at the token's max TTL: it dies at the
            # end of this lease whatever we do, so take a new one now
            log.info("vault: token reached its max ttl (%ss left); logging in again", lease)
            await self.relogin(generation)
            return
        log.debug("vault: token renewed (ttl %ss)", lease)
        self._schedule(lease)

    async def _maintain(self) -> None:
        backoff = _BACKOFF_MIN
        while True:
            delay = self._renew_at - time.monotonic()
            if delay > 0:
                self._token_changed.clear()
                # wake early when a request-triggered login replaced the token
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._token_changed.wait(), None if math.isinf(delay) else delay
                    )
                continue
            try:
                await self._refresh()
                backoff = _BACKOFF_MIN
            except CredentialError as exc:
                log.warning(
                    "vault: token refresh failed: %s; retrying in %.0fs",
                    self.scrub(exc.detail),
                    backoff,
                )
                self._renew_at = time.monotonic() + backoff * random.uniform(0.8, 1.2)
                backoff = min(backoff * 2, _BACKOFF_MAX)
            except Exception:
                # this task must outlive any surprise, or the token silently dies
                log.exception(
                    "vault: unexpected error in token renewal; retrying in %.0fs", backoff
                )
                self._renew_at = time.monotonic() + backoff * random.uniform(0.8, 1.2)
                backoff = min(backoff * 2, _BACKOFF_MAX)
