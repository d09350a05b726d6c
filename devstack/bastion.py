"""``bastion serve`` as a child process, with its settings rendered to TOML."""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devstack.consul import ConsulAgent
from devstack.process import ROOT, Process, StackError, _find, consul_bin, free_port, wait_until
from devstack.sshd import keygen, ssh_banner


def toml_value(value: Any) -> str:
    """A TOML literal for the small set of types bastion settings use."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def render_settings(sections: dict[str, dict[str, Any]]) -> str:
    out = []
    for name, values in sections.items():
        out.append(f"[{name}]")
        out += [f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None]
        out.append("")
    return "\n".join(out)


def bastion_bin() -> str:
    return _find("bastion", ROOT / ".venv/bin/bastion")


@dataclass
class BastionProcess:
    """``bastion serve`` as a child process with a generated config file."""

    workdir: Path
    sections: dict[str, dict[str, Any]]
    port: int = 0
    metrics_port: int = 0
    process: Process | None = None

    @property
    def config(self) -> Path:
        return self.workdir / "bastion.toml"

    @property
    def log(self) -> Path:
        return self.workdir / "bastion.log"

    @property
    def audit_file(self) -> Path:
        return self.workdir / "audit.jsonl"

    def start(self, timeout: float = 30.0, wait_loaded: bool = True) -> BastionProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        host_key = keygen(self.workdir / "ssh_host_ed25519_key", comment="bastion host key")
        # a short drain: stopping a test's bastion with sessions still open
        # must not wait the production default (an hour)
        server = {
            "listen": f"127.0.0.1:{self.port}",
            "host_keys": [str(host_key)],
            "drain_timeout": 3,
        }
        server.update(self.sections.get("server", {}))
        audit = {**self.sections.get("audit", {}), "file": str(self.audit_file)}
        sections = {**self.sections, "server": server, "audit": audit}
        # the admin socket only where a test asks for one ([admin] socket): the
        # default path is shared by every bastion on the machine
        sections.setdefault("admin", {"socket": ""})
        if "metrics" not in sections:
            # /metrics tells tests which directory index the bastion has seen
            self.metrics_port = free_port()
            sections["metrics"] = {"listen": f"127.0.0.1:{self.metrics_port}"}
        self.config.write_text(render_settings(sections))
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "VAULT_", "BAO_"))
        }
        self.process = Process(
            "bastion", [bastion_bin(), "serve", "--config", str(self.config)], self.log, env=env
        )
        wait_until(
            "bastion",
            lambda: ssh_banner("127.0.0.1", self.port).startswith(b"SSH-2.0-"),
            timeout,
            self.process.proc,
            self.log,
        )
        return self

    def metrics_text(self) -> str:
        """The bastion's /metrics page (its ``[metrics] listen``)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())

    def metric(self, name: str) -> float | None:
        """The value of an unlabelled series on the bastion's /metrics."""
        found = re.search(rf"^{re.escape(name)} (\S+)$", self.metrics_text(), re.M)
        return float(found.group(1)) if found else None

    def directory_indexes(self) -> dict[str, int]:
        """The index of each directory watch, from the bastion's /metrics."""
        text = self.metrics_text()
        found = re.findall(r'^bastion_directory_index\{watch="(\w+)"\} (\S+)$', text, re.M)
        return {name: int(float(value)) for name, value in found}

    def wait_synced(self, consul: ConsulAgent, timeout: float = 15.0) -> None:
        """Wait until the bastion's directory has seen every write made to
        ``consul`` so far (instead of sleeping after a ``kv put``)."""
        settings = self.sections.get("consul", {})
        targets = {
            "routes": consul.index_of(f"/v1/kv/{settings.get('routes_prefix', 'users/')}?recurse"),
            "keys": consul.index_of(f"/v1/kv/{settings.get('keys_prefix', 'ssh-keys/')}?recurse"),
            "host_keys": consul.index_of(
                f"/v1/kv/{settings.get('host_keys_prefix', 'host-keys/')}?recurse"
            ),
            "nodes": consul.index_of("/v1/catalog/nodes"),
            "health": consul.index_of("/v1/health/state/any"),
        }

        def synced() -> bool:
            seen = self.directory_indexes()
            return all(seen.get(name, 0) >= index for name, index in targets.items())

        wait_until("bastion directory in sync with consul", synced, timeout, log=self.log)

    def audit_records(self) -> list[dict[str, Any]]:
        if not self.audit_file.exists():
            return []
        return [json.loads(line) for line in self.audit_file.read_text().splitlines() if line]

    def wait_audit(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """The newest audit record that matches, polled for: records are
        written when a channel ends, a moment after the client has exited."""
        found: list[dict[str, Any]] = []

        def probe() -> bool:
            found[:] = [r for r in self.audit_records() if match(r)]
            return bool(found)

        wait_until("audit record", probe, timeout)
        return found[-1]

    def register(
        self,
        consul: ConsulAgent,
        reload_token_file: Path | None,
        *extra: str,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """``bastion register`` (or, with ``--deregister`` in ``extra``, its
        reverse) of this bastion into ``consul``'s config directory, as an
        operator runs it; StackError when it fails and ``check``."""
        argv = [bastion_bin(), "register", "--config", str(self.config)]
        argv += ["--consul-config-dir", str(consul.config_dir), "--consul-bin", consul_bin()]
        if reload_token_file is not None:
            argv += ["--reload-token-file", str(reload_token_file)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
        res = subprocess.run(
            [*argv, *extra], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        if check and res.returncode != 0:
            raise StackError(f"bastion register failed:\n{res.stdout}{res.stderr}")
        return res

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
