"""The bastion's own service (``[consul] service_name``) on the local agent:
registered, in the catalog, its checks, and whether the bastion token can put
it in maintenance (how the bastion drains itself)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bastion.doctor.api import ConsulAPI
from bastion.doctor.checks import Context, Report

INSTALL = (
    "bastion register --config FILE --consul-config-dir /etc/consul.d "
    "(then `systemctl reload consul`; deploy/README-operators.md, 3.)"
)


@dataclass(frozen=True)
class ServiceState:
    """What the local agent says: the service's ID (None: not registered) and
    whether the service and the node are in maintenance now."""

    service_id: str | None
    service_maintenance: bool
    node_maintenance: bool


def _dict(body: Any) -> dict[str, Any]:
    return body if isinstance(body, dict) else {}


async def check(ctx: Context, api: ConsulAPI, report: Report) -> ServiceState:
    name = ctx.settings.consul.service_name
    token = ctx.consul_token
    services = _dict((await api.call("GET", "/v1/agent/services", token)).body)
    # the agent's checks as the bastion token sees them, or the operator's token
    checks = _dict(
        (await api.call("GET", "/v1/agent/checks", ctx.admin_consul_token or token)).body
    )
    node_maint = "_node_maintenance" in checks
    mine_all = [_dict(s) for s in services.values() if _dict(s).get("Service") == name]
    # bastions may share an agent: the instance on this bastion's port first
    port = ctx.settings.server.listen_port
    mine_all.sort(key=lambda s: s.get("Port") != port)
    entry = mine_all[0] if mine_all else None
    if entry is None:
        report.warn(
            "service: registration",
            f"{name} is not registered on the Consul agent at {api.base} (or the bastion "
            "token may not see it): clients cannot discover the bastion",
            INSTALL,
        )
        return ServiceState(None, False, node_maint)
    sid = str(entry.get("ID") or name)
    maint_id = f"_service_maintenance:{sid}"
    node = next((str(c.get("Node")) for c in checks.values() if _dict(c).get("Node")), None)
    listed = (await api.call("GET", f"/v1/catalog/service/{name}", token)).body
    synced = any(
        _dict(e).get("ServiceID") == sid and (node is None or _dict(e).get("Node") == node)
        for e in (listed if isinstance(listed, list) else [])
    )
    where = f"{name} (id {sid}, port {entry.get('Port')})"
    if synced:
        report.ok("service: registration", f"{where} on the local agent and in the catalog")
    else:
        report.warn(
            "service: registration",
            f"{where} is on the local agent but not in the catalog: anti-entropy sync "
            "refused? (Consul 1.8 syncs with the definition's own token)",
            "put the bastion token in the service definition (`token = ...`, "
            "deploy/consul.d/ssh-bastion.hcl) and `consul reload`",
        )
    mine = [
        _dict(c)
        for cid, c in checks.items()
        if _dict(c).get("ServiceID") == sid and cid != maint_id
    ]
    if maint_id in checks:
        reason = _dict(checks[maint_id]).get("Notes") or "no reason given"
        report.warn(
            "service: health",
            f"{name} is in maintenance mode ({reason}): not offered to clients "
            "(a drained bastion leaves it when it starts again)",
            "restart the bastion, or with the bastion's own token: "
            f"CONSUL_HTTP_TOKEN=$(cat TOKEN_FILE) consul maint -disable -service {sid}",
        )
    elif not mine:
        report.warn(
            "service: health",
            f"{name} has no health check: a dead bastion is still offered to clients",
            INSTALL,
        )
    else:
        _health(report, name, mine)
    return ServiceState(sid, maint_id in checks, node_maint)


def _health(report: Report, name: str, checks: list[dict[str, Any]]) -> None:
    def line(c: dict[str, Any]) -> str:
        output = " ".join(str(c.get("Output") or "").split())[:120]
        return f"{c.get('Name') or c.get('CheckID')}: {c.get('Status')}" + (
            f" ({output})" if output else ""
        )

    bad = [c for c in checks if c.get("Status") == "critical"]
    if bad:
        report.fail(
            "service: health",
            "; ".join(line(c) for c in bad),
            "is `bastion serve` running and listening on [server] listen? the check's "
            "output says why",
        )
    elif any(c.get("Status") != "passing" for c in checks):
        report.warn("service: health", "; ".join(line(c) for c in checks), "")
    else:
        report.ok("service: health", "; ".join(line(c) for c in checks))


async def maintenance_probe(
    ctx: Context, api: ConsulAPI, report: Report, state: ServiceState
) -> None:
    """The bastion token must be able to drain its own service: switch its
    maintenance on and off again (or, when an operator already switched it on,
    only "on" again, which changes nothing)."""
    name = "bastion token: service maintenance"
    if state.service_id is None:
        report.warn(
            name,
            f"not tried: {ctx.settings.consul.service_name} is not registered on this agent",
            INSTALL,
        )
        return
    path = f"/v1/agent/service/maintenance/{state.service_id}"
    token = ctx.consul_token
    on = await api.call(
        "PUT", path, token, params={"enable": "true", "reason": "bastion doctor probe"}
    )
    if on.status != 200:
        report.fail(
            name,
            f"REFUSED: the bastion cannot drain its own service ({on.error()})",
            f'the bastion policy needs service "{ctx.settings.consul.service_name}" '
            '{ policy = "write" } (acl-policies/bastion.hcl): re-run deploy/bootstrap-acl.sh',
        )
        return
    if state.service_maintenance:
        report.ok(name, "allowed (already in maintenance: left on)")
        return
    off = await api.call("PUT", path, token, params={"enable": "false"})
    if off.status != 200:
        report.fail(
            name,
            f"switched maintenance on but not off again ({off.error()})",
            f"consul maint -disable -service {state.service_id}",
        )
        return
    report.ok(name, "switched maintenance on and off again")
