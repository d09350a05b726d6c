"""The benchmark's stack: everything real, on loopback.

* Consul 1.8 with ACLs, secured by ``deploy/bootstrap-acl.sh``;
* OpenBao with the SSH CA from ``deploy/bootstrap-vault.sh``;
* host-101 and host-102 (OpenSSH sshd), trusting the Vault CA and a local
  bench CA;
* ``jump``: a plain OpenSSH sshd on 127.0.1.50 (``AllowTcpForwarding yes``),
  the classic jump host to compare with;
* the bastion (Vault-signed upstream certificates); a second bastion signing
  with a local CA key is started on demand for the signing comparison.

The person is ``alice`` (a plain ``/bin/sh`` account: no shell start-up cost):
an ed25519 key, known to the bastion through Consul, plus a certificate from
the bench CA for the OpenSSH paths. ``bob`` is used by the route-propagation
probe.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import devstack
from devstack import BaoServer, BastionProcess, ConsulAgent, SshdHost

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

SSH_CONFIG = """\
Host *
  User {user}
  IdentityFile {key}
  CertificateFile {key}-cert.pub
  IdentitiesOnly yes
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
    parts: list[Any] = field(default_factory=list)
    key: Path = field(init=False)
    probe_key: Path = field(init=False)
    ca_key: Path = field(init=False)
    tokens: Path = field(init=False)
    vault_out: Path = field(init=False)
    known_hosts: Path = field(init=False)

    def __post_init__(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)  # sshd's users must reach the CA file
        self.key = self.base / "people" / f"id_{USER}"
        self.probe_key = self.base / "people" / f"id_{PROBE_USER}"
        self.ca_key = self.base / "bench-user-ca"
        self.tokens = self.base / "consul-tokens"
        self.vault_out = self.base / "vault-out"
        self.known_hosts = self.base / "known_hosts"

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

    def _start_bastion(self, name: str, *, vault: bool, reuse: bool = True) -> BastionProcess:
        assert self.consul is not None
        sections: dict[str, dict[str, Any]] = {
            "server": {"auth_methods": ["publickey"], "max_unauthenticated": 512},
            "consul": {
                "address": self.consul.http_addr,
                "token_file": str(self.tokens / "bastion.token"),
            },
            "upstream": {"known_hosts": str(self.known_hosts)},
        }
        if not reuse:
            sections["upstream"]["reuse_idle"] = 0
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
        proc.start()
        with self.known_hosts.open("a") as out:
            key = (proc.workdir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
            out.write(f"[127.0.0.1]:{proc.port} {' '.join(key)}\n")
        return proc

    def start_local_ca_bastion(self) -> BastionProcess:
        """A second bastion signing upstream certificates with a local CA key."""
        if self.local_bastion is None:
            self.local_bastion = self._start_bastion("bastion-local-ca", vault=False, reuse=False)
        return self.local_bastion

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

    def _ssh_config_text(self, cipher: str) -> str:
        alg = CIPHERS[cipher]
        return SSH_CONFIG.format(
            user=USER,
            key=self.key,
            known_hosts=self.known_hosts,
            kex=KEX,
            ciphers=f"  Ciphers {alg}\n" if alg else "",
        )

    def paths(self, cipher: str, options: Sequence[str] = ()) -> dict[str, list[str]]:
        """The four ways to reach host-102, as OpenSSH command-line prefixes
        (append the remote command)."""
        assert self.jump is not None and self.bastion is not None
        assert self.fresh_bastion is not None
        target = self.hosts["host-102"]
        base = [devstack.ssh_bin(), "-F", str(self.ssh_config(cipher)), *options]
        direct = ["-p", str(target.port), target.address]
        return {
            "openssh_direct": [*base, *direct],
            "openssh_jump": [*base, "-J", f"{USER}@{self.jump.address}:{self.jump.port}", *direct],
            "bastion": [*base, "-p", str(self.bastion.port), "127.0.0.1"],
            "bastion_jump": [*base, "-J", f"{USER}@127.0.0.1:{self.bastion.port}", *direct],
            "bastion_fresh": [*base, "-p", str(self.fresh_bastion.port), "127.0.0.1"],
        }
