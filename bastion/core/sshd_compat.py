"""Where asyncssh's server side must behave as sshd does for OpenSSH clients.

asyncssh is a general SSH library; a bastion in front of OpenSSH hosts must
answer every request an OpenSSH client can send the way sshd would (see
docs/channels.md for the whole table). Four places need more than asyncssh's
public callbacks, each kept here, small, and covered by end-to-end tests
(``tests/test_field_faults.py``) that fail if an asyncssh upgrade changes them:

* **SSH strings are bytes** (RFC 4254 section 6.5: the exec command and the
  subsystem name are ``string``, not UTF-8). asyncssh refuses an exec
  request whose command is not UTF-8 and a subsystem name that is not ASCII;
  :class:`TransparentServerChannel` decodes them with ``surrogateescape``, so
  :func:`wire_bytes` gives back exactly the bytes the client sent.
* **Refused requests are audited**: X11 forwarding (``x11-req``) and agent
  forwarding (``auth-agent-req@openssh.com``) refusals reach the session's
  ``request_refused`` callback.
* **MaxAuthTries** (sshd_config(5)): :func:`count_auth_failures` sees every
  failed authentication request, so the connection can be closed with
  sshd's "Too many authentication failures" once the limit is reached. As in
  sshd, the client's first ``none`` probe is not counted.
* **no-more-sessions@openssh.com** (OpenSSH PROTOCOL, section 2.2): after
  it, sshd refuses further session channels by disconnecting;
  :func:`handle_no_more_sessions` lets the connection do the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol, cast

import asyncssh


def wire_bytes(text: str) -> bytes:
    """The bytes a client sent for a string :class:`TransparentServerChannel`
    decoded (UTF-8, with any other byte kept as a lone surrogate)."""
    return text.encode("utf-8", "surrogateescape")


class RefusalListener(Protocol):
    """What a session offers to hear of requests its channel refused."""

    def request_refused(self, request: str, why: str) -> None: ...


class TransparentServerChannel(asyncssh.SSHServerChannel[bytes]):
    """A session channel that keeps the command and subsystem bytes as sent
    and reports the requests it refuses. Made with :func:`transparent_channel`.
    """

    def _process_exec_request(self, packet: Any) -> bool:
        command = packet.get_string()
        packet.check_end()
        if b"\0" in command:
            return self._nul("exec")
        return bool(self._start_session(command=command.decode("utf-8", "surrogateescape")))

    def _process_subsystem_request(self, packet: Any) -> bool:
        subsystem = packet.get_string()
        packet.check_end()
        if b"\0" in subsystem:
            return self._nul("subsystem")
        return bool(self._start_session(subsystem=subsystem.decode("utf-8", "surrogateescape")))

    def _nul(self, request: str) -> bool:
        # sshd reads these strings as C strings and ends the connection on a
        # NUL (sshpkt_get_cstring); passed upstream, one would take down the
        # host's connection, which other sessions may share
        self._refused(request, f"the {request} request holds a NUL byte")
        return False

    def _process_x11_req_request(self, packet: Any) -> bool:
        # sshd with X11Forwarding no refuses the same way; the client prints
        # "X11 forwarding request failed on channel N"
        packet.get_boolean()
        packet.get_string()
        packet.get_string()
        packet.get_uint32()
        packet.check_end()
        self._refused("x11-req", "X11 forwarding is not carried by the bastion")
        return False

    async def _finish_agent_req_request(self) -> None:
        if await self._conn.create_agent_listener():
            self._report_response(True)
        else:
            self._refused("auth-agent-req", "agent forwarding is not allowed by policy")
            self._report_response(False)

    def _refused(self, request: str, why: str) -> None:
        session = cast(Any, self._session)
        if hasattr(session, "request_refused"):
            cast(RefusalListener, session).request_refused(request, why)


def transparent_channel(conn: asyncssh.SSHServerConnection) -> TransparentServerChannel:
    """A new session channel on ``conn`` (binary data, the listener's window)."""
    chan = conn.create_server_channel(encoding=None)
    # asyncssh builds the channel from the connection's private settings; the
    # subclass only adds request handlers, so adopting the instance is safe
    chan.__class__ = TransparentServerChannel
    return cast(TransparentServerChannel, chan)


def count_auth_failures(
    conn: asyncssh.SSHServerConnection, on_failure: Callable[[bool], bool]
) -> None:
    """Call ``on_failure(counted)`` before each USERAUTH_FAILURE ``conn`` sends;
    the failure is sent only if it returns True (False: the callback closed
    the connection instead). ``counted`` is False for the first request that
    no auth method handles (the client's ``none`` probe), as in sshd's
    ``userauth_finish``.
    """
    send_failure = conn.send_userauth_failure
    first_probe = [True]

    def send_userauth_failure(partial_success: bool) -> None:
        # a method handler sends its own failure while it is conn.auth; the
        # lookup of an unsupported method (`none` included) fails with none set
        counted = True
        if getattr(conn, "auth", None) is None and first_probe[0]:
            counted = False
        first_probe[0] = False
        if on_failure(counted):
            send_failure(partial_success)

    conn.send_userauth_failure = send_userauth_failure  # type: ignore[method-assign]


def handle_no_more_sessions(
    conn: asyncssh.SSHServerConnection, on_request: Callable[[], None]
) -> None:
    """Call ``on_request()`` when the client sends ``no-more-sessions@openssh.com``."""

    def handler(packet: Any) -> None:
        packet.check_end()
        on_request()
        cast(Any, conn)._report_global_response(True)

    # asyncssh dispatches global requests by looking up this method name
    conn._process_no_more_sessions_at_openssh_dot_com_global_request = handler  # type: ignore[attr-defined]


# how long a turned-away connection may stay open for its client to read the
# disconnect message and close first
TURN_AWAY_LINGER = 2.0


def turn_away(conn: asyncssh.SSHServerConnection, code: int, reason: str) -> None:
    """Send a disconnect, and close only once the client has (or after
    :data:`TURN_AWAY_LINGER` seconds).

    asyncssh's ``disconnect()`` aborts the socket at once; with the client's
    version line and KEXINIT still unread, the kernel answers with a reset and
    the client may never read the message (it then prints nothing at
    LogLevel=ERROR). An OpenSSH client exits on the disconnect and closes.
    """
    cast(Any, conn)._send_disconnect(code, reason, "en-US")
    asyncio.get_running_loop().call_later(TURN_AWAY_LINGER, conn.abort)
