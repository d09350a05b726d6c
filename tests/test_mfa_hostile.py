"""The second factor against a hostile client: a change of user name between
the first factor and the code (sshd disconnects; here it would have mixed one
name's password with another's factor policy), keyboard-interactive offered
only for the code on a key-only bastion, and the per-person limit on wrong
codes however many connections guess."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence

import asyncssh
import pytest
from conftest import route
from test_mfa import TotpPerson, make_person, mfa_bastion, person_key, records

from devstack import BastionProcess, ConsulAgent, SshdHost

__all__ = ["make_person", "person_key"]  # fixtures, imported for pytest


def switching_client(other: str, password: str | None, answer: str) -> type[asyncssh.SSHClient]:
    """A client that passes its first factor, then asks keyboard-interactive
    under the user name ``other`` (what OpenSSH never does; a hostile
    client can)."""

    class Client(asyncssh.SSHClient):
        def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
            self.conn = conn

        def password_auth_requested(self) -> str | None:
            return password

        def kbdint_auth_requested(self) -> str | None:
            self.conn._username = other  # type: ignore[attr-defined]
            return ""

        def kbdint_challenge_received(
            self, name: str, instructions: str, lang: str, asked: Sequence[tuple[str, bool]]
        ) -> list[str]:
            return [answer] * len(asked)

    return Client


async def try_login(
    port: int, user: str, client: type[asyncssh.SSHClient], **options: object
) -> str:
    """ "ok: <output>" or the error's class and reason."""
    try:
        async with asyncssh.connect(
            "127.0.0.1", port, username=user, known_hosts=None, client_factory=client, **options
        ) as conn:
            done = await conn.run("id -un", check=False)
            return f"ok: {done.stdout!r}"
    except (asyncssh.Error, OSError) as exc:
        return f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"


async def key_then_code(
    bastion: BastionProcess, person: TotpPerson, client: type[asyncssh.SSHClient]
) -> str:
    """:func:`try_login` with the person's key, then keyboard-interactive."""
    return await try_login(
        bastion.port,
        person.name,
        client,
        client_keys=[str(person.key)],
        preferred_auth=["publickey", "keyboard-interactive"],
    )


def test_a_change_of_user_name_after_the_password_is_a_disconnect(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    hosts: dict[str, SshdHost],
) -> None:
    bastion = mfa_bastion(new_bastion, consul)
    consul.kv_put("users/carol", json.dumps({"route": route(hosts, "host-102"), "mfa": "totp"}))
    try:
        bastion.wait_synced(consul)
        client = switching_client("zz", "carol-test-pass", "whatever")
        got = asyncio.run(
            try_login(
                bastion.port,
                "carol",
                client,
                client_keys=None,
                preferred_auth=["password", "keyboard-interactive"],
            )
        )
        assert not got.startswith("ok"), got
        assert "Change of username not allowed: carol -> zz" in got
        closed = bastion.wait_audit(lambda r: r.get("event") == "connection")
        assert (closed["user"], closed["reason"]) == ("carol", "user-changed")
        assert not [r for r in bastion.audit_records() if r.get("event") == "session-start"]
    finally:
        consul.kv_put("users/carol", route(hosts, "host-102"))


def test_key_only_bastion_never_turns_the_code_prompt_into_a_password_login(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    make_person: Callable[..., TotpPerson],
) -> None:
    """With ``auth_methods = ["publickey"]``, keyboard-interactive exists only
    for the code: carol's password typed there logs nobody in."""
    bastion = mfa_bastion(new_bastion, consul, auth_methods=("publickey",))
    person = make_person()
    client = switching_client("carol", None, "carol-test-pass")
    got = asyncio.run(key_then_code(bastion, person, client))
    assert "Change of username not allowed" in got, got

    # and without switching names: the prompt is the code, a password is a wrong code
    class Guesser(asyncssh.SSHClient):
        def kbdint_auth_requested(self) -> str | None:
            return ""

        def kbdint_challenge_received(
            self, name: str, instructions: str, lang: str, asked: Sequence[tuple[str, bool]]
        ) -> list[str]:
            return ["carol-test-pass"] * len(asked)

    got = asyncio.run(key_then_code(bastion, person, Guesser))
    assert not got.startswith("ok"), got
    assert [r["outcome"] for r in records(bastion, "second-factor", person.name)][:1] == [
        "mfa-wrong-code"
    ]


@pytest.mark.timeout(120)
def test_wrong_codes_lock_the_person_not_the_source(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    make_person: Callable[..., TotpPerson],
) -> None:
    """3 wrong codes per person ([access] totp_max_wrong), spread over
    connections: the next check is refused without asking Vault, even with
    the right code; another person is not affected."""
    bastion = mfa_bastion(
        new_bastion, consul, max_auth_attempts=2, totp_max_wrong=3, totp_wrong_window=60
    )
    victim, other = make_person(), make_person()
    valid = {victim.code(w) for w in (-1, 0, 1)}
    wrong = [c for c in ("000000", "111111", "222222", "333333", "444444") if c not in valid]

    def client(codes: list[str]) -> type[asyncssh.SSHClient]:
        class Client(asyncssh.SSHClient):
            def kbdint_auth_requested(self) -> str | None:
                return ""

            def kbdint_challenge_received(
                self, name: str, instructions: str, lang: str, asked: Sequence[tuple[str, bool]]
            ) -> list[str]:
                return [codes.pop(0) if codes else "999999"] * len(asked)

        return Client

    def attempt(person: TotpPerson, codes: list[str]) -> str:
        return asyncio.run(key_then_code(bastion, person, client(codes)))

    for code in wrong[:3]:  # one wrong code per connection
        assert not attempt(victim, [code]).startswith("ok")
    assert not attempt(victim, [victim.code()]).startswith("ok")
    outcomes = [r["outcome"] for r in records(bastion, "second-factor", victim.name)]
    # (each connection retries until MaxAuthTries: the 3rd wrong code is
    # already the second connection's; everything after it is not checked)
    assert outcomes[:3] == ["mfa-wrong-code"] * 3, outcomes
    assert len(outcomes) > 3 and set(outcomes[3:]) == {"mfa-locked"}, outcomes
    assert attempt(other, [other.code()]).startswith("ok: 'alice")


def test_codes_checked_at_once_count_before_vault_answers(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    make_person: Callable[..., TotpPerson],
) -> None:
    """12 connections at the prompt send a wrong code at the same moment: only
    ``totp_max_wrong`` (3) reach Vault, the rest are not checked."""
    bastion = mfa_bastion(
        new_bastion, consul, max_auth_attempts=1, totp_max_wrong=3, totp_wrong_window=60
    )
    person = make_person()
    valid = {person.code(w) for w in (-1, 0, 1)}
    at_prompt = 12
    # distinct guesses (the engine calls a code it was asked before "already used")
    wrong = [c for c in (f"{n:06d}" for n in range(100, 200)) if c not in valid][:at_prompt]

    async def burst() -> list[str]:
        ready = asyncio.Barrier(at_prompt)

        class Client(asyncssh.SSHClient):
            def kbdint_auth_requested(self) -> str | None:
                return ""

            async def kbdint_challenge_received(  # type: ignore[override]
                self, name: str, instructions: str, lang: str, asked: Sequence[tuple[str, bool]]
            ) -> list[str]:
                if asked:
                    await ready.wait()  # everyone at the prompt, then all at once
                return [wrong.pop()] * len(asked)

        return await asyncio.gather(
            *(key_then_code(bastion, person, Client) for _ in range(at_prompt))
        )

    results = asyncio.run(burst())
    assert not [r for r in results if r.startswith("ok")], results
    outcomes = [r["outcome"] for r in records(bastion, "second-factor", person.name)]
    assert sorted(outcomes) == ["mfa-locked"] * (at_prompt - 3) + ["mfa-wrong-code"] * 3


def test_from_and_disabled_are_checked_before_the_code_is_asked(
    new_bastion: Callable[..., BastionProcess],
    consul: ConsulAgent,
    hosts: dict[str, SshdHost],
    make_person: Callable[..., TotpPerson],
) -> None:
    bastion = mfa_bastion(new_bastion, consul)
    person = make_person()
    entry = {"route": route(hosts, "host-102", login="alice"), "mfa": "totp"}
    asked: list[str] = []

    class Client(asyncssh.SSHClient):
        def kbdint_auth_requested(self) -> str | None:
            return ""

        def kbdint_challenge_received(
            self, name: str, instructions: str, lang: str, prompts: Sequence[tuple[str, bool]]
        ) -> list[str]:
            asked.extend(p for p, _ in prompts)
            return [person.code()] * len(prompts)

    for extra, why in (
        ({"from": ["10.9.9.0/24"]}, "may not log in from"),
        ({"disabled": True}, "disabled"),
    ):
        consul.kv_put(f"users/{person.name}", json.dumps({**entry, **extra}))
        bastion.wait_synced(consul)
        got = asyncio.run(key_then_code(bastion, person, Client))
        assert why in got, got
    assert asked == []  # no code asked, none spent
    assert not records(bastion, "second-factor", person.name)
