"""Which authorized key a connection logged in with, so that removing that
key from the directory can end the connection (bastion.revocation).

asyncssh matches a client's key against the ``SSHAuthorizedKeys`` set for
the login and keeps only the matched line's options; :class:`KeyWitness`
is that set, noting the key (or, for a certificate, the CA key) of the last
match. The last match before authentication completes is the key whose
signature was checked: a client queries a key, then signs with it (RFC
4252 section 7).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncssh


@dataclass(frozen=True)
class AuthKey:
    """The key a person logged in with: a plain key, or (``ca``) the user CA
    key that signed their certificate, with the certificate's principals."""

    key: asyncssh.SSHKey
    ca: bool = False
    principals: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        return str(self.key.get_fingerprint())

    def still_authorized(self, keys: asyncssh.SSHAuthorizedKeys | None, address: str) -> bool:
        """Whether ``keys`` (the person's current set) still admits this key
        from ``address``: the same line, with its ``from=`` still matching."""
        if keys is None:
            return False
        principals = list(self.principals) if self.ca else None
        return keys.validate(self.key, address, address, principals, ca=self.ca) is not None


class KeyWitness(asyncssh.SSHAuthorizedKeys):
    """``keys`` for asyncssh, noting the last key that matched (``matched``)."""

    def __init__(self, keys: asyncssh.SSHAuthorizedKeys) -> None:
        super().__init__()
        # the same parsed entries, not a copy of the text: nothing is re-read
        self.__dict__.update(keys.__dict__)
        self.matched: AuthKey | None = None

    def validate(
        self,
        key: asyncssh.SSHKey,
        client_host: str,
        client_addr: str,
        cert_principals: Sequence[str] | None = None,
        ca: bool = False,
    ) -> Any:
        options = super().validate(key, client_host, client_addr, cert_principals, ca)
        if options is not None:
            self.matched = AuthKey(key, ca, tuple(cert_principals or ()))
        return options
