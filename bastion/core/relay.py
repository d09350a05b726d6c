"""Moving a session's bytes between the person's channel and the upstream host.

:class:`SessionRelay` relays a session channel (shell, exec, subsystem) to a
session channel on the upstream SSH connection: PTY request, environment
(allow-listed), window changes, signals, break, EOF both ways, stderr kept
apart, exit status or exit signal passed back. Tunnels are
:mod:`bastion.core.tunnel`.

Flow control is symmetric and real: each direction pauses only its own source
(the sink's ``pause_writing`` pauses reading on the other side, and
``resume_writing`` resumes it). SSH window adjusts are only sent when data is
delivered, so a paused reader stops the peer; nothing here buffers without
bound. Data is passed through as ``bytes`` objects without being inspected.

The relay knows nothing about Consul, Vault or routing: it is handed an
``open_upstream`` coroutine and reports through :class:`RelayStats`.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import asyncssh
from asyncssh import EXTENDED_DATA_STDERR

from bastion.core.refusal import end_session
from bastion.core.sshd_compat import wire_bytes
from bastion.errors import BastionError, UpstreamLost, UpstreamRefused

log = logging.getLogger("bastion.relay")

# pending client data held while the upstream channel is being opened
_EARLY_DATA_LIMIT = 256 * 1024


@dataclass(eq=False)
class RelayStats:
    """Counters one relay fills in; read by the server for the audit record."""

    kind: str
    bytes_up: int = 0  # person → host
    bytes_down: int = 0  # host → person
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    exit_status: int | None = None
    exit_signal: str | None = None
    error: BastionError | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    # time.monotonic() of the last byte either way (bastion sessions' idle time)
    last_activity: float = field(default_factory=time.monotonic)
    # ends the channel with an error (a timeout, a revocation): set by its relay
    end: Callable[[BastionError], None] | None = field(default=None, repr=False)

    @property
    def duration(self) -> float:
        return (self.ended or time.monotonic()) - self.started


class SessionTap(Protocol):
    """Sees one session's traffic, e.g. to record it (bastion.recording).

    Called on the event loop from the relay's callbacks: it must not block
    and must not raise (a tap that fails stops tapping, the session goes on).
    """

    def started(
        self, *, term: tuple[str, int, int] | None, command: bytes | None, subsystem: bytes | None
    ) -> None:
        """The upstream session is open; ``term`` is (type, columns, rows) for a PTY."""

    def output(self, data: bytes) -> None:
        """Bytes from the host to the person (stdout and stderr)."""

    def input(self, data: bytes) -> None:
        """Bytes from the person to the host."""

    def resized(self, columns: int, rows: int) -> None:
        """The person's terminal changed size."""

    def ended(self) -> None:
        """The session is over."""


def filter_env(env: Mapping[bytes, bytes], allow: Sequence[str]) -> dict[bytes, bytes]:
    """Only variables whose name matches an allow-list pattern (``LANG``,
    ``LC_*``, as sshd's ``AcceptEnv``) go upstream; values pass as sent, bytes."""
    return {
        k: v
        for k, v in env.items()
        if b"\0" not in k
        and b"\0" not in v
        and any(fnmatch.fnmatchcase(k.decode("utf-8", "surrogateescape"), p) for p in allow)
    }


OpenUpstream = Callable[[], Awaitable[asyncssh.SSHClientConnection]]
# after a connection refused the channel: another connection to try, or None
ReopenUpstream = Callable[
    [asyncssh.SSHClientConnection], Awaitable[asyncssh.SSHClientConnection | None]
]


class SessionRelay(asyncssh.SSHServerSession[bytes]):
    """The person's session channel, relayed to an upstream session channel."""

    def __init__(
        self,
        open_upstream: OpenUpstream,
        env_allow: Sequence[str],
        stats: RelayStats,
        on_end: Callable[[RelayStats], None],
        *,
        reopen_upstream: ReopenUpstream | None = None,
        on_refused: Callable[[str, str], None] | None = None,
        make_tap: Callable[[], SessionTap | None] | None = None,
        on_started: Callable[[bytes | None, bytes | None, str | None], None] | None = None,
    ) -> None:
        self._open_upstream = open_upstream
        self._on_started = on_started
        self._make_tap = make_tap
        self._tap: SessionTap | None = None
        self._on_refused = on_refused
        self._reopen_upstream = reopen_upstream
        self._env_allow = env_allow
        self.stats = stats
        stats.end = self.end
        self._on_end = on_end
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._up: asyncssh.SSHClientChannel[bytes] | None = None
        # the upstream session whose end ends this relay (not a refused attempt)
        self._up_session: _UpstreamSession | None = None
        self._pty: tuple[str, tuple[int, int, int, int], Mapping[int, int]] | None = None
        self._early: list[bytes] = []
        self._early_len = 0
        self._early_eof = False
        self._front_paused = False
        self._closed = False
        self._ended = False
        self._task: asyncio.Task[None] | None = None

    # -- front (person) side -------------------------------------------------

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan

    def pty_requested(
        self, term_type: str, term_size: tuple[int, int, int, int], term_modes: Mapping[int, int]
    ) -> bool:
        if "\0" in term_type:  # see sshd_compat: never passed upstream
            self.request_refused("pty-req", "the terminal type holds a NUL byte")
            return False
        self._pty = (term_type, term_size, term_modes)
        return True

    def shell_requested(self) -> bool:
        self.stats.detail["request"] = "shell"
        return True

    def exec_requested(self, command: str) -> bool:
        self.stats.detail["request"] = "exec"
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        # the name itself (bytes, bounded) is in the session-start record
        self.stats.detail["request"] = "subsystem"
        return True

    def notice(self, text: str) -> None:
        """One line for the person, on the session's stderr (their terminal)."""
        chan = self._chan
        if chan is not None and not self._closed and not chan.is_closing():
            chan.write_stderr(f"\r\nbastion: {text}\r\n".encode())

    def end(self, exc: BastionError) -> None:
        """End the session with ``exc`` (a ChannelTimeout, a revocation): its
        line on the person's terminal, exit status 255; the channel's record
        names its reason."""
        self.stats.error = self.stats.error or exc
        chan = self._chan
        if chan is not None and not self._closed:
            end_session(chan, exc, fresh_line=self._pty is not None)

    def request_refused(self, request: str, why: str) -> None:
        """The channel refused ``request`` (X11, agent forwarding): audit it."""
        if self._on_refused is not None:
            self._on_refused(request, why)

    def session_started(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._start_upstream())

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        up = self._up
        if up is not None:
            # the host may already have closed the channel (a command that
            # never read its input has exited) while the person still sends:
            # drop, as a pipe without a reader would. Writing would raise and
            # asyncssh would tear down the person's whole connection before
            # the exit status got out.
            if not up.is_closing():
                self.stats.bytes_up += len(data)
                self.stats.last_activity = time.monotonic()
                if self._tap is not None:
                    self._tapped("input", data)
                up.write(data)
            return
        self.stats.bytes_up += len(data)
        # asyncssh resumes reading right after session_started(): hold what
        # arrives until the upstream channel exists, then stop reading
        self._early.append(data)
        self._early_len += len(data)
        if (
            self._early_len >= _EARLY_DATA_LIMIT
            and self._chan is not None
            and not self._front_paused
        ):
            self._front_paused = True
            self._chan.pause_reading()

    def eof_received(self) -> bool:
        if self._up is not None:
            if not self._up.is_closing():  # as data_received: never raise here
                self._up.write_eof()
        else:
            self._early_eof = True
        # keep our send side open: output and the exit status still follow
        return True

    def pause_writing(self) -> None:
        if self._up is not None:
            self._up.pause_reading()

    def resume_writing(self) -> None:
        if self._up is not None:
            self._up.resume_reading()

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        if self._tap is not None:
            self._tapped("resized", width, height)
        if self._up is not None:
            self._up.change_terminal_size(width, height, pixwidth, pixheight)
        elif self._pty is not None:
            self._pty = (self._pty[0], (width, height, pixwidth, pixheight), self._pty[2])

    def signal_received(self, signal: str) -> None:
        if self._up is not None:
            self._up.send_signal(signal)

    def break_received(self, msec: int) -> bool:
        if self._up is not None:
            self._up.send_break(msec)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._up is not None:
            self._up.close()
        self._finish()

    # -- upstream side -------------------------------------------------------

    async def _start_upstream(self) -> None:
        chan = self._chan
        assert chan is not None
        try:
            conn = await self._open_upstream()
            env = filter_env(chan.get_environment_bytes(), self._env_allow)
            kwargs: dict[str, Any] = {"env": env, "encoding": None}
            if self._pty is not None:
                term_type, term_size, term_modes = self._pty
                kwargs.update(
                    request_pty="force",
                    term_type=term_type,
                    term_size=term_size,
                    term_modes=term_modes,
                )
            else:
                kwargs["request_pty"] = False
            # the bytes the client sent (see sshd_compat.TransparentServerChannel)
            subsystem = chan.get_subsystem()
            command: bytes | None = None
            if subsystem is not None:
                kwargs["subsystem"] = wire_bytes(subsystem)
            elif (text := chan.get_command()) is not None:
                command = wire_bytes(text)
            retry = self._reopen_upstream
            while True:
                try:
                    up, opened = await conn.create_session(
                        lambda: _UpstreamSession(self), cast(str | None, command), **kwargs
                    )
                    session = cast(_UpstreamSession, opened)
                    break
                except asyncssh.ChannelOpenError as exc:
                    # refused before anything ran: safe to try once more elsewhere
                    other = await retry(conn) if retry is not None else None
                    if other is None:
                        raise UpstreamRefused(
                            f"the host refused the session: {exc.reason}"
                        ) from None
                    conn, retry = other, None
        except asyncio.CancelledError:
            raise
        except BastionError as exc:
            self._fail(exc)
            return
        except Exception as exc:  # the one place a relay start can fail unexpectedly
            log.exception("relay start failed")
            self._fail(
                BastionError(
                    "internal error while starting the session",
                    detail=f"{type(exc).__name__}: {exc}",
                )
            )
            return
        if self._closed:
            up.close()
            return
        self._up = up
        self._up_session = session
        if self._pty is not None and self._pty[1] != kwargs.get("term_size"):
            # the person resized while the upstream session was being opened
            up.change_terminal_size(*self._pty[1])
        if self._on_started is not None:
            self._on_started(
                command, kwargs.get("subsystem"), self._pty[0] if self._pty is not None else None
            )
        if self._make_tap is not None:
            self._start_tap(command, kwargs.get("subsystem"))
        for data in self._early:
            if self._tap is not None:
                self._tapped("input", data)
            up.write(data)
        self._early.clear()
        if self._early_eof:
            up.write_eof()
        if self._front_paused:
            self._front_paused = False
            chan.resume_reading()
        if session.lost is not None:  # a command that ended before we got here
            self._upstream_closed(session.lost[0])

    def _start_tap(self, command: bytes | None, subsystem: bytes | None) -> None:
        assert self._make_tap is not None
        try:
            self._tap = self._make_tap()
            if self._tap is not None:
                term = None
                if self._pty is not None:
                    term = (self._pty[0], self._pty[1][0], self._pty[1][1])
                self._tap.started(term=term, command=command, subsystem=subsystem)
        except Exception:  # a recording must never break the session it records
            log.exception("session tap failed to start; the session goes on untapped")
            self._tap = None

    def _tapped(self, what: str, *args: Any) -> None:
        tap = self._tap
        if tap is None:
            return
        try:
            getattr(tap, what)(*args)
        except Exception:
            log.exception("session tap failed; the session goes on untapped")
            self._tap = None

    def _fail(self, exc: BastionError) -> None:
        self.stats.error = exc
        chan = self._chan
        if chan is not None and not self._closed:
            end_session(chan, exc)

    def _upstream_data(self, data: bytes, datatype: asyncssh.DataType) -> None:
        assert self._chan is not None
        # the person may have closed the channel already: writing would raise
        # and tear down the upstream connection, which other channels share
        if self._closed or self._chan.is_closing():
            return
        self.stats.bytes_down += len(data)
        self.stats.last_activity = time.monotonic()
        if self._tap is not None:
            self._tapped("output", data)
        if datatype == EXTENDED_DATA_STDERR:
            self._chan.write_stderr(data)
        else:
            self._chan.write(data)

    def _upstream_eof(self) -> None:
        if self._chan is not None and not self._closed:
            self._chan.write_eof()

    def _upstream_pause(self, pause: bool) -> None:
        if self._chan is None or self._closed:
            return
        if pause:
            self._chan.pause_reading()
        else:
            self._chan.resume_reading()

    def _upstream_closed(self, exc: Exception | None) -> None:
        chan = self._chan
        if chan is None or self._closed:
            self._finish()
            return
        sig = self.stats.detail.get("signal")
        if isinstance(sig, tuple):
            chan.exit_with_signal(*sig)
        elif self.stats.exit_status is not None:
            chan.exit(self.stats.exit_status)
        elif exc is not None:
            self._fail(UpstreamLost(f"connection to the host was lost: {exc}"))
        else:
            chan.close()
        self._finish()

    def _finish(self) -> None:
        if not self._ended:
            self._ended = True
            self.stats.ended = time.monotonic()
            if self._tap is not None:
                self._tapped("ended")
            self._on_end(self.stats)


class _UpstreamSession(asyncssh.SSHClientSession[bytes]):
    """The upstream half of a SessionRelay: every callback goes to the front."""

    def __init__(self, relay: SessionRelay) -> None:
        self._relay = relay
        #: set when the channel has closed: (the exception or None,)
        self.lost: tuple[Exception | None] | None = None

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._relay._upstream_data(data, datatype)

    def eof_received(self) -> bool:
        self._relay._upstream_eof()
        return True

    def pause_writing(self) -> None:
        self._relay._upstream_pause(True)

    def resume_writing(self) -> None:
        self._relay._upstream_pause(False)

    def exit_status_received(self, status: int) -> None:
        self._relay.stats.exit_status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self._relay.stats.exit_signal = signal
        self._relay.stats.detail["signal"] = (signal, core_dumped, msg, lang)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = (exc,)
        # a channel whose request the host refused closes too; the relay's
        # start-up handles that refusal, so only the adopted channel ends it
        if self._relay._up_session is self:
            self._relay._upstream_closed(exc)
