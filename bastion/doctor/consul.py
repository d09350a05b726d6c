"""Consul as the bastion sees it: its address, the agent's answer and clock,
the bastion's token, and the agent's security settings (``/v1/agent/self``,
which needs agent read: the bastion token is refused that, as it should be;
``--consul-token-file`` lends the doctor an operator's token for these checks
only). The token probes are in :mod:`.probes`, the service in :mod:`.service`."""

from __future__ import annotations

import os
from typing import Any

from bastion.doctor import probes, service
from bastion.doctor.api import ConsulAPI, is_loopback, plain_remote
from bastion.doctor.checks import Context, Report
from bastion.doctor.http import Unreachable
from bastion.doctor.vault import read_kv

BOOTSTRAP = "deploy/bootstrap-acl.sh --out DIR --management-token-file FILE"
MANAGEMENT_POLICY = "00000000-0000-0000-0000-000000000001"


async def section(ctx: Context, report: Report) -> None:
    """Every Consul check, in order; stops early when Consul does not answer."""
    api = ConsulAPI(ctx.http, ctx.settings)
    _address(api, report)
    try:
        leader = await api.call("GET", "/v1/status/leader", None)
    except Unreachable as exc:
        report.fail(
            "consul: reachable",
            str(exc),
            f"start the local Consul agent, or correct [consul] address ({api.base})",
        )
        return
    if leader.status != 200 or not leader.body:
        report.fail(
            "consul: reachable",
            f"{api.base} answers but has no leader ({leader.error()})",
            "the Consul servers have lost quorum: `consul operator raft list-peers`",
        )
    else:
        report.ok("consul: reachable", f"{api.base}, leader {leader.body}")
    ctx.consul_reachable = True
    report.skew("consul: clock", leader.skew, f"Consul at {api.base}")
    await _token(ctx, api, report)
    await _agent_config(ctx, api, report)
    await probes.anonymous(ctx, api, report)
    if ctx.consul_token is None:
        return
    state = await service.check(ctx, api, report)
    await probes.bastion(ctx, api, report, state)


def _address(api: ConsulAPI, report: Report) -> None:
    if not plain_remote(api.base):
        report.ok("consul: address", f"{api.base} (loopback or TLS)")
    else:
        report.fail(
            "consul: address",
            f"{api.base}: plain HTTP to another host, the bastion's token crosses "
            "the network in clear text",
            'talk to the local agent ([consul] address = "http://127.0.0.1:8500") or use https://',
        )


async def _read_token(ctx: Context, report: Report) -> tuple[str | None, str]:
    """The bastion's Consul token from its configured source, and the source."""
    c = ctx.settings.consul
    name = "consul: bastion token"
    if c.token_file is not None:
        where = f"[consul] token_file {c.token_file}"
        try:
            value = c.token_file.read_text().strip()
        except OSError as exc:
            report.fail(name, f"cannot read {where}: {exc.strerror}", "correct the path")
            return None, where
    elif c.token_env is not None:
        where = f"[consul] token_env {c.token_env}"
        value = os.environ.get(c.token_env, "").strip()
    elif c.token_vault_path is not None:
        where = f"[consul] token_vault_path {c.token_vault_path}"
        if ctx.vault_token is None:
            report.fail(name, f"cannot read {where}: no Vault token (see vault: login)", "")
            return None, where
        data = await read_kv(ctx, c.token_vault_path)
        value = data.get(c.token_vault_field, "").strip() if data else ""
    else:
        report.fail(
            name,
            "no token configured: the bastion refuses to start",
            "set [consul] token_file, token_env or token_vault_path",
        )
        return None, ""
    if not value:
        report.fail(name, f"{where}: empty or not set", f"put the bastion token in {where}")
        return None, where
    return value, where


async def _token(ctx: Context, api: ConsulAPI, report: Report) -> None:
    name = "consul: bastion token"
    token, where = await _read_token(ctx, report)
    if token is None:
        return
    answer = await api.call("GET", "/v1/acl/token/self", token)
    if answer.status == 200 and isinstance(answer.body, dict):
        links = [str(p.get("Name") or p.get("ID")) for p in answer.body.get("Policies") or []]
        ids = {p.get("ID") for p in answer.body.get("Policies") or []}
        ctx.consul_token = token
        if MANAGEMENT_POLICY in ids or answer.body.get("Type") == "management":
            report.fail(
                name,
                f"from {where}: a MANAGEMENT token; a leaked bastion token would own Consul",
                f"give the bastion its own token: {BOOTSTRAP} writes bastion.token",
            )
            return
        report.ok(name, f"accepted (from {where}; policies: {', '.join(links) or 'none'})")
    elif "ACL support disabled" in answer.text:
        ctx.consul_token = token
        report.fail(
            name,
            "Consul answers 'ACL support disabled': every client may do everything",
            'acl { enabled = true  default_policy = "deny" } on every agent '
            "(deploy/consul.d/), then deploy/bootstrap-acl.sh",
        )
    else:
        report.fail(
            name,
            f"from {where}: Consul refuses it ({answer.error()}): revoked, or another cluster's",
            "deploy the current bastion.token (deploy/README-operators.md, 5.)",
        )


def _exposed_http(addrs: Any) -> list[str]:
    """Plain-HTTP listeners not on loopback (``tcp://10.0.0.5:8500``)."""
    exposed = []
    for addr in addrs or []:
        text = str(addr)
        if text.startswith("unix://"):
            continue
        hostport = text.removeprefix("tcp://")
        if not is_loopback(hostport.rsplit(":", 1)[0]):
            exposed.append(hostport)
    return exposed


async def _agent_config(ctx: Context, api: ConsulAPI, report: Report) -> None:
    name = "consul: agent config"
    token = ctx.admin_consul_token or ctx.consul_token
    if token is None:
        report.warn(name, "not checked: no token to ask with", "")
        return
    answer = await api.call("GET", "/v1/agent/self", token)
    if answer.denied:
        if ctx.admin_consul_token is None:
            report.warn(
                name,
                "cannot see agent config with the bastion token (least privilege: as it "
                "should be); run with --consul-token-file of an operator/management token "
                "to check it",
                "bastion doctor --config FILE --consul-token-file /path/to/management.token",
            )
        else:
            report.warn(
                name,
                f"the token in {ctx.admin_token_file} may not read /v1/agent/self "
                "(needs agent read)",
                "pass the management token with --consul-token-file",
            )
        return
    cfg = answer.body.get("DebugConfig") if isinstance(answer.body, dict) else None
    if answer.status != 200 or not isinstance(cfg, dict):
        report.warn(name, f"/v1/agent/self: {answer.error()}", "")
        return
    resolver = cfg.get("ACLResolverSettings") or {}
    default = cfg.get("ACLDefaultPolicy") or resolver.get("ACLDefaultPolicy")
    hcl = "deploy/consul.d/server.hcl and client.hcl"
    if cfg.get("ACLsEnabled") is True:
        report.ok("consul: acls enabled", "acl.enabled = true")
    else:
        report.fail(
            "consul: acls enabled",
            "ACLs are off: every client may read and write everything",
            f"acl {{ enabled = true }} ({hcl}), restart, then deploy/bootstrap-acl.sh",
        )
    if default == "deny":
        report.ok("consul: default deny", 'acl.default_policy = "deny"')
    else:
        report.fail(
            "consul: default deny",
            f"acl.default_policy = {default!r}: whatever no policy mentions is allowed",
            f'acl {{ default_policy = "deny" }} ({hcl}) and restart the agent',
        )
    if cfg.get("EnableRemoteScriptChecks") is False:
        report.ok("consul: remote script checks", "off (enable_script_checks = false)")
    else:
        report.fail(
            "consul: remote script checks",
            "enable_script_checks = true: anyone who may register a check through the "
            "HTTP API runs commands on this host as the consul user",
            "remove enable_script_checks; keep enable_local_script_checks = true "
            f"({hcl}) and restart the agent",
        )
    if cfg.get("EnableLocalScriptChecks") is True:
        report.ok("consul: local script checks", "on (the bastion's banner check can run)")
    else:
        report.warn(
            "consul: local script checks",
            "off: the bastion's `bastion check` in deploy/consul.d/ssh-bastion.hcl cannot run",
            f"enable_local_script_checks = true ({hcl})",
        )
    exposed = _exposed_http(cfg.get("HTTPAddrs"))
    if exposed:
        report.fail(
            "consul: http api",
            f"plain HTTP on {', '.join(exposed)}: tokens and the directory travel in "
            "clear text, reachable from the network",
            'client_addr = "127.0.0.1" (or ports { http = -1  https = 8501 } with TLS)',
        )
    else:
        https = [str(a).removeprefix("tcp://") for a in cfg.get("HTTPSAddrs") or []]
        plain = [str(a).removeprefix("tcp://") for a in cfg.get("HTTPAddrs") or []]
        where = ", ".join([*(f"http {a}" for a in plain), *(f"https {a}" for a in https)])
        report.ok("consul: http api", f"loopback or TLS only ({where or 'no listener'})")
