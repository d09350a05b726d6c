"""The SSH role the bastion signs with: ``max_ttl`` at least ``[upstream]
cert_ttl``, ``allowed_users`` covering every routed login, user key ids allowed.

The role is read when the bastion's policy allows it; the shipped policy does
not (least privilege), so then the same questions are asked the way the
bastion meets them: by signing throwaway keys (a fresh ed25519 key per probe,
key id ``bastion-doctor probe``, never used to log in anywhere).
"""

from __future__ import annotations

from typing import Any

import asyncssh

from bastion.credentials.vault_http import api_path
from bastion.doctor.api import VaultAPI
from bastion.doctor.checks import Context, Report
from bastion.doctor.http import Answer
from bastion.doctor.vault import BOOTSTRAP

PROBE_KEY_ID = "bastion-doctor probe"
PROBE_PRINCIPAL = "bastion-doctor"


async def section(ctx: Context, report: Report) -> None:
    """The SSH role against cert_ttl and the routed logins (after the directory)."""
    s = ctx.settings
    if not s.vault.enabled or ctx.vault_token is None:
        return
    v = VaultAPI(ctx.http, s)
    role = f"{s.vault.ssh_mount}/roles/{s.vault.ssh_role}"
    a = await v.call(
        "GET",
        api_path("/v1/{m}/roles/{r}", m=s.vault.ssh_mount, r=s.vault.ssh_role),
        ctx.vault_token,
    )
    if a.status == 200 and isinstance(a.body, dict) and isinstance(a.body.get("data"), dict):
        _role_fields(ctx, report, role, a.body["data"])
    elif a.status == 404:
        report.fail("vault role", f"no role {role}", f"{BOOTSTRAP} creates it")
    else:
        await _role_probes(ctx, v, report, role)


def _max_ttl_fix(ctx: Context) -> str:
    return (
        f"raise the role's max_ttl to at least {ctx.settings.upstream.cert_ttl} s "
        f"({BOOTSTRAP} --max-ttl 10m), or lower [upstream] cert_ttl"
    )


def _role_fields(ctx: Context, report: Report, role: str, data: dict[str, Any]) -> None:
    cert_ttl = ctx.settings.upstream.cert_ttl
    raw = data.get("max_ttl")
    max_ttl: int | None = None
    if isinstance(raw, int | float) or (isinstance(raw, str) and raw.isdigit()):
        max_ttl = int(raw)
    if max_ttl == 0:
        report.ok("vault role: max_ttl", f"{role}: 0 (the mount's maximum) >= cert_ttl")
    elif max_ttl is None or max_ttl < cert_ttl:
        report.fail(
            "vault role: max_ttl",
            f"{role}: max_ttl {raw} < cert_ttl {cert_ttl}: every signing is refused",
            _max_ttl_fix(ctx),
        )
    else:
        report.ok("vault role: max_ttl", f"{role}: {max_ttl} s >= cert_ttl {cert_ttl} s")
    allowed = [u.strip() for u in str(data.get("allowed_users") or "").split(",") if u.strip()]
    missing = sorted(ctx.logins - set(allowed)) if "*" not in allowed else []
    if missing:
        report.fail(
            "vault role: allowed_users",
            f"{role}: allowed_users {','.join(allowed) or '(none)'} leaves out routed "
            f"logins {', '.join(missing[:10])}",
            'allowed_users = "*" on the role (as deploy/bootstrap-vault.sh writes it), '
            "or add those logins",
        )
    else:
        report.ok(
            "vault role: allowed_users",
            f"{role}: {','.join(allowed)} covers {len(ctx.logins)} routed logins",
        )
    if data.get("allow_user_key_ids") is True:
        report.ok("vault role: key ids", f"{role}: allow_user_key_ids = true")
    else:
        report.fail(
            "vault role: key ids",
            f"{role}: allow_user_key_ids is not true: the bastion's key ids are refused",
            f"allow_user_key_ids = true on the role ({BOOTSTRAP} sets it)",
        )


async def _sign(
    ctx: Context, v: VaultAPI, principals: list[str], ttl: int | None, key_id: str | None
) -> Answer:
    key = asyncssh.generate_private_key("ssh-ed25519")
    body: dict[str, str] = {
        "public_key": key.export_public_key("openssh").decode().strip(),
        "valid_principals": ",".join(principals),
        "cert_type": "user",
    }
    if ttl is not None:
        body["ttl"] = f"{ttl}s"
    if key_id is not None:
        body["key_id"] = key_id
    s = ctx.settings.vault
    path = api_path("/v1/{m}/sign/{r}", m=s.ssh_mount, r=s.ssh_role)
    return await v.call("POST", path, ctx.vault_token, body=body)


async def _role_probes(ctx: Context, v: VaultAPI, report: Report, role: str) -> None:
    how = "(the bastion's policy may not read the role: checked by signing throwaway keys)"
    logins = sorted(ctx.logins)
    one = logins[:1] or [PROBE_PRINCIPAL]
    refused = None
    for start in range(0, len(logins) or 1, 100):
        a = await _sign(ctx, v, logins[start : start + 100] or one, None, None)
        if not a.ok:
            refused = a
            break
    if refused is not None and not logins:
        report.warn(
            "vault role: allowed_users",
            f"{role}: no routed logins to check, and a probe for {PROBE_PRINCIPAL!r} is "
            f"refused: {refused.error()} {how}",
            f"`bao read {role}` with an admin token shows the role",
        )
        for name in ("vault role: max_ttl", "vault role: key ids"):
            report.warn(name, "not tried: signing is refused (see allowed_users)", "")
        return
    if refused is not None:
        report.fail(
            "vault role: allowed_users",
            f"{role}: signing for the routed logins is refused: {refused.error()} {how}",
            'allowed_users = "*" on the role (as deploy/bootstrap-vault.sh writes it), or '
            f"add the logins; `bao read {role}` with an admin token shows it",
        )
        for name in ("vault role: max_ttl", "vault role: key ids"):
            report.warn(name, "not tried: signing is refused (see allowed_users)", "")
        return
    report.ok(
        "vault role: allowed_users", f"{role}: signs for all {len(logins)} routed logins {how}"
    )
    cert_ttl = ctx.settings.upstream.cert_ttl
    a = await _sign(ctx, v, one, cert_ttl, None)
    if a.ok:
        report.ok("vault role: max_ttl", f"{role}: a {cert_ttl} s certificate is signed")
    else:
        report.fail(
            "vault role: max_ttl",
            f"{role}: a certificate of cert_ttl {cert_ttl} s is refused: {a.error()}",
            _max_ttl_fix(ctx),
        )
    a = await _sign(ctx, v, one, None, PROBE_KEY_ID)
    if a.ok:
        report.ok("vault role: key ids", f"{role}: a certificate with a key id is signed")
    else:
        report.fail(
            "vault role: key ids",
            f"{role}: a key id is refused: {a.error()}",
            f"allow_user_key_ids = true on the role ({BOOTSTRAP} sets it)",
        )
