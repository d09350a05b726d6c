"""Processes of the local stack: the binaries it runs, free ports, readiness
polling, small loopback HTTP calls, and children stopped by process group."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SETUP_HINT = "run scripts/setup.sh (as root) first"


class StackError(RuntimeError):
    """A component of the local stack is missing or did not start."""


# --------------------------------------------------------------------------
# binaries


def _find(name: str, *candidates: Path) -> str:
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which(name)
    if found:
        return found
    raise StackError(f"{name} not found; {SETUP_HINT}")


def consul_bin() -> str:
    return _find("consul", ROOT / ".cache/bin/consul", ROOT / ".cache/consul/usr/bin/consul")


def bao_bin() -> str:
    return _find("bao", ROOT / ".venv/bin/bao")


def sshd_bin() -> str:
    return _find("sshd", Path("/usr/sbin/sshd"))


def ssh_bin() -> str:
    return _find("ssh", Path("/usr/bin/ssh"))


def ssh_keygen_bin() -> str:
    return _find("ssh-keygen", Path("/usr/bin/ssh-keygen"))


# --------------------------------------------------------------------------
# helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(
    what: str,
    probe: Callable[[], bool],
    timeout: float = 30.0,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Poll ``probe`` until it returns True; fail with the log tail after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with {proc.returncode}{_tail(log)}")
        try:
            if probe():
                return
        except (OSError, ValueError):
            pass
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)
    raise StackError(f"{what} not ready after {timeout:.0f}s{_tail(log)}")


def _tail(log: Path | None, lines: int = 25) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n--- " + str(log) + " ---\n" + "\n".join(text)


def http_json(
    method: str, url: str, token: str | None = None, body: Any = None, timeout: float = 10.0
) -> tuple[int, Any]:
    """A small HTTP call for the stack's own setup (status, decoded JSON or text)."""
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - loopback only
    if token:
        req.add_header("X-Consul-Token", token)
        req.add_header("X-Vault-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        raw = err.read()
        status = err.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


class Process:
    """A child process in its own process group, logging to a file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


@contextlib.contextmanager
def stopping(*things: Any) -> Iterator[None]:
    """Stop every component on the way out, in reverse order."""
    try:
        yield
    finally:
        for thing in reversed(things):
            with contextlib.suppress(Exception):
                thing.stop()
