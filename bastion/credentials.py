"""Credentials for the upstream leg: one fresh key and one short-lived SSH user
certificate per login, and the Vault/OpenBao client that signs them.

The bastion never holds a user's private key. After it has authenticated a
person it asks a :class:`CertificateSigner` for an :class:`UpstreamCredential`
(a new ed25519 key plus a certificate naming exactly one principal, valid for
minutes) and logs in to the routed host with it; the hosts trust the CA
(``TrustedUserCAKeys``). Two signers exist:

* :class:`VaultCertificateSigner`: the CA key stays in Vault/OpenBao's SSH
  secrets engine; :class:`VaultClient` logs in with AppRole, keeps its token
  renewed, and is the one place hvac, requests and aiohttp exceptions become
  :class:`~bastion.errors.SigningFailed` or
  :class:`~bastion.errors.SecretUnavailable`.
* :class:`LocalCASigner`: a CA private key file, for deployments without Vault.

Secrets held in memory are :class:`Secret` values, whose ``repr`` is redacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import secrets
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
import asyncssh
import hvac.adapters
import hvac.api
import hvac.exceptions
import hvac.utils
import requests
import requests.adapters
import requests.utils

from bastion.config import Settings, VaultSettings, read_secret_file
from bastion.errors import ConfigError, CredentialError, SecretUnavailable, SigningFailed

log = logging.getLogger(__name__)

T = TypeVar("T")

# OpenSSH and Vault both backdate certificates this much to absorb clock skew.
BACKDATE_SECONDS = 30
# Extensions every upstream certificate carries; X11 forwarding is left out.
CERT_EXTENSIONS = (
    "permit-pty",
    "permit-user-rc",
    "permit-agent-forwarding",
    "permit-port-forwarding",
)
_EPHEMERAL_KEY_ALG = "ssh-ed25519"
_CERT_TYPE_USER = 1

# what the HTTP clients raise when a request got no answer from Vault
# (connection refused, DNS, TLS, timeouts, a connection cut mid-answer)
_NO_ANSWER = (requests.RequestException, aiohttp.ClientError, TimeoutError)

# Token maintenance: renew at this fraction of the lease; on failure retry
# with exponential back-off (jittered) between these bounds.
_RENEW_FRACTION = 2 / 3
_BACKOFF_MIN = 1.0
_BACKOFF_MAX = 60.0


class Secret:
    """A secret string that does not show itself in ``repr``, ``str`` or logs.

    ``reveal()`` is the one way to the value; grep for it to audit every use.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return secrets.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class UpstreamCredential:
    """A one-login credential for the upstream host.

    Use as ``asyncssh.connect(..., client_keys=[(cred.private_key,
    cred.certificate)])``. ``valid_before`` is the certificate's expiry (unix
    time); the credential is worthless afterwards and is never stored.
    """

    private_key: asyncssh.SSHKey = field(repr=False)
    certificate: asyncssh.SSHCertificate = field(repr=False)
    principal: str
    key_id: str
    valid_before: int


class CertificateSigner(Protocol):
    """Mints an :class:`UpstreamCredential` for one login."""

    async def issue(self, principal: str, key_id: str) -> UpstreamCredential:
        """A fresh key and a user certificate valid for ``principal`` only.

        Raises SigningFailed (the CA refused) or SecretUnavailable (Vault is
        sealed, unreachable or will not let the bastion in).
        """
        ...

    async def aclose(self) -> None:
        """Release what the signer owns (not a VaultClient it was given)."""
        ...


def _check_principal(principal: str) -> None:
    # Vault's valid_principals is a comma-separated list: "alice,root" would
    # mint a root certificate. Whitespace and control characters have no
    # business in a login name either.
    if (
        not principal
        or len(principal) > 256
        or "," in principal
        or any(c.isspace() or not c.isprintable() for c in principal)
    ):
        raise SigningFailed(
            "invalid login name for the upstream certificate",
            detail=f"refusing to sign for principal {principal!r}",
        )


def _check_key_id(key_id: str) -> None:
    # the key id lands in sshd's log lines: keep them one printable line
    if not key_id or len(key_id) > 512 or not key_id.isprintable():
        raise SigningFailed(
            "invalid certificate key id", detail=f"refusing to sign with key id {key_id!r}"
        )


def _new_ephemeral_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key(_EPHEMERAL_KEY_ALG)


@dataclass(frozen=True)
class _CertFields:
    public_key: bytes
    cert_type: int
    key_id: str
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int


def _parse_ed25519_cert(blob: bytes) -> _CertFields:
    """Decode the fields of an ``ssh-ed25519-cert-v01@openssh.com`` blob.

    asyncssh keeps key id and validity private; the wire format (PROTOCOL.certkeys)
    is short enough to read here, and checking what Vault returned is worth it.
    """
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(blob):
            raise ValueError("truncated certificate")
        chunk = blob[pos : pos + n]
        pos += n
        return chunk

    def string() -> bytes:
        (length,) = struct.unpack(">I", take(4))
        return take(length)

    def uint32() -> int:
        return int(struct.unpack(">I", take(4))[0])

    def uint64() -> int:
        return int(struct.unpack(">Q", take(8))[0])

    if string() != b"ssh-ed25519-cert-v01@openssh.com":
        raise ValueError("not an ed25519 certificate")
    string()  # nonce
    public_key = string()
    uint64()  # serial
    cert_type = uint32()
    key_id = string().decode()
    packed = string()
    principals: list[str] = []
    inner = 0
    while inner < len(packed):
        (length,) = struct.unpack(">I", packed[inner : inner + 4])
        principals.append(packed[inner + 4 : inner + 4 + length].decode())
        inner += 4 + length
    valid_after = uint64()
    valid_before = uint64()
    return _CertFields(public_key, cert_type, key_id, tuple(principals), valid_after, valid_before)


# --------------------------------------------------------------------------
# local CA


class LocalCASigner:
    """Signs with a CA private key file (OpenSSH format; ed25519, RSA or ECDSA).

    The key is read once, at construction: a missing, world-readable or
    garbled file is a ConfigError naming it, not a failure at the first login.
    Issuing is pure CPU and takes well under a millisecond.
    """

    def __init__(self, ca_key_file: Path, ttl: int) -> None:
        what = "[upstream] ca_key"
        text = read_secret_file(ca_key_file, what)
        try:
            self._ca = asyncssh.import_private_key(text)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise ConfigError(
                f"{what}: {ca_key_file} is not a usable OpenSSH private key ({exc})"
            ) from None
        if ttl <= 0:
            raise ConfigError(f"{what}: certificate ttl must be positive, got {ttl}")
        self.ca_key_file = ca_key_file
        self.ttl = ttl

    def __repr__(self) -> str:
        return f"LocalCASigner(ca_key_file={str(self.ca_key_file)!r}, ttl={self.ttl})"

    async def issue(self, principal: str, key_id: str) -> UpstreamCredential:
        _check_principal(principal)
        _check_key_id(key_id)
        key = _new_ephemeral_key()
        now = int(time.time())
        valid_before = now + self.ttl
        cert = self._ca.generate_user_certificate(
            key,
            key_id,
            # a random serial ties sshd's "Accepted certificate ID ... serial N" to one login
            serial=secrets.randbits(63),
            principals=[principal],
            valid_after=now - BACKDATE_SECONDS,
            valid_before=valid_before,
            permit_x11_forwarding=False,
            permit_agent_forwarding=True,
            permit_port_forwarding=True,
            permit_pty=True,
            permit_user_rc=True,
        )
        return UpstreamCredential(
            private_key=key,
            certificate=cert,
            principal=principal,
            key_id=key_id,
            valid_before=valid_before,
        )

    async def aclose(self) -> None:
        return None


# --------------------------------------------------------------------------
# Vault / OpenBao


def _vault_errors(exc: hvac.exceptions.VaultError) -> str:
    """Vault's error texts on one line (``1 error occurred:\n\t* permission
    denied\n\n`` becomes ``permission denied``)."""
    errors = getattr(exc, "errors", None)
    if not isinstance(errors, list) or not errors:
        errors = [exc.args[0]] if exc.args and exc.args[0] else [type(exc).__name__]
    items: list[str] = []
    for error in errors:
        text = str(error)
        bullets = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("* ")]
        items.extend(bullets or [" ".join(text.split())])
    return "; ".join(items)


class VaultClient:
    """The bastion's session with Vault/OpenBao.

    Logs in with AppRole (role_id and secret_id read from mode-checked files)
    or uses a token file (re-read when Vault rejects the token, so a Vault
    Agent sink works). ``start()`` logs in and runs a task that renews the
    token at 2/3 of its lease and logs in again when renewal is refused or the
    token nears its max TTL. hvac calls (login, renewal, KV) run in a worker
    thread; the per-login signing request goes out on the event loop through
    aiohttp instead (profiled: requests plus the thread hop cost ~2 ms of CPU
    per login), and its errors are raised as the same hvac exceptions.

    Nothing is taken from the environment: hvac.Client would fall back to
    ``VAULT_TOKEN``/``~/.vault-token`` and ``VAULT_CLIENT_CERT``, and requests
    to ``*_PROXY``, ``REQUESTS_CA_BUNDLE`` and ``~/.netrc``; an operator's shell
    must not decide which identity or which CA the bastion uses. So the hvac
    adapter is built by hand with explicit url, token, cert and verify, on a
    session with ``trust_env = False``; the aiohttp session likewise (no
    proxies, no netrc) and trusts the same CAs as requests would.
    """

    def __init__(self, settings: VaultSettings) -> None:
        if settings.address is None:
            raise ConfigError("[vault] address is not set")
        self.address = settings.address.rstrip("/")
        self._settings = settings
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
        verify: bool | str = True
        if settings.ca_cert is not None:
            if not settings.ca_cert.is_file():
                raise ConfigError(f"[vault] ca_cert: {settings.ca_cert} is not a file")
            verify = str(settings.ca_cert)

        session = requests.Session()
        session.trust_env = False
        session.verify = verify
        # asyncio.to_thread runs up to 32 calls at once; requests' default pool
        # keeps 10 connections and would drop the rest (with a warning) under a
        # burst of logins
        pool = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=32)
        session.mount("http://", pool)
        session.mount("https://", pool)
        self._session = session
        # the CAs requests trusts (the given file, else its bundle), for aiohttp too
        cafile = verify if isinstance(verify, str) else requests.utils.DEFAULT_CA_BUNDLE_PATH
        try:
            self._tls = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"[vault] ca_cert: cannot load {cafile}: {exc}") from None
        self._http: aiohttp.ClientSession | None = None  # made on the loop, at first use
        self._adapter = hvac.adapters.JSONAdapter(
            base_uri=self.address,
            token=None,
            cert=None,
            verify=verify,
            timeout=settings.timeout,
            session=session,
        )
        self._auth = hvac.api.AuthMethods(adapter=self._adapter)
        self._secrets = hvac.api.SecretsEngines(adapter=self._adapter)

        self._token: Secret | None = None
        self._generation = 0  # bumped on every new token; dedupes concurrent re-logins
        self._login_lease = 0  # seconds, as granted at login
        self._renewable = False
        self._renew_at = math.inf  # time.monotonic() deadline
        self._token_changed = asyncio.Event()
        self._login_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: the current token's accessor: names it in Vault's audit log and
        #: lets an operator revoke it, but cannot be used to authenticate
        self.token_accessor = ""
        #: logins performed (for metrics and tests)
        self.logins = 0
        #: successful renewals (for metrics and tests)
        self.renewals = 0

    @property
    def auth_method(self) -> str:
        return "approle" if self._role_id is not None else "token_file"

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("logged-in" if self._token else "new")
        return f"VaultClient(address={self.address!r}, auth={self.auth_method}, {state})"

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Log in (raising SecretUnavailable if that fails) and start renewing."""
        if self._closed:
            raise SecretUnavailable("Vault client is closed")
        async with self._login_lock:
            await self._login()
        if self._task is None:
            self._task = asyncio.create_task(self._maintain(), name="vault-token-renewal")

    async def aclose(self) -> None:
        """Stop renewing, revoke an AppRole token (best effort), close the session."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._token is not None and self._role_id is not None:
            # a token nobody uses any more should not stay valid for its TTL;
            # a token_file token belongs to whoever wrote the file
            try:
                await asyncio.to_thread(self._auth.token.revoke_self)
            except (hvac.exceptions.VaultError, requests.RequestException) as exc:
                log.debug("vault: revoking the token on close failed: %s", type(exc).__name__)
        self._token = None
        self._adapter.token = None
        self._session.close()
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- public operations ---------------------------------------------------

    async def read_kv(self, path: str) -> dict[str, str]:
        """The latest version of a KV v2 secret, ``path`` = ``<mount>/<secret path>``.

        ``secret/bastion/consul`` reads ``secret/data/bastion/consul``. A deleted
        or destroyed latest version counts as missing.
        """
        mount, _, sub = path.strip("/").partition("/")
        if not mount or not sub:
            raise ConfigError(f"Vault KV path {path!r}: expected <mount>/<path>")
        what = f"read of {mount}/{sub}"

        def call() -> Awaitable[Any]:
            return asyncio.to_thread(
                self._secrets.kv.v2.read_secret_version,
                path=sub,
                mount_point=mount,
                raise_on_deleted_version=True,
            )

        resp = await self._request(what, call, SecretUnavailable)
        data = resp.get("data", {}).get("data") if isinstance(resp, dict) else None
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
    ) -> str:
        """Have the SSH secrets engine sign a user key; returns the OpenSSH
        certificate line (``ssh-ed25519-cert-v01@openssh.com AAAA...``)."""
        _check_principal(principal)
        _check_key_id(key_id)

        path = hvac.utils.format_url("/v1/{mount}/sign/{role}", mount=mount, role=role)
        body = {
            "public_key": public_key_openssh,
            "ttl": f"{ttl}s",
            "valid_principals": principal,
            "cert_type": "user",
            "key_id": key_id,
        }

        def call() -> Awaitable[Any]:
            return self._post(path, body)

        resp = await self._request(f"signing with {mount}/sign/{role}", call, SigningFailed)
        signed = resp.get("data", {}).get("signed_key") if isinstance(resp, dict) else None
        if not isinstance(signed, str) or not signed:
            raise SigningFailed(
                "Vault returned no certificate",
                detail=f"{mount}/sign/{role}: no signed_key in the response",
            )
        return signed

    # -- requests, with the one place exceptions are mapped -------------------

    async def _post(self, path: str, body: dict[str, str]) -> Any:
        """POST ``body`` as JSON on the event loop; the decoded answer (None
        when it is not JSON). An error status raises the hvac exception that
        hvac's own adapter would (the same ``raise_for_error``)."""
        if self._http is None:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=32, ssl=self._tls),
                timeout=aiohttp.ClientTimeout(total=self._settings.timeout),
                trust_env=False,
            )
        headers = {"X-Vault-Request": "true"}
        if self._token is not None:
            headers["X-Vault-Token"] = self._token.reveal()
        url = self.address + path
        # redirects are followed, as hvac's adapter does (a standby Vault may
        # send the client to the active node with a 307)
        async with self._http.post(url, json=body, headers=headers) as resp:
            text = await resp.text()
            decoded: Any = None
            with contextlib.suppress(ValueError):
                decoded = json.loads(text) if text else None
            if resp.status >= 400:
                errors = decoded.get("errors") if isinstance(decoded, dict) else None
                hvac.utils.raise_for_error(
                    "post",
                    url,
                    resp.status,
                    None if errors is not None else text,
                    errors=errors,
                    text=text,
                    json=decoded,
                )
            return decoded

    async def _request(
        self, what: str, call: Callable[[], Awaitable[T]], kind: type[CredentialError]
    ) -> T:
        """Await ``call()``; on 403 tell a policy denial from a dead token, log
        in again once for the latter and retry."""
        if self._closed:
            raise SecretUnavailable("Vault client is closed")
        if self._token is None:
            await self._relogin(self._generation)
        relogged = False
        while True:
            generation = self._generation
            try:
                return await call()
            except hvac.exceptions.Forbidden as exc:
                if not relogged and self._generation != generation:
                    # another task replaced the token while this call was in flight
                    relogged = True
                    continue
                if relogged or await self._token_works():
                    raise SecretUnavailable(
                        f"Vault denied {what}: permission denied",
                        detail=f"Vault denied {what}: {self._scrub(_vault_errors(exc))} "
                        f"(the policy of the bastion's token does not allow it)",
                    ) from exc
                log.warning("vault: token rejected during %s; logging in again", what)
                await self._relogin(generation)
                relogged = True
            except (hvac.exceptions.VaultError, *_NO_ANSWER) as exc:
                raise self._translate(exc, what, kind) from exc

    def _translate(self, exc: Exception, what: str, kind: type[CredentialError]) -> CredentialError:
        if isinstance(exc, hvac.exceptions.VaultDown):
            text = self._scrub(_vault_errors(exc))
            if "sealed" in text.lower():
                return SecretUnavailable(
                    "Vault is sealed", detail=f"Vault at {self.address} is sealed ({what})"
                )
            return SecretUnavailable(
                "Vault is unavailable", detail=f"Vault at {self.address}: {text} ({what})"
            )
        if isinstance(exc, _NO_ANSWER):
            # connection refused, DNS, TLS, timeouts: the request never got an answer
            return SecretUnavailable(
                "Vault unreachable",
                detail=f"Vault unreachable at {self.address} during {what}: {type(exc).__name__}",
            )
        text = self._scrub(_vault_errors(exc))
        if isinstance(exc, hvac.exceptions.VaultNotInitialized):
            return SecretUnavailable(
                "Vault is not initialized", detail=f"Vault at {self.address}: {text}"
            )
        if isinstance(exc, hvac.exceptions.InvalidPath):
            return kind(
                f"Vault: {what}: not found", detail=f"{what}: {text} (mount, role or path missing)"
            )
        return kind(f"Vault: {what} failed: {text}", detail=f"{what}: {text}")

    def _scrub(self, text: str) -> str:
        """Vault does not echo credentials, but an error text is never trusted to."""
        for secret in (self._token, self._secret_id, self._role_id):
            if secret is not None and secret.reveal() in text:
                text = text.replace(secret.reveal(), "***")
        return text

    async def _token_works(self) -> bool:
        """Whether the current token is still accepted (then a 403 was policy)."""
        try:
            await asyncio.to_thread(self._auth.token.lookup_self)
        except hvac.exceptions.Forbidden:
            return False
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise self._translate(exc, "token lookup", SecretUnavailable) from exc
        return True

    # -- login and renewal ---------------------------------------------------

    async def _relogin(self, seen_generation: int) -> None:
        async with self._login_lock:
            if self._generation != seen_generation and self._token is not None:
                return  # another task logged in while this one waited
            await self._login()

    async def _login(self) -> None:
        """A new token: AppRole login, or the token file read again. Caller holds the lock."""
        if self._role_id is not None and self._secret_id is not None:
            role_id, secret_id = self._role_id.reveal(), self._secret_id.reveal()
            mount = self._settings.approle_mount
            try:
                resp = await asyncio.to_thread(
                    self._auth.approle.login,
                    role_id=role_id,
                    secret_id=secret_id,
                    use_token=False,
                    mount_point=mount,
                )
            except (
                hvac.exceptions.Forbidden,
                hvac.exceptions.InvalidRequest,
                hvac.exceptions.Unauthorized,
            ) as exc:
                text = self._scrub(_vault_errors(exc))
                raise SecretUnavailable(
                    f"Vault AppRole login failed: {text}",
                    detail=f"AppRole login at {self.address} (auth/{mount}) failed: {text}; "
                    "check role_id_file/secret_id_file (the secret id may have been "
                    "destroyed or expired)",
                ) from exc
            except (hvac.exceptions.VaultError, requests.RequestException) as exc:
                raise self._translate(exc, "AppRole login", SecretUnavailable) from exc
            auth = resp.get("auth") if isinstance(resp, dict) else None
            if not isinstance(auth, dict) or not isinstance(auth.get("client_token"), str):
                raise SecretUnavailable("Vault AppRole login returned no token")
            self._install(
                Secret(auth["client_token"]),
                int(auth.get("lease_duration") or 0),
                bool(auth.get("renewable")),
                str(auth.get("accessor") or ""),
            )
            log.info(
                "vault: logged in with AppRole (token ttl %ss, accessor %s)",
                self._login_lease,
                self.token_accessor,
            )
        else:
            assert self._settings.token_file is not None
            token = Secret(read_secret_file(self._settings.token_file, "[vault] token_file"))
            self._adapter.token = token.reveal()
            try:
                resp = await asyncio.to_thread(self._auth.token.lookup_self)
            except hvac.exceptions.Forbidden as exc:
                raise SecretUnavailable(
                    "Vault rejected the bastion's token",
                    detail=f"the token in {self._settings.token_file} is invalid, "
                    "expired or revoked",
                ) from exc
            except (hvac.exceptions.VaultError, requests.RequestException) as exc:
                raise self._translate(exc, "token lookup", SecretUnavailable) from exc
            data = resp.get("data") if isinstance(resp, dict) else None
            data = data if isinstance(data, dict) else {}
            self._install(
                token,
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
        self._token = token
        self.token_accessor = accessor
        self._adapter.token = token.reveal()
        self._generation += 1
        self.logins += 1
        self._login_lease = lease
        self._renewable = renewable
        self._schedule(lease)

    def _schedule(self, lease: int) -> None:
        # lease 0 means a token that never expires (e.g. a root token)
        self._renew_at = (time.monotonic() + lease * _RENEW_FRACTION) if lease > 0 else math.inf
        self._token_changed.set()

    async def _refresh(self) -> None:
        """Renew the token, or log in again when renewal cannot keep it alive."""
        generation = self._generation
        if not self._renewable:
            await self._relogin(generation)
            return
        try:
            resp = await asyncio.to_thread(self._auth.token.renew_self)
        except hvac.exceptions.VaultError as exc:
            # Vault answered but will not renew: 403 when the token was revoked
            # or expired, 500 "past the max TTL, cannot renew". A fresh login
            # is the cure; a sealed Vault is not, and waits for the back-off.
            unavailable = (hvac.exceptions.VaultDown, hvac.exceptions.VaultNotInitialized)
            if self._role_id is None or isinstance(exc, unavailable):
                raise self._translate(exc, "token renewal", SecretUnavailable) from exc
            log.info(
                "vault: token renewal refused (%s); logging in again",
                self._scrub(_vault_errors(exc)),
            )
            await self._relogin(generation)
            return
        except requests.RequestException as exc:
            raise self._translate(exc, "token renewal", SecretUnavailable) from exc
        auth = resp.get("auth") if isinstance(resp, dict) else None
        lease = int(auth.get("lease_duration") or 0) if isinstance(auth, dict) else 0
        warnings = resp.get("warnings") if isinstance(resp, dict) else None
        capped = any("capped" in str(w) for w in warnings or ())
        self.renewals += 1
        if self._role_id is not None and (capped or lease < self._login_lease * 0.9):
            # Vault capped the renewal at the token's max TTL: it dies at the
            # end of this lease whatever we do, so take a new one now
            log.info("vault: token reached its max ttl (%ss left); logging in again", lease)
            await self._relogin(generation)
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
                    self._scrub(exc.detail),
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


class VaultCertificateSigner:
    """Signs with the Vault/OpenBao SSH secrets engine (``<mount>/sign/<role>``).

    The role must allow user certificates and user key ids, and its max_ttl
    must be at least ``ttl``: Vault refuses a longer ttl rather than clamping.
    The VaultClient is shared (the bastion also reads KV through it) and is
    not closed by :meth:`aclose`.
    """

    def __init__(self, client: VaultClient, mount: str, role: str, ttl: int) -> None:
        if ttl <= 0:
            raise ConfigError(f"certificate ttl must be positive, got {ttl}")
        self.client = client
        self.mount = mount
        self.role = role
        self.ttl = ttl

    def __repr__(self) -> str:
        return (
            f"VaultCertificateSigner({self.client!r}, mount={self.mount!r}, "
            f"role={self.role!r}, ttl={self.ttl})"
        )

    async def issue(self, principal: str, key_id: str) -> UpstreamCredential:
        key = _new_ephemeral_key()
        public_line = key.export_public_key("openssh").decode().strip()
        signed = await self.client.sign_ssh_key(
            self.mount, self.role, public_line, principal=principal, key_id=key_id, ttl=self.ttl
        )
        where = f"{self.mount}/sign/{self.role}"
        try:
            cert = asyncssh.import_certificate(signed)
            fields = _parse_ed25519_cert(cert.public_data)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise SigningFailed(
                "Vault returned an unreadable certificate", detail=f"{where}: {exc}"
            ) from exc
        # trust, but verify: a misconfigured role must not widen what the bastion asked for
        expected_key = key.convert_to_public().public_data
        if (
            fields.public_key != _parse_ed25519_key(expected_key)
            or fields.cert_type != _CERT_TYPE_USER
            or fields.principals != (principal,)
        ):
            raise SigningFailed(
                "Vault returned a certificate that does not match the request",
                detail=f"{where}: got type {fields.cert_type}, "
                f"principals {list(fields.principals)}",
            )
        return UpstreamCredential(
            private_key=key,
            certificate=cert,
            principal=principal,
            key_id=fields.key_id,
            valid_before=fields.valid_before,
        )

    async def aclose(self) -> None:
        return None


def _parse_ed25519_key(public_data: bytes) -> bytes:
    """The raw 32 bytes of an ``ssh-ed25519`` public key blob."""
    (alg_len,) = struct.unpack(">I", public_data[:4])
    rest = public_data[4 + alg_len :]
    (key_len,) = struct.unpack(">I", rest[:4])
    return rest[4 : 4 + key_len]


def build_signer(settings: Settings, vault: VaultClient | None) -> CertificateSigner:
    """Vault's SSH engine when ``[vault]`` is configured, else the local CA key."""
    if settings.vault.enabled:
        if vault is None:
            raise ConfigError("[vault] is configured but no Vault client was set up")
        return VaultCertificateSigner(
            vault, settings.vault.ssh_mount, settings.vault.ssh_role, settings.upstream.cert_ttl
        )
    if settings.upstream.ca_key is None:
        raise ConfigError("[upstream] ca_key is required when [vault] is not configured")
    return LocalCASigner(settings.upstream.ca_key, settings.upstream.cert_ttl)
