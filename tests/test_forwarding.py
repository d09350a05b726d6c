"""Jumping through the bastion (``ssh -J``) and forwarding by policy.

Real OpenSSH clients, the real bastion, real sshd hosts; the policy lives in
the user's directory entry (the JSON form of ``users/<user>``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Person, route

import devstack
from devstack import BastionProcess, ConsulAgent, SshdHost, stop_ssh_client


def write_config(
    tmp: Path, bastion: BastionProcess, person: Person, key: Path, hosts: dict[str, SshdHost]
) -> Path:
    """An ssh_config as a user would write it (README shows the same ProxyJump)."""
    known = tmp / "known_hosts"
    known.write_text(
        "".join(
            f"[{name}]:{h.port},[{h.address}]:{h.port} {h.host_pubkey}\n"
            for name, h in hosts.items()
        )
    )
    cfg = tmp / "ssh_config"
    cfg.write_text(f"""\
Host bastion
    HostName 127.0.0.1
    Port {bastion.port}
    User {person.name}
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel INFO

Host host-101 host-102
    ProxyJump bastion
    User {person.name}
    UserKnownHostsFile {known}
    StrictHostKeyChecking yes

Host *
    IdentityFile {key}
    IdentitiesOnly yes
    BatchMode yes
    LogLevel ERROR
    ConnectTimeout 10
    GlobalKnownHostsFile /dev/null
""")
    return cfg


@pytest.fixture
def jump_key(tmp_path: Path, people: dict[str, Person], local_ca: Path) -> Path:
    """alice's key with a certificate the target hosts trust, for end-to-end login."""
    key = tmp_path / "id_alice"
    shutil.copy(people["alice"].key, key)
    shutil.copy(people["alice"].key.with_suffix(".pub"), key.with_suffix(".pub"))
    key.chmod(0o600)
    devstack.sign_user_key(local_ca, key.with_suffix(".pub"), ["alice"], "alice-e2e")
    return key


@pytest.fixture
def policy(consul: ConsulAgent, hosts: dict[str, SshdHost]) -> Iterator[dict[str, object]]:
    """Set alice's and bob's entries by assignment; restored afterwards."""
    entries: dict[str, object] = {}
    yield entries  # the test fills it, then calls apply_policy
    consul.kv_put("users/alice", route(hosts, "host-102"))
    consul.kv_put("users/bob", route(hosts, "host-101"))


def put_entry(consul: ConsulAgent, bastion: BastionProcess, user: str, value: object) -> None:
    consul.kv_put(f"users/{user}", value if isinstance(value, str) else json.dumps(value))
    bastion.wait_synced(consul)  # in force within milliseconds


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        argv, capture_output=True, timeout=60, check=False, stdin=subprocess.DEVNULL, **kw
    )  # type: ignore[call-overload]


def test_jump_to_routed_host(
    tmp_path: Path,
    bastion: BastionProcess,
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
    jump_key: Path,
) -> None:
    cfg = write_config(tmp_path, bastion, people["alice"], jump_key, hosts)
    port = str(hosts["host-102"].port)
    result = run(["ssh", "-F", str(cfg), "-p", port, "host-102", "hostname; id -un"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"host-102\nalice\n"
    # the classic -J spelling works the same
    result = run(["ssh", "-F", str(cfg), "-J", "bastion", "-p", port, "alice@host-102", "hostname"])
    assert result.stdout == b"host-102\n", result.stderr
    # the tunnel is audited with its byte counts
    tunnels = [r for r in bastion.audit_records() if r["event"] == "tunnel"]
    assert tunnels and tunnels[-1]["outcome"] == "ok"
    assert tunnels[-1]["bytes_up"] > 0 and tunnels[-1]["bytes_down"] > 0


def test_jump_payload_is_byte_exact(
    tmp_path: Path,
    bastion: BastionProcess,
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
    jump_key: Path,
) -> None:
    cfg = write_config(tmp_path, bastion, people["alice"], jump_key, hosts)
    payload = os.urandom(64 * 1024 * 1024)
    result = subprocess.run(
        ["ssh", "-F", str(cfg), "-p", str(hosts["host-102"].port), "host-102", "sha256sum"],
        input=payload,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()


def test_jump_follows_the_route(
    tmp_path: Path,
    bastion: BastionProcess,
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
    consul: ConsulAgent,
    jump_key: Path,
    policy: dict[str, object],
) -> None:
    cfg = write_config(tmp_path, bastion, people["alice"], jump_key, hosts)

    def jump(name: str) -> subprocess.CompletedProcess[bytes]:
        return run(["ssh", "-F", str(cfg), "-p", str(hosts[name].port), name, "hostname"])

    refused = jump("host-101")
    assert refused.returncode == 255
    assert b"administratively prohibited" in refused.stderr
    assert b"alice may not connect to host-101:" in refused.stderr
    put_entry(consul, bastion, "alice", route(hosts, "host-101"))
    assert jump("host-101").stdout == b"host-101\n"
    assert jump("host-102").returncode == 255
    records = [
        r for r in bastion.audit_records() if r["event"] == "tunnel" and r["outcome"] == "refused"
    ]
    assert records and records[-1]["reason"] == "forward-denied"


def test_jump_by_address_and_extra_jump_hosts(
    tmp_path: Path,
    bastion: BastionProcess,
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
    consul: ConsulAgent,
    jump_key: Path,
    policy: dict[str, object],
) -> None:
    h101, h102 = hosts["host-101"], hosts["host-102"]
    argv = [
        "ssh",
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "IdentitiesOnly=yes",
        "-i",
        str(jump_key),
        "-o",
        f"ProxyCommand=ssh -F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes "
        f"-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
        f"-i {jump_key} -p {bastion.port} -W %h:%p alice@127.0.0.1",
    ]
    # by the node's address, as resolved through the catalog
    by_addr = run([*argv, "-p", str(h102.port), f"alice@{h102.address}", "hostname"])
    assert by_addr.stdout == b"host-102\n", by_addr.stderr
    assert run([*argv, "-p", str(h101.port), f"alice@{h101.address}", "hostname"]).returncode == 255
    put_entry(
        consul,
        bastion,
        "alice",
        {"route": route(hosts, "host-102"), "jump": [f"host-101:{h101.port}"]},
    )
    extra = run([*argv, "-p", str(h101.port), f"alice@{h101.address}", "hostname"])
    assert extra.stdout == b"host-101\n", extra.stderr


@pytest.fixture
def agent(tmp_path: Path, people: dict[str, Person]) -> Iterator[dict[str, str]]:
    """A real ssh-agent holding alice's key."""
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(
        ["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        devstack.wait_until("ssh-agent", sock.exists, 10)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(
            ["ssh-add", str(people["alice"].key)], env=env, check=True, capture_output=True
        )
        yield env
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def fingerprint(person: Person) -> bytes:
    out = subprocess.run(
        ["ssh-keygen", "-lf", str(person.key.with_suffix(".pub"))], capture_output=True, check=True
    ).stdout
    return out.split()[1]


def test_agent_forwarding_by_policy(
    bastion: BastionProcess,
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
    consul: ConsulAgent,
    agent: dict[str, str],
    policy: dict[str, object],
) -> None:
    alice = people["alice"]
    argv = devstack.ssh_command(
        port=bastion.port,
        user="alice",
        identity=alice.key,
        extra=["-A"],
        command=["ssh-add -l; echo rc=$?"],
    )
    # off by default: no agent on the target
    off = run(argv, env=agent)
    assert b"rc=2" in off.stdout, off
    # ... and none on the bastion either: the request is refused, no socket is made
    assert _bastion_agent_sockets_during(bastion, alice, agent) == 0
    put_entry(
        consul, bastion, "alice", {"route": route(hosts, "host-102"), "agent_forwarding": True}
    )
    on = run(argv, env=agent)
    assert on.returncode == 0, on.stderr
    assert fingerprint(alice) in on.stdout
    assert b"rc=0" in on.stdout
    assert _bastion_agent_sockets_during(bastion, alice, agent) == 1


def _agent_sockets() -> set[str]:
    """Paths of asyncssh's agent-forwarding sockets listening on this machine."""
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return {ln.split()[-1] for ln in lines if "/asyncssh-" in ln and ln.endswith("/agent")}


def _bastion_agent_sockets_during(
    bastion: BastionProcess, person: Person, env: dict[str, str]
) -> int:
    """How many agent sockets appear while ``ssh -A`` holds a session open."""
    before = _agent_sockets()
    argv = devstack.ssh_command(
        port=bastion.port,
        user=person.name,
        identity=person.key,
        extra=["-A"],
        command=["echo ready; sleep 5"],
    )
    holder = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"ready\n"
        return len(_agent_sockets() - before)
    finally:
        stop_ssh_client(holder)


def wait_record(
    bastion: BastionProcess, match: Callable[[dict[str, Any]], bool], timeout: float = 10
) -> dict[str, Any]:
    """The newest audit record that matches (records are written when a channel ends)."""
    return bastion.wait_audit(match, timeout)


def _banner_through(port: int, timeout: float = 10) -> bytes:
    """The SSH banner read through a forward at ``port``, once it answers."""
    devstack.wait_until(
        f"a banner through port {port}",
        lambda: devstack.ssh_banner("127.0.0.1", port).startswith(b"SSH-"),
        timeout,
    )
    return devstack.ssh_banner("127.0.0.1", port)


def _forwarding_client(
    bastion: BastionProcess, person: Person, spec: list[str]
) -> subprocess.Popen[bytes]:
    argv = devstack.ssh_command(
        port=bastion.port,
        user=person.name,
        identity=person.key,
        extra=["-N", "-o", "ExitOnForwardFailure=yes", *spec],
    )
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def test_local_forwarding_by_policy(
    bastion: BastionProcess,
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
    consul: ConsulAgent,
    policy: dict[str, object],
) -> None:
    h101 = hosts["host-101"]
    put_entry(
        consul, bastion, "alice", {"route": route(hosts, "host-102"), "local_forwarding": True}
    )
    lport = devstack.free_port()
    mark = len(bastion.audit_records())
    client = _forwarding_client(
        bastion, people["alice"], ["-L", f"127.0.0.1:{lport}:{h101.address}:{h101.port}"]
    )
    try:
        # host-102 opens the connection to host-101's sshd for alice
        assert _banner_through(lport).startswith(b"SSH-2.0-OpenSSH")
    finally:
        stop_ssh_client(client)
    record = wait_record(
        bastion, lambda r: r["event"] == "forward" and r in bastion.audit_records()[mark:]
    )
    assert record["outcome"] == "ok" and record["bytes_down"] > 0

    # bob has no such policy: the channel is refused, the login itself works
    lport = devstack.free_port()
    client = _forwarding_client(
        bastion, people["bob"], ["-L", f"127.0.0.1:{lport}:{h101.address}:22"]
    )
    try:
        deadline = time.monotonic() + 10
        while True:  # until the client listens
            try:
                sock = socket.create_connection(("127.0.0.1", lport), timeout=10)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        with sock:
            sock.settimeout(10)
            assert sock.recv(100) == b""
    finally:
        stop_ssh_client(client)
    refused = wait_record(
        bastion,
        lambda r: r["event"] == "tunnel" and r.get("user") == "bob" and r["outcome"] == "refused",
    )
    assert refused["reason"] == "forward-denied"


def test_remote_forwarding_by_policy(
    bastion: BastionProcess,
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
    consul: ConsulAgent,
    policy: dict[str, object],
) -> None:
    h101 = hosts["host-101"]
    rport = devstack.free_port()
    spec = ["-R", f"127.0.0.1:{rport}:{h101.address}:{h101.port}"]
    denied = _forwarding_client(bastion, people["alice"], spec)
    _, err = denied.communicate(timeout=30)
    assert denied.returncode == 255
    assert b"remote port forwarding failed" in err

    put_entry(
        consul, bastion, "alice", {"route": route(hosts, "host-102"), "remote_forwarding": True}
    )
    client = _forwarding_client(bastion, people["alice"], spec)
    try:
        # a connection made on host-102 comes back through the bastion to the
        # client. One made while the forward is still being set up can be
        # dropped (sshd listens before it answers the request), so retry.
        deadline = time.monotonic() + 10
        while not (banner := _banner_through(rport)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert banner.startswith(b"SSH-2.0-OpenSSH")
    finally:
        stop_ssh_client(client)
