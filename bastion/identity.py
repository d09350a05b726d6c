"""Who is connecting: the one user-name grammar, and the keys and
certificates a person may log in with.

A user name is a POSIX-portable login name (lower case, at most 32
characters; useradd(8)'s default ``NAME_REGEX`` without upper case): the
same grammar for the person at the bastion, the directory's ``users/<name>``
keys, the upstream ``login@`` of a route and the command line.

A user's authorized keys come from the directory (``ssh-keys/<user>``) and/or
a local directory of authorized_keys files (``<dir>/<user>``), both in
OpenSSH authorized_keys format. A trusted user CA adds a ``cert-authority``
line with ``principals="<user>"``: a certificate must name the user among its
principals (one with none is refused, as sshd's TrustedUserCAKeys does).

An unknown user gets an empty key set, not an error: the client sees the same
"Permission denied" either way, so user names cannot be enumerated.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import asyncssh

from bastion.errors import BastionError

log = logging.getLogger("bastion.identity")

USER_NAME_RULE = (
    "lower-case letters, digits, '_', '.', '-', starting with a letter or '_', at most 32"
)
_USER_NAME_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}\Z")


def valid_user_name(name: str) -> bool:
    """Whether ``name`` is a user (and upstream login) name; see the module docstring."""
    return bool(_USER_NAME_RE.match(name))


class KeyDirectory:
    """Builds the authorized-keys set for one login attempt.

    ``user_ca_lines`` are OpenSSH public key lines of the trusted user CA,
    already checked by the settings (:mod:`bastion.config`).
    """

    def __init__(
        self,
        directory_keys: Callable[[str], list[str]] | None,
        local_dir: Path | None,
        user_ca_lines: tuple[str, ...] = (),
    ) -> None:
        self._directory_keys = directory_keys
        self._local_dir = local_dir
        self._ca_lines = tuple(user_ca_lines)

    def authorized_keys(
        self, username: str, *, agent_forwarding: bool = True
    ) -> tuple[asyncssh.SSHAuthorizedKeys | None, BastionError | None]:
        """The keys ``username`` may log in with (None: none at all), and the
        directory's problem if it could not be asked. Without
        ``agent_forwarding`` every key carries ``no-agent-forwarding``, so
        that asyncssh refuses the client's agent request instead of opening
        an agent socket on the bastion that policy would never use."""
        if not valid_user_name(username):
            return None, None
        problem: BastionError | None = None
        # principals="<user>": the certificate must name this user, as sshd's
        # TrustedUserCAKeys requires (sshd_config(5)); asyncssh alone would
        # take a certificate with no principals at all for any user name
        lines: list[str] = [
            f'cert-authority,principals="{username}" {line}' for line in self._ca_lines
        ]
        if self._directory_keys is not None:
            try:
                lines += self._directory_keys(username)
            except BastionError as exc:
                # no directory: local keys and the user CA still work
                log.warning("directory keys for %s unavailable: %s", username, exc.detail)
                problem = exc
        if self._local_dir is not None:
            path = self._local_dir / username
            try:
                lines += path.read_text().splitlines()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot read %s: %s", path, exc.strerror)
        if not agent_forwarding:
            lines = [_deny_agent(line) for line in lines]
        return _import_lines(lines, username), problem


# the key types an authorized_keys line without options starts with
_KEY_TYPE_RE = re.compile(r"^(ssh-|ecdsa-|sk-)")


def _deny_agent(line: str) -> str:
    """``line`` with the ``no-agent-forwarding`` option added (sshd's syntax)."""
    line = line.strip()
    if not line or line.startswith("#"):
        return line
    if _KEY_TYPE_RE.match(line):
        return f"no-agent-forwarding {line}"
    return f"no-agent-forwarding,{line}"  # joins the options field already there


def _import_lines(lines: list[str], username: str) -> asyncssh.SSHAuthorizedKeys | None:
    """Parse the lines once; only when that fails, find and drop the bad ones
    (one bad line must not lock the person out of their other keys)."""
    wanted = [ln.strip() for ln in lines]
    wanted = [ln for ln in wanted if ln and not ln.startswith("#")]
    if not wanted:
        return None
    try:
        return asyncssh.import_authorized_keys("\n".join(wanted) + "\n")
    except (asyncssh.KeyImportError, ValueError):
        pass
    good: list[str] = []
    for line in wanted:
        try:
            asyncssh.import_authorized_keys(line)
        except (asyncssh.KeyImportError, ValueError):
            log.warning("ignoring an unparsable authorized key line for %s", username)
            continue
        good.append(line)
    return asyncssh.import_authorized_keys("\n".join(good) + "\n") if good else None
