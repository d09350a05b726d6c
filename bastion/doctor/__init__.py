"""``bastion doctor``: is this deployment safe? One command, run on the bastion
host with the bastion's own settings, that looks at Consul (ACLs, script
checks, where the API listens, what tokens may really do, the bastion's
service), Vault/OpenBao (health, login, token, SSH role), the routed hosts'
keys, file modes and clocks, and prints a PASS/WARN/FAIL table with the fix
for each failure (``--json`` for scripts; exit status 1 on any FAIL).

Modules by concern: :mod:`.checks` (results, runner, rendering), :mod:`.http`
and :mod:`.api` (the one HTTP client), :mod:`.consul`, :mod:`.probes` and
:mod:`.service` (Consul), :mod:`.vault` and :mod:`.vault_role`, :mod:`.hosts`, :mod:`.files`.
"""

from __future__ import annotations

from pathlib import Path

from bastion.config import Settings
from bastion.doctor import consul, files, hosts, vault, vault_role
from bastion.doctor.checks import (
    Check,
    Context,
    Report,
    Status,
    exit_status,
    render_json,
    render_table,
    run_sections,
)
from bastion.doctor.http import DoctorHTTP

__all__ = ["Check", "Status", "diagnose", "exit_status", "render_json", "render_table"]


async def diagnose(
    settings: Settings, admin_token: str | None = None, admin_token_file: Path | None = None
) -> list[Check]:
    """Every check, in order. ``admin_token`` (``--consul-token-file``) is used
    for reading the Consul agent's configuration (and its checks) only."""
    http = DoctorHTTP()
    ctx = Context(settings, http, admin_consul_token=admin_token, admin_token_file=admin_token_file)
    report = Report()
    try:
        await run_sections(
            ctx,
            report,
            [
                ("files", files.section),
                ("vault", vault.section),
                ("consul", consul.section),
                ("hosts", hosts.section),
                ("vault role", vault_role.section),
            ],
        )
    finally:
        try:
            await vault.cleanup(ctx)
        finally:
            await http.aclose()
    return report.checks
