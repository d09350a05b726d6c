"""The second factor's pieces alone: who must give one
(``LoginPolicy.second_factor``, pure, over the real route grammar) and the
code check against the real OpenBao TOTP engine with the bastion's own
AppRole token (``TotpVerifier``). End to end: tests/test_mfa.py.
"""

from __future__ import annotations

import asyncio
import time

import pyotp
import pytest
from conftest import VaultSetup

from bastion.config import VaultSettings
from bastion.credentials.totp import TotpVerifier
from bastion.credentials.vault import VaultClient
from bastion.directory.grammar import parse_route
from bastion.errors import (
    CodeReused,
    DirectoryUnavailable,
    NoRoute,
    NotEnrolled,
    RoutingError,
    SecondFactorFailed,
)
from bastion.model import Destination, Node, Route, Target
from bastion.policy import LoginPolicy
from bastion.trust import HostKeyPolicy
from devstack import BaoServer


class OneEntry:
    """A directory with one route entry (the real grammar) or a problem."""

    default_port = 22

    def __init__(self, value: str | None = None, problem: Exception | None = None) -> None:
        self.value = value
        self.problem = problem

    def route_for(self, user: str) -> Route:
        if self.problem is not None:
            raise self.problem
        if self.value is None:
            raise NoRoute(f"no route for {user}")
        return parse_route(user, self.value)

    def resolve_target(self, route: Route, target: Target) -> Destination | RoutingError:
        raise AssertionError("not asked")

    def node(self, name: str) -> Node | None:
        return None


@pytest.mark.parametrize(
    ("mode", "directory", "wanted"),
    [
        ("per-person", OneEntry('{"route": "h", "mfa": "totp"}'), "totp"),
        ("per-person", OneEntry('{"route": "h"}'), None),
        ("per-person", OneEntry("h"), None),
        ("per-person", OneEntry(None), None),  # no entry: refused for want of a route
        # malformed: no login (refused with its own message at the plan)
        ("per-person", OneEntry('{"route": "h", "mfa": "sms"}'), None),
        ("per-person", OneEntry(problem=DirectoryUnavailable("down")), "totp"),
        ("required", OneEntry('{"route": "h"}'), "totp"),
        ("required", OneEntry(None), "totp"),
        ("off", OneEntry('{"route": "h", "mfa": "totp"}'), None),
    ],
)
def test_policy_second_factor(mode: str, directory: OneEntry, wanted: str | None) -> None:
    policy = LoginPolicy(directory, HostKeyPolicy(None, None), mfa=mode)
    assert policy.second_factor("alice") == wanted


def test_totp_verifier_against_openbao(vault: VaultSetup, bao: BaoServer) -> None:
    status, body = bao.api(
        "POST",
        "/v1/totp/keys/verifier",
        {"generate": True, "issuer": "bastion"} | {"account_name": "verifier"},
    )
    assert status == 200, body
    totp = pyotp.parse_uri(body["data"]["url"])
    settings = VaultSettings(
        address=vault.addr, role_id_file=vault.role_id_file, secret_id_file=vault.secret_id_file
    )

    async def scenario() -> None:
        # the bastion's own AppRole token: its policy allows totp/code/* and no more
        client = VaultClient(settings)
        await client.start()
        try:
            verifier = TotpVerifier(client, "totp")
            code = totp.now()
            await verifier.verify("verifier", code)
            with pytest.raises(
                CodeReused, match="code already used or tried; wait for the next one"
            ):
                await verifier.verify("verifier", code)
            wrong = next(
                c for c in ("000000", "111111") if c not in {code, totp.at(time.time() + 30)}
            )
            with pytest.raises(SecondFactorFailed, match="wrong verification code"):
                await verifier.verify("verifier", wrong)
            for garbage in ("", "12345", "123456789", "12a456", "../../x"):
                with pytest.raises(SecondFactorFailed):
                    await verifier.verify("verifier", garbage)
            with pytest.raises(
                NotEnrolled, match="no TOTP key enrolled for nobody; ask an operator"
            ):
                await verifier.verify("nobody", "123456")
            # reading or creating keys is not the bastion's business
            answer = await client.write("totp/keys/mallory", {"generate": True}, "x", accept=(403,))
            assert answer.status == 403
        finally:
            await client.aclose()
            bao.api("DELETE", "/v1/totp/keys/verifier")

    asyncio.run(scenario())
