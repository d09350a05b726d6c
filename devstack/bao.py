"""A real OpenBao dev server and its SSH CA/AppRole set up with
``deploy/bootstrap-vault.sh``."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devstack.process import ROOT, Process, StackError, bao_bin, free_port, http_json, wait_until


@dataclass
class BaoServer:
    """A real OpenBao dev server (``bao server -dev``) on loopback."""

    workdir: Path
    root_token: str = "bastion-dev-root"
    port: int = 0
    process: Process | None = None

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> BaoServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.workdir)
        argv = [
            bao_bin(),
            "server",
            "-dev",
            f"-dev-root-token-id={self.root_token}",
            f"-dev-listen-address=127.0.0.1:{self.port}",
        ]
        self.process = Process("bao", argv, self.workdir / "bao.log", env=env)

        def healthy() -> bool:
            status, _ = http_json("GET", f"{self.addr}/v1/sys/health", timeout=1)
            return status == 200

        wait_until("openbao", healthy, timeout, self.process.proc, self.process.log)
        return self

    def api(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any]:
        return http_json(method, f"{self.addr}{path}", token=token or self.root_token, body=body)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def bootstrap_vault(bao: BaoServer, out_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``deploy/bootstrap-vault.sh`` against ``bao``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env.update(
        VAULT_ADDR=bao.addr,
        VAULT_TOKEN=bao.root_token,
        PATH=f"{Path(bao_bin()).parent}:{env.get('PATH', '/usr/bin:/bin')}",
    )
    return subprocess.run(
        ["bash", str(ROOT / "deploy/bootstrap-vault.sh"), "--out", str(out_dir), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def setup_vault(bao: BaoServer, out: Path) -> str:
    """Set up the SSH CA and AppRole with ``deploy/bootstrap-vault.sh``."""
    result = bootstrap_vault(bao, out)
    if result.returncode != 0:
        raise StackError(f"bootstrap-vault.sh failed:\n{result.stdout}{result.stderr}")
    return result.stdout
