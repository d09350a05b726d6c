"""File modes: secrets readable only by their owner (the bastion refuses to
start otherwise, and a copy readable by others is a leak waiting), files the
bastion trusts not writable by others, and the audit and recording
directories not world-writable (records could be removed or forged)."""

from __future__ import annotations

import stat
from pathlib import Path

from bastion.doctor.checks import Context, Report


def _secrets(ctx: Context) -> list[tuple[str, Path]]:
    s = ctx.settings
    found: list[tuple[str, Path | None]] = [
        ("[consul] token_file", s.consul.token_file),
        ("[vault] role_id_file", s.vault.role_id_file if s.vault.enabled else None),
        ("[vault] secret_id_file", s.vault.secret_id_file if s.vault.enabled else None),
        ("[vault] token_file", s.vault.token_file if s.vault.enabled else None),
        ("[upstream] ca_key", s.upstream.ca_key),
    ]
    found += [(f"[server] host_keys {p.name}", p) for p in s.server.host_keys]
    return [(what, p) for what, p in found if p is not None]


def _trusted(ctx: Context) -> list[tuple[str, Path]]:
    s = ctx.settings
    found = [
        ("[upstream] known_hosts", s.upstream.known_hosts),
        ("[server] user_ca_keys", s.server.user_ca_keys),
        ("[server] authorized_keys_dir", s.server.authorized_keys_dir),
    ]
    return [(what, p) for what, p in found if p is not None]


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None


async def section(ctx: Context, report: Report) -> None:
    for what, path in _secrets(ctx):
        name = f"file: {what}"
        mode = _mode(path)
        if mode is None:
            report.fail(name, f"{path} is missing or unreadable", f"correct {what}")
        elif mode & (stat.S_IRWXG | stat.S_IRWXO):
            report.fail(
                name,
                f"{path} is mode {mode:03o}: group or others may read it",
                f"chmod 600 {path}",
            )
        else:
            report.ok(name, f"{path} mode {mode:03o}")
    for what, path in _trusted(ctx):
        _not_world_writable(report, f"file: {what}", path, "anyone may add a trusted key")
    s = ctx.settings
    if s.audit.file != "-":
        audit = Path(s.audit.file)
        _not_world_writable(report, "file: [audit] dir", audit.parent, "audit records")
        if _mode(audit) is not None:
            _not_world_writable(report, "file: [audit] file", audit, "audit records")
    if s.recording.dir is not None:
        rec = s.recording.dir
        name = "file: [recording] dir"
        mode = _mode(rec)
        if mode is not None and mode & stat.S_IRWXO and not mode & stat.S_IWOTH:
            report.warn(
                name,
                f"{rec} is mode {mode:03o}: others may read the recordings",
                f"chmod 700 {rec}",
            )
        else:
            _not_world_writable(report, name, rec, "recordings")


def _not_world_writable(report: Report, name: str, path: Path, what: str) -> None:
    mode = _mode(path)
    if mode is None:
        report.warn(name, f"{path} does not exist (yet)", "")
    elif mode & stat.S_IWOTH:
        report.fail(
            name,
            f"{path} is mode {mode:03o}, world-writable: {what} can be changed by anyone",
            f"chmod o-w {path}",
        )
    else:
        report.ok(name, f"{path} mode {mode:03o}, not world-writable")
