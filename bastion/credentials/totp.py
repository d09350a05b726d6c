"""The second factor's check: a TOTP code (RFC 6238) validated by the
Vault/OpenBao TOTP secrets engine.

The secret never reaches the bastion: an operator enrols a person with
``bao write totp/keys/alice generate=true issuer=bastion account_name=alice``
(docs/mfa.md), and the bastion only asks ``PUT <mount>/code/<user>`` with
``{"code": "123456"}``, which needs nothing but ``update`` on
``<mount>/code/*`` in its Vault policy. The engine answers ``{"valid":
true|false}``; it refuses a code it has accepted once within its window with
400 "code already used; wait until the next time period", so a replay is
refused by Vault itself, for every bastion that shares it. A person without
a key gets 400 "unknown key: <user>".

This module is where those answers become exceptions (once):
:class:`~bastion.errors.SecondFactorFailed`,
:class:`~bastion.errors.CodeReused`, :class:`~bastion.errors.NotEnrolled`,
or :class:`~bastion.errors.SecretUnavailable` when Vault cannot answer
(sealed, unreachable, the mount missing, the policy denying): the login then
fails closed.
"""

from __future__ import annotations

import logging

from bastion.credentials.vault import VaultClient
from bastion.errors import CodeReused, NotEnrolled, SecondFactorFailed, SecretUnavailable

log = logging.getLogger("bastion.credentials")

# RFC 6238 codes are 6 to 8 decimal digits (the engine's "digits" is 6 or 8)
_MIN_DIGITS, _MAX_DIGITS = 6, 8


class TotpVerifier:
    """Checks TOTP codes with the TOTP engine mounted at ``mount``
    (``[access] totp_mount``), through the bastion's own Vault session."""

    method = "totp"  # the name audit records and AuthFailed events give the factor

    def __init__(self, client: VaultClient, mount: str = "totp") -> None:
        self.client = client
        self.mount = mount.strip("/")

    def __repr__(self) -> str:
        return f"TotpVerifier(mount={self.mount!r})"

    async def verify(self, user: str, code: str) -> None:
        """Return when ``code`` is ``user``'s current TOTP code, seen for the
        first time.

        Raises SecondFactorFailed (a wrong or malformed code), CodeReused (the
        engine accepted that code before), NotEnrolled (no key for ``user``)
        or SecretUnavailable (Vault sealed, unreachable, denied, mount
        missing). The code itself is never logged.
        """
        code = code.strip()
        if not (code.isascii() and code.isdigit() and _MIN_DIGITS <= len(code) <= _MAX_DIGITS):
            # not worth a round trip; and nothing odd goes into Vault's audit log
            raise SecondFactorFailed("wrong verification code")
        what = f"TOTP check for {user} at {self.mount}/code"
        try:
            answer = await self.client.write(
                f"{self.mount}/code/{user}", {"code": code}, what, accept=(400,)
            )
        except SecretUnavailable as exc:
            raise SecretUnavailable(
                f"cannot check the verification code now ({exc.user_message}); try again later",
                detail=exc.detail,
            ) from exc
        if answer.status == 400:
            text = answer.errors.lower()
            if "already used" in text:
                raise CodeReused("code already used; wait for the next one")
            if "unknown key" in text:
                raise NotEnrolled(
                    f"no TOTP key enrolled for {user}; ask an operator",
                    detail=f"{user}: no key at {self.mount}/keys/{user} (docs/mfa.md)",
                )
            # "invalid number of digits for the code": the key has 8 digits, say
            raise SecondFactorFailed("wrong verification code", detail=f"{what}: {answer.errors}")
        if answer.section("data").get("valid") is not True:
            raise SecondFactorFailed("wrong verification code")
