"""The one place where an error becomes what the person sees.

Three shapes, each the way OpenSSH users expect it:

* a session that cannot be served: one stderr line ``bastion: <reason>`` and
  exit status 255 (what ``ssh`` itself exits with when it cannot connect);
* a refusal before a session (directory down, MaxAuthTries, the
  unauthenticated bound): an SSH disconnect, which OpenSSH prints at every
  LogLevel but QUIET ("Received disconnect from ...: bastion: <reason>");
* a refused channel: the SSH channel-open failure code the error class
  carries (RFC 4254 section 5.1) and its message, which OpenSSH prints as
  "open failed: administratively prohibited: <reason>".

Every message is the error's ``user_message``: one line, no secrets.
"""

from __future__ import annotations

import contextlib

import asyncssh

from bastion.errors import BastionError


def stderr_line(exc: BastionError) -> bytes:
    return f"bastion: {exc.user_message}\r\n".encode()


def end_session(
    chan: asyncssh.SSHServerChannel[bytes], exc: BastionError, *, fresh_line: bool = False
) -> None:
    """End a session channel with ``exc``: its line on stderr, exit status 255
    (``fresh_line``: on a line of its own on a terminal, after a prompt)."""
    if not chan.is_closing():  # not after EOF: writing would raise
        chan.write_stderr((b"\r\n" if fresh_line else b"") + stderr_line(exc))
    chan.exit(255)


def disconnect(
    conn: asyncssh.SSHServerConnection, exc: BastionError, code: int = asyncssh.DISC_BY_APPLICATION
) -> None:
    """End the whole connection with ``exc``'s message (sshd's own words, as
    "Too many authentication failures", go as they are)."""
    text = exc.user_message if exc.verbatim else f"bastion: {exc.user_message}"
    with contextlib.suppress(Exception):  # the peer may be gone already
        conn.disconnect(code, text)


def auth_banner(conn: asyncssh.SSHServerConnection, exc: BastionError) -> None:
    """Say why an authentication attempt failed, before its failure is sent
    (a wrong second-factor code): an SSH_MSG_USERAUTH_BANNER (RFC 4252
    section 5.4), which OpenSSH prints at LogLevel INFO (its default) and
    above, before it asks again."""
    with contextlib.suppress(Exception):  # the peer may be gone already
        conn.send_auth_banner(f"bastion: {exc.user_message}\r\n")


def open_error(exc: BastionError) -> asyncssh.ChannelOpenError:
    """The channel-open failure a person's client sees for ``exc``."""
    return asyncssh.ChannelOpenError(exc.open_code, exc.user_message)
