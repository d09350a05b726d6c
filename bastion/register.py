"""``bastion register``: the bastion's own Consul service, from its settings.

Writes ``<agent config dir>/<service id>.json``: the service ``[consul]
service_name`` on the port of ``[server] listen``, with a LOCAL script check
that runs this very ``bastion`` executable (``bastion check 127.0.0.1:PORT``)
every ``[consul] check_interval`` seconds, and the token Consul 1.8 needs to
sync a service defined in a file (without it, anti-entropy is "blocked by
ACLs"). Then ``consul validate`` the directory (a failure puts the previous
file back) and reload the agent:

- with ``--reload-token-file``: ``consul reload`` with that token (agent write
  on the agent's own node, ``acl-policies/agent-reload.hcl``), then the agent
  is asked whether it now has the service;
- without: one line telling the operator to run ``systemctl reload consul``
  (a SIGHUP from the service manager, no Consul token at all).

The file is mode 0640, owned by the config directory's owner and the
``consul`` group (when it exists): it holds a token. It is written atomically
(temporary file and rename) and only when its content changes, so a second
run changes nothing. ``--deregister`` removes it the same way.

Script checks are never registered through the HTTP API: agents refuse that
("Scripts are disabled on this agent from remote calls"), and must keep doing
so (``enable_local_script_checks``, never ``enable_script_checks``).
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.addresses import consul_base_url, split_host_port
from bastion.config import Settings
from bastion.errors import BastionError, ConfigError
from bastion.secretfiles import read_secret_file

FILE_MODE = 0o640
CONSUL_TIMEOUT = 60.0
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "*")
RELOAD_HINT = (
    "now reload the local Consul agent: systemctl reload consul "
    "(the service manager needs no Consul token), or run this again with "
    "--reload-token-file FILE (a token with agent write on this node: agent-reload.token)"
)


class RegisterError(BastionError):
    reason = "register-error"


@dataclass(frozen=True)
class Plan:
    """What ``bastion register`` writes, and where."""

    service_id: str
    service_name: str
    port: int
    check_args: tuple[str, ...]
    path: Path
    content: bytes  # the JSON file; holds the service token


def bastion_executable(argv0: str | None = None) -> Path:
    """The absolute path of the ``bastion`` command running now (what the
    agent's script check runs): ``sys.argv[0]`` when it is that script, else
    the one beside this Python (a venv's ``bin/``), else the one on PATH."""
    first = Path(argv0 if argv0 is not None else sys.argv[0])
    candidates = [first] if first.name == "bastion" else []
    candidates.append(Path(sys.executable).parent / "bastion")
    on_path = shutil.which("bastion")
    if on_path:
        candidates.append(Path(on_path))
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return Path(os.path.abspath(cand))
    raise ConfigError("cannot find the bastion executable for the script check (not on PATH)")


def check_address(settings: Settings) -> str:
    """Where the script check connects: the listen address, or loopback for a
    wildcard listen address."""
    host, port = split_host_port(settings.server.listen, 2222)
    if host in WILDCARD_HOSTS:
        host = "::1" if host == "::" else "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _seconds(value: float) -> str:
    return f"{value:g}s"


def plan(settings: Settings, config_dir: Path, token: str, bastion_bin: Path) -> Plan:
    """The service definition for ``settings`` (pure: reads nothing)."""
    host, port = split_host_port(settings.server.listen, 2222)
    consul = settings.consul
    service_id = settings.consul_service_id
    address = check_address(settings)
    # bastion check gives up before Consul kills it, so its own reason shows
    check_timeout = (
        consul.check_timeout - 1 if consul.check_timeout >= 2 else consul.check_timeout / 2
    )
    args = (str(bastion_bin), "check", address, "--timeout", f"{check_timeout:g}")
    service: dict[str, Any] = {
        "id": service_id,
        "name": consul.service_name,
        "port": port,
        "tags": ["ssh"],
        # Consul 1.8 syncs a file-defined service with this token (service write)
        "token": token,
        "check": {
            "id": f"{service_id}-banner",
            "name": f"SSH banner on {address}",
            "args": list(args),
            "interval": _seconds(consul.check_interval),
            "timeout": _seconds(consul.check_timeout),
        },
    }
    if host not in WILDCARD_HOSTS:
        # listening on one address only: that is where people reach it
        service["address"] = host
    content = (json.dumps({"service": service}, indent=2) + "\n").encode()
    return Plan(
        service_id=service_id,
        service_name=consul.service_name,
        port=port,
        check_args=args,
        path=config_dir / f"{service_id}.json",
        content=content,
    )


def _file_owner(config_dir: Path) -> tuple[int, int]:
    """(uid, gid) for the file: the directory's owner, the ``consul`` group if
    there is one (the agent reads the file through it), else the directory's."""
    st = config_dir.stat()
    gid = st.st_gid
    with contextlib.suppress(KeyError):
        gid = grp.getgrnam("consul").gr_gid
    return st.st_uid, gid


def write_atomically(path: Path, content: bytes, owner: tuple[int, int]) -> None:
    """``content`` into ``path``: a temporary file in the same directory (no
    .json/.hcl suffix: the agent never loads it), mode 0640, chowned when we
    may, then renamed over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        if os.geteuid() == 0:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_dir(path.parent)


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _restore(path: Path, old: bytes | None, owner: tuple[int, int]) -> None:
    if old is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        _sync_dir(path.parent)
    else:
        write_atomically(path, old, owner)


def _oneline(text: str, limit: int = 400) -> str:
    return " ".join(text.split())[:limit]


@dataclass
class Agent:
    """The local Consul agent: its CLI (validate, reload) and one HTTP read."""

    consul_bin: str
    http_addr: str

    def _env(self, token_file: Path | None = None) -> dict[str, str]:
        # never an operator's exported token: only the one we were given
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE")
        }
        env["CONSUL_HTTP_ADDR"] = self.http_addr
        if token_file is not None:
            env["CONSUL_HTTP_TOKEN_FILE"] = str(token_file)
        return env

    def run(self, *args: str, token_file: Path | None = None) -> tuple[bool, str]:
        try:
            res = subprocess.run(
                [self.consul_bin, *args],
                env=self._env(token_file),
                capture_output=True,
                text=True,
                timeout=CONSUL_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, str(exc)
        return res.returncode == 0, (res.stdout + res.stderr).strip()

    def service(self, service_id: str, token: str) -> dict[str, Any] | str | None:
        """The agent's local service ``service_id`` (a dict), None when the agent
        has none, or a string saying why we cannot tell."""
        url = f"{self.http_addr}/v1/agent/service/{urllib.parse.quote(service_id, safe='')}"
        req = urllib.request.Request(url, headers={"X-Consul-Token": token})  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - the agent
                body = json.loads(resp.read())
                return body if isinstance(body, dict) else "an unexpected answer"
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            return f"{exc.code} {_oneline(exc.read().decode(errors='replace'), 120)}"
        except (OSError, ValueError) as exc:
            return f"no answer from {self.http_addr}: {exc}"


def find_consul(consul_bin: str) -> str:
    found = shutil.which(consul_bin)
    if found is None:
        raise ConfigError(f"consul CLI not found: {consul_bin!r} (pass --consul-bin PATH)")
    return os.path.abspath(found)


def run_register(
    settings: Settings,
    config_dir: Path,
    *,
    service_token_file: Path | None = None,
    reload_token_file: Path | None = None,
    consul_bin: str = "consul",
    deregister: bool = False,
    bastion_bin: Path | None = None,
    say: Callable[[str], None] = print,
) -> int:
    """Register (or deregister) the bastion's service with the local agent;
    returns the exit code. Problems are ConfigError / RegisterError."""
    if not config_dir.is_dir():
        raise ConfigError(f"--consul-config-dir: {config_dir} is not a directory")
    config_dir = Path(os.path.abspath(config_dir))
    token_file = service_token_file or settings.consul.token_file
    if token_file is None:
        raise ConfigError(
            "the service definition needs a Consul token with service write on "
            f"{settings.consul.service_name!r} (Consul 1.8 syncs with it): pass "
            "--service-token-file (the settings have no [consul] token_file)"
        )
    token = read_secret_file(token_file, "--service-token-file")
    if reload_token_file is not None:
        # the consul CLI reads it; refuse one others could read, like ours
        read_secret_file(reload_token_file, "--reload-token-file")
    agent = Agent(find_consul(consul_bin), consul_base_url(settings.consul.address))
    wanted = plan(settings, config_dir, token, bastion_bin or bastion_executable())
    path = wanted.path
    old = path.read_bytes() if path.exists() else None
    new = None if deregister else wanted.content
    owner = _file_owner(config_dir)
    what = f"service {wanted.service_name} (id {wanted.service_id}, port {wanted.port})"

    def note(line: str) -> None:
        say(f"[register] {line}")

    def loaded() -> bool | str:
        """Whether the agent runs the wanted registration (a string: cannot tell)."""
        known = agent.service(wanted.service_id, token)
        if isinstance(known, str):
            return known
        return known is not None and known.get("Port") == wanted.port

    if old == new:
        state = loaded()
        if isinstance(state, str):
            note(f"{path}: unchanged (cannot ask the agent whether it runs it: {state})")
            return 0
        if state != deregister:
            note(f"{path}: unchanged and {'absent from' if deregister else 'loaded by'} the agent")
            return 0
        note(f"{path}: unchanged, but the agent {'still has' if deregister else 'lacks'} it")
    elif new is None:
        path.unlink()
        _sync_dir(config_dir)
        note(f"removed {path} ({what})")
    else:
        write_atomically(path, new, owner)
        verb = "updated" if old is not None else "wrote"
        note(f"{verb} {path} ({what}; mode {FILE_MODE:04o}, holds its token)")
        every = _seconds(settings.consul.check_interval)
        note(f"local script check every {every}: {' '.join(wanted.check_args)}")

    ok, out = agent.run("validate", str(config_dir))
    if not ok:
        _restore(path, old, owner)
        raise RegisterError(
            f"consul validate {config_dir} failed ({_oneline(out)}); {path.name} is back as it was"
        )
    note(f"consul validate {config_dir}: valid")

    if reload_token_file is None:
        note(RELOAD_HINT)
        return 0
    ok, out = agent.run("reload", token_file=reload_token_file)
    if not ok:
        _restore(path, old, owner)
        raise RegisterError(
            f"consul reload at {agent.http_addr} failed ({_oneline(out)}); "
            f"{path.name} is back as it was"
        )
    note(f"consul reload at {agent.http_addr}: done (token from {reload_token_file})")
    state = loaded()
    if isinstance(state, str):
        note(f"cannot ask the agent whether it runs {wanted.service_id}: {state}")
    elif state == deregister:
        raise RegisterError(
            f"the agent {'still has' if deregister else 'has not loaded'} "
            f"{wanted.service_id} after the reload"
        )
    else:
        note(f"agent: {what} {'deregistered' if deregister else 'registered'}")
    return 0
