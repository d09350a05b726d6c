"""What a token may really do, tried against Consul: policy typos are accepted
silently, so only calls prove a token's rights.

Every write probe uses a unique name (``.bastion-doctor-probe-<hex>``: not a
user name, so it can never become a route) and undoes only what it created:
a KV key is written with ``cas=0`` (only if absent) and deleted only when that
write created it; a node or service registered by a probe is deregistered;
node maintenance is switched off again only if the probe switched it on.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from bastion.doctor.api import ConsulAPI, kv_path
from bastion.doctor.checks import Context, Report
from bastion.doctor.http import Answer
from bastion.doctor.service import ServiceState, maintenance_probe

PROBE_VALUE = b"bastion doctor probe: safe to delete"
# documentation address (RFC 5737): a probe node registered by mistake points nowhere
PROBE_ADDRESS = "192.0.2.1"
ANON_FIX = (
    "the anonymous token (accessor 00000000-0000-0000-0000-000000000002) must carry only "
    'the "anonymous" policy ("anonymous-dns" for DNS): re-run '
    "deploy/bootstrap-acl.sh --out DIR --management-token-file FILE to reset it"
)
BASTION_FIX = (
    "remove the rule that grants it from the bastion token's policies "
    "(acl-policies/bastion.hcl is all it needs): deploy/bootstrap-acl.sh --out DIR "
    "--management-token-file FILE resets drifted policies and token links"
)


def probe_name() -> str:
    return f".bastion-doctor-probe-{secrets.token_hex(6)}"


@dataclass(frozen=True)
class Outcome:
    """``allowed`` None: the answer did not tell (``detail`` says what came)."""

    allowed: bool | None
    detail: str


def _not_done(a: Answer) -> Outcome:
    """An answer that did not do what was asked: a 403 is a refusal; anything
    else (a 500, "ACL support disabled") does not tell."""
    if a.denied:
        return Outcome(False, "refused (403)")
    return Outcome(None, a.error())


class Prober:
    """Probes made with one token (None: no token, i.e. anonymous)."""

    def __init__(self, api: ConsulAPI, token: str | None) -> None:
        self.api = api
        self.token = token

    async def kv_read(self, key: str) -> Outcome:
        a = await self.api.call("GET", kv_path(key), self.token)
        if a.status in (200, 404):
            return Outcome(True, f"allowed ({a.status} for a probe key)")
        return _not_done(a)

    async def kv_write(self, key: str) -> Outcome:
        a = await self.api.call(
            "PUT", kv_path(key), self.token, params={"cas": "0"}, body=PROBE_VALUE
        )
        if a.status != 200:
            return _not_done(a)
        if a.body is not True:
            return Outcome(True, f"write allowed ({key} existed: left untouched)")
        d = await self.api.call("DELETE", kv_path(key), self.token)
        left = "" if d.status == 200 else f"; could not delete it: consul kv delete {key}"
        return Outcome(True, f"wrote {key} (then deleted it){left}")

    async def catalog_register(self) -> Outcome:
        node = probe_name()
        body = {"Node": node, "Address": PROBE_ADDRESS}
        a = await self.api.call("PUT", "/v1/catalog/register", self.token, body=body)
        if a.status != 200:
            return _not_done(a)
        d = await self.api.call("PUT", "/v1/catalog/deregister", self.token, body={"Node": node})
        left = "" if d.status == 200 else f"; could not remove it: deregister node {node}"
        return Outcome(True, f"registered node {node} (then removed it){left}")

    async def service_register(self) -> Outcome:
        sid = probe_name()
        body = {"ID": sid, "Name": sid, "Port": 9}
        a = await self.api.call("PUT", "/v1/agent/service/register", self.token, body=body)
        if a.status != 200:
            return _not_done(a)
        d = await self.api.call("PUT", f"/v1/agent/service/deregister/{sid}", self.token)
        left = f"; could not remove it: consul services deregister -id={sid}"
        left = "" if d.status == 200 else left
        return Outcome(True, f"registered service {sid} (then removed it){left}")

    async def get(self, path: str) -> Outcome:
        a = await self.api.call("GET", path, self.token)
        return Outcome(True, f"allowed (HTTP {a.status})") if a.ok else _not_done(a)

    async def listing(self, path: str) -> Outcome:
        """A catalog/health list: refused means 403, or silently filtered to nothing."""
        a = await self.api.call("GET", path, self.token)
        if a.status == 200 and isinstance(a.body, list):
            if a.body:
                return Outcome(True, f"{len(a.body)} entries visible")
            return Outcome(False, "filtered to nothing")
        return _not_done(a)

    async def agent_write(self) -> Outcome:
        # a join to a closed port: refused by ACL (403) or tried and failed (500)
        a = await self.api.call("PUT", "/v1/agent/join/127.0.0.1:1", self.token)
        if a.denied:
            return _not_done(a)
        return Outcome(True, f"agent write allowed (a join was attempted: {a.error(60)})")

    async def node_maintenance(self, already_on: bool) -> Outcome:
        params = {"enable": "true", "reason": "bastion doctor probe"}
        a = await self.api.call("PUT", "/v1/agent/maintenance", self.token, params=params)
        if a.status != 200:
            return _not_done(a)
        if already_on:
            return Outcome(True, "allowed (the node was already in maintenance: left on)")
        d = await self.api.call(
            "PUT", "/v1/agent/maintenance", self.token, params={"enable": "false"}
        )
        left = "" if d.status == 200 else "; could not switch it off: consul maint -disable"
        return Outcome(True, f"switched node maintenance on (then off){left}")


def _must_refuse(report: Report, name: str, outcome: Outcome, what: str, fix: str) -> None:
    if outcome.allowed is False:
        report.ok(name, outcome.detail)
    elif outcome.allowed:
        report.fail(name, f"ALLOWED: {what}: {outcome.detail}", fix)
    else:
        report.warn(name, f"could not tell: {outcome.detail}", "")


def _must_work(report: Report, name: str, outcome: Outcome, what: str, fix: str) -> None:
    if outcome.allowed:
        report.ok(name, outcome.detail)
    elif outcome.allowed is False:
        report.fail(name, f"REFUSED: {what}: {outcome.detail}", fix)
    else:
        report.warn(name, f"could not tell: {outcome.detail}", "")


async def anonymous(ctx: Context, api: ConsulAPI, report: Report) -> None:
    """Requests without a token must get nothing but, at most, what DNS needs."""
    p = Prober(api, None)
    c = ctx.settings.consul
    who = "a client without a token"
    checks = [
        (
            "anonymous: kv read",
            await p.kv_read(c.routes_prefix + probe_name()),
            f"{who} may read {c.routes_prefix}",
        ),
        (
            "anonymous: kv write",
            await p.kv_write("bastion-doctor-probe/" + probe_name()),
            f"{who} may write the KV store",
        ),
        ("anonymous: node write", await p.catalog_register(), f"{who} may register nodes"),
        ("anonymous: service write", await p.service_register(), f"{who} may register services"),
        (
            "anonymous: agent read",
            await p.get("/v1/agent/self"),
            f"{who} may read the agent's configuration",
        ),
    ]
    for name, outcome, what in checks:
        _must_refuse(report, name, outcome, what, ANON_FIX)
    nodes = await p.listing("/v1/catalog/nodes")
    if nodes.allowed:
        report.ok(
            "anonymous: catalog read",
            f"{nodes.detail}: the node list is public (what Consul DNS needs; "
            "deploy/README-operators.md, 6.)",
        )
    else:
        report.ok("anonymous: catalog read", f"no nodes visible ({nodes.detail})")


async def bastion(ctx: Context, api: ConsulAPI, report: Report, state: ServiceState) -> None:
    """The bastion token: what it needs must work, everything else must be refused."""
    c = ctx.settings.consul
    p = Prober(api, ctx.consul_token)
    # grants/ too: a token without it sees no grant (Consul answers an
    # unreadable prefix like an empty one), so grants would silently do nothing
    prefixes = (
        c.routes_prefix,
        c.keys_prefix,
        c.host_keys_prefix,
        ctx.settings.access.grants_prefix,
    )
    for prefix in prefixes:
        _must_work(
            report,
            f"bastion token: read {prefix}",
            await p.kv_read(prefix + probe_name()),
            f"the bastion cannot read {prefix}",
            f'the bastion policy needs key_prefix "{prefix}" {{ policy = "read" }} '
            "(acl-policies/bastion.hcl): re-run deploy/bootstrap-acl.sh",
        )
    node_fix = (
        'the bastion policy needs node_prefix "" { policy = "read" } '
        "(acl-policies/bastion.hcl): re-run deploy/bootstrap-acl.sh"
    )
    _must_work(
        report,
        "bastion token: list nodes",
        await p.listing("/v1/catalog/nodes"),
        "the bastion cannot resolve routed nodes",
        node_fix,
    )
    _must_work(
        report,
        "bastion token: read health",
        await p.listing("/v1/health/state/any"),
        "the bastion cannot see node health",
        node_fix,
    )
    await maintenance_probe(ctx, api, report, state)
    refusals = [
        *[
            (
                f"bastion token: no write {prefix}",
                await p.kv_write(prefix + probe_name()),
                f"the bastion may write {prefix}",
            )
            for prefix in (
                c.routes_prefix,
                c.keys_prefix,
                c.host_keys_prefix,
                ctx.settings.access.grants_prefix,  # grants: read only (docs/access.md)
            )
        ],
        (
            "bastion token: no write elsewhere",
            await p.kv_write("bastion-doctor-probe/" + probe_name()),
            "the bastion may write KV outside its prefixes",
        ),
        (
            "bastion token: no read secret-probe/",
            await p.kv_read("secret-probe/" + probe_name()),
            "the bastion may read KV outside its prefixes",
        ),
        (
            "bastion token: no acl list",
            await p.get("/v1/acl/policies"),
            "the bastion may read the ACL policies",
        ),
        (
            "bastion token: no agent read",
            await p.get("/v1/agent/self"),
            "the bastion may read the agent's configuration",
        ),
        (
            "bastion token: no agent write",
            await p.agent_write(),
            "the bastion may manage the agent (join, leave, reload)",
        ),
        (
            "bastion token: no node maintenance",
            await p.node_maintenance(state.node_maintenance),
            "the bastion may put the node in maintenance",
        ),
        (
            "bastion token: no other service",
            await p.service_register(),
            "the bastion may register other services",
        ),
        (
            "bastion token: no catalog register",
            await p.catalog_register(),
            "the bastion may register nodes",
        ),
    ]
    for name, outcome, what in refusals:
        _must_refuse(report, name, outcome, what, BASTION_FIX)
