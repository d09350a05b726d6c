"""Audit records: one JSON object per line on the ``bastion.audit`` logger.

One record per channel (session or tunnel) when it ends, and one per refused
login or connection that never opened a channel. Fields: ``event``, ``user``,
``source``, ``route``, ``upstream``, ``outcome``, ``reason``, ``bytes_up``,
``bytes_down``, ``duration_ms``, plus channel details (exit status, request
kind). Credentials and tokens are never passed in, so they cannot leak.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

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

    def record(self, event: str, **fields: Any) -> None:
        entry: dict[str, Any] = {"ts": round(time.time(), 3), "event": event}
        entry.update({k: v for k, v in fields.items() if v is not None})
        audit_log.info(json.dumps(entry, sort_keys=False, default=str))

    def close(self) -> None:
        for handler in list(audit_log.handlers):
            handler.close()
            audit_log.removeHandler(handler)
