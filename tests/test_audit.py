"""The audit log, read from a real bastion after real logins (docs/audit.md).

One login's records tie together by ``conn``; the upstream certificate's key
id carries it, so the host's own auth log names the same login; a failed
attempt names the method and the key's fingerprint, never a secret; a disk
that refuses the audit file never stops a login.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Person

import devstack
from bastion.check import check_ssh_banner
from devstack import BastionProcess, SshdHost, ssh_command


def ssh(
    bastion: BastionProcess, person: Person, *command: str, key: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ssh_command(
            port=bastion.port, user=person.name, identity=key or person.key, command=command
        ),
        capture_output=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def own_bastion(new_bastion: Callable[..., BastionProcess]) -> BastionProcess:
    # each login its own certificate
    return new_bastion(tweak=lambda sections: sections["upstream"].update(reuse_idle=0))


def records_of(bastion: BastionProcess, conn: str) -> list[dict[str, Any]]:
    return [r for r in bastion.audit_records() if r.get("conn") == conn]


def test_one_login_from_connect_to_close(
    own_bastion: BastionProcess, people: dict[str, Person], hosts: dict[str, SshdHost]
) -> None:
    alice = people["alice"]
    result = ssh(own_bastion, alice, "echo audited")
    assert result.stdout == b"audited\n", result.stderr
    closed = own_bastion.wait_audit(
        lambda r: r["event"] == "connection" and r.get("user") == "alice"
    )
    conn = closed["conn"]
    events = [r["event"] for r in records_of(own_bastion, conn)]
    assert events == ["connect", "login", "session-start", "session", "connection"], events
    connect = records_of(own_bastion, conn)[0]
    assert connect["user"] == "alice" and connect["client"].startswith("SSH-2.0-OpenSSH")
    # a port probe (what Consul's script check does) leaves no record
    marker = len(own_bastion.audit_records())
    code, _ = check_ssh_banner(f"127.0.0.1:{own_bastion.port}", 2)
    assert code == 0
    devstack.wait_until(
        "probe counted", lambda: (own_bastion.metric("bastion_probes_total") or 0) >= 1, 10
    )
    assert own_bastion.audit_records()[marker:] == []
    login, start, session = (
        next(r for r in records_of(own_bastion, conn) if r["event"] == name)
        for name in ("login", "session-start", "session")
    )
    assert login["user"] == "alice" and login["login"] == "alice"
    assert login["upstream"].startswith("host-102 (127.0.1.102:")
    assert login["address"] == "127.0.1.102"
    # person, connection, and the ModifyIndex of users/alice (docs/audit.md)
    assert re.fullmatch(rf"bastion:alice:{conn}:kv=\d+", login["key_id"]), login["key_id"]
    assert login["reused"] is False and isinstance(login["serial"], int)
    for timing in ("ms", "route_ms", "sign_ms", "auth_ms"):
        assert login[timing] >= 0
    assert start["request"] == "exec" and start["command"] == "echo audited"
    assert start["session_id"] == session["session_id"] == f"{conn}-1"
    assert session["exit_status"] == 0 and session["bytes_down"] == len(b"audited\n")
    assert closed["outcome"] == "authenticated" and closed["channels"] == 1
    # the host's sshd names the same login and certificate
    sshd_log = (hosts["host-102"].workdir / "sshd.log").read_text(errors="replace")
    assert f'ID "{login["key_id"]}" (serial {login["serial"]})' in sshd_log


def test_failed_attempts_name_the_key_never_a_secret(
    tmp_path: Path, own_bastion: BastionProcess, people: dict[str, Person]
) -> None:
    alice = people["alice"]
    stranger = devstack.keygen(tmp_path / "id_stranger")
    fingerprint = subprocess.run(
        ["ssh-keygen", "-lf", str(stranger.with_suffix(".pub"))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[1]
    assert ssh(own_bastion, alice, "true", key=stranger).returncode == 255
    failed = own_bastion.wait_audit(lambda r: r["event"] == "auth-failed")
    assert failed["method"] == "publickey" and failed["key"] == fingerprint
    assert failed["user"] == "alice"
    closed = own_bastion.wait_audit(
        lambda r: r["event"] == "connection" and r["conn"] == failed["conn"]
    )
    assert closed["outcome"] == "auth-failed" and closed["auth_failures"] >= 1
    # a password attempt: the method, never the password
    secret = "not-carols-password-4711"
    askpass = tmp_path / "askpass"
    askpass.write_text(f"#!/bin/sh\necho {secret}\n")
    askpass.chmod(0o700)
    argv = ssh_command(
        port=own_bastion.port,
        user="carol",
        extra=("-o", "BatchMode=no", "-o", "PreferredAuthentications=password"),
        command=("true",),
    )
    env = {"SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}
    subprocess.run(argv, capture_output=True, timeout=60, check=False, env=env)
    own_bastion.wait_audit(lambda r: r["event"] == "auth-failed" and r["method"] == "password")
    assert secret not in own_bastion.audit_file.read_text()
    assert secret not in own_bastion.log.read_text()


def test_an_audit_file_that_fails_never_stops_a_login(
    tmp_path: Path, new_bastion: Callable[..., BastionProcess], people: dict[str, Person]
) -> None:
    proc = new_bastion(start=False)
    # a full disk: every write to /dev/full fails with ENOSPC
    proc.workdir.mkdir(parents=True)
    proc.audit_file.symlink_to("/dev/full")
    proc.start()
    try:
        for _ in range(2):
            result = ssh(proc, people["alice"], "hostname")
            assert result.stdout == b"host-102\n", result.stderr
        devstack.wait_until(
            "audit errors counted",
            lambda: (proc.metric("bastion_audit_write_errors_total") or 0) >= 2,
            10,
        )
        assert "cannot write the audit log" in proc.log.read_text()
        assert proc.log.read_text().count("cannot write the audit log") == 1  # not per record
    finally:
        proc.stop()


def test_records_also_go_to_syslog(
    tmp_path: Path, new_bastion: Callable[..., BastionProcess], people: dict[str, Person]
) -> None:
    """[audit] syslog: one RFC 3164 datagram per record on the syslog socket
    (a stand-in for /dev/log here); without the socket, logins go on."""
    path = tmp_path / "log.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(10)
    proc = new_bastion(
        tweak=lambda sections: sections.update(audit={"syslog": True, "syslog_socket": str(path)})
    )
    try:
        assert ssh(proc, people["alice"], "true").returncode == 0
        events = []
        while "connection" not in events:
            datagram = listener.recv(65536).decode()
            prefix, _, record = datagram.partition(" ")
            assert prefix == "<86>bastion-audit:", datagram
            events.append(json.loads(record)["event"])
        assert events[:2] == ["connect", "login"], events
        # the socket goes away: records are counted as lost, logins go on
        listener.close()
        path.unlink()
        assert ssh(proc, people["alice"], "true").returncode == 0
        devstack.wait_until(
            "syslog errors counted",
            lambda: (proc.metric("bastion_audit_write_errors_total") or 0) >= 1,
            10,
        )
    finally:
        proc.stop()
