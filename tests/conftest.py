"""The real test stack: Consul (ACLs, deny by default), OpenBao, two OpenSSH
hosts. Session-scoped; everything is stopped by PID at the end.

A component that cannot be found fails the run with the setup command to use;
nothing here skips.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import devstack
from devstack import BaoServer, ConsulAgent, SshdHost


@pytest.fixture(scope="session")
def stack_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bastion-test-"))
    path.chmod(0o755)  # sshd's users must traverse to read the CA file
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def consul(stack_dir: Path) -> Iterator[ConsulAgent]:
    """A Consul agent secured by the project's own ``deploy/bootstrap-acl.sh``."""
    agent = ConsulAgent(stack_dir / "consul")
    try:
        agent.start()
        devstack.secure_consul(agent, stack_dir / "consul-tokens")
        yield agent
    finally:
        agent.stop()


@dataclass(frozen=True)
class ConsulTokens:
    management: str
    bastion: str
    operator: str
    files: Path


@pytest.fixture(scope="session")
def consul_tokens(consul: ConsulAgent, stack_dir: Path) -> ConsulTokens:
    files = stack_dir / "consul-tokens"
    return ConsulTokens(
        management=consul.management_token,
        bastion=(files / "bastion.token").read_text().strip(),
        operator=(files / "operator.token").read_text().strip(),
        files=files,
    )


@pytest.fixture(scope="session")
def bao(stack_dir: Path) -> Iterator[BaoServer]:
    server = BaoServer(stack_dir / "bao")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class VaultSetup:
    """What ``deploy/bootstrap-vault.sh`` wrote: AppRole credentials and the CA key."""

    addr: str
    root_token: str
    out: Path

    @property
    def role_id_file(self) -> Path:
        return self.out / "role_id"

    @property
    def secret_id_file(self) -> Path:
        return self.out / "secret_id"

    @property
    def user_ca_pub(self) -> Path:
        return self.out / "user_ca.pub"


@pytest.fixture(scope="session")
def vault(bao: BaoServer, stack_dir: Path) -> VaultSetup:
    out = stack_dir / "vault-out"
    devstack.setup_vault(bao, out)
    return VaultSetup(addr=bao.addr, root_token=bao.root_token, out=out)


@pytest.fixture(scope="session")
def local_ca(stack_dir: Path) -> Path:
    """A local user CA (private key path; ``.pub`` beside it)."""
    return devstack.keygen(stack_dir / "local-user-ca", comment="bastion test user CA")


@pytest.fixture(scope="session")
def hosts(
    stack_dir: Path, local_ca: Path, vault: VaultSetup, consul: ConsulAgent
) -> Iterator[dict[str, SshdHost]]:
    """host-101 and host-102: real sshd, own host names, trusting both user CAs,
    registered in the Consul catalog with a passing node check."""
    ca_keys = [local_ca.with_suffix(".pub"), vault.user_ca_pub]
    started: dict[str, SshdHost] = {}
    try:
        for name, addr in (("host-101", "127.0.1.101"), ("host-102", "127.0.1.102")):
            host = SshdHost(name, addr, stack_dir / name, ca_keys).start()
            started[name] = host
            consul.register_node(name, addr)
        yield started
    finally:
        for host in started.values():
            host.stop()


@pytest.fixture(scope="session")
def known_hosts(stack_dir: Path, hosts: dict[str, SshdHost]) -> Path:
    """known_hosts naming every test host by address and by node name."""
    path = stack_dir / "known_hosts"
    path.write_text("".join(h.known_hosts_line() + "\n" for h in hosts.values()))
    return path


@dataclass(frozen=True)
class Person:
    """A person who logs in: OS account name and an OpenSSH key pair."""

    name: str
    key: Path

    @property
    def pubkey(self) -> str:
        return self.key.with_suffix(".pub").read_text().strip()


@pytest.fixture(scope="session")
def people(stack_dir: Path) -> dict[str, Person]:
    keys = stack_dir / "people"
    return {
        name: Person(name, devstack.keygen(keys / f"id_{name}", comment=f"{name}@laptop"))
        for name in ("alice", "bob", "carol")
    }


def route(hosts: dict[str, SshdHost], name: str, login: str | None = None) -> str:
    """The KV value routing to test host ``name`` (its sshd is on a free port)."""
    prefix = f"{login}@" if login else ""
    return f"{prefix}{name}:{hosts[name].port}"


@pytest.fixture(scope="session")
def directory_entries(
    consul: ConsulAgent, hosts: dict[str, SshdHost], people: dict[str, Person]
) -> None:
    """The operators' view: keys for alice and bob, alice → host-102, bob → host-101."""
    for person in people.values():
        consul.kv_put(f"ssh-keys/{person.name}", person.pubkey + "\n")
    consul.kv_put("users/alice", route(hosts, "host-102"))
    consul.kv_put("users/bob", route(hosts, "host-101"))
    consul.kv_put("users/carol", route(hosts, "host-102"))


def bastion_sections(
    consul_tokens: ConsulTokens,
    consul: ConsulAgent,
    known_hosts: Path,
    vault: VaultSetup | None = None,
    ca_key: Path | None = None,
    **server: object,
) -> dict[str, dict[str, object]]:
    sections: dict[str, dict[str, object]] = {
        "server": {
            "auth_methods": ["publickey", "password", "keyboard-interactive"],
            "login_grace_time": 20,
            **server,
        },
        "consul": {
            "address": consul.http_addr,
            "token_file": str(consul_tokens.files / "bastion.token"),
            "stale_after": 30,
        },
        "upstream": {"known_hosts": str(known_hosts), "connect_timeout": 5},
        # every test connects from 127.0.0.1 and many fail logins on purpose:
        # it is exempt from PerSourcePenalties, as an operator exempts their
        # monitoring; tests/test_door.py penalises 127.0.0.2 and 127.0.0.3
        "penalties": {"exempt": ["127.0.0.1/32"]},
    }
    if vault is not None:
        sections["vault"] = {
            "address": vault.addr,
            "role_id_file": str(vault.role_id_file),
            "secret_id_file": str(vault.secret_id_file),
        }
    if ca_key is not None:
        sections["upstream"]["ca_key"] = str(ca_key)
    return sections


def start_bastion(
    base: Path,
    consul: ConsulAgent,
    consul_tokens: ConsulTokens,
    vault: VaultSetup,
    known_hosts: Path,
    **upstream: object,
) -> devstack.BastionProcess:
    """A bastion of a test's own, like the session one but for ``upstream``
    settings; the caller stops it."""
    sections = bastion_sections(consul_tokens, consul, known_hosts, vault)
    sections["upstream"].update(upstream)
    return devstack.BastionProcess(base, sections).start()


@pytest.fixture
def new_bastion(
    tmp_path: Path,
    consul: ConsulAgent,
    consul_tokens: ConsulTokens,
    vault: VaultSetup,
    known_hosts: Path,
    directory_entries: None,
) -> Iterator[Callable[..., devstack.BastionProcess]]:
    """Make a bastion of the test's own: ``new_bastion(tweak=..., start=...,
    **server)`` with ``[server]`` settings and ``tweak(sections)`` for any
    other change; every one made is stopped after the test."""
    made: list[devstack.BastionProcess] = []

    def make(
        *,
        tweak: Callable[[dict[str, dict[str, object]]], None] | None = None,
        start: bool = True,
        **server: object,
    ) -> devstack.BastionProcess:
        sections = bastion_sections(consul_tokens, consul, known_hosts, vault, **server)
        if tweak is not None:
            tweak(sections)
        proc = devstack.BastionProcess(tmp_path / f"bastion-{len(made)}", sections)
        made.append(proc)
        return proc.start() if start else proc

    yield make
    for proc in made:
        proc.stop()


@pytest.fixture(scope="session")
def bastion(
    stack_dir: Path,
    consul: ConsulAgent,
    consul_tokens: ConsulTokens,
    vault: VaultSetup,
    known_hosts: Path,
    directory_entries: None,
) -> Iterator[devstack.BastionProcess]:
    """The bastion under test: least-privilege Consul token, Vault-signed certificates."""
    proc = devstack.BastionProcess(
        stack_dir / "bastion", bastion_sections(consul_tokens, consul, known_hosts, vault)
    )
    try:
        yield proc.start()
    finally:
        proc.stop()
