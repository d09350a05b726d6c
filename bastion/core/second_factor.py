"""A second factor after the key: a TOTP code asked through keyboard-interactive.

This is what sshd does with ``AuthenticationMethods
publickey,keyboard-interactive`` (sshd_config(5)): when the first method
succeeds and a second is required, the server answers
SSH_MSG_USERAUTH_FAILURE with *partial success* set and only the methods
still to pass (RFC 4252 section 5.1); the client continues with
keyboard-interactive (RFC 4256), the bastion asks "Verification code: "
(no echo) and only a valid code sends SSH_MSG_USERAUTH_SUCCESS. OpenSSH
clients print ``Authenticated using "publickey" with partial success.`` and
then prompt (on the terminal, or through ``SSH_ASKPASS``).

asyncssh 2.24 has no multi-factor API: :class:`SecondFactorGate` wraps, on
one connection instance, the method that sends the success (as
:func:`bastion.core.sshd_compat.count_auth_failures` wraps the failure) and
the ``*_auth_supported`` checks asyncssh builds the method list from.
``tests/test_mfa.py`` fails if an asyncssh upgrade changes that contract.

The factor is asked at the front door on every client connection, before
any channel exists, so a reused upstream connection (``[upstream]
reuse_idle``) never skips it. A wrong or replayed code counts as a failed
authentication (MaxAuthTries, ``AuthFailed`` with method ``totp``, and
PerSourcePenalties ``authfail``); a person with no key enrolled, or a Vault
that cannot answer, ends the connection with a message that says so (fails
closed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

import asyncssh

from bastion.core import refusal
from bastion.errors import (
    BastionError,
    NotEnrolled,
    SecondFactorFailed,
    SecondFactorRequired,
    SecretUnavailable,
)
from bastion.events import EventBus, SecondFactorChecked

log = logging.getLogger("bastion.frontdoor")

PROMPT = "Verification code: "

# first-factor methods a pending second factor switches off (asyncssh asks
# these to build the method list of USERAUTH_FAILURE)
_FIRST_FACTORS = (
    "public_key_auth_supported",
    "password_auth_supported",
    "host_based_auth_supported",
    "gss_kex_auth_supported",
    "gss_mic_auth_supported",
)

KbdIntChallenge = tuple[str, str, str, list[tuple[str, bool]]]


class FactorCheck(Protocol):
    """Checks a code (``bastion.credentials.totp.TotpVerifier`` answers)."""

    method: str

    async def verify(self, user: str, code: str) -> None:
        """Return when the code is good; raise SecondFactorFailed (and its
        CodeReused, NotEnrolled) or SecretUnavailable otherwise."""
        ...


class FactorPolicy(Protocol):
    """Who must give which factor (``bastion.policy.LoginPolicy`` answers)."""

    def second_factor(self, user: str) -> str | None: ...


class GateContext(Protocol):
    """What the gate reads, at the moment it needs it (``ServerContext``)."""

    @property
    def policy(self) -> FactorPolicy: ...
    @property
    def second_factor(self) -> FactorCheck | None: ...
    @property
    def events(self) -> EventBus: ...


class Person(Protocol):
    """Who is logging in (``BastionConnection`` answers)."""

    conn_id: str
    user: str
    source: str

    def may_log_in(self) -> bool:
        """The policy's word on this login ("from", "disabled"); False: it is
        being refused and closed."""
        ...


class SecondFactorGate:
    """The second factor of one connection.

    ``ctx.policy.second_factor(user)`` is asked the moment the first factor
    succeeds (``"totp"`` or None); ``ctx.second_factor`` validates codes
    (None: no Vault, so a required factor refuses the login); ``refuse(exc)``
    ends the connection with ``exc``'s message (the front door's disconnect).
    The front door hands its keyboard-interactive callbacks to
    :meth:`challenge` and :meth:`check_response` while :meth:`pending_for`.
    """

    def __init__(
        self,
        conn: asyncssh.SSHServerConnection,
        person: Person,
        ctx: GateContext,
        refuse: Callable[[BastionError], None],
    ) -> None:
        self._conn = conn
        self._person = person
        self._ctx = ctx
        self._check: FactorCheck | None = None  # the check in force for this login
        self._refuse = refuse
        self._pending: str | None = None  # the factor asked for, between the two
        self._first_user = ""
        self._saved_options: tuple[Any, Any] = ({}, None)
        self.passed: str | None = None  # the factor passed ("totp"), for the audit
        self._send_success = conn.send_userauth_success
        conn.send_userauth_success = self._on_success  # type: ignore[method-assign]
        for name in _FIRST_FACTORS:
            original = getattr(conn, name)
            setattr(conn, name, self._off_while_pending(original))
        original_kbdint = conn.kbdint_auth_supported
        conn.kbdint_auth_supported = (  # type: ignore[method-assign]
            lambda: self._pending is not None or original_kbdint()
        )

    def _off_while_pending(self, original: Callable[[], bool]) -> Callable[[], bool]:
        return lambda: self._pending is None and original()

    async def _on_success(self) -> None:
        """asyncssh's USERAUTH_SUCCESS: sent as is once every factor passed;
        after the first factor, a partial success asking for the second."""
        if self.passed is not None:
            await self._send_success()
            return
        if self._pending is not None:  # only check_response passes it: never here
            type(self._conn).send_userauth_failure(self._conn, True)
            return
        user = self._person.user
        factor = self._ctx.policy.second_factor(user)
        if factor is not None and not self._person.may_log_in():
            return  # refused with its reason: no code is asked (nor spent)
        if factor is None:
            await self._send_success()
            return
        self._check = self._ctx.second_factor
        if self._check is None or factor != self._check.method:
            self._refuse(
                SecretUnavailable(
                    "a second factor is required but cannot be checked; ask an operator",
                    detail=f"{user}: second factor {factor!r} required, "
                    "but no [vault] TOTP engine is configured",
                )
            )
            return
        conn = cast(Any, self._conn)
        # asyncssh clears what the key's authorized_keys line or certificate
        # allows at the next USERAUTH_REQUEST: keep it for after the code
        self._saved_options = (conn._key_options, conn._cert_options)
        self._pending = factor
        self._first_user = user
        # the class's own method: a partial success is not a failed attempt
        # (count_auth_failures wraps the instance's)
        type(self._conn).send_userauth_failure(self._conn, True)

    def pending_for(self, username: str) -> bool:
        """Whether the next keyboard-interactive round is the second factor.
        A change of user name never gets here: the front door disconnects
        (sshd allows none between methods); a pending factor stays pending."""
        return self._pending is not None

    def challenge(self) -> KbdIntChallenge:
        """The keyboard-interactive challenge: one prompt, not echoed."""
        return "", "", "", [(PROMPT, False)]

    async def check_response(self, username: str, responses: Sequence[str]) -> bool:
        """Validate the answer. True: the factor passed (the success follows).
        False: a failed attempt; its reason is sent as an auth banner first,
        or the connection is ended (nothing enrolled, Vault unavailable)."""
        assert self._pending is not None and self._check is not None
        method = self._pending
        try:
            if len(responses) != 1:
                raise SecondFactorFailed("wrong verification code")
            await self._check.verify(username, responses[0])
        except (NotEnrolled, SecretUnavailable) as exc:
            self._checked(method, exc.reason)
            who = f"{username} from {self._person.source}"
            log.warning("second factor of %s: %s", who, exc.detail)
            self._refuse(exc)
            return False
        except SecondFactorFailed as exc:
            self._checked(method, exc.reason)
            log.info("second factor of %s from %s: %s", username, self._person.source, exc.detail)
            refusal.auth_banner(self._conn, exc)
            return False
        self._checked(method, "ok")
        conn = cast(Any, self._conn)
        conn._key_options, conn._cert_options = self._saved_options
        self._pending = None
        self.passed = method
        return True

    def recheck(self, user: str) -> None:
        """Before the first upstream login of this connection: raise
        SecondFactorRequired if the policy now asks a factor that was not
        given (the entry gained ``"mfa"``, or could not be read at
        authentication and can now)."""
        if self.passed is None and self._ctx.policy.second_factor(user) is not None:
            raise SecondFactorRequired(
                "a second factor is required now; log in again",
                detail=f"{user}: the directory asks a second factor this connection did not give",
            )

    def _checked(self, method: str, outcome: str) -> None:
        p = self._person
        self._ctx.events.emit(SecondFactorChecked(p.conn_id, p.user, p.source, method, outcome))
