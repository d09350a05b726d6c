"""The ACL kit (acl-policies/*.hcl + deploy/bootstrap-acl.sh) against a real Consul.

Every allow/deny claim is checked by HTTP status against a real agent with
ACLs on and ``default_policy = "deny"``: policy typos are accepted silently by
Consul, so only these calls prove what a token can do.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devstack import (
    ROOT,
    BaoServer,
    ConsulAgent,
    bao_bin,
    bootstrap_acl,
    consul_bin,
    free_port,
)

SCRIPT = ROOT / "deploy/bootstrap-acl.sh"
POLICIES = ROOT / "acl-policies"
ANON = "00000000-0000-0000-0000-000000000002"
TOKEN_FILES = ("management", "bastion", "operator", "agent", "agent-reload")
UUID_LINE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\n\Z")


# --------------------------------------------------------------------------
# helpers


@dataclass
class Kit:
    agent: ConsulAgent
    out: Path
    first_run: subprocess.CompletedProcess[str]
    tokens: dict[str, str] = field(default_factory=dict)
    accessors: dict[str, str] = field(default_factory=dict)

    def load(self) -> None:
        for name in TOKEN_FILES:
            self.tokens[name] = (self.out / f"{name}.token").read_text().strip()
        for name in TOKEN_FILES[1:]:
            self.accessors[name] = (self.out / f"{name}.accessor").read_text().strip()
        self.agent.management_token = self.tokens["management"]

    def call(self, actor: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        token = "" if actor == "anonymous" else self.tokens[actor]
        return self.agent.api(method, path, body=body, token=token)


def run_ok(
    agent: ConsulAgent, out: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    res = bootstrap_acl(agent, out, *extra, env=env)
    assert res.returncode == 0, f"bootstrap-acl failed:\n{res.stdout}\n{res.stderr}"
    return res


def run_script(
    addr: str, out: Path, *extra: str, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Like devstack.bootstrap_acl, but lets CONSUL_* variables through (env_extra)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "VAULT_", "BAO_"))}
    env["CONSUL_HTTP_ADDR"] = addr
    env["PATH"] = f"{Path(consul_bin()).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(env_extra or {})
    return subprocess.run(
        ["bash", str(SCRIPT), "--out", str(out), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def acl_indexes(agent: ConsulAgent) -> dict[str, int]:
    """ModifyIndex of every policy and every token (management view)."""
    status, policies = agent.api("GET", "/v1/acl/policies")
    assert status == 200, policies
    status, tokens = agent.api("GET", "/v1/acl/tokens")
    assert status == 200, tokens
    found = {f"policy:{p['Name']}": p["ModifyIndex"] for p in policies}
    found.update({f"token:{t['AccessorID']}": t["ModifyIndex"] for t in tokens})
    return found


def token_links(agent: ConsulAgent, accessor: str) -> list[str]:
    status, tok = agent.api("GET", f"/v1/acl/token/{accessor}")
    assert status == 200, tok
    links = [f"policy:{p['Name']}" for p in tok.get("Policies") or []]
    links += [f"node:{n['NodeName']}:{n['Datacenter']}" for n in tok.get("NodeIdentities") or []]
    links += [f"role:{r['Name']}" for r in tok.get("Roles") or []]
    links += [f"service:{s['ServiceName']}" for s in tok.get("ServiceIdentities") or []]
    return sorted(links)


def policy_rules(agent: ConsulAgent, name: str) -> tuple[str, str]:
    status, policies = agent.api("GET", "/v1/acl/policies")
    assert status == 200
    pid = next(p["ID"] for p in policies if p["Name"] == name)
    status, pol = agent.api("GET", f"/v1/acl/policy/{pid}")
    assert status == 200
    return pid, pol["Rules"]


def secrets_of(out: Path) -> list[str]:
    return [
        (out / f"{n}.token").read_text().strip()
        for n in TOKEN_FILES
        if (out / f"{n}.token").exists()
    ]


def assert_no_secret_printed(res: subprocess.CompletedProcess[str], out: Path) -> None:
    for secret in secrets_of(out):
        assert secret not in res.stdout
        assert secret not in res.stderr


def assert_one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode != 0, res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("bootstrap-acl: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


def seed(agent: ConsulAgent) -> None:
    for key, value in {
        "users/alice": "host-102",
        "users/bob": "host-101",
        "users": "not-a-route",
        "users-archive/x": "old",
        "ssh-keys/alice": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample alice",
        "host-keys/host-102": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHost host-102",
        "secret/x": "do-not-read",
        "grants/alice/host-103": '{"route": "host-103", "expires": 1}',
    }.items():
        agent.kv_put(key, value)
    agent.register_node("host-101", "127.0.0.101")
    agent.register_node("host-102", "127.0.0.102")


def started_agent(workdir: Path) -> ConsulAgent:
    return ConsulAgent(workdir).start()


# --------------------------------------------------------------------------
# the kit bootstrapped once on a fresh agent


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kit]:
    base = tmp_path_factory.mktemp("acl-kit")
    agent = started_agent(base / "consul")
    try:
        out = base / "secrets"
        first = run_ok(agent, out)
        k = Kit(agent=agent, out=out, first_run=first)
        k.load()
        seed(agent)
        status, body = k.call(
            "bastion",
            "PUT",
            "/v1/agent/service/register",
            {"ID": "ssh-bastion", "Name": "ssh-bastion", "Port": 2222},
        )
        assert status == 200, body
        yield k
    finally:
        agent.stop()


def test_first_run_writes_token_files_0600(kit: Kit) -> None:
    out = kit.out
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for name in TOKEN_FILES:
        path = out / f"{name}.token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert UUID_LINE.match(path.read_text()), f"{path} must hold just the SecretID"
    for name in TOKEN_FILES[1:]:
        assert stat.S_IMODE((out / f"{name}.accessor").stat().st_mode) == 0o600
    res = kit.first_run
    assert "bootstrapped the ACL system" in res.stdout
    for line in res.stdout.splitlines():
        assert line.startswith("[bootstrap-acl] "), line
    assert str(out) in res.stdout
    assert_no_secret_printed(res, out)


def test_first_run_creates_policies_and_tokens(kit: Kit) -> None:
    agent = kit.agent
    for f in sorted(POLICIES.glob("*.hcl")):
        _, rules = policy_rules(agent, f.stem)
        # agent-reload.hcl is templated with the agent's node name
        assert rules.strip() == f.read_text().replace("@AGENT_NODE@", "consul-dev").strip()
    descriptions = {}
    for actor, accessor in kit.accessors.items():
        status, tok = agent.api("GET", f"/v1/acl/token/{accessor}")
        assert status == 200
        assert tok["SecretID"] == kit.tokens[actor]
        descriptions[actor] = tok["Description"]
        assert actor in tok["Description"]
    assert token_links(agent, kit.accessors["bastion"]) == ["policy:bastion"]
    assert token_links(agent, kit.accessors["operator"]) == ["policy:operator"]
    assert token_links(agent, kit.accessors["agent"]) == ["node:consul-dev:dc1"]
    assert token_links(agent, kit.accessors["agent-reload"]) == ["policy:agent-reload"]
    assert token_links(agent, ANON) == ["policy:anonymous"]


def test_reruns_change_nothing(kit: Kit) -> None:
    before = acl_indexes(kit.agent)
    files_before = {p.name: p.read_bytes() for p in kit.out.iterdir()}
    for _ in range(2):
        res = run_ok(kit.agent, kit.out)
        assert not re.search(r"\b(created|updated|reset|bootstrapped)\b", res.stdout), res.stdout
        assert res.stdout.count(" unchanged") == 5 + 5  # 5 policies, 5 tokens
        assert_no_secret_printed(res, kit.out)
        assert acl_indexes(kit.agent) == before
    assert {p.name: p.read_bytes() for p in kit.out.iterdir()} == files_before


def test_print_secrets_prints_them(kit: Kit) -> None:
    res = run_ok(kit.agent, kit.out, "--print-secrets")
    for name in TOKEN_FILES:
        assert f"{name}.token: {kit.tokens[name]}" in res.stdout


# --------------------------------------------------------------------------
# what each token may and may not do (HTTP status against the real agent)

# expectation: an HTTP status, or "empty" (200 with nothing in it: a silently
# filtered list or a null node) or "nonempty".
PERMISSIONS: list[tuple[str, str, str, Any, int | str]] = [
    # --- bastion: reads the directory, writes only its own service
    ("bastion", "GET", "/v1/kv/users/alice", None, 200),
    ("bastion", "GET", "/v1/kv/ssh-keys/alice", None, 200),
    ("bastion", "GET", "/v1/kv/host-keys/host-102", None, 200),
    ("bastion", "GET", "/v1/kv/users/?recurse", None, "nonempty"),
    ("bastion", "GET", "/v1/kv/users/nobody", None, 404),  # readable prefix, no such key
    ("bastion", "GET", "/v1/catalog/node/host-102", None, "nonempty"),
    ("bastion", "GET", "/v1/health/node/host-102", None, "nonempty"),
    ("bastion", "GET", "/v1/catalog/nodes", None, "nonempty"),
    (
        "bastion",
        "PUT",
        "/v1/agent/service/register",
        {"ID": "ssh-bastion", "Name": "ssh-bastion", "Port": 2222},
        200,
    ),
    ("bastion", "PUT", "/v1/kv/users/alice", b"host-666", 403),
    ("bastion", "DELETE", "/v1/kv/users/alice", None, 403),
    ("bastion", "PUT", "/v1/kv/ssh-keys/alice", b"ssh-ed25519 AAAA evil", 403),
    ("bastion", "PUT", "/v1/kv/host-keys/host-102", b"ssh-ed25519 AAAA evil", 403),
    ("bastion", "PUT", "/v1/kv/bastion/state", b"x", 403),
    ("bastion", "GET", "/v1/kv/secret/x", None, 403),
    ("bastion", "GET", "/v1/kv/users-archive/x", None, 403),
    ("bastion", "GET", "/v1/kv/users", None, 403),
    ("bastion", "GET", "/v1/kv/secret/?recurse", None, 404),
    ("bastion", "PUT", "/v1/agent/service/register", {"Name": "web", "Port": 80}, 403),
    (
        "bastion",
        "PUT",
        "/v1/agent/service/register",
        {"ID": "ssh-bastion-2", "Name": "ssh-bastion-other", "Port": 2223},
        403,
    ),
    ("bastion", "GET", "/v1/catalog/service/consul", None, "empty"),
    ("bastion", "GET", "/v1/acl/policies", None, 403),
    ("bastion", "GET", "/v1/acl/tokens", None, 403),
    ("bastion", "GET", f"/v1/acl/token/{ANON}", None, 403),
    (
        "bastion",
        "PUT",
        "/v1/acl/policy",
        {"Name": "evil", "Rules": 'key_prefix "" { policy = "write" }'},
        403,
    ),
    ("bastion", "PUT", "/v1/acl/token", {"Description": "evil"}, 403),
    ("bastion", "GET", "/v1/agent/self", None, 403),
    ("bastion", "GET", "/v1/agent/metrics", None, 403),
    ("bastion", "PUT", "/v1/agent/reload", None, 403),
    ("bastion", "PUT", "/v1/agent/join/127.0.0.1:1", None, 403),
    ("bastion", "PUT", "/v1/agent/maintenance?enable=true&reason=x", None, 403),
    ("bastion", "PUT", "/v1/agent/token/agent", {"Token": "x"}, 403),
    ("bastion", "PUT", "/v1/agent/check/register", {"Name": "node-ttl", "TTL": "30s"}, 403),
    ("bastion", "PUT", "/v1/catalog/register", {"Node": "host-999", "Address": "10.9.9.9"}, 403),
    ("bastion", "PUT", "/v1/catalog/register", {"Node": "host-102", "Address": "10.6.6.6"}, 403),
    ("bastion", "PUT", "/v1/catalog/deregister", {"Node": "host-102"}, 403),
    ("bastion", "PUT", "/v1/event/fire/deploy", None, 403),
    ("bastion", "PUT", "/v1/session/create", {}, 403),
    # grants: the bastion reads them, never writes one
    ("bastion", "GET", "/v1/kv/grants/alice/host-103", None, 200),
    ("bastion", "GET", "/v1/kv/grants/?recurse", None, "nonempty"),
    ("bastion", "PUT", "/v1/kv/grants/alice/host-101", b'{"route": "host-101"}', 403),
    ("bastion", "DELETE", "/v1/kv/grants/alice/host-103", None, 403),
    ("bastion", "PUT", "/v1/session/create", {"TTL": "10s", "Behavior": "delete"}, 403),
    ("bastion", "GET", "/v1/operator/raft/configuration", None, 403),
    ("bastion", "GET", "/v1/snapshot", None, 403),
    # --- operator: writes the directory, reads nodes, nothing else
    ("operator", "PUT", "/v1/kv/users/carol", b"host-101", 200),
    ("operator", "PUT", "/v1/kv/ssh-keys/carol", b"ssh-ed25519 AAAA carol", 200),
    ("operator", "PUT", "/v1/kv/host-keys/host-101", b"ssh-ed25519 AAAA host-101", 200),
    ("operator", "DELETE", "/v1/kv/users/carol", None, 200),
    ("operator", "GET", "/v1/kv/users/?recurse", None, "nonempty"),
    ("operator", "GET", "/v1/catalog/node/host-102", None, "nonempty"),
    ("operator", "GET", "/v1/catalog/nodes", None, "nonempty"),
    ("operator", "PUT", "/v1/kv/grants/bob/host-101", b'{"route": "host-101"}', 200),
    ("operator", "DELETE", "/v1/kv/grants/bob/host-101", None, 200),
    ("operator", "GET", "/v1/kv/grants/?recurse", None, "nonempty"),
    ("operator", "PUT", "/v1/kv/grants", b"x", 403),
    # sessions on the managed agent's node only (not another node's locks)
    ("operator", "PUT", "/v1/session/create", {"Node": "host-101", "TTL": "10s"}, 403),
    ("operator", "PUT", "/v1/kv/secret/x", b"x", 403),
    ("operator", "GET", "/v1/kv/secret/x", None, 403),
    ("operator", "PUT", "/v1/kv/users-archive/x", b"x", 403),
    ("operator", "PUT", "/v1/kv/users", b"x", 403),
    ("operator", "GET", "/v1/acl/policies", None, 403),
    ("operator", "GET", "/v1/acl/tokens", None, 403),
    (
        "operator",
        "PUT",
        "/v1/acl/policy",
        {"Name": "evil", "Rules": 'key_prefix "" { policy = "write" }'},
        403,
    ),
    (
        "operator",
        "PUT",
        "/v1/agent/service/register",
        {"ID": "ssh-bastion", "Name": "ssh-bastion", "Port": 2222},
        403,
    ),
    ("operator", "PUT", "/v1/agent/service/register", {"Name": "web", "Port": 80}, 403),
    ("operator", "GET", "/v1/catalog/service/ssh-bastion", None, "empty"),
    ("operator", "PUT", "/v1/catalog/register", {"Node": "host-999", "Address": "10.9.9.9"}, 403),
    ("operator", "GET", "/v1/agent/self", None, 403),
    ("operator", "PUT", "/v1/agent/token/agent", {"Token": "x"}, 403),
    # --- agent (node identity consul-dev:dc1): its own node, service read
    ("agent", "PUT", "/v1/agent/check/register", {"Name": "agent-ttl", "TTL": "30s"}, 200),
    ("agent", "PUT", "/v1/agent/check/deregister/agent-ttl", None, 200),
    ("agent", "GET", "/v1/catalog/service/ssh-bastion", None, "nonempty"),
    ("agent", "GET", "/v1/catalog/node/consul-dev", None, "nonempty"),
    ("agent", "GET", "/v1/kv/users/alice", None, 403),
    ("agent", "PUT", "/v1/kv/users/alice", b"host-666", 403),
    ("agent", "PUT", "/v1/catalog/register", {"Node": "host-999", "Address": "10.9.9.9"}, 403),
    ("agent", "PUT", "/v1/catalog/register", {"Node": "host-102", "Address": "10.6.6.6"}, 403),
    ("agent", "PUT", "/v1/agent/service/register", {"Name": "web", "Port": 80}, 403),
    ("agent", "GET", "/v1/acl/policies", None, 403),
    ("agent", "GET", "/v1/agent/self", None, 403),
    # --- agent-reload (agent write on consul-dev): `consul reload`, nothing of the data
    ("agent-reload", "PUT", "/v1/agent/reload", None, 200),
    ("agent-reload", "GET", "/v1/kv/users/alice", None, 403),
    ("agent-reload", "GET", "/v1/kv/users/?recurse", None, 404),
    ("agent-reload", "PUT", "/v1/kv/users/alice", b"host-666", 403),
    ("agent-reload", "PUT", "/v1/kv/bastion/state", b"x", 403),
    (
        "agent-reload",
        "PUT",
        "/v1/agent/service/register",
        {"ID": "ssh-bastion", "Name": "ssh-bastion", "Port": 2222},
        403,
    ),
    ("agent-reload", "PUT", "/v1/agent/service/register", {"Name": "web", "Port": 80}, 403),
    ("agent-reload", "PUT", "/v1/agent/service/deregister/ssh-bastion", None, 403),
    ("agent-reload", "PUT", "/v1/agent/check/register", {"Name": "x", "TTL": "30s"}, 403),
    (
        "agent-reload",
        "PUT",
        "/v1/catalog/register",
        {"Node": "host-999", "Address": "10.9.9.9"},
        403,
    ),
    ("agent-reload", "PUT", "/v1/agent/maintenance?enable=true&reason=x", None, 403),
    ("agent-reload", "PUT", "/v1/agent/service/maintenance/ssh-bastion?enable=true", None, 403),
    ("agent-reload", "PUT", "/v1/agent/force-leave/host-101", None, 403),
    ("agent-reload", "GET", "/v1/catalog/nodes", None, "empty"),
    ("agent-reload", "GET", "/v1/catalog/service/ssh-bastion", None, "empty"),
    ("agent-reload", "GET", "/v1/agent/services", None, "empty"),
    ("agent-reload", "GET", "/v1/acl/policies", None, 403),
    ("agent-reload", "GET", "/v1/acl/tokens", None, 403),
    ("agent-reload", "GET", f"/v1/acl/token/{ANON}", None, 403),
    ("agent-reload", "PUT", "/v1/acl/token", {"Description": "evil"}, 403),
    ("agent-reload", "GET", "/v1/operator/raft/configuration", None, 403),
    ("agent-reload", "PUT", "/v1/event/fire/deploy", None, 403),
    ("agent-reload", "GET", "/v1/kv/grants/alice/host-103", None, 403),
    ("agent-reload", "PUT", "/v1/session/create", {"TTL": "10s"}, 403),
    # --- anonymous (no token): nothing
    ("anonymous", "GET", "/v1/kv/users/alice", None, 403),
    ("anonymous", "GET", "/v1/kv/ssh-keys/alice", None, 403),
    ("anonymous", "GET", "/v1/kv/?recurse", None, 404),
    ("anonymous", "GET", "/v1/kv/grants/alice/host-103", None, 403),
    ("anonymous", "GET", "/v1/kv/grants/?recurse", None, 404),
    ("anonymous", "PUT", "/v1/kv/grants/alice/host-101", b'{"route": "host-101"}', 403),
    ("anonymous", "PUT", "/v1/session/create", {"TTL": "10s"}, 403),
    ("anonymous", "PUT", "/v1/kv/users/alice", b"host-666", 403),
    ("anonymous", "GET", "/v1/catalog/nodes", None, "empty"),
    ("anonymous", "GET", "/v1/catalog/node/host-102", None, "empty"),
    ("anonymous", "GET", "/v1/health/node/host-102", None, "empty"),
    ("anonymous", "GET", "/v1/catalog/services", None, "empty"),
    ("anonymous", "GET", "/v1/catalog/service/ssh-bastion", None, "empty"),
    ("anonymous", "GET", "/v1/agent/members", None, "empty"),
    ("anonymous", "GET", "/v1/acl/policies", None, 403),
    ("anonymous", "GET", "/v1/agent/self", None, 403),
    ("anonymous", "PUT", "/v1/agent/service/register", {"Name": "web", "Port": 80}, 403),
    ("anonymous", "PUT", "/v1/catalog/register", {"Node": "host-999", "Address": "10.9.9.9"}, 403),
]


@pytest.mark.parametrize(
    ("actor", "method", "path", "body", "expect"),
    PERMISSIONS,
    ids=[f"{a}-{m}-{p}-{e}" for a, m, p, _, e in PERMISSIONS],
)
def test_token_permissions(
    kit: Kit, actor: str, method: str, path: str, body: Any, expect: int | str
) -> None:
    status, resp = kit.call(actor, method, path, body)
    if expect == "empty":
        assert status == 200 and not resp, (status, resp)
    elif expect == "nonempty":
        assert status == 200 and resp, (status, resp)
    else:
        assert status == expect, (status, resp)


def test_bastion_sees_only_its_prefixes_from_the_root(kit: Kit) -> None:
    status, entries = kit.call("bastion", "GET", "/v1/kv/?recurse")
    assert status == 200
    keys = {e["Key"] for e in entries}
    assert {"users/alice", "ssh-keys/alice", "host-keys/host-102", "grants/alice/host-103"} <= keys
    assert all(k.startswith(("users/", "ssh-keys/", "host-keys/", "grants/")) for k in keys), keys


def test_grant_lifecycle_by_token(kit: Kit) -> None:
    """A grant as `bastion grant` writes it: the operator creates a session
    (TTL, Behavior delete) and acquires the key; the bastion reads it but can
    neither take it over nor end its session; destroying the session makes
    Consul delete the key."""
    status, session = kit.call(
        "operator",
        "PUT",
        "/v1/session/create",
        {"Name": "grant", "TTL": "30s", "Behavior": "delete", "LockDelay": "0s"},
    )
    assert status == 200, session
    sid = session["ID"]
    value = b'{"route": "host-101", "expires": 4102444800}'
    path = "/v1/kv/grants/carol/host-101"
    assert kit.call("operator", "PUT", f"{path}?acquire={sid}", value) == (200, True)
    status, entries = kit.call("bastion", "GET", path)
    assert status == 200 and entries[0]["Session"] == sid
    # the bastion: no release, no writing over it, no ending the session
    assert kit.call("bastion", "PUT", f"{path}?release={sid}", value)[0] == 403
    assert kit.call("bastion", "PUT", path, b"{}")[0] == 403
    assert kit.call("bastion", "PUT", f"/v1/session/destroy/{sid}")[0] == 403
    assert kit.call("bastion", "PUT", f"/v1/session/renew/{sid}")[0] == 403
    assert kit.call("anonymous", "PUT", f"/v1/session/destroy/{sid}")[0] == 403
    assert kit.call("bastion", "GET", path)[0] == 200
    # the operator ends it: Consul deletes the key (Behavior delete)
    assert kit.call("operator", "PUT", f"/v1/session/destroy/{sid}") == (200, True)
    assert kit.call("bastion", "GET", path)[0] == 404


def test_bastion_reads_node_address_and_health(kit: Kit) -> None:
    status, node = kit.call("bastion", "GET", "/v1/catalog/node/host-102")
    assert status == 200 and node["Node"]["Address"] == "127.0.0.102"
    status, checks = kit.call("bastion", "GET", "/v1/health/node/host-102")
    assert status == 200 and [c["Status"] for c in checks] == ["passing"]
    # the refused re-registration did not move the node
    status, node = kit.agent.api("GET", "/v1/catalog/node/host-102")
    assert node["Node"]["Address"] == "127.0.0.102"


def test_agent_members_is_only_node_read(kit: Kit) -> None:
    """/v1/agent/members is filtered by node read: the bastion (node_prefix read)
    sees the gossip members -- the same names the catalog gives it -- and nothing
    of the agent itself (self, metrics: 403 above)."""
    status, members = kit.call("bastion", "GET", "/v1/agent/members")
    assert status == 200
    assert [m["Name"] for m in members] == ["consul-dev"]


def test_bastion_token_drains_only_its_own_service(kit: Kit) -> None:
    """What a drain needs (bastion/service.py): maintenance mode of its own
    service through the local agent, and nothing else: not another service's,
    not the node's."""
    agent = kit.agent
    own = {"ID": "ssh-bastion-drain", "Name": "ssh-bastion", "Port": 2299}
    other = {"ID": "web-1", "Name": "web", "Port": 80}
    for service in (own, other):
        status, body = agent.api("PUT", "/v1/agent/service/register", body=service)
        assert status == 200, body
    try:
        on = "/v1/agent/service/maintenance/{}?enable=true&reason=drain"
        assert kit.call("bastion", "PUT", on.format("ssh-bastion-drain"))[0] == 200
        status, passing = kit.call("bastion", "GET", "/v1/health/service/ssh-bastion?passing=1")
        assert status == 200
        assert "ssh-bastion-drain" not in {e["Service"]["ID"] for e in passing or []}
        assert kit.call("bastion", "PUT", on.format("web-1"))[0] == 403
        assert kit.call("bastion", "PUT", "/v1/agent/maintenance?enable=true")[0] == 403
        off = "/v1/agent/service/maintenance/ssh-bastion-drain?enable=false"
        assert kit.call("bastion", "PUT", off)[0] == 200
    finally:
        for service in (own, other):
            agent.api("PUT", f"/v1/agent/service/deregister/{service['ID']}")


def test_agent_reload_token_reloads_and_what_else_agent_write_means(kit: Kit) -> None:
    """`consul reload` works with the agent-reload token (what `bastion register
    --reload-token-file` runs). Agent write on the node cannot be split: it also
    reads the agent's own config, and on Consul 1.8 it may set the agent's ACL
    tokens (current Consul requires acl:write there) -- documented in
    acl-policies/agent-reload.hcl; the service manager needs no token at all."""
    agent = kit.agent
    res = agent.run_cli("reload", token=kit.tokens["agent-reload"], check=False)
    assert res.returncode == 0 and "reload triggered" in res.stdout.lower(), res.stderr
    for actor in ("bastion", "operator", "agent", "anonymous"):
        assert kit.call(actor, "PUT", "/v1/agent/reload")[0] == 403, actor
    status, self_info = kit.call("agent-reload", "GET", "/v1/agent/self")
    assert status == 200 and self_info["Config"]["NodeName"] == "consul-dev"
    # set the agent token to the one it already has: harmless, and shows the grant
    status, _ = kit.call(
        "agent-reload", "PUT", "/v1/agent/token/agent", {"Token": kit.tokens["agent"]}
    )
    assert status == (200 if self_info["Config"]["Version"].startswith("1.8.") else 403)


def test_anonymous_dns_variant(kit: Kit) -> None:
    agent = kit.agent
    assert kit.call("anonymous", "GET", "/v1/catalog/nodes") == (200, [])
    res = run_ok(agent, kit.out, "--anonymous-dns")
    assert "token anonymous: set to policy anonymous-dns" in res.stdout
    status, nodes = kit.call("anonymous", "GET", "/v1/catalog/nodes")
    assert status == 200
    assert {"host-101", "host-102"} <= {n["Node"] for n in nodes}  # the fleet inventory
    assert kit.call("anonymous", "GET", "/v1/kv/users/alice")[0] == 403
    assert kit.call("anonymous", "GET", "/v1/acl/policies")[0] == 403
    assert (
        kit.call(
            "anonymous", "PUT", "/v1/catalog/register", {"Node": "host-999", "Address": "10.9.9.9"}
        )[0]
        == 403
    )
    # without the flag: back to deny-all
    res = run_ok(agent, kit.out)
    assert "token anonymous: set to policy anonymous " in res.stdout
    assert kit.call("anonymous", "GET", "/v1/catalog/nodes") == (200, [])


@pytest.mark.parametrize("via", ["bao-cli", "curl"])
def test_vault_path_stores_bastion_token(kit: Kit, tmp_path: Path, via: str) -> None:
    bao = BaoServer(tmp_path / "bao").start()
    try:
        venv_bin = str(Path(bao_bin()).parent)
        base_path = "/usr/local/bin:/usr/bin:/bin"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env.update(
            VAULT_ADDR=bao.addr,
            VAULT_TOKEN=bao.root_token,
            PATH=f"{venv_bin}:{base_path}" if via == "bao-cli" else base_path,
        )
        args = ("--vault-path", "secret/bastion/consul")
        res = run_ok(kit.agent, kit.out, *args, env=env)
        tool = "bao" if via == "bao-cli" else "curl"
        assert (
            f"vault: bastion token stored at secret/bastion/consul (field token, {tool})"
            in res.stdout
        )
        assert_no_secret_printed(res, kit.out)
        status, body = bao.api("GET", "/v1/secret/data/bastion/consul")
        assert status == 200
        assert body["data"]["data"] == {"token": kit.tokens["bastion"]}
        res = run_ok(kit.agent, kit.out, *args, env=env)
        assert "vault: bastion token already at secret/bastion/consul" in res.stdout
        status, body = bao.api("GET", "/v1/secret/data/bastion/consul")
        assert body["data"]["metadata"]["version"] == 1
    finally:
        bao.stop()


def test_agent_node_option(kit: Kit) -> None:
    agent, acc = kit.agent, kit.accessors["agent"]
    before = acl_indexes(agent)
    res = run_ok(agent, kit.out, "--agent-node", "consul-dev")
    assert "token agent: unchanged" in res.stdout
    assert acl_indexes(agent) == before
    try:
        res = run_ok(agent, kit.out, "--agent-node", "host-101")
        assert "token agent: reset to node:host-101:dc1 (had: node:consul-dev:dc1)" in res.stdout
        assert token_links(agent, acc) == ["node:host-101:dc1"]
        # the reload policy follows the node: it reloads host-101's agent, not this one
        assert "policy agent-reload: updated" in res.stdout
        assert kit.call("agent-reload", "PUT", "/v1/agent/reload")[0] == 403
        token = kit.tokens["agent"]
        assert (
            agent.api(
                "PUT",
                "/v1/catalog/register",
                {"Node": "host-101", "Address": "127.0.0.101"},
                token=token,
            )[0]
            == 200
        )
        assert (
            agent.api(
                "PUT", "/v1/agent/check/register", {"Name": "agent-ttl", "TTL": "30s"}, token=token
            )[0]
            == 403
        )
    finally:
        run_ok(agent, kit.out)
    assert token_links(agent, acc) == ["node:consul-dev:dc1"]
    assert kit.call("agent-reload", "PUT", "/v1/agent/reload")[0] == 200


# --------------------------------------------------------------------------
# management token sources and failure modes


def test_management_token_from_env_is_not_written(kit: Kit, tmp_path: Path) -> None:
    out = tmp_path / "env-run"
    # copy the persisted IDs so that this run manages the same tokens
    shutil.copytree(kit.out, out)
    (out / "management.token").unlink()
    before = acl_indexes(kit.agent)
    res = run_script(
        kit.agent.http_addr, out, env_extra={"CONSUL_HTTP_TOKEN": kit.tokens["management"]}
    )
    assert res.returncode == 0, res.stderr
    assert "from CONSUL_HTTP_TOKEN, accepted" in res.stdout
    assert not (out / "management.token").exists()
    assert acl_indexes(kit.agent) == before
    assert kit.tokens["management"] not in res.stdout + res.stderr


def test_management_token_file_is_copied(kit: Kit, tmp_path: Path) -> None:
    out = tmp_path / "file-run"
    shutil.copytree(kit.out, out)
    (out / "management.token").unlink()
    given = tmp_path / "mgmt"
    given.write_text(kit.tokens["management"] + "\n")
    res = run_ok(kit.agent, out, "--management-token-file", str(given))
    assert (out / "management.token").read_text() == kit.tokens["management"] + "\n"
    assert stat.S_IMODE((out / "management.token").stat().st_mode) == 0o600
    assert_no_secret_printed(res, out)


def test_fails_when_consul_unreachable(tmp_path: Path) -> None:
    res = run_script(f"http://127.0.0.1:{free_port()}", tmp_path / "out")
    assert_one_line_error(res, "unreachable", "connection refused")
    assert not (tmp_path / "out" / "management.token").exists()


def test_fails_when_bootstrapped_and_no_token(tmp_path: Path) -> None:
    agent = started_agent(tmp_path / "consul")
    try:
        agent.bootstrap()  # someone else bootstrapped it; we have no token
        res = bootstrap_acl(agent, tmp_path / "out")
        assert_one_line_error(res, "already bootstrapped", "no management token")
        assert not list((tmp_path / "out").glob("*.token"))
        # wrong token, by file and by environment: 403 ACL not found
        wrong = tmp_path / "wrong"
        wrong.write_text(str(uuid.uuid4()) + "\n")
        res = bootstrap_acl(agent, tmp_path / "out", "--management-token-file", str(wrong))
        assert_one_line_error(res, "rejected", "ACL not found")
        res = run_script(
            agent.http_addr, tmp_path / "out", env_extra={"CONSUL_HTTP_TOKEN": str(uuid.uuid4())}
        )
        assert_one_line_error(res, "rejected", "ACL not found")
        assert not list((tmp_path / "out").glob("*.token"))
        # a real token that is not a management token
        status, tok = agent.api("PUT", "/v1/acl/token", {"Description": "nobody"})
        assert status == 200
        res = run_script(
            agent.http_addr, tmp_path / "out", env_extra={"CONSUL_HTTP_TOKEN": tok["SecretID"]}
        )
        assert_one_line_error(res, "may not manage ACLs")
    finally:
        agent.stop()


def test_usage_errors(tmp_path: Path) -> None:
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert res.returncode != 0 and "--out DIR is required" in res.stderr
    res = run_script("http://127.0.0.1:1", tmp_path / "o", "--policies", str(tmp_path))
    assert_one_line_error(res, "missing policy file")


# --------------------------------------------------------------------------
# drift repair, the DNS variant, rotation, Vault


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Kit]:
    agent = started_agent(tmp_path / "consul")
    try:
        policies = tmp_path / "policies"
        shutil.copytree(POLICIES, policies)
        out = tmp_path / "out"
        k = Kit(agent=agent, out=out, first_run=run_ok(agent, out, "--policies", str(policies)))
        k.load()
        seed(agent)
        yield k
    finally:
        agent.stop()


def test_drift_policy_file_and_hand_edit_are_repaired(fresh: Kit) -> None:
    agent, policies = fresh.agent, fresh.out.parent / "policies"
    pid, _ = policy_rules(agent, "bastion")
    assert fresh.call("bastion", "GET", "/v1/kv/secret/x")[0] == 403
    # the file changes: the policy follows, same ID
    f = policies / "bastion.hcl"
    f.write_text(f.read_text() + '\nkey_prefix "secret/" {\n  policy = "read"\n}\n')
    res = run_ok(agent, fresh.out, "--policies", str(policies))
    assert "policy bastion: updated" in res.stdout
    assert "policy operator: unchanged" in res.stdout
    assert policy_rules(agent, "bastion") == (pid, f.read_text())
    assert fresh.call("bastion", "GET", "/v1/kv/secret/x")[0] == 200
    # someone edits the policy in Consul by hand: the next run restores the file's rules
    agent.run_cli(
        "acl", "policy", "update", "-id", pid, "-rules", 'key_prefix "" { policy = "write" }'
    )
    assert fresh.call("bastion", "PUT", "/v1/kv/users/alice", b"host-666")[0] == 200
    res = run_ok(agent, fresh.out, "--policies", str(policies))
    assert "policy bastion: updated" in res.stdout
    assert policy_rules(agent, "bastion") == (pid, f.read_text())
    assert fresh.call("bastion", "PUT", "/v1/kv/users/alice", b"host-666")[0] == 403
    # and then it is stable again
    before = acl_indexes(agent)
    run_ok(agent, fresh.out, "--policies", str(policies))
    assert acl_indexes(agent) == before


def test_drift_token_links_are_reset(fresh: Kit) -> None:
    agent, policies = fresh.agent, fresh.out.parent / "policies"
    bastion, agent_acc = fresh.accessors["bastion"], fresh.accessors["agent"]
    agent.run_cli(
        "acl",
        "token",
        "update",
        "-id",
        bastion,
        "-policy-name",
        "bastion",
        "-policy-name",
        "operator",
    )
    assert token_links(agent, bastion) == ["policy:bastion", "policy:operator"]
    assert fresh.call("bastion", "PUT", "/v1/kv/users/alice", b"host-666")[0] == 200
    agent.run_cli(
        "acl",
        "token",
        "update",
        "-id",
        agent_acc,
        "-node-identity",
        "consul-dev:dc1",
        "-policy-name",
        "operator",
    )
    assert token_links(agent, agent_acc) == ["node:consul-dev:dc1", "policy:operator"]
    agent.run_cli("acl", "token", "update", "-id", ANON, "-policy-name", "anonymous-dns")

    res = run_ok(agent, fresh.out, "--policies", str(policies))
    assert "token bastion: reset" in res.stdout
    assert "token agent: reset" in res.stdout
    assert "token anonymous: set to policy anonymous" in res.stdout
    assert "token operator: unchanged" in res.stdout
    assert token_links(agent, bastion) == ["policy:bastion"]
    assert token_links(agent, agent_acc) == ["node:consul-dev:dc1"]
    assert token_links(agent, ANON) == ["policy:anonymous"]
    # same secrets as before: the bastion keeps working, without the extra rights
    _, tok = agent.api("GET", f"/v1/acl/token/{bastion}")
    assert tok["SecretID"] == fresh.tokens["bastion"]
    assert fresh.call("bastion", "PUT", "/v1/kv/users/alice", b"host-666")[0] == 403
    assert fresh.call("bastion", "GET", "/v1/kv/users/alice")[0] == 200
    assert_no_secret_printed(res, fresh.out)


def test_rotate_bastion_token_as_documented(fresh: Kit) -> None:
    """The procedure in deploy/README-operators.md: move the two files aside,
    re-run (new token), deploy it, then delete the old accessor."""
    agent, out, policies = fresh.agent, fresh.out, fresh.out.parent / "policies"
    old_secret, old_acc = fresh.tokens["bastion"], fresh.accessors["bastion"]
    (out / "bastion.token").rename(out / "bastion.token.old")
    (out / "bastion.accessor").rename(out / "bastion.accessor.old")
    res = run_ok(agent, out, "--policies", str(policies))
    assert "token bastion: created" in res.stdout
    new_secret = (out / "bastion.token").read_text().strip()
    assert new_secret != old_secret
    for secret in (old_secret, new_secret):
        status, _ = agent.api("GET", "/v1/kv/users/alice", token=secret)
        assert status == 200
    agent.run_cli("acl", "token", "delete", "-id", old_acc)
    assert agent.api("GET", "/v1/kv/users/alice", token=old_secret)[0] == 403
    assert agent.api("GET", "/v1/kv/users/alice", token=new_secret)[0] == 200


def test_replaced_secret_file_is_a_clear_error(kit: Kit, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(kit.out, out)
    (out / "operator.token").write_text(str(uuid.uuid4()) + "\n")
    before = acl_indexes(kit.agent)
    res = bootstrap_acl(kit.agent, out)
    assert_one_line_error(res, "token operator", "different secret")
    assert acl_indexes(kit.agent) == before
    # a secret already used by another token (its accessor file lost)
    shutil.rmtree(out)
    shutil.copytree(kit.out, out)
    (out / "operator.accessor").unlink()
    res = bootstrap_acl(kit.agent, out)
    assert_one_line_error(res, "creating token operator", "already belongs to another token")
    assert acl_indexes(kit.agent) == before


def test_vault_path_needs_vault_env(kit: Kit) -> None:
    res = bootstrap_acl(
        kit.agent,
        kit.out,
        "--vault-path",
        "secret/bastion/consul",
        env={k: v for k, v in os.environ.items() if not k.startswith("VAULT_")},
    )
    assert_one_line_error(res, "VAULT_ADDR")


# --------------------------------------------------------------------------
# static checks


def test_shellcheck_clean() -> None:
    scripts = sorted(str(p) for p in (ROOT / "deploy").glob("*.sh"))
    assert str(SCRIPT) in scripts
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck missing: run scripts/setup.sh"
    res = subprocess.run([shellcheck, *scripts], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_policy_files_use_portable_grammar() -> None:
    """No Enterprise-only or post-1.8 blocks; every file has a header comment;
    the bastion's policy has exactly the rules it needs."""
    files = {p.stem: p.read_text() for p in POLICIES.glob("*.hcl")}
    assert {"bastion", "operator", "anonymous", "anonymous-dns", "agent-reload"} <= set(files)
    for name, text in files.items():
        assert text.startswith("#"), f"{name}.hcl needs a header comment"
        assert not re.search(r"^\s*(partition|namespace|mesh|peering)\b", text, re.M), name
    rules = re.findall(
        r'^(\w+)\s+"([^"]*)"\s*\{\s*\n\s*policy\s*=\s*"(\w+)"', files["bastion"], re.M
    )
    assert sorted(rules) == sorted(
        [
            ("key_prefix", "users/", "read"),
            ("key_prefix", "ssh-keys/", "read"),
            ("key_prefix", "host-keys/", "read"),
            ("key_prefix", "grants/", "read"),
            ("node_prefix", "", "read"),
            ("service", "ssh-bastion", "write"),
        ]
    )
    # nothing besides those six blocks (no top-level acl/agent/operator rules)
    code = re.sub(r"#.*", "", files["bastion"])
    assert len(re.findall(r"\bpolicy\s*=", code)) == 6
    assert not re.search(r"^\s*(acl|operator|keyring)\s*=", code, re.M)
    # agent-reload: agent write on the one node the script puts in, nothing else
    code = re.sub(r"#.*", "", files["agent-reload"])
    rules = re.findall(r'^(\w+)\s+"([^"]*)"\s*\{\s*\n\s*policy\s*=\s*"(\w+)"', code, re.M)
    assert rules == [("agent", "@AGENT_NODE@", "write")]
    assert len(re.findall(r"\bpolicy\s*=", code)) == 1


def _argv_logging_path(tmp_path: Path, log: Path, *tools: str) -> str:
    """A PATH whose ``tools`` log their arguments to ``log``, then run the real one."""
    shims = tmp_path / "shims"
    shims.mkdir()
    for tool in tools:
        real = shutil.which(tool, path=f"{Path(consul_bin()).parent}:{os.environ['PATH']}")
        assert real, tool
        shim = shims / tool
        shim.write_text(f'#!/bin/sh\nprintf "%s\\n" "{tool} $*" >> "{log}"\nexec "{real}" "$@"\n')
        shim.chmod(0o755)
    return f"{shims}:{Path(consul_bin()).parent}:{os.environ['PATH']}"


def test_no_secret_is_ever_in_a_process_argument_list(tmp_path: Path) -> None:
    """Tokens are created and the agent token set over the HTTP API with the
    secrets on stdin and in a piped header: `ps` never shows one."""
    agent = started_agent(tmp_path / "consul")
    try:
        log = tmp_path / "argv.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
        env["CONSUL_HTTP_ADDR"] = agent.http_addr
        env["PATH"] = _argv_logging_path(tmp_path, log, "consul", "curl", "python3")
        out = tmp_path / "out"
        res = subprocess.run(
            ["bash", str(ROOT / "deploy/bootstrap-acl.sh"), "--out", str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        calls = log.read_text()
        for secret in secrets_of(out):
            assert secret not in calls, "a secret was in a command line"
        assert "curl -sS --max-time 10 -X PUT" in calls  # the HTTP API did the work
        assert "consul acl policy" in calls  # the shims saw the CLI too
        # and the tokens work as created
        accessor = (out / "bastion.accessor").read_text().strip()
        management = (out / "management.token").read_text().strip()
        status, tok = agent.api("GET", f"/v1/acl/token/{accessor}", token=management)
        assert status == 200
        assert tok["SecretID"] == (out / "bastion.token").read_text().strip()
    finally:
        agent.stop()
