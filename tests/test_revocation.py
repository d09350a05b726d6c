"""Access that ends when the directory says so (bastion/revocation.py).

Real OpenSSH sessions held open through a real bastion; the directory is
changed in the real Consul; each held session must end within seconds with
the notice on its terminal and the disconnect the client prints, and one
``revoke`` audit record per person and cause. With ``on_revoke = "keep"``
nothing closes and the audit says so. A route moved elsewhere is not a
revocation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Person, route

import devstack
from devstack import BastionProcess, ConsulAgent, SshdHost, ssh_command, stop_ssh_client

CLOSE_WITHIN = 5.0  # seconds from the Consul write to the client's exit


def hold(proc: BastionProcess, person: Person, user: str | None = None) -> subprocess.Popen[bytes]:
    """A session through ``proc`` that has printed "up" and then waits a minute."""
    argv = ssh_command(
        port=proc.port,
        user=user or person.name,
        identity=person.key,
        command=("echo up; sleep 60",),
    )
    held = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert held.stdout is not None and held.stdout.readline() == b"up\n"
    return held


def ended_within(
    held: subprocess.Popen[bytes], seconds: float, since: float | None = None
) -> tuple[float, bytes]:
    """Wait for the client to exit; (seconds since ``since``, its stderr). Exit 255."""
    started = time.monotonic() if since is None else since
    try:
        _, err = held.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        stop_ssh_client(held)
        raise AssertionError(f"the session was still open after {seconds} s") from None
    assert held.returncode == 255, (held.returncode, err)
    return time.monotonic() - started, err


def revokes(proc: BastionProcess) -> list[dict[str, Any]]:
    return [r for r in proc.audit_records() if r["event"] == "revoke"]


def conn_of(proc: BastionProcess, user: str) -> str:
    """The connection id of ``user``'s newest login."""
    logins = [r for r in proc.audit_records() if r["event"] == "login" and r["user"] == user]
    assert logins, f"no login of {user}"
    return str(logins[-1]["conn"])


@pytest.fixture
def carol(
    consul: ConsulAgent, hosts: dict[str, SshdHost], people: dict[str, Person]
) -> Iterator[Person]:
    """carol, whose entry and keys the test changes; restored afterwards."""
    yield people["carol"]
    consul.kv_put("users/carol", route(hosts, "host-102"))
    consul.kv_put("ssh-keys/carol", people["carol"].pubkey + "\n")


def test_route_removed_closes_live_sessions_with_a_notice(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    carol: Person,
    people: dict[str, Person],
) -> None:
    proc = new_bastion()
    held = [hold(proc, carol) for _ in range(2)]
    bob = hold(proc, people["bob"])
    try:
        written = time.monotonic()
        consul.kv_delete("users/carol")
        for session in held:
            took, err = ended_within(session, CLOSE_WITHIN, written)
            print(f"closed {took:.2f} s after the write: {err!r}")
            text = err.decode(errors="replace")
            # the notice on the terminal, then the disconnect the client prints
            assert "bastion: your route was removed from the directory" in text, text
            assert "this session is being closed" in text, text
            assert took < CLOSE_WITHIN
        assert bob.poll() is None  # another person's session goes on
        devstack.wait_until("revoke record", lambda: revokes(proc), 5)
        records = revokes(proc)
        assert len(records) == 1, records  # one per person and cause, not per connection
        rec = records[0]
        assert (rec["user"], rec["cause"], rec["action"]) == ("carol", "route-removed", "closed")
        assert len(rec["conns"]) == 2
        closed = [
            r
            for r in proc.audit_records()
            if r["event"] == "connection" and r.get("user") == "carol"
        ]
        assert {r["reason"] for r in closed} == {"revoked"}
        series = 'bastion_revoked_connections_total{action="closed",cause="route-removed"} 2.0'
        assert series in proc.metrics_text()
        # and the next login is refused as usual
        again = subprocess.run(
            ssh_command(port=proc.port, user="carol", identity=carol.key, command=("true",)),
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert again.returncode == 255
    finally:
        for session in [*held, bob]:
            stop_ssh_client(session)


def test_key_removed_closes_the_sessions_it_opened(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    carol: Person,
    people: dict[str, Person],
) -> None:
    proc = new_bastion()
    held = hold(proc, carol)
    try:
        # another key added: carol's key is still there, nothing closes
        consul.kv_put("ssh-keys/carol", f"{carol.pubkey}\n{people['bob'].pubkey}\n")
        proc.wait_synced(consul)
        # bob's key is still authorized for carol: her own goes
        consul.kv_put("ssh-keys/carol", people["bob"].pubkey + "\n")
        _, err = ended_within(held, CLOSE_WITHIN)
        assert b"the key you logged in with was removed from the directory" in err, err
        (rec,) = revokes(proc)
        assert (rec["user"], rec["cause"]) == ("carol", "key-removed")
        assert rec["conns"] == [conn_of(proc, "carol")]
    finally:
        stop_ssh_client(held)


def test_disabled_entry_closes_live_sessions(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    hosts: dict[str, SshdHost],
    carol: Person,
) -> None:
    proc = new_bastion()
    held = hold(proc, carol)
    try:
        consul.kv_put(
            "users/carol", json.dumps({"route": route(hosts, "host-102"), "disabled": True})
        )
        _, err = ended_within(held, CLOSE_WITHIN)
        assert b"your access was disabled in the directory" in err, err
        (rec,) = revokes(proc)
        assert (rec["cause"], rec["action"]) == ("disabled", "closed")
    finally:
        stop_ssh_client(held)


def test_keep_leaves_sessions_open_and_says_so(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    hosts: dict[str, SshdHost],
    carol: Person,
) -> None:
    proc = new_bastion(tweak=lambda s: s.update(access={"on_revoke": "keep"}))
    held = hold(proc, carol)
    try:
        consul.kv_delete("users/carol")
        devstack.wait_until("revoke record", lambda: revokes(proc), 5)
        rec = revokes(proc)[0]
        assert (rec["user"], rec["cause"], rec["action"]) == ("carol", "route-removed", "kept")
        assert rec["conns"] == [conn_of(proc, "carol")]
        assert "keeping 1 live connection" in proc.log.read_text()
        # another change to the same person: said once, not again
        consul.kv_put("users/carol-other", route(hosts, "host-101"))
        consul.kv_put("ssh-keys/carol", carol.pubkey + "\n# comment\n")
        proc.wait_synced(consul)
        assert held.poll() is None
        assert len(revokes(proc)) == 1
    finally:
        consul.kv_delete("users/carol-other")
        stop_ssh_client(held)


def test_route_moved_elsewhere_is_not_a_revocation(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    hosts: dict[str, SshdHost],
    carol: Person,
) -> None:
    proc = new_bastion()
    held = hold(proc, carol)
    try:
        consul.kv_put("users/carol", route(hosts, "host-101"))
        proc.wait_synced(consul)
        moved = subprocess.run(
            ssh_command(port=proc.port, user="carol", identity=carol.key, command=("hostname",)),
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert moved.stdout == b"host-101\n", moved.stderr  # the next login goes there
        assert held.poll() is None  # the live one stays where it is
        assert revokes(proc) == []
    finally:
        stop_ssh_client(held)


def test_jump_host_removed_from_the_entry_keeps_open_tunnels_refuses_new_ones(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    hosts: dict[str, SshdHost],
    carol: Person,
) -> None:
    """Like a moved route (docs/access.md): an `ssh -W` tunnel already open to
    a jump host stays open when the host leaves the entry's "jump"; a new one
    is refused at once."""
    h101 = hosts["host-101"]
    entry = {"route": route(hosts, "host-102"), "jump": [route(hosts, "host-101")]}
    consul.kv_put("users/carol", json.dumps(entry))
    proc = new_bastion()
    tunnel = ssh_command(
        port=proc.port,
        user="carol",
        identity=carol.key,
        extra=("-W", f"{h101.address}:{h101.port}"),
    )
    held = subprocess.Popen(
        tunnel, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert held.stdout is not None
        assert held.stdout.readline().startswith(b"SSH-2.0-")  # host-101's sshd, through it
        consul.kv_put("users/carol", route(hosts, "host-102"))
        proc.wait_synced(consul)
        refused = subprocess.run(
            tunnel, capture_output=True, timeout=30, check=False, stdin=subprocess.DEVNULL
        )
        assert refused.returncode == 255 and b"forwarding failed" in refused.stderr, refused.stderr
        assert held.poll() is None  # the open tunnel stays
        assert revokes(proc) == []
    finally:
        stop_ssh_client(held)


def test_certificate_login_lasts_while_its_user_ca_is_trusted(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    carol: Person,
    people: dict[str, Person],
    local_ca: Path,
    tmp_path: Path,
) -> None:
    """A certificate login's "key" is the user CA: removing the person's
    directory keys leaves it alone; a reload that stops trusting the CA
    (SIGHUP) ends it."""
    key = tmp_path / "id_carol"
    key.write_bytes(carol.key.read_bytes())
    key.chmod(0o600)
    key.with_suffix(".pub").write_text(carol.pubkey + "\n")
    devstack.sign_user_key(local_ca, key.with_suffix(".pub"), ["carol"], "carol-cert")
    # carol's plain key is not authorized: only the certificate logs her in
    consul.kv_put("ssh-keys/carol", people["bob"].pubkey + "\n")
    proc = new_bastion(user_ca_keys=str(local_ca.with_suffix(".pub")))
    proc.wait_synced(consul)
    held = hold(proc, Person("carol", key))
    try:
        consul.kv_delete("ssh-keys/carol")
        proc.wait_synced(consul)
        assert held.poll() is None and revokes(proc) == []
        settings = tomllib.loads(proc.config.read_text())
        del settings["server"]["user_ca_keys"]
        proc.config.write_text(devstack.render_settings(settings))
        assert proc.process is not None
        os.kill(proc.process.pid, signal.SIGHUP)
        _, err = ended_within(held, 10)
        assert b"the key you logged in with was removed" in err, err
        (rec,) = revokes(proc)
        assert (rec["user"], rec["cause"]) == ("carol", "key-removed")
    finally:
        stop_ssh_client(held)


def test_a_directory_gone_empty_closes_nothing(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    hosts: dict[str, SshdHost],
    carol: Person,
) -> None:
    """A KV listing the token may no longer read is a 404, like an empty one:
    the routing table going empty at once must not end every session."""
    consul.kv_put("users/solo/carol", route(hosts, "host-102"))
    proc = new_bastion(tweak=lambda s: s["consul"].update(routes_prefix="users/solo/"))
    held = hold(proc, carol)
    try:
        consul.kv_delete("users/solo/carol")
        proc.wait_synced(consul)
        devstack.wait_until(
            "the error line", lambda: "users/solo/ is now empty" in proc.log.read_text(), 5
        )
        assert held.poll() is None and revokes(proc) == []
    finally:
        consul.kv_delete("users/solo/carol")
        stop_ssh_client(held)
