"""The benchmark's stack: everything real, on loopback.

* Consul 1.8 with ACLs, secured by ``deploy/bootstrap-acl.sh``;
* OpenBao with the SSH CA from ``deploy/bootstrap-vault.sh``;
* host-101 and host-102 (OpenSSH sshd), trusting the Vault CA and a local
  bench CA;
* ``jump``: a plain OpenSSH sshd on 127.0.1.50 (``AllowTcpForwarding yes``),
  the classic jump host to compare with, and the OpenSSH twin of a routed
  session: the nested hop ``ssh -A alice@jump ssh host-102 CMD``, its inner
  ssh client logging in with the forwarded agent (an ``ssh-agent`` of the
  bench holding alice's key and her bench-CA certificate);
* the bastion (Vault-signed upstream certificates); a second bastion signing
  with a local CA key is started on demand for the signing comparison.

The person is ``alice`` (a plain ``/bin/sh`` account: no shell start-up cost):
an ed25519 key, known to the bastion through Consul, plus a certificate from
the bench CA for the OpenSSH paths. ``bob`` is used by the route-propagation
probe.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import devstack
from devstack import BaoServer, BastionProcess, ConsulAgent, SshdHost
from devstack.process import Process, StackError, wait_until

HOSTS = (("host-101", "127.0.1.101"), ("host-102", "127.0.1.102"))
JUMP = ("jump", "127.0.1.50")
USER = "alice"
PROBE_USER = "bob"

# The two cipher settings every path is measured with. "default" leaves the
# choice to OpenSSH (chacha20-poly1305 first); the bastion's own upstream leg
# then uses its preference (aes128-gcm), as a deployed bastion would.
CIPHERS: dict[str, str | None] = {
    "aes128-gcm": "aes128-gcm@openssh.com",
    "default": None,
}
KEX = "curve25519-sha256"

# what every bench client sets, after its identity lines
_COMMON = """\
  BatchMode yes
  LogLevel ERROR
  UserKnownHostsFile {known_hosts}
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  UpdateHostKeys no
  ConnectTimeout 15
  ControlMaster no
  ControlPath none
  ForwardAgent no
  Compression no
  KexAlgorithms {kex}
{ciphers}"""

SSH_CONFIG = (
    """\
Host *
  User {user}
  IdentityFile {key}
  CertificateFile {key}-cert.pub
  IdentitiesOnly yes
"""
    + _COMMON
)

# the inner ssh of the nested hop, run by alice on the jump host: no private
# key there, the forwarded agent holds her key and certificate; naming the
# certificate (a public file) offers only it, as the bastion does (else the
# plain key is offered first and refused: one more round trip)
INNER_SSH_CONFIG = (
    """\
Host *
  IdentityFile {key}-cert.pub
  IdentitiesOnly yes
"""
    + _COMMON
)


class NestedArgv(list[str]):
    """The command-line prefix of the nested hop: the remote command passes
    through the jump host's shell first, so :func:`remote` quotes it once more."""


def remote(prefix: Sequence[str], command: str) -> list[str]:
    """An OpenSSH command line: a path's prefix plus the remote command
    (``cat > /dev/null`` runs on host-102, also through the nested hop)."""
    if isinstance(prefix, NestedArgv):
        return [*prefix, shlex.quote(command)]
    return [*prefix, command]


def from_source(prefix: Sequence[str], index: int) -> list[str]:
    """``prefix`` with the client bound to loopback source address number
    ``index`` (127.0.0.10 onwards; BindAddress is the first hop's): parallel
    clients look like different machines, as people are. A bastion with
    ``[server] workers`` steers by source address, so clients that all come
    from 127.0.0.1 would all meet one worker (bastion/workers.py)."""
    out = list(prefix)
    at = next(i for i, part in enumerate(out) if part.rsplit("/", 1)[-1] == "ssh")
    out[at + 1 : at + 1] = ["-o", f"BindAddress=127.0.0.{10 + index % 200}"]
    return NestedArgv(out) if isinstance(prefix, NestedArgv) else out


def bench_server_settings(workers: int | None = None) -> dict[str, Any]:
    """``[server]`` of every bench bastion: every client comes from 127.0.0.1,
    so the per-source limits for hostile clients are lifted (32 parallel
    logins, helpers opening 64 connections at a time)."""
    server: dict[str, Any] = {
        "auth_methods": ["publickey"],
        "max_unauthenticated": 512,
        "max_startups": "512:30:512",
        "per_source_max_startups": 512,
    }
    if workers is not None:
        server["workers"] = workers
    return server


@dataclass
class BenchStack:
    """Starts, describes and stops the components (``with BenchStack() as s``)."""

    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bastion-bench-")))
    keep: bool = False
    consul: ConsulAgent | None = None
    bao: BaoServer | None = None
    hosts: dict[str, SshdHost] = field(default_factory=dict)
    jump: SshdHost | None = None
    bastion: BastionProcess | None = None
    fresh_bastion: BastionProcess | None = None
    local_bastion: BastionProcess | None = None
    agent: Process | None = None
    parts: list[Any] = field(default_factory=list)
    key: Path = field(init=False)
    probe_key: Path = field(init=False)
    ca_key: Path = field(init=False)
    tokens: Path = field(init=False)
    vault_out: Path = field(init=False)
    known_hosts: Path = field(init=False)
    agent_sock: Path = field(init=False)

    def __post_init__(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)  # sshd's users must reach the CA file
        self.key = self.base / "people" / f"id_{USER}"
        self.probe_key = self.base / "people" / f"id_{PROBE_USER}"
        self.ca_key = self.base / "bench-user-ca"
        self.tokens = self.base / "consul-tokens"
        self.vault_out = self.base / "vault-out"
        self.known_hosts = self.base / "known_hosts"
        self.agent_sock = self.base / "agent" / "sock"

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> BenchStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        consul = ConsulAgent(self.base / "consul")
        self.parts.append(consul)
        consul.start()
        devstack.secure_consul(consul, self.tokens)
        self.consul = consul

        bao = BaoServer(self.base / "bao")
        self.parts.append(bao)
        bao.start()
        devstack.setup_vault(bao, self.vault_out)
        self.bao = bao

        devstack.keygen(self.ca_key, comment="bench user CA")
        ca_keys = [self.ca_key.with_suffix(".pub"), self.vault_out / "user_ca.pub"]
        for name, addr in HOSTS:
            host = SshdHost(name, addr, self.base / name, ca_keys)
            self.parts.append(host)
            self.hosts[name] = host.start()
            consul.register_node(name, addr)
        jump = SshdHost(JUMP[0], JUMP[1], self.base / "jump", ca_keys)
        self.parts.append(jump)
        self.jump = jump.start()

        for user, key in ((USER, self.key), (PROBE_USER, self.probe_key)):
            devstack.keygen(key, comment=f"{user}@bench")
            devstack.sign_user_key(
                self.ca_key, key.with_suffix(".pub"), [user], f"bench:{user}", "+6h"
            )
            consul.kv_put(f"ssh-keys/{user}", key.with_suffix(".pub").read_text())
        consul.kv_put(f"users/{USER}", self.route("host-102"))
        consul.kv_put(f"users/{PROBE_USER}", self.route("host-101"))

        self.known_hosts.write_text(
            "".join(h.known_hosts_line() + "\n" for h in [*self.hosts.values(), self.jump])
        )
        self.bastion = self._start_bastion("bastion", vault=True)
        # the same bastion with upstream reuse off: every login is a new
        # upstream handshake with a new certificate
        self.fresh_bastion = self._start_bastion("bastion-fresh", vault=True, reuse=False)
        for cipher in CIPHERS:
            self.ssh_config(cipher).write_text(self._ssh_config_text(cipher))
            inner = self.inner_ssh_config(cipher)
            inner.write_text(self._ssh_config_text(cipher, INNER_SSH_CONFIG))
            inner.chmod(0o644)  # alice's inner ssh on the jump host reads it
        self._start_agent()

    def _start_agent(self) -> None:
        """ssh-agent with alice's key; ssh-add loads the certificate next to it."""
        self.agent_sock.parent.mkdir(mode=0o700, exist_ok=True)
        agent = Process(
            "ssh-agent",
            ["ssh-agent", "-D", "-a", str(self.agent_sock)],
            self.base / "agent" / "agent.log",
        )
        self.parts.append(agent)
        wait_until("ssh-agent", self.agent_sock.exists, 10, agent.proc, agent.log)
        self.agent = agent
        env = {**os.environ, "SSH_AUTH_SOCK": str(self.agent_sock)}
        proc = subprocess.run(
            ["ssh-add", str(self.key)], env=env, capture_output=True, text=True, check=False
        )
        listed = subprocess.run(
            ["ssh-add", "-l"], env=env, capture_output=True, text=True, check=False
        ).stdout
        if proc.returncode != 0 or "CERT" not in listed:
            raise StackError(f"ssh-add {self.key}: {proc.stderr.strip()} (agent holds: {listed})")

    def _start_bastion(
        self,
        name: str,
        *,
        vault: bool,
        reuse: bool = True,
        workers: int | None = None,
        upstream: dict[str, Any] | None = None,
        timeout: float = 30.0,
        steering: str | None = None,
    ) -> BastionProcess:
        assert self.consul is not None
        sections: dict[str, dict[str, Any]] = {
            "server": bench_server_settings(workers),
            # one source (127.0.0.1) opens thousands of connections
            "penalties": {"enabled": False},
            "consul": {
                "address": self.consul.http_addr,
                "token_file": str(self.tokens / "bastion.token"),
            },
            "upstream": {"known_hosts": str(self.known_hosts)},
        }
        if not reuse:
            sections["upstream"]["reuse_idle"] = 0
        sections["upstream"].update(upstream or {})
        if steering is not None:
            sections["server"]["worker_steering"] = steering
        if vault:
            assert self.bao is not None
            sections["vault"] = {
                "address": self.bao.addr,
                "role_id_file": str(self.vault_out / "role_id"),
                "secret_id_file": str(self.vault_out / "secret_id"),
            }
        else:
            sections["upstream"]["ca_key"] = str(self.ca_key)
        proc = BastionProcess(self.base / name, sections)
        self.parts.append(proc)
        try:
            proc.start(timeout)
        except StackError:
            # e.g. a supervisor restarting workers that die: stop it now
            self.stop_bastion(proc)
            raise
        with self.known_hosts.open("a") as out:
            key = (proc.workdir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
            out.write(f"[127.0.0.1]:{proc.port} {' '.join(key)}\n")
        return proc

    def start_local_ca_bastion(self) -> BastionProcess:
        """A second bastion signing upstream certificates with a local CA key."""
        if self.local_bastion is None:
            self.local_bastion = self._start_bastion("bastion-local-ca", vault=False, reuse=False)
        return self.local_bastion

    def start_bastion(
        self,
        name: str,
        *,
        reuse: bool = True,
        workers: int | None = None,
        upstream: dict[str, Any] | None = None,
        timeout: float = 30.0,
        steering: str | None = None,
    ) -> BastionProcess:
        """Another Vault-signing bastion (``workers``: its ``[server] workers``,
        ``steering`` its ``worker_steering``); raises StackError if it does not
        start. Stop it with stop_bastion."""
        return self._start_bastion(
            name,
            vault=True,
            reuse=reuse,
            workers=workers,
            upstream=upstream,
            timeout=timeout,
            steering=steering,
        )

    def stop_bastion(self, proc: BastionProcess) -> None:
        with contextlib.suppress(Exception):
            proc.stop()
        if proc in self.parts:
            self.parts.remove(proc)

    def stop_local_ca_bastion(self) -> None:
        if self.local_bastion is not None:
            self.local_bastion.stop()
            self.parts.remove(self.local_bastion)
            self.local_bastion = None

    def stop(self) -> None:
        for part in reversed(self.parts):
            with contextlib.suppress(Exception):
                part.stop()
        self.parts.clear()
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- what the measurements need ------------------------------------------

    def route(self, host: str) -> str:
        return f"{host}:{self.hosts[host].port}"

    def ssh_config(self, cipher: str) -> Path:
        return self.base / f"ssh_config.{cipher}"

    def inner_ssh_config(self, cipher: str) -> Path:
        return self.base / f"ssh_config.inner.{cipher}"

    def _ssh_config_text(self, cipher: str, template: str = SSH_CONFIG) -> str:
        alg = CIPHERS[cipher]
        return template.format(
            user=USER,
            key=self.key,
            known_hosts=self.known_hosts,
            kex=KEX,
            ciphers=f"  Ciphers {alg}\n" if alg else "",
        )

    def bastion_argv(
        self, cipher: str, proc: BastionProcess, options: Sequence[str] = ()
    ) -> list[str]:
        """A routed session through ``proc`` (append the remote command)."""
        base = [devstack.ssh_bin(), "-F", str(self.ssh_config(cipher)), *options]
        return [*base, "-p", str(proc.port), "127.0.0.1"]

    def paths(self, cipher: str, options: Sequence[str] = ()) -> dict[str, list[str]]:
        """The ways to reach host-102, as OpenSSH command-line prefixes
        (add the remote command with :func:`remote`)."""
        assert self.jump is not None and self.bastion is not None
        assert self.fresh_bastion is not None
        target = self.hosts["host-102"]
        ssh = devstack.ssh_bin()
        base = [ssh, "-F", str(self.ssh_config(cipher)), *options]
        direct = ["-p", str(target.port), target.address]
        # env execs ssh: the same process, with the agent for -A
        nested = NestedArgv(
            [
                "env",
                f"SSH_AUTH_SOCK={self.agent_sock}",
                *base,
                "-A",
                "-p",
                str(self.jump.port),
                self.jump.address,
                ssh,
                "-F",
                str(self.inner_ssh_config(cipher)),
                *direct,
            ]
        )
        return {
            "openssh_direct": [*base, *direct],
            "openssh_jump": [*base, "-J", f"{USER}@{self.jump.address}:{self.jump.port}", *direct],
            "openssh_nested": nested,
            "bastion": [*base, "-p", str(self.bastion.port), "127.0.0.1"],
            "bastion_jump": [*base, "-J", f"{USER}@127.0.0.1:{self.bastion.port}", *direct],
            "bastion_fresh": [*base, "-p", str(self.fresh_bastion.port), "127.0.0.1"],
        }
