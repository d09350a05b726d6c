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
import time
from collections import deque
from collections.abc import Callable

from bastion.credentials.vault import VaultClient
from bastion.errors import (
    CodeReused,
    NotEnrolled,
    SecondFactorFailed,
    SecretUnavailable,
    TooManyWrongCodes,
)

log = logging.getLogger("bastion.credentials")

# RFC 6238 codes are 6 to 8 decimal digits (the engine's "digits" is 6 or 8)
_MIN_DIGITS, _MAX_DIGITS = 6, 8


class WrongCodes:
    """Wrong codes per person in a sliding window: after ``limit`` within
    ``window`` seconds, that person's codes are not checked until the oldest
    leaves the window. Six-digit codes give a guesser about 3 chances in a
    million per try (the engine's skew accepts the neighbouring periods);
    MaxAuthTries and PerSourcePenalties bound one connection and one source,
    this bounds one account however many sources guess, within one bastion
    process (with ``[server] workers`` or several bastions, each counts its
    own: the bound is ``limit`` x processes per window). Bounded memory: at
    most ``limit`` timestamps for each of at most ``max_people`` people."""

    def __init__(
        self,
        limit: int = 5,
        window: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        max_people: int = 65536,
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._max_people = max_people
        self._seen: dict[str, deque[float]] = {}

    def _recent(self, user: str) -> deque[float]:
        now = self._clock()
        times = self._seen.get(user, deque())
        while times and now - times[0] >= self.window:
            times.popleft()
        return times

    def locked_for(self, user: str) -> float:
        """Seconds until ``user``'s codes are checked again (0: now)."""
        times = self._recent(user)
        if len(times) < self.limit:
            return 0.0
        return max(0.0, self.window - (self._clock() - times[0]))

    def forgive(self, user: str) -> None:
        """Take back the latest :meth:`failed` of ``user`` (the check it
        reserved did not find a wrong code)."""
        times = self._seen.get(user)
        if times:
            times.pop()

    def failed(self, user: str) -> None:
        times = self._recent(user)
        if user not in self._seen:
            if len(self._seen) >= self._max_people:  # forget the quietest
                stale = [u for u, t in self._seen.items() if not self._recent(u)]
                for u in stale or list(self._seen)[: self._max_people // 10 or 1]:
                    del self._seen[u]
            self._seen[user] = times
        times.append(self._clock())
        while len(times) > self.limit:
            times.popleft()


class TotpVerifier:
    """Checks TOTP codes with the TOTP engine mounted at ``mount``
    (``[access] totp_mount``), through the bastion's own Vault session, at
    most ``wrong_codes.limit`` wrong ones per person per window."""

    method = "totp"  # the name audit records and AuthFailed events give the factor

    def __init__(
        self, client: VaultClient, mount: str = "totp", wrong_codes: WrongCodes | None = None
    ) -> None:
        self.client = client
        self.mount = mount.strip("/")
        self.wrong_codes = wrong_codes if wrong_codes is not None else WrongCodes()

    def __repr__(self) -> str:
        return f"TotpVerifier(mount={self.mount!r})"

    async def verify(self, user: str, code: str) -> None:
        """Return when ``code`` is ``user``'s current TOTP code, seen for the
        first time.

        Raises SecondFactorFailed (a wrong or malformed code), CodeReused (the
        engine has seen that code before: OpenBao remembers every code it was
        asked, right or wrong, for its period), TooManyWrongCodes (the
        person's limit), NotEnrolled (no key for ``user``) or
        SecretUnavailable (Vault sealed, unreachable, denied, mount missing).
        The code itself is never logged.
        """
        wait = self.wrong_codes.locked_for(user)
        if wait > 0:
            raise TooManyWrongCodes(
                f"too many wrong codes for {user}; try again in {max(1, round(wait / 60))} min",
                detail=f"{user}: {self.wrong_codes.limit} wrong codes within "
                f"{self.wrong_codes.window:.0f} s; codes are not checked for {wait:.0f} s",
            )
        # counted before Vault is asked and given back unless the code was
        # wrong: checks in flight at once count too (a burst of connections
        # all at the prompt gets `limit` checks, not one each)
        self.wrong_codes.failed(user)
        try:
            await self._verify(user, code)
        except SecondFactorFailed as exc:
            if isinstance(exc, (CodeReused, NotEnrolled)):
                self.wrong_codes.forgive(user)
            raise
        except BaseException:
            self.wrong_codes.forgive(user)
            raise
        self.wrong_codes.forgive(user)

    async def _verify(self, user: str, code: str) -> None:
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
                raise CodeReused("code already used or tried; wait for the next one")
            if "unknown key" in text:
                raise NotEnrolled(
                    f"no TOTP key enrolled for {user}; ask an operator",
                    detail=f"{user}: no key at {self.mount}/keys/{user} (docs/mfa.md)",
                )
            # "invalid number of digits for the code": the key has 8 digits, say
            raise SecondFactorFailed("wrong verification code", detail=f"{what}: {answer.errors}")
        if answer.section("data").get("valid") is not True:
            raise SecondFactorFailed("wrong verification code")
