"""Per-login upstream credentials against the real things: OpenBao (session
server bootstrapped by ``deploy/bootstrap-vault.sh``, plus a private one for the
sealed/stopped cases) and a real sshd (host-102) trusting both user CAs.

Nothing is mocked. Every secret a test creates is registered in ``SECRETS``;
an autouse fixture fails the test if any log record mentions one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import stat
import subprocess
import time
from collections.abc import Coroutine, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
import pytest

import devstack
from bastion.config import Settings, UpstreamSettings, VaultSettings
from bastion.credentials import (
    BACKDATE_SECONDS,
    CERT_EXTENSIONS,
    LocalCASigner,
    Secret,
    UpstreamCredential,
    VaultCertificateSigner,
    VaultClient,
    build_signer,
)
from bastion.credentials.sshcert import parse_ed25519_cert
from bastion.errors import ConfigError, SecretUnavailable, SigningFailed
from devstack import BaoServer, SshdHost

T = TypeVar("T")

MOUNT = "ssh-client-signer"
ROLE = "bastion"
TTL = 120

# every secret id / token value the tests handle; no log record may contain one
SECRETS: set[str] = set()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(autouse=True)
def no_secrets_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    # caplog.records at teardown holds only the teardown phase: ask for all
    formatter = logging.Formatter("%(name)s %(message)s")
    for when in ("setup", "call"):
        for record in caplog.get_records(when):
            text = formatter.format(record)  # with the traceback, if any
            leaked = [s for s in SECRETS if s and s in text]
            assert not leaked, f"log record from {record.name} contains a secret: {text!r}"


@pytest.fixture(scope="module")
def host(hosts: dict[str, SshdHost]) -> SshdHost:
    return hosts["host-102"]


@pytest.fixture(scope="module")
def approle(vault: Any) -> VaultSettings:
    SECRETS.add(vault.secret_id_file.read_text().strip())
    SECRETS.add(vault.role_id_file.read_text().strip())
    return VaultSettings(
        address=vault.addr,
        role_id_file=vault.role_id_file,
        secret_id_file=vault.secret_id_file,
        ssh_mount=MOUNT,
        ssh_role=ROLE,
    )


def write_secret(path: Path, value: str, mode: int = 0o600) -> Path:
    path.write_text(value + "\n")
    path.chmod(mode)
    SECRETS.add(value)
    return path


def new_secret_id(bao: BaoServer, role: str = ROLE) -> tuple[str, str]:
    """A fresh AppRole secret id (value, accessor), made with the root token."""
    status, body = bao.api("POST", f"/v1/auth/approle/role/{role}/secret-id", body={})
    assert status == 200, body
    SECRETS.add(body["data"]["secret_id"])
    return body["data"]["secret_id"], body["data"]["secret_id_accessor"]


def revoke_accessor(bao: BaoServer, accessor: str) -> None:
    status, body = bao.api("POST", "/v1/auth/token/revoke-accessor", body={"accessor": accessor})
    assert status == 204, body


async def login_and_hostname(host: SshdHost, user: str, cred: UpstreamCredential) -> str:
    """Log in to ``host`` as ``user`` with only ``cred``; the output of ``hostname``."""
    async with asyncssh.connect(
        host.address,
        host.port,
        username=user,
        client_keys=[(cred.private_key, cred.certificate)],
        known_hosts=asyncssh.import_known_hosts(host.known_hosts_line() + "\n"),
        agent_path=None,
        config=(),
        preferred_auth="publickey",
        connect_timeout=10,
    ) as conn:
        result = await conn.run("hostname", check=True, timeout=10)
        return str(result.stdout).strip()


def cert_text(cred: UpstreamCredential, tmp_path: Path) -> str:
    """``ssh-keygen -L`` of the certificate: an independent reading of it."""
    path = tmp_path / "cred-cert.pub"
    path.write_bytes(cred.certificate.export_certificate())
    return subprocess.run(
        [devstack.ssh_keygen_bin(), "-L", "-f", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def assert_cert(
    cred: UpstreamCredential,
    principal: str,
    key_id: str,
    ttl: int,
    issued_at: float,
    tmp_path: Path,
) -> str:
    """Check the certificate as asyncssh and as ``ssh-keygen -L`` read it; returns the latter."""
    fields = parse_ed25519_cert(cred.certificate.public_data)
    assert fields.principals == (principal,)
    assert fields.key_id == key_id == cred.key_id
    assert cred.principal == principal
    assert fields.valid_before == cred.valid_before
    assert cred.private_key.algorithm == b"ssh-ed25519"
    assert cred.certificate.key.public_data == cred.private_key.public_data
    # backdated 30 s for clock skew, valid for ttl from issue, nothing longer
    assert fields.valid_before - fields.valid_after <= ttl + BACKDATE_SECONDS + 1
    assert issued_at + ttl - 5 <= cred.valid_before <= time.time() + ttl + 1

    text = cert_text(cred, tmp_path)
    assert "ssh-ed25519-cert-v01@openssh.com user certificate" in text
    assert f'Key ID: "{key_id}"' in text
    listed = text.split("Principals:")[1].split("Critical Options:")[0].split()
    assert listed == [principal]
    valid = re.search(r"Valid: from (\S+) to (\S+)", text)
    assert valid is not None, text
    # ssh-keygen prints local time, which is what naive datetimes assume
    stamps = [datetime.fromisoformat(v).timestamp() for v in valid.groups()]
    assert stamps == [fields.valid_after, fields.valid_before]
    for ext in CERT_EXTENSIONS:
        assert ext in text
    assert "permit-X11-forwarding" not in text
    return text


# --------------------------------------------------------------------------
# deploy/bootstrap-vault.sh


def test_bootstrap_vault_rerun_is_idempotent(bao: BaoServer, vault: Any) -> None:
    ca_before = vault.user_ca_pub.read_text()
    secret_id = vault.secret_id_file.read_text()
    role_id = vault.role_id_file.read_text()
    SECRETS.update({secret_id.strip(), role_id.strip()})

    result = devstack.bootstrap_vault(bao, vault.out)

    assert result.returncode == 0, result.stdout + result.stderr
    assert vault.user_ca_pub.read_text() == ca_before
    assert vault.secret_id_file.read_text() == secret_id  # still valid: kept
    assert vault.role_id_file.read_text() == role_id
    assert "SSH user CA present (kept)" in result.stdout
    assert secret_id.strip() not in result.stdout + result.stderr
    assert stat.S_IMODE(vault.out.stat().st_mode) == 0o700
    for name in ("role_id", "secret_id"):
        assert stat.S_IMODE((vault.out / name).stat().st_mode) == 0o600
    status, body = bao.api("GET", f"/v1/{MOUNT}/public_key")
    assert status == 200
    assert ca_before.split()[:2] == str(body).split()[:2]
    assert ca_before.startswith("ssh-ed25519 ")


def test_bootstrap_vault_replaces_a_secret_id_vault_no_longer_accepts(
    bao: BaoServer, vault: Any, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    write_secret(out / "secret_id", "00000000-dead-beef-0000-000000000000")

    result = devstack.bootstrap_vault(bao, out)

    assert result.returncode == 0, result.stdout + result.stderr
    fresh = (out / "secret_id").read_text().strip()
    SECRETS.add(fresh)
    assert fresh and fresh != "00000000-dead-beef-0000-000000000000"
    assert fresh not in result.stdout + result.stderr
    assert (out / "user_ca.pub").read_text() == vault.user_ca_pub.read_text()


# --------------------------------------------------------------------------
# LocalCASigner


def test_local_ca_certificate_logs_in_as_alice_only(
    local_ca: Path, host: SshdHost, tmp_path: Path
) -> None:
    signer = LocalCASigner(local_ca, ttl=TTL)
    issued_at = time.time()
    cred = run(signer.issue("alice", "bastion:alice:test-1"))

    assert_cert(cred, "alice", "bastion:alice:test-1", TTL, issued_at, tmp_path)

    assert run(login_and_hostname(host, "alice", cred)) == "host-102"
    with pytest.raises(asyncssh.PermissionDenied):
        run(login_and_hostname(host, "bob", cred))
    run(signer.aclose())


def test_local_ca_rsa_key_signs_with_sha2(tmp_path: Path) -> None:
    rsa_ca = devstack.keygen(tmp_path / "rsa-ca", kind="rsa")
    cred = run(LocalCASigner(rsa_ca, ttl=60).issue("alice", "k"))
    # OpenSSH >= 8.8 refuses certificates signed with SHA-1 "ssh-rsa"
    assert "(using rsa-sha2-256)" in cert_text(cred, tmp_path)


@pytest.mark.parametrize("principal", ["", "alice,root", "alice root", "al\nice"])
def test_principal_that_could_widen_the_certificate_is_refused(
    local_ca: Path, principal: str
) -> None:
    with pytest.raises(SigningFailed):
        run(LocalCASigner(local_ca, ttl=60).issue(principal, "k"))


def test_ca_key_file_missing_or_garbage_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=str(missing)):
        LocalCASigner(missing, ttl=60)
    garbage = write_secret(tmp_path / "garbage", "this is not a key")
    with pytest.raises(ConfigError, match=str(garbage)):
        LocalCASigner(garbage, ttl=60)


# --------------------------------------------------------------------------
# Vault: signing


def test_vault_certificate_logs_in_as_alice_only(
    approle: VaultSettings, host: SshdHost, vault: Any, tmp_path: Path
) -> None:
    async def scenario() -> UpstreamCredential:
        client = VaultClient(approle)
        try:
            await client.start()
            signer = VaultCertificateSigner(client, MOUNT, ROLE, TTL)
            issued_at = time.time()
            cred = await signer.issue("alice", "bastion:alice:vault-1")
            assert_cert(cred, "alice", "bastion:alice:vault-1", TTL, issued_at, tmp_path)
            assert await login_and_hostname(host, "alice", cred) == "host-102"
            with pytest.raises(asyncssh.PermissionDenied):
                await login_and_hostname(host, "bob", cred)
            await signer.aclose()
            return cred
        finally:
            await client.aclose()

    cred = run(scenario())
    text = cert_text(cred, tmp_path)
    ca_fingerprint = subprocess.run(
        [devstack.ssh_keygen_bin(), "-l", "-f", str(vault.user_ca_pub)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[1]
    assert ca_fingerprint in text  # signed by the CA the hosts trust


def test_ttl_above_role_max_is_signing_failed(approle: VaultSettings) -> None:
    async def scenario() -> None:
        client = VaultClient(approle)
        try:
            await client.start()
            with pytest.raises(SigningFailed, match="ttl"):
                await VaultCertificateSigner(client, MOUNT, ROLE, 3600).issue("alice", "k")
        finally:
            await client.aclose()

    run(scenario())


# --------------------------------------------------------------------------
# Vault: KV v2


def test_read_kv_round_trip_and_policy(
    approle: VaultSettings, bao: BaoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    status, body = bao.api(
        "POST", "/v1/secret/data/bastion/consul", body={"data": {"token": "consul-token-value"}}
    )
    assert status == 200, body
    status, body = bao.api("POST", "/v1/secret/data/other/thing", body={"data": {"x": "y"}})
    assert status == 200, body
    # an operator's shell must not lend the bastion its identity or its Vault
    monkeypatch.setenv("VAULT_TOKEN", bao.root_token)
    monkeypatch.setenv("VAULT_ADDR", "http://127.0.0.1:1")

    async def scenario() -> None:
        client = VaultClient(approle)
        try:
            await client.start()
            assert await client.read_kv("secret/bastion/consul") == {"token": "consul-token-value"}
            with pytest.raises(SecretUnavailable, match="denied read of secret/other/thing"):
                await client.read_kv("secret/other/thing")
            with pytest.raises(SecretUnavailable, match="not found"):
                await client.read_kv("secret/bastion/missing")
            assert client.logins == 1  # a policy denial is not mistaken for a dead token
        finally:
            await client.aclose()

    run(scenario())


# --------------------------------------------------------------------------
# Vault: failure modes


def test_sealed_then_unreachable_vault(tmp_path: Path, local_ca: Path) -> None:
    """A private OpenBao (the session one must stay usable): bootstrap it from
    scratch, seal it, then stop it."""
    server = BaoServer(tmp_path / "bao", root_token="sealed-test-root")
    try:
        server.start()
        result = devstack.bootstrap_vault(server, tmp_path / "out")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "generated the SSH user CA (ed25519)" in result.stdout
        out = tmp_path / "out"
        SECRETS.add((out / "secret_id").read_text().strip())
        settings = VaultSettings(
            address=server.addr,
            role_id_file=out / "role_id",
            secret_id_file=out / "secret_id",
            timeout=2.0,
        )

        async def scenario() -> None:
            client = VaultClient(settings)
            try:
                await client.start()
                signer = VaultCertificateSigner(client, MOUNT, ROLE, 60)
                await signer.issue("alice", "before-seal")
                status, body = server.api("PUT", "/v1/sys/seal")
                assert status == 204, body
                with pytest.raises(SecretUnavailable, match="sealed") as sealed:
                    await signer.issue("alice", "while-sealed")
                assert sealed.value.reason == "secret-unavailable"
                assert server.process is not None
                server.process.stop()
                with pytest.raises(SecretUnavailable, match="unreachable") as down:
                    await signer.issue("alice", "while-down")
                assert server.addr in down.value.detail  # for the operator's log
                assert server.addr not in down.value.user_message
            finally:
                await client.aclose()

        run(scenario())
    finally:
        server.stop()


def test_revoked_token_is_replaced_by_a_new_approle_login(
    approle: VaultSettings, bao: BaoServer
) -> None:
    async def scenario() -> None:
        client = VaultClient(approle)
        try:
            await client.start()
            signer = VaultCertificateSigner(client, MOUNT, ROLE, 60)
            first = client.token_accessor
            revoke_accessor(bao, first)
            cred = await signer.issue("alice", "after-revoke")
            assert cred.principal == "alice"
            assert client.logins == 2
            assert client.token_accessor != first
        finally:
            await client.aclose()

    run(scenario())


def test_destroyed_secret_id_and_revoked_token_is_secret_unavailable(
    bao: BaoServer, vault: Any, tmp_path: Path
) -> None:
    secret_id, secret_id_accessor = new_secret_id(bao)
    settings = VaultSettings(
        address=vault.addr,
        role_id_file=vault.role_id_file,
        secret_id_file=write_secret(tmp_path / "secret_id", secret_id),
    )

    async def scenario() -> None:
        client = VaultClient(settings)
        try:
            await client.start()
            status, body = bao.api(
                "POST",
                f"/v1/auth/approle/role/{ROLE}/secret-id-accessor/destroy",
                body={"secret_id_accessor": secret_id_accessor},
            )
            assert status == 204, body
            revoke_accessor(bao, client.token_accessor)
            with pytest.raises(SecretUnavailable, match="AppRole login failed") as err:
                await VaultCertificateSigner(client, MOUNT, ROLE, 60).issue("alice", "k")
            assert secret_id not in str(err.value) + err.value.detail
        finally:
            await client.aclose()

    run(scenario())


def test_renewal_then_relogin_near_max_ttl(
    bao: BaoServer, vault: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A role whose tokens live 2 s (max 4 s): the background task renews,
    then logs in again before the max ttl runs out; issuing keeps working."""
    status, body = bao.api(
        "POST",
        "/v1/auth/approle/role/bastion-short",
        body={"token_policies": "bastion", "token_ttl": "2s", "token_max_ttl": "4s"},
    )
    assert status == 204, body
    status, body = bao.api("GET", "/v1/auth/approle/role/bastion-short/role-id")
    assert status == 200, body
    secret_id, _ = new_secret_id(bao, "bastion-short")
    settings = VaultSettings(
        address=vault.addr,
        role_id_file=write_secret(tmp_path / "role_id", body["data"]["role_id"]),
        secret_id_file=write_secret(tmp_path / "secret_id", secret_id),
    )

    async def scenario() -> None:
        client = VaultClient(settings)
        try:
            await client.start()
            deadline = time.monotonic() + 15
            while not (client.renewals >= 1 and client.logins >= 2):
                assert time.monotonic() < deadline, (client.renewals, client.logins)
                await asyncio.sleep(0.1)
            await VaultCertificateSigner(client, MOUNT, ROLE, 60).issue("alice", "k")
        finally:
            await client.aclose()

    run(scenario())
    # the planned path: no failed renewal, no expired token on the way
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "bastion.credentials" and r.levelno >= logging.WARNING
    ]
    assert warnings == []


def test_token_file_is_reread_when_vault_rejects_the_token(
    bao: BaoServer, vault: Any, tmp_path: Path
) -> None:
    """token_file (e.g. a Vault Agent sink): a rejected token makes the client
    read the file again; closing the client leaves the file's token alone."""

    def create_token() -> tuple[str, str]:
        status, body = bao.api("POST", "/v1/auth/token/create", body={"policies": ["bastion"]})
        assert status == 200, body
        SECRETS.add(body["auth"]["client_token"])
        return body["auth"]["client_token"], body["auth"]["accessor"]

    first, first_accessor = create_token()
    second, _ = create_token()
    token_file = write_secret(tmp_path / "token", first)
    settings = VaultSettings(address=vault.addr, token_file=token_file)

    async def scenario() -> None:
        client = VaultClient(settings)
        try:
            await client.start()
            signer = VaultCertificateSigner(client, MOUNT, ROLE, 60)
            await signer.issue("alice", "token-file-1")
            revoke_accessor(bao, first_accessor)
            write_secret(token_file, second)
            await signer.issue("alice", "token-file-2")
            assert client.logins == 2
        finally:
            await client.aclose()

    run(scenario())
    status, body = bao.api("GET", "/v1/auth/token/lookup-self", token=second)
    assert status == 200, body


# --------------------------------------------------------------------------
# secrets stay secret; configuration errors


def test_nothing_secret_in_reprs(approle: VaultSettings, vault: Any) -> None:
    secret_id = vault.secret_id_file.read_text().strip()
    assert repr(Secret(secret_id)) == "Secret('***')"
    assert str(Secret(secret_id)) == "Secret('***')"
    assert f"{Secret(secret_id)}" == "Secret('***')"
    assert Secret(secret_id).reveal() == secret_id

    async def scenario() -> list[str]:
        client = VaultClient(approle)
        try:
            await client.start()
            signer = VaultCertificateSigner(client, MOUNT, ROLE, 60)
            cred = await signer.issue("alice", "k")
            return [
                repr(client),
                repr(signer),
                repr(cred),
                repr(approle),
                repr(Settings(vault=approle)),
                repr(client.__dict__),
            ]
        finally:
            await client.aclose()

    for text in run(scenario()):
        assert secret_id not in text


def test_secret_file_readable_by_others_is_a_config_error(vault: Any, tmp_path: Path) -> None:
    role_id = write_secret(tmp_path / "role_id", vault.role_id_file.read_text().strip(), mode=0o644)
    settings = VaultSettings(
        address=vault.addr, role_id_file=role_id, secret_id_file=vault.secret_id_file
    )
    with pytest.raises(ConfigError, match="chmod") as err:
        VaultClient(settings)
    assert str(role_id) in str(err.value)


def test_build_signer_picks_vault_or_local_ca(approle: VaultSettings, local_ca: Path) -> None:
    local = build_signer(Settings(upstream=UpstreamSettings(ca_key=local_ca, cert_ttl=90)), None)
    assert isinstance(local, LocalCASigner)
    assert local.ttl == 90

    async def scenario() -> None:
        client = VaultClient(approle)
        try:
            signer = build_signer(
                Settings(vault=approle, upstream=UpstreamSettings(cert_ttl=90)), client
            )
            assert isinstance(signer, VaultCertificateSigner)
            assert (signer.mount, signer.role, signer.ttl) == (MOUNT, ROLE, 90)
            # used before start(): logs in on demand
            assert (await signer.issue("alice", "k")).principal == "alice"
        finally:
            await client.aclose()

    run(scenario())
