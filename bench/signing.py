"""What one upstream certificate costs: Vault/OpenBao SSH engine vs a local CA.

Calls the bastion's own signers (``VaultCertificateSigner`` through
``VaultClient`` with the bench's AppRole, and ``LocalCASigner``) in this
process, one issue at a time, and reads the wall time, this process's CPU
time and the OpenBao server's CPU time (from /proc) per certificate.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bastion.config import VaultSettings
from bastion.credentials import (
    CertificateSigner,
    LocalCASigner,
    VaultCertificateSigner,
    VaultClient,
)
from bench.measure import cpu_seconds, percentile, summary
from bench.stack import USER, BenchStack


async def _time_issues(
    signer: CertificateSigner, count: int, server_pid: int | None
) -> dict[str, Any]:
    for _ in range(3):  # warm up (connection pool, token)
        await signer.issue(USER, "bench:warmup")
    walls: list[float] = []
    cpu0 = time.process_time()
    srv0 = cpu_seconds(server_pid) if server_pid else 0.0
    for i in range(count):
        t0 = time.perf_counter()
        await signer.issue(USER, f"bench:{i}")
        walls.append((time.perf_counter() - t0) * 1000)
    own_cpu = (time.process_time() - cpu0) * 1000 / count
    out: dict[str, Any] = {
        "wall_ms": {
            "p50": round(percentile(walls, 50), 2),
            "p95": round(percentile(walls, 95), 2),
            **summary(walls, 2),
        },
        "bastion_side_cpu_ms": round(own_cpu, 2),
    }
    if server_pid:
        out["openbao_cpu_ms"] = round((cpu_seconds(server_pid) - srv0) * 1000 / count, 2)
    return out


async def _run(stack: BenchStack, count: int) -> dict[str, Any]:
    assert stack.bao is not None and stack.bao.process is not None
    settings = VaultSettings(
        address=stack.bao.addr,
        role_id_file=stack.vault_out / "role_id",
        secret_id_file=stack.vault_out / "secret_id",
    )
    client = VaultClient(settings)
    await client.start()
    try:
        vault = VaultCertificateSigner(client, settings.ssh_mount, settings.ssh_role, 300)
        vault_res = await _time_issues(vault, count, stack.bao.process.pid)
    finally:
        await client.aclose()
    local = LocalCASigner(stack.ca_key, 300)
    local_res = await _time_issues(local, count, None)
    return {"vault": vault_res, "local_ca": local_res, "count": count}


def measure(stack: BenchStack, count: int) -> dict[str, Any]:
    return asyncio.run(_run(stack, count))
