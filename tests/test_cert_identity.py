"""Certificates that say where they came from: the key id of each upstream
certificate names the person, the connection (the audit's ``conn``) and the
Consul ModifyIndex of the directory entry the route came from, so the host's
auth log line alone tells who logged in, through which bastion session, under
which directory state; ``[upstream] source_address`` becomes the
``source-address`` critical option (PROTOCOL.certkeys), which the host
enforces. Both signers: the Vault/OpenBao SSH engine and a local CA key.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Person

from bastion.credentials.signers import LocalCASigner
from devstack import BastionProcess, ConsulAgent, SshdHost, ssh_command, wait_until


def use_signer(signer: str, local_ca: Path) -> Callable[[dict[str, dict[str, object]]], None]:
    """A ``new_bastion`` tweak: sign with Vault (as configured) or the local CA."""

    def tweak(sections: dict[str, dict[str, object]]) -> None:
        if signer == "local":
            del sections["vault"]
            sections["upstream"]["ca_key"] = str(local_ca)

    return tweak


def login(bastion: BastionProcess, person: Person) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ssh_command(port=bastion.port, user=person.name, identity=person.key, command=["hostname"]),
        capture_output=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def entry_index(consul: ConsulAgent, key: str) -> int:
    status, body = consul.api("GET", f"/v1/kv/{key}")
    assert status == 200, body
    return int(body[0]["ModifyIndex"])


@pytest.mark.parametrize("signer", ["vault", "local"])
def test_host_log_names_person_session_and_directory_index(
    signer: str,
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
    local_ca: Path,
) -> None:
    bastion = new_bastion(tweak=use_signer(signer, local_ca))
    result = login(bastion, people["alice"])
    assert result.returncode == 0, result.stderr
    record = bastion.wait_audit(lambda r: r.get("event") == "login" and r["user"] == "alice")
    index = entry_index(consul, "users/alice")
    assert record["key_id"] == f"bastion:alice:{record['conn']}:kv={index}"
    # sshd (LogLevel VERBOSE): Accepted certificate ID "bastion:alice:<conn>:kv=<index>"
    # (serial N) signed by ED25519 CA ...
    log = hosts["host-102"].workdir / "sshd.log"
    wanted = f'Accepted certificate ID "{record["key_id"]}" (serial {record["serial"]}) signed by'
    wait_until("the host's auth log line", lambda: wanted in log.read_text(errors="replace"), 10)
    # and at INFO, sshd's default: "Accepted publickey for alice from ... ID ... (serial N)"
    info = f"ID {record['key_id']} (serial {record['serial']}) CA ED25519"
    accepted = [ln for ln in log.read_text(errors="replace").splitlines() if info in ln]
    assert accepted and "Accepted publickey for alice from 127.0.0.1 port" in accepted[0]


@pytest.mark.parametrize("signer", ["vault", "local"])
def test_source_address_is_enforced_by_the_host(
    signer: str,
    new_bastion: Callable[..., BastionProcess],
    people: dict[str, Person],
    local_ca: Path,
) -> None:
    alice = people["alice"]

    def with_source(cidrs: list[str]) -> Callable[[dict[str, dict[str, object]]], None]:
        def tweak(sections: dict[str, dict[str, object]]) -> None:
            use_signer(signer, local_ca)(sections)
            sections["upstream"]["source_address"] = cidrs
            sections["upstream"]["reuse_idle"] = 0  # every login shows its own certificate

        return tweak

    # the bastion reaches the test hosts (127.0.1.x) from 127.0.0.1, the
    # kernel's source address for the loopback route
    allowed = new_bastion(tweak=with_source(["127.0.0.1/32"]))
    ok = login(allowed, alice)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == b"host-102\n"

    foreign = new_bastion(tweak=with_source(["192.0.2.0/24"]))
    refused = login(foreign, alice)
    assert refused.returncode == 255
    assert refused.stdout == b""
    assert b"bastion: host-102" in refused.stderr
    assert b"refused the login for alice" in refused.stderr
    record = foreign.wait_audit(lambda r: r.get("event") == "connection" and r["user"] == "alice")
    assert record["reason"] == "upstream-auth-failed"
    # the operator's log says why
    assert "valid from 192.0.2.0/24 only" in foreign.log.read_text()


def test_local_ca_certificate_carries_source_address(local_ca: Path) -> None:
    signer = LocalCASigner(local_ca, 60, source_address=("10.0.0.5/32", "2001:db8::/64"))
    cred = asyncio.run(signer.issue("alice", "bastion:alice:c1:kv=7"))
    options = cred.certificate.options  # type: ignore[attr-defined]
    assert [str(n) for n in options["source-address"]] == ["10.0.0.5/32", "2001:db8::/64"]
    bare = asyncio.run(LocalCASigner(local_ca, 60).issue("alice", "k"))
    assert "source-address" not in bare.certificate.options  # type: ignore[attr-defined]
