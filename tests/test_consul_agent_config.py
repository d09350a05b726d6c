"""deploy/consul.d/ against the real Consul: the shipped agent configs validate,
a real (non -dev) server started from server.hcl is secure as configured, the
bastion's service definition loads and its local script check runs, and script
checks sent through the HTTP API are refused."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bastion.check import check_ssh_banner
from devstack import (
    ROOT,
    ConsulAgent,
    Process,
    bootstrap_acl,
    consul_bin,
    free_port,
    http_json,
    wait_until,
)

CONSUL_D = ROOT / "deploy/consul.d"
VENV_BIN = ROOT / ".venv/bin"

# Only what a test must change to run the shipped server.hcl on one machine
# next to other agents. Loaded last, so it wins; everything else (ACLs,
# client_addr, script-check settings, bootstrap_expect) is the shipped file.
TEST_OVERRIDES = """\
node_name = "bastion-host"
data_dir = "{data_dir}"
bind_addr = "127.0.0.1"
log_level = "INFO"
# elections in ~2 s instead of ~6 s (default multiplier 5); production
# servers usually run with 1
performance {{
  raft_multiplier = 2
}}
ports {{
  http = {http}
  dns = {dns}
  grpc = -1
  serf_lan = {serf_lan}
  serf_wan = {serf_wan}
  server = {server}
}}
"""


def consul(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    clean.update(env or {})
    return subprocess.run(
        [consul_bin(), *args], capture_output=True, text=True, env=clean, timeout=60, check=False
    )


def poll(what: str, probe: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Poll ``probe`` until it returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(delay)
        delay = min(delay * 1.5, 0.3)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


# --------------------------------------------------------------------------
# static: consul validate, and what must never be in the files


@pytest.mark.parametrize(
    "files",
    [
        ["server.hcl"],
        ["client.hcl"],
        ["server.hcl", "ssh-bastion.hcl"],
        ["client.hcl", "ssh-bastion.hcl"],
    ],
    ids="+".join,
)
def test_consul_validate(files: list[str]) -> None:
    res = consul("validate", *(str(CONSUL_D / f) for f in files))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Configuration is valid" in res.stdout


def test_configs_are_secure_and_portable() -> None:
    for name in ("server.hcl", "client.hcl"):
        text = (CONSUL_D / name).read_text()
        code = re.sub(r"#.*", "", text)
        assert re.search(r'^client_addr\s*=\s*"127\.0\.0\.1"', code, re.M), name
        assert re.search(r"^enable_local_script_checks\s*=\s*true", code, re.M), name
        assert not re.search(r"^\s*enable_script_checks\b", code, re.M), name
        assert "0.0.0.0" not in code, name
        # 1.8.7 refuses these; current Consul accepts what 1.8.7 accepts
        assert "initial_management" not in code and "config_file_service_registration" not in code
        for setting in (
            r'default_policy\s*=\s*"deny"',
            r'down_policy\s*=\s*"extend-cache"',
            r"enable_token_persistence\s*=\s*true",
            r"enabled\s*=\s*true",
        ):
            assert re.search(setting, code), (name, setting)
    service = (CONSUL_D / "ssh-bastion.hcl").read_text()
    assert 'args     = ["bastion", "check", "127.0.0.1:2222", "--timeout", "2"]' in service
    assert 'token = "@BASTION_CONSUL_TOKEN@"' in service


# --------------------------------------------------------------------------
# a real server from the shipped server.hcl


@dataclass
class Server:
    process: Process
    config_dir: Path
    http_addr: str
    dns_port: int
    out: Path
    tokens: dict[str, str]
    bootstrap: subprocess.CompletedProcess[str]

    @property
    def agent(self) -> ConsulAgent:
        """A devstack handle on this server (for api/run_cli); it did not start it."""
        handle = ConsulAgent(self.config_dir, http_port=int(self.http_addr.rsplit(":", 1)[1]))
        handle.management_token = self.tokens["management"]
        return handle

    def api(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        return self.agent.api(method, path, body=body, token=token)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("consul-server")
    config_dir = base / "consul.d"
    config_dir.mkdir()
    shutil.copy(CONSUL_D / "server.hcl", config_dir / "server.hcl")
    http, dns = free_port(), free_port()
    (config_dir / "zz-test-overrides.hcl").write_text(
        TEST_OVERRIDES.format(
            data_dir=base / "data",
            http=http,
            dns=dns,
            serf_lan=free_port(),
            serf_wan=free_port(),
            server=free_port(),
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    # the script check runs `bastion check` (or python -m bastion.check)
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    proc = Process(
        "consul-server",
        [consul_bin(), "agent", f"-config-dir={config_dir}"],
        base / "consul.log",
        env=env,
        cwd=ROOT,
    )
    try:
        addr = f"http://127.0.0.1:{http}"

        def http_up() -> bool:
            status, _ = http_json("GET", f"{addr}/v1/status/leader", timeout=1)
            return status == 200

        # Run the script as an operator would, right after starting the server:
        # before the election it refuses ACL bootstrap, and the script retries.
        wait_until("consul server HTTP", http_up, 30, proc.proc, proc.log)
        handle = ConsulAgent(config_dir, http_port=http)
        out = base / "secrets"
        res = bootstrap_acl(handle, out)
        assert res.returncode == 0, res.stdout + res.stderr + proc.log.read_text()[-3000:]
        tokens = {
            n: (out / f"{n}.token").read_text().strip()
            for n in ("management", "bastion", "operator", "agent")
        }
        yield Server(proc, config_dir, addr, dns, out, tokens, res)
    finally:
        proc.stop()


def test_bootstrap_waited_for_the_new_server(server: Server) -> None:
    """A fresh non-dev server refuses ACL bootstrap until it has elected itself
    and left "legacy mode": the script says so once, retries, and succeeds."""
    out = server.bootstrap.stdout
    assert out.count("ACL system not ready yet") == 1, out
    assert "legacy mode" in out or "No cluster leader" in out, out
    assert "management token: bootstrapped the ACL system" in out


def test_server_runs_with_the_secure_settings(server: Server) -> None:
    status, body = server.api("GET", "/v1/agent/self")
    assert status == 200
    cfg = body["DebugConfig"]
    assert cfg["ACLsEnabled"] is True
    assert cfg["ACLDefaultPolicy"] == "deny"
    assert cfg["ACLDownPolicy"] == "extend-cache"
    assert cfg["ACLEnableTokenPersistence"] is True
    assert cfg["EnableRemoteScriptChecks"] is False
    assert cfg["EnableLocalScriptChecks"] is True
    assert cfg["DisableRemoteExec"] is True
    assert [str(a) for a in cfg["ClientAddrs"]] == ["127.0.0.1"]
    assert all(a.startswith("tcp://127.0.0.1:") for a in cfg["HTTPAddrs"]), cfg["HTTPAddrs"]
    assert all(a.startswith(("tcp://127.0.0.1:", "udp://127.0.0.1:")) for a in cfg["DNSAddrs"])
    assert cfg["ServerMode"] is True
    assert body["Config"]["Datacenter"] == "dc1"
    # the agent token persisted (enable_token_persistence)
    persisted = server.config_dir.parent / "data" / "acl-tokens.json"
    assert persisted.exists()
    assert server.tokens["agent"] in persisted.read_text()


def test_anonymous_gets_nothing_from_the_server(server: Server) -> None:
    assert server.api("GET", "/v1/kv/users/alice", token="")[0] == 403
    assert server.api("GET", "/v1/catalog/nodes", token="") == (200, [])
    assert server.api("GET", "/v1/agent/self", token="")[0] == 403


def dns_a_records(port: int, name: bytes) -> int:
    """Number of answers to an A query for ``name`` (e.g. b"bastion-host.node.consul")."""
    qname = b"".join(bytes([len(p)]) + p for p in name.split(b".")) + b"\x00"
    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + qname + b"\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(query, ("127.0.0.1", port))
        answer = sock.recv(512)
    assert answer[:2] == b"\x12\x34"
    return int.from_bytes(answer[6:8], "big")


def test_dns_needs_the_anonymous_dns_variant(server: Server) -> None:
    """The price of anonymous = deny: <node>.node.consul does not resolve without a
    token; --anonymous-dns makes it resolve (and hands out the inventory)."""
    name = b"bastion-host.node.consul"
    assert dns_a_records(server.dns_port, name) == 0
    handle = server.agent
    try:
        res = bootstrap_acl(handle, server.out, "--anonymous-dns")
        assert res.returncode == 0, res.stderr
        poll("DNS answers with anonymous-dns", lambda: dns_a_records(server.dns_port, name) == 1)
    finally:
        res = bootstrap_acl(handle, server.out)
        assert res.returncode == 0, res.stderr
    poll("DNS silent again", lambda: dns_a_records(server.dns_port, name) == 0)


class BannerServer:
    """A tiny TCP server that greets every connection with an SSH banner."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(b"SSH-2.0-test\r\n")
                    conn.settimeout(1)
                    conn.recv(64)  # the checker's own identification
                except OSError:
                    pass

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.sock.close()


def service_definition(token: str, port: int) -> str:
    """The shipped ssh-bastion.hcl with the token, a free port and a 1 s interval."""
    text = (CONSUL_D / "ssh-bastion.hcl").read_text()
    replacements = [
        ("@BASTION_CONSUL_TOKEN@", token),
        ("2222", str(port)),
        ('interval = "10s"', 'interval = "1s"'),
    ]
    if importlib.util.find_spec("bastion.cli") is None:
        # bastion/cli.py (the `bastion check` subcommand) does not exist yet
        replacements.append(
            ('["bastion", "check",', f'["{VENV_BIN / "python"}", "-m", "bastion.check",')
        )
    for old, new in replacements:
        assert old in text, f"ssh-bastion.hcl no longer contains {old!r}"
        text = text.replace(old, new)
    return text


def test_script_checks_via_http_api_refused_local_one_runs(server: Server, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    remote = ["/bin/sh", "-c", f"touch {marker}"]
    # 1. remote script checks: refused even with the management token
    status, body = server.api(
        "PUT", "/v1/agent/check/register", {"Name": "rce", "Args": remote, "Interval": "1s"}
    )
    assert status == 500 and "Scripts are disabled on this agent from remote calls" in body
    status, body = server.api(
        "PUT",
        "/v1/agent/service/register",
        {"Name": "evil", "Port": 1, "Check": {"Args": remote, "Interval": "1s"}},
    )
    assert status == 500 and "Scripts are disabled" in body
    status, body = server.api(
        "PUT",
        "/v1/agent/service/register",
        {"Name": "ssh-bastion", "Port": 1, "Check": {"Args": remote, "Interval": "1s"}},
        token=server.tokens["bastion"],
    )
    assert status == 500 and "Scripts are disabled" in body

    # 2. the shipped service definition, from a file, with the bastion token
    log_offset = len(server.process.log.read_text())
    port = free_port()
    (server.config_dir / "ssh-bastion.hcl").write_text(
        service_definition(server.tokens["bastion"], port)
    )
    reload = server.agent.run_cli("reload", check=False)
    assert reload.returncode == 0, reload.stderr

    def check() -> dict[str, Any] | None:
        status, checks = server.api("GET", "/v1/agent/checks")
        assert status == 200
        return checks.get("ssh-bastion-banner")

    # nothing listens yet: critical, with the check's own output (it really ran)
    first = poll(
        "check ran and is critical",
        lambda: (c := check()) and "connection refused" in c["Output"] and c,
    )
    assert first["Status"] == "critical"
    assert first["Output"].startswith(f"CRITICAL: connection refused by 127.0.0.1:{port}")
    status, services = server.api("GET", "/v1/agent/services")
    assert services["ssh-bastion"]["Port"] == port

    banner = BannerServer(port)
    try:
        passing = poll("check passing", lambda: (c := check()) and c["Status"] == "passing" and c)
        assert re.match(rf"OK: SSH-2\.0-test from 127\.0\.0\.1:{port} in \d+ ms", passing["Output"])
        # synced to the catalog with the definition's token (1.8: not "blocked by ACLs")
        poll(
            "catalog sees passing ssh-bastion",
            lambda: [
                c
                for c in server.api("GET", "/v1/health/checks/ssh-bastion")[1] or []
                if c["CheckID"] == "ssh-bastion-banner" and c["Status"] == "passing"
            ],
        )
        status, entries = server.api(
            "GET", "/v1/health/service/ssh-bastion?passing=1", token=server.tokens["agent"]
        )
        assert status == 200 and [e["Service"]["Port"] for e in entries] == [port]
    finally:
        banner.stop()
    poll("check critical again", lambda: (c := check()) and c["Status"] == "critical")

    # by now script checks have run for seconds: the refused one never did
    assert not marker.exists()
    status, checks = server.api("GET", "/v1/agent/checks")
    assert set(checks) == {"ssh-bastion-banner"}
    # anti-entropy synced the service and its check with the definition's token
    assert "blocked by ACLs" not in server.process.log.read_text()[log_offset:]


# --------------------------------------------------------------------------
# bastion check itself, against real sockets


class OneShot:
    """Accepts connections and answers each with ``payload``; then closes, or
    holds the connection open (``hold``) until stopped."""

    def __init__(self, payload: bytes, *, hold: bool = False, family: int = socket.AF_INET) -> None:
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        self.sock = socket.create_server((host, 0), family=family)
        self.port = self.sock.getsockname()[1]
        self.address = (
            f"[{host}]:{self.port}" if family == socket.AF_INET6 else f"{host}:{self.port}"
        )
        self.payload, self.hold = payload, hold
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                if self.payload:
                    conn.sendall(self.payload)
                if self.hold:
                    self.stopped.wait(10)

    def __enter__(self) -> OneShot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.sock.close()


def test_check_ok_with_banner_and_preamble_lines() -> None:

    with OneShot(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n") as srv:
        code, line = check_ssh_banner(srv.address, 2)
        assert code == 0
        assert re.fullmatch(
            rf"OK: SSH-2\.0-OpenSSH_9\.2p1 Debian-2 from {srv.address} in \d+ ms", line
        )
    # RFC 4253: other lines may come first
    with OneShot(b"hello\r\nwelcome\r\nSSH-2.0-x\r\n") as srv:
        assert check_ssh_banner(srv.address, 2)[0] == 0
    with OneShot(b"SSH-2.0-v6\r\n", family=socket.AF_INET6) as srv:
        code, line = check_ssh_banner(srv.address, 2)
        assert code == 0 and line.startswith(f"OK: SSH-2.0-v6 from [::1]:{srv.port} in "), line


@pytest.mark.parametrize(
    ("payload", "hold", "reason"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n" + b"x" * 300, False, "not an SSH server"),
        (b"", False, "closed the connection without an SSH banner"),
        (b"", True, "no SSH banner from"),
        (b"SSH-2.0-partial", True, "no SSH banner from"),
        (b"SSH-1.5-old\r\n", False, "unsupported protocol: SSH-1.5-old"),
        (b"SSH-2.0-" + b"a" * 300 + b"\r\n", False, "too long"),
        (b"junk\n" * 3000, False, "not an SSH server"),
    ],
    ids=["http", "closed", "silent", "partial", "ssh1", "long", "junk-lines"],
)
def test_check_critical_reasons(payload: bytes, hold: bool, reason: str) -> None:

    with OneShot(payload, hold=hold) as srv:
        start = time.monotonic()
        code, line = check_ssh_banner(srv.address, 0.5)
        assert time.monotonic() - start < 2
    assert code == 2
    assert line.startswith("CRITICAL: ") and reason in line, line


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "expected HOST:PORT"),
        ("::1:22", "needs brackets"),
        ("[::1]22", "expected [IPv6]:PORT"),
        ("host:0", "bad port"),
        ("host:http", "bad port"),
        (":22", "empty host"),
        ("no-such-host.invalid:22", "cannot resolve"),
    ],
)
def test_check_bad_addresses(address: str, reason: str) -> None:

    code, line = check_ssh_banner(address, 0.5)
    assert code == 2 and line.startswith("CRITICAL: ") and reason in line, line


def test_check_refused_and_module_entry_point() -> None:
    port = free_port()
    res = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "bastion.check", f"127.0.0.1:{port}", "--timeout", "1"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert res.returncode == 2
    assert res.stdout == f"CRITICAL: connection refused by 127.0.0.1:{port}\n"
    with OneShot(b"SSH-2.0-test\r\n") as srv:
        res = subprocess.run(
            [str(VENV_BIN / "python"), "-m", "bastion.check", srv.address],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    assert res.returncode == 0 and res.stdout.startswith("OK: SSH-2.0-test from "), res.stdout
    res = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "bastion.check", "x:1", "--timeout", "-1"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert res.returncode == 2 and "positive" in res.stderr
