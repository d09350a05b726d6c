"""The doctor's results: one :class:`Check` per thing looked at, the runner that
collects them (a check that crashes becomes a FAIL row, never a traceback),
and the two renderings (a table for people, JSON for scripts)."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

from bastion.config import Settings
from bastion.doctor.http import DoctorHTTP

log = logging.getLogger("bastion.doctor")

# clock skew against Consul and Vault: certificates are minutes long
SKEW_WARN = 5.0
SKEW_FAIL = 60.0


class Status(StrEnum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    """One line of the report. ``fix`` says what to do (empty for a PASS)."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        out = asdict(self)
        out["status"] = self.status.value
        return out


@dataclass
class Context:
    """What the sections share: the bastion's settings, one HTTP client, the
    tokens found on the way and the logins the directory routes to."""

    settings: Settings
    http: DoctorHTTP
    # --consul-token-file: for the agent-config checks only
    admin_consul_token: str | None = None
    admin_token_file: Path | None = None
    consul_token: str | None = None
    consul_reachable: bool = False
    vault_token: str | None = None
    vault_token_from_login: bool = False
    logins: set[str] = field(default_factory=set)
    directory_loaded: bool = False


class Report:
    """The checks so far, in the order they were made."""

    def __init__(self) -> None:
        self.checks: list[Check] = []

    def add(self, name: str, status: Status, detail: str, fix: str = "") -> Check:
        check = Check(name, status, detail, fix)
        self.checks.append(check)
        return check

    def ok(self, name: str, detail: str) -> Check:
        return self.add(name, Status.PASS, detail)

    def warn(self, name: str, detail: str, fix: str = "") -> Check:
        return self.add(name, Status.WARN, detail, fix)

    def fail(self, name: str, detail: str, fix: str) -> Check:
        return self.add(name, Status.FAIL, detail, fix)

    def skew(self, name: str, skew: float | None, where: str) -> Check:
        """Clock skew against ``where`` (seconds, server minus local)."""
        if skew is None:
            return self.warn(name, f"{where} sent no usable Date header", "")
        text = f"{skew:+.1f} s against {where}"
        if abs(skew) > SKEW_FAIL:
            return self.fail(
                name,
                f"{text}: certificates valid for minutes are rejected or live too long",
                "synchronise the clocks (chrony/systemd-timesyncd) on this host and on "
                f"{where}; check with `timedatectl timesync-status`",
            )
        if abs(skew) > SKEW_WARN:
            return self.warn(name, f"{text} (over {SKEW_WARN:g} s)", "synchronise the clocks (NTP)")
        return self.ok(name, text)

    @property
    def failed(self) -> bool:
        return any(c.status is Status.FAIL for c in self.checks)


Section = Callable[[Context, Report], Awaitable[None]]


async def run_sections(
    ctx: Context, report: Report, sections: Sequence[tuple[str, Section]]
) -> None:
    """Run each section in order; one that raises becomes a FAIL row naming it."""
    for name, section in sections:
        try:
            await section(ctx, report)
        except Exception as exc:
            log.debug("doctor section %s crashed", name, exc_info=True)
            report.fail(
                name,
                f"the check itself failed: {type(exc).__name__}: {exc}",
                "run again with --log-level DEBUG and report it",
            )


def counts(checks: Sequence[Check]) -> dict[str, int]:
    return {s.value: sum(1 for c in checks if c.status is s) for s in Status}


def exit_status(checks: Sequence[Check]) -> int:
    """1 on any FAIL, else 0."""
    return 1 if any(c.status is Status.FAIL for c in checks) else 0


def render_table(checks: Sequence[Check]) -> str:
    """``STATUS  CHECK  DETAIL`` rows, a ``fix:`` line under each that has one."""
    width = max([len("CHECK"), *(len(c.name) for c in checks)])
    lines = [f"{'STATUS':<6}  {'CHECK':<{width}}  DETAIL"]
    for c in checks:
        lines.append(f"{c.status.value:<6}  {c.name:<{width}}  {c.detail}".rstrip())
        if c.fix and c.status is not Status.PASS:
            lines.append(f"{'':<6}  fix: {c.fix}")
    n = counts(checks)
    lines.append("")
    lines.append(f"{n['PASS']} PASS, {n['WARN']} WARN, {n['FAIL']} FAIL")
    return "\n".join(lines)


def render_json(checks: Sequence[Check]) -> str:
    return json.dumps(
        {
            "ok": exit_status(checks) == 0,
            "counts": counts(checks),
            "checks": [c.as_dict() for c in checks],
        },
        indent=2,
    )
