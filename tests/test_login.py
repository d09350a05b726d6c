"""``ssh alice@bastion`` lands on the host the directory names (real everything)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence

import pytest
from conftest import Person, route

from devstack import BastionProcess, ConsulAgent, SshdHost, ssh_command


def ssh(
    bastion: BastionProcess,
    person: Person,
    *command: str,
    user: str | None = None,
    extra: Sequence[str] = (),
    input: bytes | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[bytes]:
    argv = ssh_command(
        port=bastion.port,
        user=user or person.name,
        identity=person.key,
        extra=extra,
        command=command,
    )
    return subprocess.run(
        argv,
        check=False,
        input=input,
        capture_output=True,
        timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


def test_alice_lands_on_host_102(bastion: BastionProcess, people: dict[str, Person]) -> None:
    result = ssh(bastion, people["alice"], "hostname")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"host-102\n"


def test_whoami_is_the_routed_login(bastion: BastionProcess, people: dict[str, Person]) -> None:
    result = ssh(bastion, people["bob"], "id -un; hostname")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"bob\nhost-101\n"


def test_route_change_is_in_force_for_next_login(
    bastion: BastionProcess,
    consul: ConsulAgent,
    hosts: dict[str, SshdHost],
    people: dict[str, Person],
) -> None:
    alice = people["alice"]
    try:
        consul.kv_put("users/alice", route(hosts, "host-101"))
        changed = time.monotonic()
        # the next login, within one second of the put, goes to the new host
        deadline = changed + 1.0
        while True:
            out = ssh(bastion, alice, "hostname").stdout
            if out == b"host-101\n" or time.monotonic() > deadline:
                break
        assert out == b"host-101\n"
        consul.kv_delete("users/alice")
        bastion.wait_synced(consul)
        refused = ssh(bastion, alice, "hostname")
        assert refused.returncode == 255
        assert b"no route for alice" in refused.stderr
        assert refused.stdout == b""
    finally:
        consul.kv_put("users/alice", route(hosts, "host-102"))


@pytest.mark.parametrize("code", [0, 1, 42])
def test_exit_status_comes_back(
    bastion: BastionProcess, people: dict[str, Person], code: int
) -> None:
    result = ssh(bastion, people["alice"], f"echo out; echo err >&2; exit {code}")
    assert result.returncode == code
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"


def test_signal_killed_command(bastion: BastionProcess, people: dict[str, Person]) -> None:
    result = ssh(bastion, people["alice"], "kill -TERM $$")
    # OpenSSH reports a remote signal death as exit status 255
    assert result.returncode == 255
    records = [r for r in bastion.audit_records() if r.get("exit_signal") == "TERM"]
    assert records, bastion.audit_records()[-3:]


def test_unknown_user_and_wrong_key_look_the_same(
    bastion: BastionProcess, people: dict[str, Person]
) -> None:
    unknown = ssh(bastion, people["alice"], "true", user="mallory")
    wrong_key = ssh(bastion, people["bob"], "true", user="alice")
    assert unknown.returncode == wrong_key.returncode == 255
    assert unknown.stderr.replace(b"mallory", b"X") == wrong_key.stderr.replace(b"alice", b"X")
    assert b"Permission denied" in unknown.stderr
