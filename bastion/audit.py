"""Audit records: one JSON object per line, written and flushed one by one.

The audit log subscribes to the lifecycle events (:mod:`bastion.events`);
docs/audit.md has one table per record. Every record has ``ts`` (epoch
seconds) and ``event``; ``conn`` ties the records of one connection together
and is also in the upstream certificate's key id (``bastion:<user>:<conn>``),
so the host's auth log ("Accepted certificate ID ...") names the same login;
``session_id`` (``<conn>-<n>``) names one session channel and its recording.
Credentials and tokens are never in an event, so they cannot leak.

A record that cannot be written (disk full, file removed or unwritable) is
counted (``bastion_audit_write_errors_total``) and logged at ERROR at most
once a minute; it never blocks or breaks a login or a relay. With
``[audit] syslog = true`` every record also goes, one datagram each, to the
local syslog socket (``[audit] syslog_socket``, default ``/dev/log``, which
journald reads) as ``<authpriv.info>bastion-audit: {json}`` (RFC 3164); a
socket that is missing or full loses the datagram, counted like a file error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from bastion.events import (
    AuthFailed,
    ChannelEnded,
    ChannelRefused,
    ConnectionClosed,
    DrainStarted,
    Event,
    Greeted,
    LoginAccepted,
    OperatorAction,
    PenaltyStarted,
    Reloaded,
    Revoked,
    SecondFactorChecked,
    ServerStopped,
    SessionStarted,
)

log = logging.getLogger("bastion.audit")

_ERROR_EVERY = 60.0  # seconds between ERROR lines about a failing audit file
_AUTHPRIV_INFO = 10 * 8 + 6  # syslog facility authpriv, severity info (RFC 3164)


class AuditLog:
    """Writes audit records to ``file`` ("-": stderr) and optionally syslog."""

    def __init__(
        self,
        file: str = "-",
        *,
        syslog: Path | None = None,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self._path = file
        self._on_error = on_error
        self._last_error = 0.0
        self._stream: IO[str] | None = None
        # a datagram per record to the syslog socket, RFC 3164 framing:
        # <authpriv.info>tag: message (journald and rsyslog read it)
        self._syslog_path = syslog
        self._syslog: socket.socket | None = None
        if syslog is not None:
            self._syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._syslog.setblocking(False)  # a full socket buffer drops, never waits

    def _open(self) -> IO[str]:
        if self._stream is None:
            if self._path == "-":
                self._stream = sys.stderr
            else:
                # 0600 like the recordings: the records hold every command as sent
                fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                self._stream = os.fdopen(fd, "a", encoding="utf-8")
        return self._stream

    def handle(self, event: Event) -> None:
        """The events subscriber: one record per event (docs/audit.md)."""
        fields = dataclasses.asdict(event)
        if isinstance(event, ChannelEnded):
            self.record(fields.pop("kind"), **fields)
        elif isinstance(event, ChannelRefused):
            self.record(
                event.kind,
                conn=event.conn,
                user=event.user,
                source=event.source,
                upstream=event.target or None,
                outcome="refused",
                reason=event.reason,
                message=event.message,
            )
        elif isinstance(event, ConnectionClosed):
            if not event.greeted:
                return  # a port probe (Consul's check, a scanner): counted, not audited
            del fields["authenticated"], fields["greeted"]  # the outcome says them
            fields["auth_failures"] = event.auth_failures or None
            self.record("connection", **fields)
        elif isinstance(event, Greeted):
            # written once the client has shaken hands: a port probe (Consul's
            # script check, a scanner) that never gets this far is not audited
            self.record("connect", **fields)
        elif isinstance(event, AuthFailed):
            self.record("auth-failed", **fields)
        elif isinstance(event, SecondFactorChecked):  # docs/mfa.md
            self.record("second-factor", **fields)
        elif isinstance(event, LoginAccepted):
            for key in ("seconds", "auth_seconds", "route_seconds", "sign_seconds"):
                value = fields.pop(key)
                if value is not None:
                    fields[key.replace("seconds", "ms")] = round(value * 1000, 1)
            self.record("login", **fields)
        elif isinstance(event, SessionStarted):
            self.record("session-start", **fields)
        elif isinstance(event, OperatorAction):
            self.record(fields.pop("action"), **fields)
        elif isinstance(event, Reloaded):
            self.record("reload", **fields)
        elif isinstance(event, DrainStarted):
            self.record("drain", **fields)
        elif isinstance(event, ServerStopped):
            self.record("stop", **fields)
        elif isinstance(event, PenaltyStarted):
            # once per penalty, never per refused connection (docs/audit.md)
            self.record("penalty", **fields)
        elif isinstance(event, Revoked):  # the directory withdrew access (docs/access.md)
            self.record("revoke", **fields)

    def record(self, event: str, **fields: Any) -> None:
        entry: dict[str, Any] = {"ts": round(time.time(), 3), "event": event}
        entry.update({k: v for k, v in fields.items() if v is not None})
        line = json.dumps(entry, sort_keys=False, default=str)
        try:
            stream = self._open()
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError) as exc:
            self._failed(exc)
        if self._syslog is not None:
            try:
                self._syslog.sendto(
                    f"<{_AUTHPRIV_INFO}>bastion-audit: {line}".encode(), str(self._syslog_path)
                )
            except OSError as exc:
                self._failed(exc, f"syslog {self._syslog_path}")

    def _failed(self, exc: Exception, where: str | None = None) -> None:
        if self._on_error is not None:
            self._on_error()
        # a file that failed may be reopened (deleted, or space freed)
        if where is None and self._stream is not None and self._stream is not sys.stderr:
            with contextlib.suppress(OSError):
                self._stream.close()
            self._stream = None
        now = time.monotonic()
        if now - self._last_error >= _ERROR_EVERY:
            self._last_error = now
            log.error(
                "cannot write the audit log %s: %s (records are being lost)",
                where or self._path,
                exc,
            )

    def close(self) -> None:
        if self._stream is not None and self._stream is not sys.stderr:
            self._stream.close()
        self._stream = None
        if self._syslog is not None:
            self._syslog.close()
            self._syslog = None
