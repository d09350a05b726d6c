"""Audit records: one JSON object per line on the ``bastion.audit`` logger.

The audit log subscribes to the lifecycle events (:mod:`bastion.events`):
one record per channel when it ends (``session``, ``tunnel``, ``forward``,
``remote-forward``), one per refused channel or request (the same kinds,
``x11-req``, ``auth-agent-req``, ``tun``; ``outcome`` ``refused``), and one
``connection`` record when a connection ends. Fields: ``event``, ``conn``,
``user``, ``source``, ``route``, ``upstream``, ``outcome``, ``reason``,
``message``, ``bytes_up``, ``bytes_down``, ``duration_ms``, plus channel
details (exit status or signal, request kind, ``upstream_login``) and
connection details (``channels``, ``auth_failures``, ``closed_by``).
Credentials and tokens are never in an event, so they cannot leak.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from typing import Any

from bastion.events import ChannelEnded, ChannelRefused, ConnectionClosed, Event

audit_log = logging.getLogger("bastion.audit")


class AuditLog:
    """Writes audit records; ``file`` "-" means stderr."""

    def __init__(self, file: str = "-") -> None:
        audit_log.setLevel(logging.INFO)
        audit_log.propagate = False
        if not audit_log.handlers:
            handler: logging.Handler
            if file == "-":
                handler = logging.StreamHandler(sys.stderr)
            else:
                handler = logging.FileHandler(file, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(message)s"))
            audit_log.addHandler(handler)

    def handle(self, event: Event) -> None:
        """The events subscriber: the records described in the module docstring."""
        if isinstance(event, ChannelEnded):
            fields = dataclasses.asdict(event)
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
            fields = dataclasses.asdict(event)
            del fields["authenticated"]  # the outcome says it
            fields["auth_failures"] = event.auth_failures or None
            self.record("connection", **fields)

    def record(self, event: str, **fields: Any) -> None:
        entry: dict[str, Any] = {"ts": round(time.time(), 3), "event": event}
        entry.update({k: v for k, v in fields.items() if v is not None})
        audit_log.info(json.dumps(entry, sort_keys=False, default=str))

    def close(self) -> None:
        for handler in list(audit_log.handlers):
            handler.close()
            audit_log.removeHandler(handler)
