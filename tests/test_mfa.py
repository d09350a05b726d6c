"""A second factor after the key: TOTP codes from the real OpenBao TOTP engine,
asked through keyboard-interactive (``publickey,keyboard-interactive`` as
sshd's AuthenticationMethods), answered by the real OpenSSH client (through
``SSH_ASKPASS``, no terminal) and by the asyncssh client.

Each test has people of its own (a bastion user name routed to the OS account
``alice``, with its own TOTP key), so that no code is used twice by accident:
the engine refuses a code it has accepted once. With the engine's default
skew, the codes of the previous, current and next 30-second window are all
valid, which gives a test two codes without waiting (the current and the
next: a window that ends meanwhile leaves both valid).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pyotp
import pytest
from conftest import VaultSetup, route

import devstack
from devstack import BaoServer, BastionProcess, ConsulAgent, SshdHost, ssh_command

_serial = itertools.count()


@dataclass(frozen=True)
class TotpPerson:
    """A bastion user (own key, own TOTP key) whose route logs in as ``alice``."""

    name: str
    key: Path
    totp: pyotp.TOTP | None

    def code(self, windows: int = 0) -> str:
        """The code of the window ``windows`` steps from now (0 or +1; for
        two codes, take both at once)."""
        assert self.totp is not None
        return str(self.totp.at(time.time() + 30 * windows))


@pytest.fixture(scope="module")
def person_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return devstack.keygen(tmp_path_factory.mktemp("mfa") / "id_mfa", comment="mfa@laptop")


@pytest.fixture
def make_person(
    consul: ConsulAgent,
    bao: BaoServer,
    vault: VaultSetup,
    hosts: dict[str, SshdHost],
    person_key: Path,
) -> Iterator[Callable[..., TotpPerson]]:
    """``make_person(mfa=True, enrol=True)``: a new person in the directory,
    routed to alice@host-102, with ``"mfa": "totp"`` when ``mfa``, and a TOTP
    key enrolled in OpenBao (as docs/mfa.md tells operators) when ``enrol``."""
    made: list[str] = []

    def make(*, mfa: bool = True, enrol: bool = True) -> TotpPerson:
        name = f"mfa{os.getpid() % 1000}x{next(_serial)}"
        made.append(name)
        totp = None
        if enrol:
            status, body = bao.api(
                "POST",
                f"/v1/totp/keys/{name}",
                {"generate": True, "issuer": "bastion", "account_name": name},
            )
            assert status == 200, body
            assert body["data"]["barcode"]  # the PNG a person scans
            totp = pyotp.parse_uri(body["data"]["url"])
            assert isinstance(totp, pyotp.TOTP)
        entry: dict[str, Any] = {"route": route(hosts, "host-102", login="alice")}
        if mfa:
            entry["mfa"] = "totp"
        consul.kv_put(f"ssh-keys/{name}", person_key.with_suffix(".pub").read_text())
        consul.kv_put(f"users/{name}", json.dumps(entry))
        return TotpPerson(name, person_key, totp)

    yield make
    for name in made:
        consul.kv_delete(f"users/{name}")
        consul.kv_delete(f"ssh-keys/{name}")
        bao.api("DELETE", f"/v1/totp/keys/{name}")


def mfa_bastion(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    auth_methods: Sequence[str] = ("publickey", "password", "keyboard-interactive"),
    max_auth_attempts: int = 6,
    **access: object,
) -> BastionProcess:
    def tweak(sections: dict[str, dict[str, object]]) -> None:
        sections["access"] = dict(access)
        sections["server"]["auth_methods"] = list(auth_methods)
        sections["server"]["max_auth_attempts"] = max_auth_attempts

    proc = new_bastion(tweak=tweak)
    proc.wait_synced(consul)
    return proc


def ssh_with_code(
    bastion: BastionProcess,
    person: TotpPerson,
    code: str | None,
    tmp_path: Path,
    *command: str,
    extra: Sequence[str] = (),
    env_extra: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """The real OpenSSH client, no terminal: the code (None: no way to give
    one, BatchMode) is answered by an SSH_ASKPASS program, as a desktop's
    askpass would; LogLevel INFO shows the bastion's auth banners."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSH_")}
    env.update(env_extra or {})
    opts: list[str] = list(extra)  # first: for ssh the first value of an option wins
    if code is not None:
        askpass = tmp_path / f"askpass-{next(_serial)}"
        # it notes each prompt it answers (tmp_path/prompts)
        askpass.write_text(f"#!/bin/sh\necho \"$1\" >>'{tmp_path}/prompts'\necho '{code}'\n")
        askpass.chmod(0o700)
        env.update(SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
        opts += ["-o", "BatchMode=no", "-o", "NumberOfPasswordPrompts=1"]
    opts += ["-o", "LogLevel=INFO"]
    argv = ssh_command(
        port=bastion.port,
        user=person.name,
        identity=person.key,
        extra=opts,
        command=command or ("hostname",),
    )
    return subprocess.run(
        argv, env=env, capture_output=True, timeout=60, check=False, stdin=subprocess.DEVNULL
    )


def records(bastion: BastionProcess, event: str, user: str) -> list[dict[str, Any]]:
    return [r for r in bastion.audit_records() if r.get("event") == event and r.get("user") == user]


def test_key_then_code_with_openssh(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    make_person: Callable[..., TotpPerson],
    tmp_path: Path,
) -> None:
    # keys only at the door: keyboard-interactive is offered for the code alone
    bastion = mfa_bastion(new_bastion, consul, auth_methods=["publickey"])
    person = make_person()
    result = ssh_with_code(bastion, person, person.code(), tmp_path, "id -un; hostname")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"alice\nhost-102\n"
    # the key was accepted as a partial success, then the code was asked once
    # (OpenSSH names the login before the bastion's prompt)
    assert (tmp_path / "prompts").read_text() == f"({person.name}@127.0.0.1) Verification code: \n"
    login = bastion.wait_audit(lambda r: r.get("event") == "login" and r["user"] == person.name)
    assert login["mfa"] == "totp"
    checked = records(bastion, "second-factor", person.name)
    assert [(r["method"], r["outcome"]) for r in checked] == [("totp", "ok")]
    assert not records(bastion, "auth-failed", person.name)


def test_asyncssh_client_answers_the_prompt(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    make_person: Callable[..., TotpPerson],
) -> None:
    bastion = mfa_bastion(new_bastion, consul)
    person = make_person()
    prompts: list[tuple[str, bool]] = []

    class Client(asyncssh.SSHClient):
        def kbdint_auth_requested(self) -> str:
            return ""

        def kbdint_challenge_received(
            self, name: str, instructions: str, lang: str, asked: Sequence[tuple[str, bool]]
        ) -> list[str]:
            prompts.extend(asked)
            return [person.code()] if asked else []

    async def login() -> bytes:
        async with asyncssh.connect(
            "127.0.0.1",
            bastion.port,
            username=person.name,
            client_keys=[str(person.key)],
            known_hosts=None,
            client_factory=Client,
            password_auth=False,
            preferred_auth=["publickey", "keyboard-interactive"],
        ) as conn:
            done = await conn.run("hostname", encoding=None, check=True)
            assert isinstance(done.stdout, bytes)
            return done.stdout

    assert asyncio.run(login()) == b"host-102\n"
    # one prompt, not echoed
    assert prompts == [("Verification code: ", False)]


def test_wrong_code_is_a_failed_attempt(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    make_person: Callable[..., TotpPerson],
    tmp_path: Path,
) -> None:
    bastion = mfa_bastion(new_bastion, consul)
    person = make_person()
    valid = {person.code(w) for w in (-1, 0, 1)}
    wrong = next(c for c in ("000000", "111111", "222222") if c not in valid)
    result = ssh_with_code(bastion, person, wrong, tmp_path)
    assert result.returncode == 255
    assert result.stdout == b""
    assert b"bastion: wrong verification code" in result.stderr
    assert b"Permission denied" in result.stderr
    failed = bastion.wait_audit(
        lambda r: r.get("event") == "auth-failed" and r["user"] == person.name
    )
    assert failed["method"] == "totp"
    checked = records(bastion, "second-factor", person.name)
    assert [r["outcome"] for r in checked] == ["mfa-wrong-code"]
    assert not records(bastion, "login", person.name)
    assert (
        bastion.metric('bastion_second_factor_total{method="totp",outcome="mfa-wrong-code"}') == 1
    )


def test_wrong_codes_count_against_max_auth_tries(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    make_person: Callable[..., TotpPerson],
    tmp_path: Path,
) -> None:
    bastion = mfa_bastion(new_bastion, consul, max_auth_attempts=2)
    person = make_person()
    valid = {person.code(w) for w in (-1, 0, 1)}
    wrong = next(c for c in ("000000", "111111", "222222") if c not in valid)
    # the client would try three codes; the bastion ends it at the second failure
    result = ssh_with_code(
        bastion, person, wrong, tmp_path, extra=["-o", "NumberOfPasswordPrompts=3"]
    )
    assert result.returncode == 255
    assert b"Too many authentication failures" in result.stderr
    assert len((tmp_path / "prompts").read_text().splitlines()) == 2
    closed = bastion.wait_audit(
        lambda r: r.get("event") == "connection" and r.get("user") == person.name
    )
    assert (closed["reason"], closed["auth_failures"]) == ("max-auth-tries", 2)


def test_replayed_code_is_refused(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    make_person: Callable[..., TotpPerson],
    tmp_path: Path,
) -> None:
    bastion = mfa_bastion(new_bastion, consul)
    person = make_person()
    code = person.code()
    assert ssh_with_code(bastion, person, code, tmp_path).returncode == 0
    again = ssh_with_code(bastion, person, code, tmp_path)
    assert again.returncode == 255
    assert b"bastion: code already used or tried; wait for the next one" in again.stderr
    assert again.stdout == b""
    outcomes = [r["outcome"] for r in records(bastion, "second-factor", person.name)]
    assert outcomes == ["ok", "mfa-code-reused"]


def test_no_way_to_give_a_code_is_refused(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    make_person: Callable[..., TotpPerson],
    tmp_path: Path,
) -> None:
    bastion = mfa_bastion(new_bastion, consul)
    person = make_person()
    # BatchMode: the client cannot answer keyboard-interactive at all
    batch = ssh_with_code(bastion, person, None, tmp_path)
    assert batch.returncode == 255
    assert b"Permission denied (keyboard-interactive)" in batch.stderr
    # nor a client that turned keyboard-interactive off
    off = ssh_with_code(
        bastion, person, person.code(), tmp_path, extra=["-o", "KbdInteractiveAuthentication=no"]
    )
    assert off.returncode == 255
    assert b"Permission denied (keyboard-interactive)" in off.stderr
    assert not records(bastion, "login", person.name)


def test_reused_upstream_connection_never_skips_the_factor(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    make_person: Callable[..., TotpPerson],
    tmp_path: Path,
) -> None:
    bastion = mfa_bastion(new_bastion, consul)  # reuse_idle: 10 s by default
    person = make_person()
    # two different codes, taken at the same moment (taken later, the "current"
    # one could be the first one's window by then: a replay)
    now, following = person.code(), person.code(1)
    first = ssh_with_code(bastion, person, following, tmp_path)
    assert first.returncode == 0, first.stderr
    # the upstream connection waits for her next login; without a code there is none
    assert bastion.metric("bastion_upstream_shared_connections") == 1
    refused = ssh_with_code(bastion, person, None, tmp_path)
    assert refused.returncode == 255
    assert b"Permission denied" in refused.stderr
    second = ssh_with_code(bastion, person, now, tmp_path)
    assert second.returncode == 0, second.stderr
    logins = records(bastion, "login", person.name)
    assert [(r["reused"], r["mfa"]) for r in logins] == [(False, "totp"), (True, "totp")]


def test_required_for_everyone(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    make_person: Callable[..., TotpPerson],
    tmp_path: Path,
) -> None:
    bastion = mfa_bastion(new_bastion, consul, mfa="required")
    plain = make_person(mfa=False)  # no "mfa" in the entry, a TOTP key enrolled
    bastion.wait_synced(consul)
    assert ssh_with_code(bastion, plain, None, tmp_path).returncode == 255
    ok = ssh_with_code(bastion, plain, plain.code(), tmp_path)
    assert ok.returncode == 0, ok.stderr
    # nobody enrolled: told so, once the key has proved who it is
    unenrolled = make_person(mfa=False, enrol=False)
    bastion.wait_synced(consul)
    result = ssh_with_code(bastion, unenrolled, "123456", tmp_path)
    assert result.returncode == 255
    assert (
        f"bastion: no TOTP key enrolled for {unenrolled.name}; ask an operator".encode()
        in result.stderr
    )
    closed = bastion.wait_audit(
        lambda r: r.get("event") == "connection" and r.get("user") == unenrolled.name
    )
    assert (closed["outcome"], closed["reason"]) == ("refused", "mfa-not-enrolled")


def test_per_person_without_mfa_logs_in_with_the_key(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    make_person: Callable[..., TotpPerson],
    tmp_path: Path,
) -> None:
    bastion = mfa_bastion(new_bastion, consul)  # [access] mfa = "per-person" (the default)
    person = make_person(mfa=False, enrol=False)
    bastion.wait_synced(consul)
    result = ssh_with_code(bastion, person, None, tmp_path)  # BatchMode: key only
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"host-102\n"
    login = bastion.wait_audit(lambda r: r.get("event") == "login" and r["user"] == person.name)
    assert login.get("mfa") is None  # (the audit leaves out empty fields)
    assert not records(bastion, "second-factor", person.name)


def test_vault_that_cannot_answer_fails_closed(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    make_person: Callable[..., TotpPerson],
    tmp_path: Path,
) -> None:
    # a mount that does not exist: Vault answers 404, as a mistyped totp_mount would
    bastion = mfa_bastion(new_bastion, consul, totp_mount="no-such-totp")
    person = make_person()
    result = ssh_with_code(bastion, person, person.code(), tmp_path)
    assert result.returncode == 255
    assert b"bastion: cannot check the verification code now" in result.stderr
    assert b"try again later" in result.stderr
    assert not records(bastion, "login", person.name)
    assert [r["outcome"] for r in records(bastion, "second-factor", person.name)] == [
        "secret-unavailable"
    ]


def test_password_then_code(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    bao: BaoServer,
    hosts: dict[str, SshdHost],
    tmp_path: Path,
) -> None:
    """Password passthrough (carol's password, checked by the host) as the
    first factor, then the code; one askpass answers both prompts."""
    bastion = mfa_bastion(new_bastion, consul)
    status, body = bao.api(
        "POST",
        "/v1/totp/keys/carol",
        {"generate": True, "issuer": "bastion"} | {"account_name": "carol"},
    )
    assert status == 200, body
    totp = pyotp.parse_uri(body["data"]["url"])
    entry = {"route": route(hosts, "host-102"), "mfa": "totp"}
    consul.kv_put("users/carol", json.dumps(entry))
    try:
        bastion.wait_synced(consul)
        askpass = tmp_path / "askpass"
        askpass.write_text(
            "#!/bin/sh\n"
            f'echo "$1" >>"{tmp_path}/prompts"\n'
            'case "$1" in *assword*) echo carol-test-pass;; '
            f"*) echo {totp.now()};; esac\n"
        )
        askpass.chmod(0o700)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SSH_")}
        env.update(SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
        argv = ssh_command(
            port=bastion.port,
            user="carol",
            extra=[
                "-o",
                "BatchMode=no",
                "-o",
                "PubkeyAuthentication=no",
                "-o",
                "PreferredAuthentications=password,keyboard-interactive",
            ],
            command=["id -un"],
        )
        result = subprocess.run(
            argv, env=env, capture_output=True, timeout=60, check=False, stdin=subprocess.DEVNULL
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"carol\n"
        prompts = (tmp_path / "prompts").read_text().splitlines()
        assert prompts == ["carol@127.0.0.1's password: ", "(carol@127.0.0.1) Verification code: "]
        login = bastion.wait_audit(lambda r: r.get("event") == "second-factor")
        assert (login["user"], login["outcome"]) == ("carol", "ok")
    finally:
        consul.kv_put("users/carol", route(hosts, "host-102"))
        bao.api("DELETE", "/v1/totp/keys/carol")


def test_factor_required_after_authentication_is_asked_for_at_the_plan(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    hosts: dict[str, SshdHost],
    make_person: Callable[..., TotpPerson],
) -> None:
    """The entry gains "mfa" between a key-only authentication and the first
    channel: the login is refused, not let through on the old answer."""
    bastion = mfa_bastion(new_bastion, consul)
    person = make_person(mfa=False)
    bastion.wait_synced(consul)

    async def scenario() -> asyncssh.SSHCompletedProcess:
        async with asyncssh.connect(
            "127.0.0.1",
            bastion.port,
            username=person.name,
            client_keys=[str(person.key)],
            known_hosts=None,
            preferred_auth=["publickey"],
        ) as conn:
            entry = {"route": route(hosts, "host-102", login="alice"), "mfa": "totp"}
            consul.kv_put(f"users/{person.name}", json.dumps(entry))
            await asyncio.to_thread(bastion.wait_synced, consul)
            return await conn.run("hostname", check=False)

    done = asyncio.run(scenario())
    assert done.exit_status == 255
    assert done.stdout == ""
    assert done.stderr == "bastion: a second factor is required now; log in again\r\n"
    closed = bastion.wait_audit(
        lambda r: r.get("event") == "connection" and r.get("user") == person.name
    )
    assert closed["reason"] == "mfa-required"


def test_what_the_key_allows_still_holds_after_the_code(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    make_person: Callable[..., TotpPerson],
    tmp_path: Path,
) -> None:
    """The key's authorized_keys options (here the ``no-agent-forwarding`` the
    bastion adds for a person whose entry does not allow it) survive the
    second round of authentication: ``ssh -A`` is refused and audited."""
    bastion = mfa_bastion(new_bastion, consul)
    person = make_person()
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(
        ["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        devstack.wait_until("ssh-agent", sock.exists, 10)
        result = ssh_with_code(
            bastion,
            person,
            person.code(),
            tmp_path,
            'test -z "$SSH_AUTH_SOCK" && echo no-agent',
            extra=["-A"],
            env_extra={"SSH_AUTH_SOCK": str(sock)},
        )
    finally:
        agent.terminate()
        agent.wait(10)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"no-agent\n"
    refused = bastion.wait_audit(
        lambda r: r.get("event") == "auth-agent-req" and r.get("user") == person.name
    )
    assert refused["outcome"] == "refused"


def test_without_vault_a_required_factor_refuses_the_login(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    make_person: Callable[..., TotpPerson],
    local_ca: Path,
    tmp_path: Path,
) -> None:
    def local_signer(sections: dict[str, dict[str, object]]) -> None:
        del sections["vault"]  # certificates from a local CA key, no TOTP engine
        sections["upstream"]["ca_key"] = str(local_ca)

    bastion = new_bastion(tweak=local_signer)
    person = make_person()
    bastion.wait_synced(consul)
    result = ssh_with_code(bastion, person, person.code(), tmp_path)
    assert result.returncode == 255
    assert (
        b"bastion: a second factor is required but cannot be checked; ask an operator"
        in result.stderr
    )
    assert not records(bastion, "login", person.name)
