"""A local stack of the real components: Consul (ACLs, deny by default),
OpenBao, OpenSSH target hosts and the bastion itself.

Used by the test suite, the benchmarks and ``bastion demo``. Every process is
started on a free 127.0.0.x port, polled for readiness against a deadline (no
fixed sleeps) and stopped by PID (its whole process group).

Nothing here is used by ``bastion serve``.
"""

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
from dataclasses import dataclass, field
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


def ssh_banner(host: str, port: int, timeout: float = 2.0) -> bytes:
    """The first line an SSH server sends (its identification string)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        data = b""
        while b"\n" not in data and len(data) < 256:
            chunk = sock.recv(256)
            if not chunk:
                break
            data += chunk
        return data.split(b"\n", 1)[0]


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


# --------------------------------------------------------------------------
# Consul


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
  dns = -1
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
    """A real Consul agent (``-dev``) with ACLs on and ``default_policy = "deny"``."""

    workdir: Path
    node: str = "consul-dev"
    extra_config_dirs: list[Path] = field(default_factory=list)
    env: dict[str, str] | None = None
    http_port: int = 0
    process: Process | None = None
    management_token: str = ""

    @property
    def http_addr(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30.0) -> ConsulAgent:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.http_port:
            self.http_port = free_port()
        cfg = self.workdir / "agent.hcl"
        data_dir = self.workdir / "data"
        data_dir.mkdir(exist_ok=True)
        cfg.write_text(
            CONSUL_AGENT_HCL.format(
                node=self.node,
                data_dir=data_dir,
                http=self.http_port,
                serf_lan=free_port(),
                serf_wan=free_port(),
                server=free_port(),
            )
        )
        argv = [consul_bin(), "agent", "-dev", f"-config-file={cfg}"]
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


# --------------------------------------------------------------------------
# OpenBao


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


def secure_consul(agent: ConsulAgent, tokens: Path) -> str:
    """Secure a started ``agent`` with ``deploy/bootstrap-acl.sh``, keep its
    management token, and return what the script printed."""
    result = bootstrap_acl(agent, tokens)
    if result.returncode != 0:
        raise StackError(f"bootstrap-acl.sh failed:\n{result.stdout}{result.stderr}")
    agent.management_token = (tokens / "management.token").read_text().strip()
    return result.stdout


def setup_vault(bao: BaoServer, out: Path) -> str:
    """Set up the SSH CA and AppRole with ``deploy/bootstrap-vault.sh``."""
    result = bootstrap_vault(bao, out)
    if result.returncode != 0:
        raise StackError(f"bootstrap-vault.sh failed:\n{result.stdout}{result.stderr}")
    return result.stdout


# --------------------------------------------------------------------------
# OpenSSH hosts


def keygen(path: Path, kind: str = "ed25519", comment: str = "") -> Path:
    """``ssh-keygen`` a key pair at ``path`` (no passphrase); returns ``path``."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                ssh_keygen_bin(),
                "-q",
                "-t",
                kind,
                "-N",
                "",
                "-C",
                comment or path.name,
                "-f",
                str(path),
            ],
            check=True,
            capture_output=True,
        )
    return path


def sign_user_key(
    ca_key: Path, pubkey: Path, principals: Sequence[str], key_id: str, validity: str = "+1h"
) -> Path:
    """Sign ``pubkey`` with ``ca_key``; the certificate lands next to it."""
    subprocess.run(
        [
            ssh_keygen_bin(),
            "-q",
            "-s",
            str(ca_key),
            "-I",
            key_id,
            "-n",
            ",".join(principals),
            "-V",
            validity,
            str(pubkey),
        ],
        check=True,
        capture_output=True,
    )
    return pubkey.with_name(pubkey.name.removesuffix(".pub") + "-cert.pub")


SSHD_CONFIG = """\
ListenAddress {listen}
HostKey {host_key}
PidFile {workdir}/sshd.pid
UsePAM no
StrictModes no
PermitRootLogin no
PubkeyAuthentication yes
TrustedUserCAKeys {user_ca_keys}
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication yes
KbdInteractiveAuthentication no
AllowAgentForwarding yes
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
PrintLastLog no
AcceptEnv LANG LC_* BASTION_TEST_*
Subsystem sftp internal-sftp
LogLevel VERBOSE
MaxStartups 200:30:400
MaxSessions {max_sessions}
"""


@dataclass
class SshdHost:
    """A real OpenSSH server with its own host name (UTS namespace) and address."""

    name: str
    address: str
    workdir: Path
    user_ca_keys: list[Path]
    port: int = 0
    process: Process | None = None
    # sshd's limit of sessions per connection (hardened hosts set 1 or 2)
    max_sessions: int = 100
    host_key: Path = field(init=False)

    def __post_init__(self) -> None:
        self.host_key = self.workdir / "ssh_host_ed25519_key"

    @property
    def host_pubkey(self) -> str:
        return self.host_key.with_suffix(".pub").read_text().strip()

    def known_hosts_line(self) -> str:
        """The line a client needs to trust this host, by address and by name."""
        key = " ".join(self.host_pubkey.split()[:2])
        return f"[{self.address}]:{self.port},{self.name} {key}"

    def start(self, timeout: float = 20.0) -> SshdHost:
        self.workdir.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(exist_ok=True)
        if not self.port:
            self.port = free_port(self.address)
        keygen(self.host_key, comment=f"host key of {self.name}")
        ca_file = self.workdir / "trusted_user_ca_keys"
        ca_file.write_text("".join(p.read_text() for p in self.user_ca_keys))
        cfg = self.workdir / "sshd_config"
        cfg.write_text(
            SSHD_CONFIG.format(
                listen=f"[{self.address}]:{self.port}"
                if ":" in self.address
                else f"{self.address}:{self.port}",
                host_key=self.host_key,
                workdir=self.workdir,
                user_ca_keys=ca_file,
                max_sessions=self.max_sessions,
            )
        )
        sshd = sshd_bin()
        # a UTS namespace per host so that `hostname` tells the hosts apart
        argv = [
            "unshare",
            "--uts",
            "sh",
            "-c",
            f'hostname "$0" && exec {sshd} -D -e -f "$1"',
            self.name,
            str(cfg),
        ]
        self.process = Process(f"sshd {self.name}", argv, self.workdir / "sshd.log")
        wait_until(
            f"sshd {self.name}",
            lambda: ssh_banner(self.address, self.port).startswith(b"SSH-2.0-"),
            timeout,
            self.process.proc,
            self.process.log,
        )
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def ssh_command(
    *,
    port: int,
    user: str,
    host: str = "127.0.0.1",
    identity: Path | None = None,
    known_hosts: Path | None = None,
    extra: Sequence[str] = (),
    command: Sequence[str] = (),
) -> list[str]:
    """An OpenSSH client command line that reads no user config and never prompts.

    ``extra`` comes first: for ssh the first value of an option wins.
    """
    argv = [
        ssh_bin(),
        "-F",
        "/dev/null",
        "-p",
        str(port),
        *extra,
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=10",
        "-o",
        f"UserKnownHostsFile={known_hosts or '/dev/null'}",
        "-o",
        "StrictHostKeyChecking=" + ("yes" if known_hosts else "no"),
        "-o",
        "GlobalKnownHostsFile=/dev/null",
    ]
    if identity is not None:
        argv += ["-o", "IdentitiesOnly=yes", "-i", str(identity)]
    argv.append(f"{user}@{host}")
    argv += list(command)
    return argv


def stop_ssh_client(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """End a running OpenSSH client and reap it (its pipes are drained and closed).

    SIGTERM is sent again every half second: OpenSSH 9.2's client loses a
    SIGTERM that arrives while it is not waiting in ``ppoll`` (it blocks no
    signals around the check), and with ``-N`` it then sleeps there forever.
    A second signal finds it asleep. SIGKILL after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.5)
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


@contextlib.contextmanager
def stopping(*things: Any) -> Iterator[None]:
    """Stop every component on the way out, in reverse order."""
    try:
        yield
    finally:
        for thing in reversed(things):
            with contextlib.suppress(Exception):
                thing.stop()


# --------------------------------------------------------------------------
# the bastion itself


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
        server = {"listen": f"127.0.0.1:{self.port}", "host_keys": [str(host_key)]}
        server.update(self.sections.get("server", {}))
        sections = {**self.sections, "server": server, "audit": {"file": str(self.audit_file)}}
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

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
