"""``bastion doctor`` against the real stack: the session's correct deployment
passes, and each deliberately widened setup (a bastion policy that may write
all of KV, an anonymous token that may read routes, a routed node without a
host key, a secret file readable by others, an agent with remote script
checks) is caught as a FAIL under the right name, then put back as it was."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ConsulTokens, VaultSetup, route

import devstack
from devstack import (
    BastionProcess,
    ConsulAgent,
    SshdHost,
    bastion_bin,
    render_settings,
    wait_until,
)

ANON = "00000000-0000-0000-0000-000000000002"
PROBE_MARK = "bastion-doctor-probe"


@dataclass(frozen=True)
class Result:
    code: int
    checks: list[dict[str, str]]
    stdout: str
    stderr: str

    @property
    def by_name(self) -> dict[str, dict[str, str]]:
        return {c["name"]: c for c in self.checks}

    def named(self, status: str) -> set[str]:
        return {c["name"] for c in self.checks if c["status"] == status}


def run_doctor(config: Path, *extra: str, as_json: bool = True) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "VAULT_", "BAO_"))}
    argv = [bastion_bin(), "doctor", "--config", str(config), *extra]
    if as_json:
        argv.append("--json")
    res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)
    checks = json.loads(res.stdout)["checks"] if as_json else []
    if as_json:
        names = [c["name"] for c in checks]
        assert len(names) == len(set(names)), names
    return Result(res.returncode, checks, res.stdout, res.stderr)


def ok(status: int, body: Any) -> Any:
    assert status == 200, body
    return body


def leftovers(consul: ConsulAgent) -> list[str]:
    """Anything a probe created and did not remove (KV keys, nodes, services)."""
    status, keys = consul.api("GET", "/v1/kv/?keys")
    found = [k for k in (keys if status == 200 else []) if PROBE_MARK in k]
    nodes = ok(*consul.api("GET", "/v1/catalog/nodes"))
    found += [n["Node"] for n in nodes if PROBE_MARK in n["Node"]]
    found += [s for s in ok(*consul.api("GET", "/v1/agent/services")) if PROBE_MARK in s]
    return found


@pytest.fixture(scope="module")
def routes(
    consul: ConsulAgent, hosts: dict[str, SshdHost], directory_entries: None
) -> Iterator[None]:
    """The session's routes exactly as conftest made them (other tests may have
    left theirs), put back as found afterwards."""
    status, saved = consul.api("GET", "/v1/kv/users/?recurse")
    saved = saved if status == 200 else []
    ok(*consul.api("DELETE", "/v1/kv/users/?recurse"))
    for user, host in (("alice", "host-102"), ("bob", "host-101"), ("carol", "host-102")):
        consul.kv_put(f"users/{user}", route(hosts, host))
    yield
    ok(*consul.api("DELETE", "/v1/kv/users/?recurse"))
    for entry in saved:
        consul.kv_put(entry["Key"], base64.b64decode(entry["Value"] or ""))


@pytest.fixture(scope="module")
def stack(consul: ConsulAgent, bastion: BastionProcess, routes: None) -> Iterator[BastionProcess]:
    """The session bastion, with its service registered on the agent (a TCP
    check on its port) and passing, as a deployment has it."""
    sid = f"ssh-bastion-{bastion.port}"
    check = {"TCP": f"127.0.0.1:{bastion.port}", "Interval": "1s", "Timeout": "1s"}
    service = {"ID": sid, "Name": "ssh-bastion", "Port": bastion.port, "Check": check}
    ok(*consul.api("PUT", "/v1/agent/service/register", body=service))

    def passing() -> bool:
        status, entries = consul.api("GET", "/v1/health/service/ssh-bastion?passing=1")
        return status == 200 and any(e["Service"]["ID"] == sid for e in entries)

    try:
        wait_until("ssh-bastion passing in the catalog", passing, 20)
        yield bastion
    finally:
        consul.api("PUT", f"/v1/agent/service/deregister/{sid}")


def management_file(consul_tokens: ConsulTokens) -> str:
    return str(consul_tokens.files / "management.token")


def config_like(stack: BastionProcess, path: Path, **changes: dict[str, Any]) -> Path:
    """The session bastion's settings with some values replaced, by section."""
    sections = tomllib.loads(stack.config.read_text())
    for name, values in changes.items():
        sections.setdefault(name, {}).update(values)
    path.write_text(render_settings(sections))
    return path


# --------------------------------------------------------------------------
# the correct stack


def test_correct_stack_all_pass_with_the_management_token(
    stack: BastionProcess, consul: ConsulAgent, consul_tokens: ConsulTokens
) -> None:
    res = run_doctor(stack.config, "--consul-token-file", management_file(consul_tokens))
    assert res.code == 0, res.stdout
    not_passed = [c for c in res.checks if c["status"] != "PASS"]
    assert not not_passed, json.dumps(not_passed, indent=2)
    names = set(res.by_name)
    expected = {
        "consul: acls enabled",
        "consul: default deny",
        "consul: remote script checks",
        "consul: local script checks",
        "consul: http api",
        "consul: clock",
        "vault: clock",
        "anonymous: kv read",
        "anonymous: kv write",
        "anonymous: node write",
        "anonymous: service write",
        "anonymous: agent read",
        "bastion token: read users/",
        "bastion token: read ssh-keys/",
        "bastion token: read host-keys/",
        "bastion token: read grants/",
        "bastion token: list nodes",
        "bastion token: read health",
        "bastion token: service maintenance",
        "bastion token: no write users/",
        "bastion token: no write grants/",
        "bastion token: no write elsewhere",
        "bastion token: no read secret-probe/",
        "bastion token: no acl list",
        "bastion token: no agent read",
        "bastion token: no agent write",
        "bastion token: no node maintenance",
        "bastion token: no other service",
        "bastion token: no catalog register",
        "service: registration",
        "service: health",
        "vault: health",
        "vault: login",
        "vault: token renewal",
        "vault role: max_ttl",
        "vault role: allowed_users",
        "vault role: key ids",
        "host keys",
        "file: [consul] token_file",
        "file: [vault] secret_id_file",
    }
    assert expected <= names, sorted(expected - names)
    assert "signs for all 3 routed logins" in res.by_name["vault role: allowed_users"]["detail"]
    # the probes left nothing behind, and the service is out of maintenance again
    assert leftovers(consul) == []
    checks = ok(*consul.api("GET", "/v1/agent/checks"))
    assert not [c for c in checks if c.startswith("_")], checks


def test_table_without_operator_token_warns_only_about_agent_config(
    stack: BastionProcess,
) -> None:
    res = run_doctor(stack.config, as_json=False)
    assert res.code == 0, res.stdout
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["STATUS", "CHECK", "DETAIL"]
    rows = [line for line in lines if line.split()[:1] in (["PASS"], ["WARN"], ["FAIL"])]
    assert not [r for r in rows if r.startswith("FAIL")], res.stdout
    warns = [r for r in rows if r.startswith("WARN")]
    assert len(warns) == 1 and "consul: agent config" in warns[0], res.stdout
    assert "cannot see agent config with the bastion token" in warns[0]
    after = lines[lines.index(warns[0]) + 1]
    assert after.strip().startswith("fix: ") and "--consul-token-file" in after
    assert "bastion token: no agent read" in res.stdout
    assert lines[-1].endswith(" 1 WARN, 0 FAIL"), lines[-1]


# --------------------------------------------------------------------------
# widened setups, each caught and put back


@contextlib.contextmanager
def widened_policy(consul: ConsulAgent, name: str, extra: str) -> Iterator[None]:
    """Policy ``name`` with ``extra`` rules added (by ID: on 1.8 a name would rename)."""
    policies = ok(*consul.api("GET", "/v1/acl/policies"))
    pid = next(p["ID"] for p in policies if p["Name"] == name)
    original = ok(*consul.api("GET", f"/v1/acl/policy/{pid}"))

    def put(rules: str) -> None:
        body = {"ID": pid, "Name": name, "Description": original["Description"], "Rules": rules}
        ok(*consul.api("PUT", f"/v1/acl/policy/{pid}", body=body))

    put(original["Rules"] + "\n" + extra)
    try:
        yield
    finally:
        put(original["Rules"])
        assert ok(*consul.api("GET", f"/v1/acl/policy/{pid}"))["Rules"] == original["Rules"]


def test_bastion_policy_that_may_write_all_kv(stack: BastionProcess, consul: ConsulAgent) -> None:
    with widened_policy(consul, "bastion", 'key_prefix "" {\n  policy = "write"\n}\n'):
        res = run_doctor(stack.config)
        # what the policy allows beyond its prefixes, and the writes into them
        assert leftovers(consul) == []
    assert res.code == 1, res.stdout
    # users/, ssh-keys/ and host-keys/ keep their more specific "read" rules
    # (longest prefix wins): everywhere else the bastion may now read and write
    assert res.named("FAIL") == {
        "bastion token: no write elsewhere",
        "bastion token: no read secret-probe/",
    }, res.stdout
    fail = res.by_name["bastion token: no write elsewhere"]
    assert fail["detail"].startswith("ALLOWED: the bastion may write KV outside its prefixes")
    assert "then deleted it" in fail["detail"]
    assert "bootstrap-acl.sh" in fail["fix"]
    assert run_doctor(stack.config).code == 0  # restored


def test_bastion_policy_from_before_grants(stack: BastionProcess, consul: ConsulAgent) -> None:
    """An upgrade that did not re-run bootstrap-acl.sh: the bastion token cannot
    read grants/ (Consul answers it like an empty prefix), so grants would
    silently grant nothing; the doctor says so."""
    policies = ok(*consul.api("GET", "/v1/acl/policies"))
    pid = next(p["ID"] for p in policies if p["Name"] == "bastion")
    original = ok(*consul.api("GET", f"/v1/acl/policy/{pid}"))
    narrowed = re.sub(r'key_prefix "grants/" \{[^}]*\}\n?', "", original["Rules"])
    assert narrowed != original["Rules"]

    def put(rules: str) -> None:
        body = {
            "ID": pid,
            "Name": "bastion",
            "Description": original["Description"],
            "Rules": rules,
        }
        ok(*consul.api("PUT", f"/v1/acl/policy/{pid}", body=body))

    put(narrowed)
    try:
        res = run_doctor(stack.config)
    finally:
        put(original["Rules"])
    assert res.code == 1, res.stdout
    assert res.named("FAIL") == {"bastion token: read grants/"}, res.stdout
    assert "bootstrap-acl.sh" in res.by_name["bastion token: read grants/"]["fix"]


def test_anonymous_token_that_may_read_routes(stack: BastionProcess, consul: ConsulAgent) -> None:
    token = ok(*consul.api("GET", f"/v1/acl/token/{ANON}"))
    before = [{"ID": p["ID"]} for p in token["Policies"] or []]
    rules = 'key_prefix "users/" {\n  policy = "read"\n}\n'
    body = {"Name": "doctor-anon-kv", "Rules": rules}
    policy = ok(*consul.api("PUT", "/v1/acl/policy", body=body))

    def set_policies(links: list[dict[str, str]]) -> None:
        body = {"AccessorID": ANON, "Description": token["Description"], "Policies": links}
        ok(*consul.api("PUT", f"/v1/acl/token/{ANON}", body=body))

    try:
        set_policies([*before, {"ID": policy["ID"]}])
        res = run_doctor(stack.config)
    finally:
        set_policies(before)
        ok(*consul.api("DELETE", f"/v1/acl/policy/{policy['ID']}"))
    assert res.code == 1, res.stdout
    assert res.named("FAIL") == {"anonymous: kv read"}, res.stdout
    assert "00000000-0000-0000-0000-000000000002" in res.by_name["anonymous: kv read"]["fix"]
    after = ok(*consul.api("GET", f"/v1/acl/token/{ANON}"))
    assert [p["ID"] for p in after["Policies"]] == [p["ID"] for p in before]


def test_routed_node_without_a_host_key(stack: BastionProcess, consul: ConsulAgent) -> None:
    consul.register_node("host-zed", "192.0.2.55")
    consul.kv_put("users/zed", "host-zed")
    try:
        res = run_doctor(stack.config)
    finally:
        consul.kv_delete("users/zed")
        ok(*consul.api("PUT", "/v1/catalog/deregister", body={"Node": "host-zed"}))
    assert res.code == 1, res.stdout
    assert res.named("FAIL") == {"host key: host-zed"}, res.stdout
    check = res.by_name["host key: host-zed"]
    assert "users: zed" in check["detail"]
    fix = 'consul kv put host-keys/host-zed "$(cat ssh_host_ed25519_key.pub)"'
    assert check["fix"].startswith(fix), check
    assert "host keys" not in res.by_name  # the summary row is for a clean bill only


def test_secret_file_readable_by_others(stack: BastionProcess, tmp_path: Path) -> None:
    original = tomllib.loads(stack.config.read_text())["consul"]["token_file"]
    loose = tmp_path / "bastion.token"
    shutil.copy(original, loose)
    loose.chmod(0o644)
    config = config_like(stack, tmp_path / "bastion.toml", consul={"token_file": str(loose)})
    res = run_doctor(config)
    assert res.code == 1, res.stdout
    assert res.named("FAIL") == {"file: [consul] token_file"}, res.stdout
    check = res.by_name["file: [consul] token_file"]
    assert "mode 644" in check["detail"] and check["fix"] == f"chmod 600 {loose}"


def test_agent_with_remote_script_checks(stack: BastionProcess, tmp_path: Path) -> None:
    """Its own agent, started with enable_script_checks = true and secured by the
    ACL kit; doctor reads its configuration with its management token."""
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "script-checks.hcl").write_text("enable_script_checks = true\n")
    agent = ConsulAgent(tmp_path / "consul", node="doctor-rce", extra_config_dirs=[extra])
    try:
        agent.start()
        tokens = tmp_path / "tokens"
        devstack.secure_consul(agent, tokens)
        config = config_like(
            stack,
            tmp_path / "bastion.toml",
            consul={"address": agent.http_addr, "token_file": str(tokens / "bastion.token")},
        )
        res = run_doctor(config, "--consul-token-file", str(tokens / "management.token"))
    finally:
        agent.stop()
    assert res.code == 1, res.stdout
    assert res.named("FAIL") == {"consul: remote script checks"}, res.stdout
    check = res.by_name["consul: remote script checks"]
    assert "enable_script_checks = true" in check["detail"]
    assert "remove enable_script_checks" in check["fix"]
    for name in ("consul: acls enabled", "consul: default deny", "consul: http api"):
        assert res.by_name[name]["status"] == "PASS", res.by_name[name]


@pytest.mark.parametrize("how", ["approle", "admin-token"])
def test_cert_ttl_above_the_role_max_ttl(
    stack: BastionProcess, vault: VaultSetup, tmp_path: Path, how: str
) -> None:
    """The shipped role has max_ttl 10m. With the bastion's AppRole the role is
    not readable and a signing probe finds it out; with a token that may read
    the role, its fields do."""
    changes: dict[str, dict[str, Any]] = {"upstream": {"cert_ttl": 900}}
    if how == "admin-token":
        token = tmp_path / "vault.token"
        token.write_text(vault.root_token + "\n")
        token.chmod(0o600)
        changes["vault"] = {"token_file": str(token), "role_id_file": None, "secret_id_file": None}
    res = run_doctor(config_like(stack, tmp_path / "bastion.toml", **changes))
    assert res.code == 1, res.stdout
    assert res.named("FAIL") == {"vault role: max_ttl"}, res.stdout
    check = res.by_name["vault role: max_ttl"]
    assert "900" in check["detail"] and "--max-ttl" in check["fix"], check
    for name in ("vault role: allowed_users", "vault role: key ids"):
        assert res.by_name[name]["status"] == "PASS", res.by_name[name]
    if how == "admin-token":
        assert "max_ttl 600 < cert_ttl 900" in check["detail"]
        # a root token never expires: said, but not a failure
        assert res.by_name["vault: token renewal"]["status"] == "WARN"
    else:
        assert "signing throwaway keys" in res.by_name["vault role: allowed_users"]["detail"]
