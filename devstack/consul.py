"""A real Consul agent (ACLs on, deny by default) and its securing with
``deploy/bootstrap-acl.sh``."""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devstack.process import ROOT, Process, StackError, consul_bin, free_port, http_json, wait_until

CONSUL_AGENT_HCL = """\
datacenter = "dc1"
node_name = "{node}"
data_dir = "{data_dir}"
bind_addr = "127.0.0.1"
client_addr = "127.0.0.1"
log_level = "INFO"
enable_local_script_checks = true
disable_update_check = true
ports {{
  http = {http}
  dns = {dns}
  grpc = -1
  serf_lan = {serf_lan}
  serf_wan = {serf_wan}
  server = {server}
}}
acl {{
  enabled = true
  default_policy = "deny"
  down_policy = "extend-cache"
  enable_token_persistence = true
}}
"""


@dataclass
class ConsulAgent:
    """A real Consul agent (``-dev``) with ACLs on and ``default_policy = "deny"``.

    Its configuration is a directory, ``config_dir`` (``agent.hcl`` and what
    ``bastion register`` adds), like ``/etc/consul.d`` on a host, so ``consul
    validate`` and ``consul reload`` work on it as they do there. DNS is off
    unless ``dns_port`` is 0 (a free port) or a port."""

    workdir: Path
    node: str = "consul-dev"
    extra_config_dirs: list[Path] = field(default_factory=list)
    env: dict[str, str] | None = None
    http_port: int = 0
    dns_port: int = -1
    process: Process | None = None
    management_token: str = ""

    @property
    def http_addr(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def config_dir(self) -> Path:
        return self.workdir / "consul.d"

    def start(self, timeout: float = 30.0) -> ConsulAgent:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.http_port:
            self.http_port = free_port()
        if self.dns_port == 0:
            self.dns_port = free_port()
        self.config_dir.mkdir(exist_ok=True)
        cfg = self.config_dir / "agent.hcl"
        data_dir = self.workdir / "data"
        data_dir.mkdir(exist_ok=True)
        cfg.write_text(
            CONSUL_AGENT_HCL.format(
                node=self.node,
                data_dir=data_dir,
                http=self.http_port,
                dns=self.dns_port,
                serf_lan=free_port(),
                serf_wan=free_port(),
                server=free_port(),
            )
        )
        argv = [consul_bin(), "agent", "-dev", f"-config-dir={self.config_dir}"]
        for extra in self.extra_config_dirs:
            argv.append(f"-config-dir={extra}")
        env = dict(os.environ if self.env is None else self.env)
        # an operator's exported token must not leak into the agent or its checks
        env.pop("CONSUL_HTTP_TOKEN", None)
        self.process = Process("consul", argv, self.workdir / "consul.log", env=env)

        def leader() -> bool:
            status, body = http_json("GET", f"{self.http_addr}/v1/status/leader", timeout=1)
            return status == 200 and isinstance(body, str) and bool(body)

        wait_until("consul", leader, timeout, self.process.proc, self.process.log)
        return self

    def bootstrap(self, timeout: float = 30.0) -> str:
        """``PUT /v1/acl/bootstrap`` (retried while the ACL system warms up)."""
        result: dict[str, str] = {}

        def attempt() -> bool:
            status, body = http_json("PUT", f"{self.http_addr}/v1/acl/bootstrap", timeout=2)
            if status == 200 and isinstance(body, dict):
                result["token"] = body["SecretID"]
                return True
            return False

        wait_until("consul ACL bootstrap", attempt, timeout)
        self.management_token = result["token"]
        return self.management_token

    def api(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any]:
        tok = self.management_token if token is None else token
        return http_json(method, f"{self.http_addr}{path}", token=tok or None, body=body)

    def index_of(self, path: str) -> int:
        """Consul's ``X-Consul-Index`` for ``path`` now (what a blocking query
        on it has to reach to have seen every write so far)."""
        req = urllib.request.Request(  # noqa: S310 - the agent's own http:// address
            f"{self.http_addr}{path}", headers={"X-Consul-Token": self.management_token}
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
                return int(resp.headers["X-Consul-Index"])
        except urllib.error.HTTPError as exc:  # 404: an empty prefix still has an index
            return int(exc.headers["X-Consul-Index"])

    def kv_put(self, key: str, value: str | bytes) -> None:
        raw = value if isinstance(value, bytes) else value.encode()
        status, body = self.api("PUT", f"/v1/kv/{key}", body=raw)
        if status != 200:
            raise StackError(f"kv put {key}: {status} {body}")

    def kv_delete(self, key: str) -> None:
        status, body = self.api("DELETE", f"/v1/kv/{key}")
        if status != 200:
            raise StackError(f"kv delete {key}: {status} {body}")

    def register_node(self, node: str, address: str, status: str = "passing") -> None:
        """Put ``node`` in the catalog with one node-level health check."""
        body = {
            "Node": node,
            "Address": address,
            "Check": {
                "Node": node,
                "CheckID": "node-ssh",
                "Name": "ssh reachable",
                "Status": status,
            },
        }
        code, resp = self.api("PUT", "/v1/catalog/register", body=body)
        if code != 200:
            raise StackError(f"catalog register {node}: {code} {resp}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def run_cli(
        self, *args: str, token: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
        env["CONSUL_HTTP_ADDR"] = self.http_addr
        if token or self.management_token:
            env["CONSUL_HTTP_TOKEN"] = token or self.management_token
        return subprocess.run(
            [consul_bin(), *args], env=env, capture_output=True, text=True, check=check, timeout=60
        )


def bootstrap_acl(
    agent: ConsulAgent, out_dir: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real ``deploy/bootstrap-acl.sh`` against ``agent``."""
    run_env = {k: v for k, v in (env or os.environ).items() if not k.startswith("CONSUL_")}
    run_env["CONSUL_HTTP_ADDR"] = agent.http_addr
    run_env["PATH"] = f"{Path(consul_bin()).parent}:{run_env.get('PATH', '/usr/bin:/bin')}"
    return subprocess.run(
        ["bash", str(ROOT / "deploy/bootstrap-acl.sh"), "--out", str(out_dir), *extra],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def enable_service_dns(agent: ConsulAgent, service: str = "ssh-bastion") -> str:
    """Let Consul DNS answer ``<service>.service.consul`` (and nothing else) to
    clients without a token: a policy with read on ``service`` and on the
    agent's node, on a token set as the agent's ``default`` token (which DNS
    and token-less HTTP requests use instead of the deny-all anonymous token).
    Needs the management token; returns the new token's SecretID."""
    rules = (
        f'service "{service}" {{\n  policy = "read"\n}}\n'
        f'node "{agent.node}" {{\n  policy = "read"\n}}\n'
    )
    name = f"dns-{service}"
    code, body = agent.api("PUT", "/v1/acl/policy", {"Name": name, "Rules": rules})
    if code != 200:
        raise StackError(f"creating policy {name}: {code} {body}")
    code, body = agent.api(
        "PUT", "/v1/acl/token", {"Description": f"DNS: {service}", "Policies": [{"Name": name}]}
    )
    if code != 200:
        raise StackError(f"creating the DNS token: {code} {body}")
    secret = str(body["SecretID"])
    code, body = agent.api("PUT", "/v1/agent/token/default", {"Token": secret})
    if code != 200:
        raise StackError(f"setting the agent's default token: {code} {body}")
    return secret


def secure_consul(agent: ConsulAgent, tokens: Path) -> str:
    """Secure a started ``agent`` with ``deploy/bootstrap-acl.sh``, keep its
    management token, and return what the script printed."""
    result = bootstrap_acl(agent, tokens)
    if result.returncode != 0:
        raise StackError(f"bootstrap-acl.sh failed:\n{result.stdout}{result.stderr}")
    agent.management_token = (tokens / "management.token").read_text().strip()
    return result.stdout
