"""SIGHUP: the bastion reads its settings again, applies what can change live,
says what needs a restart, and keeps serving on the old settings when the
new file is invalid."""

from __future__ import annotations

import os
import signal
import subprocess
import tomllib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import Person, VaultSetup

import devstack
from devstack import BastionProcess, ConsulAgent, render_settings, ssh_command


def login(proc: BastionProcess, user: str, key: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ssh_command(port=proc.port, user=user, identity=key, command=("hostname",)),
        capture_output=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def reload_with(proc: BastionProcess, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Edit the bastion's settings file, send SIGHUP, return its reload record."""
    settings = tomllib.loads(proc.config.read_text())
    change(settings)
    proc.config.write_text(render_settings(settings))
    before = sum(1 for r in proc.audit_records() if r["event"] == "reload")
    assert proc.process is not None
    os.kill(proc.process.pid, signal.SIGHUP)
    devstack.wait_until(
        "reload record",
        lambda: sum(1 for r in proc.audit_records() if r["event"] == "reload") > before,
        15,
    )
    return [r for r in proc.audit_records() if r["event"] == "reload"][-1]


def test_reload_applies_live_settings_and_names_the_rest(
    tmp_path: Path,
    new_bastion: Callable[..., BastionProcess],
    people: dict[str, Person],
) -> None:
    proc = new_bastion()
    try:
        # a person's own certificate from a CA the bastion does not trust yet
        ca = devstack.keygen(tmp_path / "new_user_ca", comment="a new user CA")
        key = devstack.keygen(tmp_path / "id_cert")
        devstack.sign_user_key(ca, key.with_suffix(".pub"), ["alice"], "alice-new-ca")
        assert login(proc, "alice", key).returncode == 255

        def trust_the_ca(settings: dict[str, Any]) -> None:
            settings["server"]["user_ca_keys"] = str(ca.with_suffix(".pub"))
            settings["server"]["max_sessions"] = 5
            settings["server"]["listen"] = "127.0.0.1:1"  # needs a restart
            settings["upstream"]["reuse_idle"] = 0

        record = reload_with(proc, trust_the_ca)
        assert "[server] user_ca_keys" in record["applied"]
        assert "[server] max_sessions" in record["applied"]
        assert "[upstream] reuse_idle" in record["applied"]
        assert record["need_restart"] == ["[server] listen"]
        ok = login(proc, "alice", key)
        assert ok.stdout == b"host-102\n", ok.stderr  # the new CA is trusted now
        assert login(proc, "alice", people["alice"].key).stdout == b"host-102\n"
        log = proc.log.read_text()
        assert "reload: applied" in log and "needs a restart to take effect: [server] listen" in log
    finally:
        proc.stop()


def test_reload_applies_access_settings(
    new_bastion: Callable[..., BastionProcess],
    people: dict[str, Person],
) -> None:
    """``[access]`` applies live (the second factor's mode, on_revoke, ...),
    but ``grants_prefix``, which names a directory watch, needs a restart."""
    proc = new_bastion()
    try:
        assert login(proc, "alice", people["alice"].key).stdout == b"host-102\n"

        def require_codes(settings: dict[str, Any]) -> None:
            settings["access"] = {
                "mfa": "required",
                "on_revoke": "keep",
                "grants_prefix": "elsewhere/",
            }

        record = reload_with(proc, require_codes)
        assert {"[access] mfa", "[access] on_revoke"} <= set(record["applied"]), record
        assert record["need_restart"] == ["[access] grants_prefix"]
        # a key alone no longer logs anyone in: the code is asked (BatchMode cannot answer)
        refused = login(proc, "alice", people["alice"].key)
        assert refused.returncode == 255 and refused.stdout == b"", refused.stderr
    finally:
        proc.stop()


def test_an_invalid_file_changes_nothing(
    new_bastion: Callable[..., BastionProcess],
    people: dict[str, Person],
) -> None:
    proc = new_bastion()
    try:

        def break_it(settings: dict[str, Any]) -> None:
            settings["upstream"]["cert_ttl"] = 5  # below the 30 s minimum

        record = reload_with(proc, break_it)
        assert "cert_ttl" in record["error"]
        assert "still serving with the previous settings" in proc.log.read_text()
        assert login(proc, "alice", people["alice"].key).stdout == b"host-102\n"
    finally:
        proc.stop()


def test_a_rotated_consul_token_is_taken_on_reload(
    tmp_path: Path,
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    people: dict[str, Person],
) -> None:
    """The operator mints a new bastion token, points the settings at it, sends
    SIGHUP and revokes the old one: the directory keeps loading."""

    def mint(name: str) -> tuple[Path, str]:
        secret = str(uuid.uuid4())
        status, made = consul.api(
            "PUT",
            "/v1/acl/token",
            body={"SecretID": secret, "Policies": [{"Name": "bastion"}], "Description": name},
        )
        assert status == 200, made
        path = tmp_path / f"{name}.token"
        path.write_text(secret)
        path.chmod(0o600)
        return path, str(made["AccessorID"])

    old_token, old_accessor = mint("old")
    new_token, new_accessor = mint("new")
    proc = new_bastion(tweak=lambda sections: sections["consul"].update(token_file=str(old_token)))
    try:

        def rotate(settings: dict[str, Any]) -> None:
            settings["consul"]["token_file"] = str(new_token)

        record = reload_with(proc, rotate)
        assert "[consul] token_file" in record["applied"]
        # the old token is revoked: the directory still follows Consul
        status, _ = consul.api("DELETE", f"/v1/acl/token/{old_accessor}")
        assert status == 200
        consul.kv_put("users/reload-probe", "host-102")
        proc.wait_synced(consul)
        assert login(proc, "alice", people["alice"].key).stdout == b"host-102\n"
        assert "token rejected by Consul" not in proc.log.read_text()
    finally:
        proc.stop()
        consul.kv_delete("users/reload-probe")
        consul.api("DELETE", f"/v1/acl/token/{new_accessor}")


def test_a_rotated_approle_secret_id_is_taken_on_reload(
    tmp_path: Path,
    new_bastion: Callable[..., BastionProcess],
    vault: VaultSetup,
    people: dict[str, Person],
) -> None:
    """The operator writes a new secret_id into the same file and sends SIGHUP:
    the bastion logs in with it at once; the old one can then be destroyed."""

    def new_secret_id() -> str:
        status, made = devstack.http_json(
            "POST",
            f"{vault.addr}/v1/auth/approle/role/bastion/secret-id",
            token=vault.root_token,
            body={},
        )
        assert status == 200, made
        return str(made["data"]["secret_id"])

    creds = tmp_path / "vault"
    creds.mkdir()
    # secret ids of this test's own: the session's stays valid for the others
    (creds / "role_id").write_text((vault.out / "role_id").read_text())
    (creds / "secret_id").write_text(new_secret_id())
    for name in ("role_id", "secret_id"):
        (creds / name).chmod(0o600)

    def own_credentials(sections: dict[str, dict[str, object]]) -> None:
        sections["vault"]["role_id_file"] = str(creds / "role_id")
        sections["vault"]["secret_id_file"] = str(creds / "secret_id")
        sections["upstream"]["reuse_idle"] = 0  # every login signs a certificate

    proc = new_bastion(tweak=own_credentials)
    try:
        old_secret = (creds / "secret_id").read_text().strip()
        (creds / "secret_id").write_text(new_secret_id())
        logins = proc.log.read_text().count("vault: logged in with AppRole")
        record = reload_with(proc, lambda settings: None)
        assert "[vault] AppRole credentials" in record["applied"]
        assert proc.log.read_text().count("vault: logged in with AppRole") == logins + 1
        status, _ = devstack.http_json(
            "POST",
            f"{vault.addr}/v1/auth/approle/role/bastion/secret-id/destroy",
            token=vault.root_token,
            body={"secret_id": old_secret},
        )
        assert status in (200, 204)
        assert login(proc, "alice", people["alice"].key).stdout == b"host-102\n"
        assert old_secret not in proc.log.read_text()
    finally:
        proc.stop()


def test_an_unreadable_token_file_on_reload_changes_nothing(
    tmp_path: Path,
    new_bastion: Callable[..., BastionProcess],
    people: dict[str, Person],
) -> None:
    proc = new_bastion()
    try:
        for bad in (tmp_path / "a-directory", tmp_path / "a-fifo"):
            if bad.name == "a-directory":
                bad.mkdir()
            else:
                os.mkfifo(bad)
            bad.chmod(0o600)
            record = reload_with(
                proc, lambda settings, b=bad: settings["consul"].update(token_file=str(b))
            )
            assert "not a regular file" in record["error"], record
        assert "Traceback" not in proc.log.read_text()
        assert login(proc, "alice", people["alice"].key).stdout == b"host-102\n"
    finally:
        proc.stop()
