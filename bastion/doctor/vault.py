"""Vault/OpenBao as the bastion uses it: reachable and unsealed, its clock, the
AppRole login (or token file) and a renewable token. The SSH role is
:mod:`.vault_role`'s."""

from __future__ import annotations

import contextlib
from pathlib import Path

from bastion.credentials.vault_http import api_path
from bastion.doctor.api import VaultAPI, plain_remote
from bastion.doctor.checks import Context, Report
from bastion.doctor.http import Unreachable

BOOTSTRAP = "deploy/bootstrap-vault.sh --out DIR"


def _read(path: Path) -> tuple[str, str]:
    """A one-line secret file (its mode is the files section's business) and
    what is wrong with it, if anything."""
    try:
        value = path.read_text().strip()
    except OSError as exc:
        return "", f"cannot read {path}: {exc.strerror}"
    return value, "" if value else f"{path} is empty"


async def section(ctx: Context, report: Report) -> None:
    """Address, health, clock, login and token; keeps the token for later checks."""
    s = ctx.settings
    if not s.vault.enabled:
        how = (
            f"certificates are signed with [upstream] ca_key {s.upstream.ca_key}"
            if s.upstream.ca_key is not None
            else "no certificates are minted (password passthrough only)"
        )
        report.ok("vault", f"not configured: {how}")
        return
    v = VaultAPI(ctx.http, s)
    if plain_remote(v.base):
        report.fail(
            "vault: address",
            f"{v.base}: plain HTTP to another host, the AppRole secret and tokens cross "
            "the network in clear text",
            "use https:// (and [vault] ca_cert)",
        )
    else:
        report.ok("vault: address", f"{v.base} (loopback or TLS)")
    try:
        health = await v.call("GET", "/v1/sys/health", None)
    except Unreachable as exc:
        report.fail("vault: health", str(exc), "start Vault/OpenBao, or correct [vault] address")
        return
    state = {200: "active", 429: "standby", 472: "DR secondary", 473: "performance standby"}
    version = health.body.get("version") if isinstance(health.body, dict) else None
    if health.status in state:
        report.ok("vault: health", f"initialized, unsealed, {state[health.status]} ({version})")
    elif health.status == 503:
        report.fail("vault: health", "sealed: no certificate can be signed", "unseal it")
        return
    else:
        report.fail("vault: health", f"not serving: {health.error()}", "initialize and unseal it")
        return
    report.skew("vault: clock", health.skew, f"Vault at {v.base}")
    await _login(ctx, v, report)
    if ctx.vault_token is not None:
        await _token(ctx, v, report)


async def _login(ctx: Context, v: VaultAPI, report: Report) -> None:
    s = ctx.settings.vault
    name = "vault: login"
    if s.role_id_file is not None and s.secret_id_file is not None:
        (role_id, bad_role), (secret_id, bad_secret) = (
            _read(s.role_id_file),
            _read(s.secret_id_file),
        )
        for what, problem in (("role_id_file", bad_role), ("secret_id_file", bad_secret)):
            if problem:
                report.fail(name, f"[vault] {what}: {problem}", "correct the file")
                return
        path = api_path("/v1/auth/{mount}/login", mount=s.approle_mount)
        a = await v.call("POST", path, None, body={"role_id": role_id, "secret_id": secret_id})
        auth = a.body.get("auth") if isinstance(a.body, dict) else None
        if not a.ok or not isinstance(auth, dict) or not auth.get("client_token"):
            report.fail(
                name,
                f"AppRole login at auth/{s.approle_mount} refused: {a.error()}",
                f"check [vault] role_id_file and secret_id_file; {BOOTSTRAP} issues a new "
                "secret id when the old one is gone",
            )
            return
        ctx.vault_token = str(auth["client_token"])
        ctx.vault_token_from_login = True
        policies = ", ".join(str(p) for p in auth.get("token_policies") or [])
        report.ok(name, f"AppRole login at auth/{s.approle_mount} works (policies: {policies})")
    elif s.token_file is not None:
        token, problem = _read(s.token_file)
        if problem:
            report.fail(name, f"[vault] token_file: {problem}", "correct the file")
            return
        ctx.vault_token = token
        report.ok(name, f"token from [vault] token_file {s.token_file}")


async def _token(ctx: Context, v: VaultAPI, report: Report) -> None:
    name = "vault: token renewal"
    a = await v.call("GET", "/v1/auth/token/lookup-self", ctx.vault_token)
    data = a.body.get("data") if isinstance(a.body, dict) else None
    if not a.ok or not isinstance(data, dict):
        report.fail(name, f"lookup-self refused: {a.error()}", "the token is invalid or expired")
        ctx.vault_token = None
        return
    ttl = int(data.get("ttl") or 0)
    explicit = int(data.get("explicit_max_ttl") or 0)
    if ttl == 0:
        report.warn(
            name,
            "the token never expires: a leaked copy stays valid until revoked",
            f"use an AppRole with token_ttl and token_max_ttl ({BOOTSTRAP})",
        )
    elif data.get("renewable"):
        limit = f", explicit max {explicit} s" if explicit else ""
        report.ok(name, f"renewable (ttl {ttl} s{limit})")
    else:
        report.warn(
            name,
            f"not renewable (ttl {ttl} s): the bastion must log in again when it runs out",
            "give the AppRole renewable tokens (token_max_ttl above token_ttl)",
        )


async def read_kv(ctx: Context, path: str) -> dict[str, str] | None:
    """A KV v2 secret (``<mount>/<path>``) with the doctor's Vault token."""
    if ctx.vault_token is None or ctx.settings.vault.address is None:
        return None
    mount, _, sub = path.strip("/").partition("/")
    v = VaultAPI(ctx.http, ctx.settings)
    a = await v.call("GET", api_path("/v1/{m}/data/{p}", m=mount, p=sub), ctx.vault_token)
    data = a.body.get("data") if isinstance(a.body, dict) else None
    inner = data.get("data") if isinstance(data, dict) else None
    return {str(k): str(x) for k, x in inner.items()} if isinstance(inner, dict) else None


async def cleanup(ctx: Context) -> None:
    """Revoke the token the doctor's own AppRole login made (best effort)."""
    if ctx.vault_token is None or not ctx.vault_token_from_login:
        return
    v = VaultAPI(ctx.http, ctx.settings)
    with contextlib.suppress(Unreachable):
        await v.call("POST", "/v1/auth/token/revoke-self", ctx.vault_token)
    ctx.vault_token = None
