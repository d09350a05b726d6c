"""Bad input gets a clear, specific refusal and the bastion keeps serving others.

Malformed directory entries, unknown and unhealthy hosts, host-key
mismatches, password passthrough, a local CA instead of Vault, Consul going
away and coming back, and secrets never reaching logs.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ConsulTokens, Person, VaultSetup, bastion_sections, route, start_bastion

import devstack
from devstack import BastionProcess, ConsulAgent, SshdHost, ssh_command


def ssh(
    port: int, user: str, key: Path, *command: str, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ssh_command(port=port, user=user, identity=key, extra=extra, command=command),
        capture_output=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def dave(consul: ConsulAgent, people: dict[str, Person]) -> Iterator[Person]:
    """A person whose directory entry the tests break in every way (alice's key)."""
    consul.kv_put("ssh-keys/dave", people["alice"].pubkey)
    yield Person("dave", people["alice"].key)
    consul.kv_delete("users/dave")
    consul.kv_delete("ssh-keys/dave")


def set_route(consul: ConsulAgent, bastion: BastionProcess, user: str, value: str | bytes) -> None:
    consul.kv_put(f"users/{user}", value)
    bastion.wait_synced(consul)  # in force within milliseconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"%%% not a host", b"directory entry for dave is malformed"),
        (b"", b"directory entry for dave is malformed"),
        (b"host-" + b"a" * 2000, b"directory entry for dave is malformed"),
        (b"host-102\x07", b"directory entry for dave is malformed"),
        (b"host-102:99999", b"bad port"),
        (b"\xff\xfe", b"directory entry for dave is malformed"),
        (b"host-999", b"host-999 is not a known host"),
    ],
)
def test_bad_entries_are_refused_and_others_keep_working(
    bastion: BastionProcess,
    consul: ConsulAgent,
    dave: Person,
    people: dict[str, Person],
    value: bytes,
    message: bytes,
) -> None:
    set_route(consul, bastion, "dave", value)
    result = ssh(bastion.port, "dave", dave.key, "hostname")
    assert result.returncode == 255
    assert result.stdout == b""
    assert result.stderr.startswith(b"bastion: "), result.stderr
    assert message in result.stderr
    assert result.stderr.count(b"\n") == 1  # one line
    ok = ssh(bastion.port, "alice", people["alice"].key, "hostname")
    assert ok.stdout == b"host-102\n"


def test_unhealthy_host_is_not_used(
    bastion: BastionProcess, consul: ConsulAgent, hosts: dict[str, SshdHost], dave: Person
) -> None:
    consul.register_node("host-666", hosts["host-102"].address, status="critical")
    set_route(consul, bastion, "dave", f"host-666:{hosts['host-102'].port}")
    result = ssh(bastion.port, "dave", dave.key, "hostname")
    assert result.returncode == 255
    assert b"host-666 is down" in result.stderr
    # with a fallback the next healthy target is used
    set_route(
        consul,
        bastion,
        "dave",
        f"dave@host-666:{hosts['host-102'].port}, alice@{route(hosts, 'host-101')}",
    )
    result = ssh(bastion.port, "dave", dave.key, "hostname; id -un")
    assert result.stdout == b"host-101\nalice\n", result.stderr
    record = bastion.wait_audit(lambda r: r.get("event") == "session" and r.get("user") == "dave")
    assert record["upstream"].startswith("host-101")


def test_unreachable_host_is_named(
    bastion: BastionProcess, consul: ConsulAgent, dave: Person
) -> None:
    # a node in the catalog, passing, but nothing listens there
    consul.register_node("host-404", "127.0.1.104")
    consul.kv_put(
        "host-keys/host-404",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
    )
    set_route(consul, bastion, "dave", f"host-404:{devstack.free_port('127.0.1.104')}")
    result = ssh(bastion.port, "dave", dave.key, "hostname")
    assert result.returncode == 255
    assert b"cannot reach host-404" in result.stderr
    consul.kv_delete("host-keys/host-404")


@pytest.fixture(scope="module")
def host_103(
    stack_dir: Path, local_ca: Path, vault: VaultSetup, consul: ConsulAgent
) -> Iterator[SshdHost]:
    """A host whose key the bastion does not know (nor is told correctly)."""
    host = SshdHost(
        "host-103",
        "127.0.1.103",
        stack_dir / "host-103",
        [local_ca.with_suffix(".pub"), vault.user_ca_pub],
    ).start()
    consul.register_node("host-103", host.address)
    yield host
    host.stop()
    consul.kv_delete("host-keys/host-103")


def test_upstream_host_key_is_verified(
    bastion: BastionProcess,
    consul: ConsulAgent,
    hosts: dict[str, SshdHost],
    host_103: SshdHost,
    dave: Person,
) -> None:
    set_route(consul, bastion, "dave", f"alice@host-103:{host_103.port}")
    unknown = ssh(bastion.port, "dave", dave.key, "hostname")
    assert unknown.returncode == 255
    assert b"no known host key for host-103" in unknown.stderr
    # a wrong key published in the directory: mismatch, refused
    consul.kv_put("host-keys/host-103", hosts["host-101"].host_pubkey)
    bastion.wait_synced(consul)
    mismatch = ssh(bastion.port, "dave", dave.key, "hostname")
    assert mismatch.returncode == 255
    assert b"host key of host-103" in mismatch.stderr
    assert b"does not match" in mismatch.stderr
    # the right key: accepted
    consul.kv_put("host-keys/host-103", host_103.host_pubkey)
    bastion.wait_synced(consul)
    ok = ssh(bastion.port, "dave", dave.key, "hostname")
    assert ok.stdout == b"host-103\n", ok.stderr
    reasons = {r.get("reason") for r in bastion.audit_records() if r.get("user") == "dave"}
    assert "host-key-mismatch" in reasons


def test_alice_key_does_not_log_bob_in(bastion: BastionProcess, people: dict[str, Person]) -> None:
    result = ssh(bastion.port, "bob", people["alice"].key, "hostname")
    assert result.returncode == 255
    assert result.stdout == b""
    assert b"Permission denied" in result.stderr


def askpass(tmp_path: Path, secret: str) -> dict[str, str]:
    script = tmp_path / "askpass.sh"
    script.write_text(f"#!/bin/sh\necho '{secret}'\n")
    script.chmod(0o700)
    return {
        "SSH_ASKPASS": str(script),
        "SSH_ASKPASS_REQUIRE": "force",
        "DISPLAY": ":0",
        "PATH": "/usr/bin:/bin",
    }


@pytest.mark.parametrize("method", ["password", "keyboard-interactive"])
def test_password_passthrough(tmp_path: Path, bastion: BastionProcess, method: str) -> None:
    def login(secret: str) -> subprocess.CompletedProcess[bytes]:
        argv = [
            "ssh",
            "-F",
            "/dev/null",
            "-p",
            str(bastion.port),
            "-o",
            "BatchMode=no",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            f"PreferredAuthentications={method}",
            "-o",
            "NumberOfPasswordPrompts=1",
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "LogLevel=ERROR",
            "carol@127.0.0.1",
            "hostname; id -un",
        ]
        return subprocess.run(
            argv,
            env=askpass(tmp_path, secret),
            capture_output=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    ok = login("carol-test-pass")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == b"host-102\ncarol\n"
    wrong = login("not-her-password")
    assert wrong.returncode == 255
    assert b"Permission denied" in wrong.stderr
    logged = bastion.log.read_text() + bastion.audit_file.read_text()
    assert "carol-test-pass" not in logged and "not-her-password" not in logged


@pytest.fixture(scope="module")
def local_ca_bastion(
    stack_dir: Path,
    consul: ConsulAgent,
    consul_tokens: ConsulTokens,
    known_hosts: Path,
    local_ca: Path,
    directory_entries: None,
) -> Iterator[BastionProcess]:
    """A bastion with no Vault: it signs with a local CA key file."""
    proc = BastionProcess(
        stack_dir / "bastion-local-ca",
        bastion_sections(consul_tokens, consul, known_hosts, ca_key=local_ca),
    )
    yield proc.start()
    proc.stop()


def test_local_ca_mode(local_ca_bastion: BastionProcess, people: dict[str, Person]) -> None:
    result = ssh(local_ca_bastion.port, "alice", people["alice"].key, "hostname")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"host-102\n"


def test_route_command_explains(bastion: BastionProcess, hosts: dict[str, SshdHost]) -> None:
    def explain(user: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                devstack.bastion_bin(),
                "--log-level",
                "ERROR",
                "route",
                user,
                "--config",
                str(bastion.config),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    result = explain("alice")
    assert result.returncode == 0, result.stderr
    assert "host-102" in result.stdout
    assert hosts["host-102"].address in result.stdout
    assert "verdict: alice@host-102 (" in result.stdout
    refused = explain("nobody")
    assert refused.returncode == 1
    assert "verdict: REFUSED: no route for nobody" in refused.stdout


def test_audit_record_of_a_refusal(
    bastion: BastionProcess, consul: ConsulAgent, dave: Person
) -> None:
    consul.kv_delete("users/dave")
    bastion.wait_synced(consul)
    result = ssh(bastion.port, "dave", dave.key, "true")
    assert b"no route for dave" in result.stderr
    record = bastion.wait_audit(
        lambda r: (
            r.get("event") == "session"
            and r.get("user") == "dave"
            and r.get("reason") == "no-route"
        )
    )
    assert record["outcome"] == "error"
    assert record["reason"] == "no-route"
    assert record["source"].startswith("127.0.0.1:")
    for key in ("duration_ms", "bytes_up", "bytes_down", "conn", "ts"):
        assert key in record


def test_secrets_never_reach_logs(
    bastion: BastionProcess, consul_tokens: ConsulTokens, vault: VaultSetup
) -> None:
    secrets = [
        consul_tokens.bastion,
        consul_tokens.management,
        consul_tokens.operator,
        vault.secret_id_file.read_text().strip(),
        vault.root_token,
    ]
    text = bastion.log.read_text() + bastion.audit_file.read_text()
    for secret in secrets:
        assert secret not in text


# -- Consul going away and coming back -------------------------------------


@pytest.fixture
def own_consul(
    tmp_path: Path, hosts: dict[str, SshdHost], people: dict[str, Person]
) -> Iterator[tuple[ConsulAgent, Path]]:
    """A Consul of this test's own, secured by the real bootstrap script."""
    agent = ConsulAgent(tmp_path / "consul").start()
    tokens = tmp_path / "tokens"
    devstack.secure_consul(agent, tokens)
    fill_directory(agent, hosts, people)
    try:
        yield agent, tokens
    finally:
        agent.stop()


def fill_directory(
    agent: ConsulAgent, hosts: dict[str, SshdHost], people: dict[str, Person]
) -> None:
    for name, host in hosts.items():
        agent.register_node(name, host.address)
    agent.kv_put("ssh-keys/alice", people["alice"].pubkey)
    agent.kv_put("users/alice", route(hosts, "host-102"))


def test_consul_outage_and_recovery(
    tmp_path: Path,
    own_consul: tuple[ConsulAgent, Path],
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
    known_hosts: Path,
    local_ca: Path,
) -> None:
    agent, tokens = own_consul
    stale_after = 4.0
    sections = bastion_sections(
        ConsulTokens("", "", "", tokens), agent, known_hosts, ca_key=local_ca
    )
    sections["consul"]["stale_after"] = stale_after
    proc = BastionProcess(tmp_path / "bastion", sections).start()
    alice = people["alice"]
    try:
        assert ssh(proc.port, "alice", alice.key, "hostname").stdout == b"host-102\n"
        agent.stop()
        stopped = time.monotonic()
        # within the bound: the cached table keeps serving
        cached = ssh(proc.port, "alice", alice.key, "hostname")
        assert cached.stdout == b"host-102\n", cached.stderr
        assert time.monotonic() - stopped < stale_after
        # past the bound: refused with the reason
        devstack.wait_until(
            "the cached directory to go stale",
            lambda: ssh(proc.port, "alice", alice.key, "hostname").returncode == 255,
            stale_after + 10,
        )
        # the reason comes in a disconnect, which OpenSSH shows even at LogLevel=ERROR
        stale = ssh(proc.port, "alice", alice.key, "hostname", extra=("-o", "LogLevel=ERROR"))
        assert stale.returncode == 255
        assert b"directory" in stale.stderr and b"unavailable" in stale.stderr
        # Consul back on the same address (a new cluster, secured the same way
        # by the same script: tokens keep their secrets)
        back = ConsulAgent(tmp_path / "consul-2", http_port=agent.http_port).start()
        try:
            (tokens / "management.token").unlink()
            devstack.secure_consul(back, tokens)
            fill_directory(back, hosts, people)
            deadline = time.monotonic() + 15
            while True:
                result = ssh(proc.port, "alice", alice.key, "hostname")
                if result.stdout == b"host-102\n" or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert result.stdout == b"host-102\n", result.stderr
        finally:
            back.stop()
        log = proc.log.read_text()
        assert "WARNING" in log or "ERROR" in log  # the outage was logged loudly
    finally:
        proc.stop()


# -- broken and slow clients, and where the Consul token comes from ---------


@pytest.fixture(scope="module")
def strict_bastion(
    stack_dir: Path,
    consul: ConsulAgent,
    consul_tokens: ConsulTokens,
    known_hosts: Path,
    vault: VaultSetup,
    bao: devstack.BaoServer,
    local_ca: Path,
    directory_entries: None,
) -> Iterator[BastionProcess]:
    """Short grace time, few pre-auth slots, Consul token read from Vault KV v2,
    and people's own certificates from a trusted user CA."""
    status, body = bao.api(
        "POST", "/v1/secret/data/bastion/consul", body={"data": {"token": consul_tokens.bastion}}
    )
    assert status == 200, body
    sections = bastion_sections(
        consul_tokens,
        consul,
        known_hosts,
        vault,
        login_grace_time=2,
        max_unauthenticated=4,
        user_ca_keys=str(local_ca.with_suffix(".pub")),
    )
    del sections["consul"]["token_file"]
    sections["consul"]["token_vault_path"] = "secret/bastion/consul"
    proc = BastionProcess(stack_dir / "bastion-strict", sections)
    yield proc.start()
    proc.stop()


def test_consul_token_from_vault(strict_bastion: BastionProcess, people: dict[str, Person]) -> None:
    result = ssh(strict_bastion.port, "alice", people["alice"].key, "hostname")
    assert result.stdout == b"host-102\n", result.stderr


def test_grace_time_and_preauth_bound(
    strict_bastion: BastionProcess, people: dict[str, Person]
) -> None:
    port = strict_bastion.port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
    try:
        for sock in idle:
            assert sock.recv(64).startswith(b"SSH-2.0-")
        # a fifth unauthenticated connection is dropped at once...
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
            extra.settimeout(5)
            data = b""
            while chunk := extra.recv(4096):
                data += chunk
        assert "4 unauthenticated connections already" in strict_bastion.log.read_text()
        # ...and a broken
        # client sending garbage is cut off without hurting anyone
        with socket.create_connection(("127.0.0.1", port), timeout=10) as junk:
            junk.sendall(b"GET / HTTP/1.1\r\n\r\n" * 10)
        # the idle ones are disconnected after the login grace time
        started = time.monotonic()
        for sock in idle:
            sock.settimeout(10)
            while sock.recv(4096):
                pass
        assert time.monotonic() - started < 8
    finally:
        for sock in idle:
            sock.close()
    result = ssh(port, "alice", people["alice"].key, "hostname")
    assert result.stdout == b"host-102\n", result.stderr


def test_user_certificate_from_trusted_ca(
    tmp_path: Path, strict_bastion: BastionProcess, local_ca: Path
) -> None:
    # a key the directory has never seen, certified by the trusted CA for alice
    key = devstack.keygen(tmp_path / "id_cert", comment="alice laptop")
    devstack.sign_user_key(local_ca, key.with_suffix(".pub"), ["alice"], "alice-cert")
    ok = ssh(strict_bastion.port, "alice", key, "hostname")
    assert ok.stdout == b"host-102\n", ok.stderr
    # the certificate names alice, not bob
    assert ssh(strict_bastion.port, "bob", key, "hostname").returncode == 255
    # a certificate naming nobody (ssh-keygen without -n) logs nobody in, as
    # sshd refuses it ("Certificate lacks principal list")
    anyone = devstack.keygen(tmp_path / "id_anyone", comment="no principals")
    sign = [devstack.ssh_keygen_bin(), "-q", "-s", str(local_ca), "-I", "anyone", "-V", "+1h"]
    subprocess.run(
        [*sign, str(anyone.with_suffix(".pub"))],
        check=True,
        capture_output=True,
    )
    for user in ("alice", "bob"):
        refused = ssh(strict_bastion.port, user, anyone, "hostname")
        assert (refused.returncode, refused.stdout) == (255, b""), refused.stderr


def test_never_loaded_directory_refuses_with_reason(
    tmp_path: Path,
    people: dict[str, Person],
    known_hosts: Path,
    local_ca: Path,
    consul_tokens: ConsulTokens,
) -> None:
    nowhere = ConsulAgent(tmp_path / "none", http_port=devstack.free_port())  # never started
    sections = bastion_sections(consul_tokens, nowhere, known_hosts, ca_key=local_ca)
    sections["consul"]["request_timeout"] = 1
    proc = BastionProcess(tmp_path / "bastion", sections).start()
    try:
        result = ssh(
            proc.port, "alice", people["alice"].key, "hostname", extra=("-o", "LogLevel=ERROR")
        )
        assert result.returncode == 255
        assert b"no routing table loaded yet" in result.stderr, result.stderr
        assert b"Permission denied" not in result.stderr
        record = proc.wait_audit(lambda r: r.get("event") == "connection")
        assert record["reason"] == "directory-unavailable", record
    finally:
        proc.stop()


def test_signing_that_would_fail_every_login_is_reported_at_start(
    tmp_path: Path,
    bastion: BastionProcess,
    consul: ConsulAgent,
    consul_tokens: ConsulTokens,
    vault: VaultSetup,
    known_hosts: Path,
    people: dict[str, Person],
) -> None:
    # the session bastion's self-check passed
    assert "certificate signing self-check passed" in bastion.log.read_text()
    # cert_ttl above the Vault role's max_ttl (10 min): Vault refuses every signing
    proc = start_bastion(
        tmp_path / "bastion", consul, consul_tokens, vault, known_hosts, cert_ttl=3600, reuse_idle=0
    )
    try:
        log = proc.log.read_text()
        assert "certificate signing self-check failed" in log, log[-2000:]
        assert "ttl" in log.split("self-check failed", 1)[1].splitlines()[0]
        # and it is what a login then meets
        refused = ssh(proc.port, "alice", people["alice"].key, "hostname")
        assert refused.returncode == 255
        assert refused.stdout == b""
    finally:
        proc.stop()


def test_unreadable_host_key_stops_start_with_a_clear_error(
    tmp_path: Path, bastion: BastionProcess
) -> None:
    """The host keys are loaded once at start: a bad one is named there."""
    bad_key = tmp_path / "ssh_host_ed25519_key"
    bad_key.write_text("not a key\n")
    bad_key.chmod(0o600)
    sections = {**bastion.sections, "audit": {"file": str(tmp_path / "audit.jsonl")}}
    sections["server"] = {
        **bastion.sections["server"],
        "listen": f"127.0.0.1:{devstack.free_port()}",
        "host_keys": [str(bad_key)],
    }
    config = tmp_path / "bastion.toml"
    config.write_text(devstack.render_settings(sections))
    result = subprocess.run(
        [devstack.bastion_bin(), "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert f"[server] host_keys: cannot load {bad_key}: " in result.stderr, result.stderr
