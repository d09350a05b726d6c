"""Reading and replaying a recording (``bastion replay``)."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from bastion.errors import BastionError

if TYPE_CHECKING:
    pass

from bastion.recording.writer import _SESSION_RE, SUFFIX

log = logging.getLogger("bastion.recording")


_OPEN, _LINE, _CLOSE = "open", "line", "close"


def recording_path(directory: Path, session: str) -> Path:
    """``<directory>/<session>.cast`` for a session id (BastionError if it is not one)."""
    name = session.removesuffix(SUFFIX)
    if not _SESSION_RE.match(name):
        raise BastionError(f"{session!r} is not a session id (as in the audit's session_id)")
    return directory / f"{name}{SUFFIX}"


CastEvent = tuple[float, str, str]


def read_cast(path: Path) -> tuple[dict[str, Any], Iterator[CastEvent]]:
    """The header and the events of an asciicast v2 file; BastionError naming
    the line when it is not one. The events are read as they are iterated."""
    try:
        f = path.open(encoding="utf-8", errors="strict")
    except OSError as exc:
        raise BastionError(f"cannot read {path}: {exc.strerror}") from None
    try:
        header = json.loads(f.readline())
    except (ValueError, UnicodeDecodeError):
        f.close()
        raise BastionError(f"{path}: line 1 is not an asciicast header") from None
    if not (
        isinstance(header, dict)
        and header.get("version") == 2
        and isinstance(header.get("width"), int)
        and isinstance(header.get("height"), int)
    ):
        f.close()
        raise BastionError(f"{path}: not asciicast v2 (header without version 2, width, height)")

    def events() -> Iterator[CastEvent]:
        with f:
            for number, text in enumerate(f, 2):
                try:
                    t, code, data = json.loads(text)
                    ok = isinstance(t, int | float) and isinstance(code, str)
                    ok = ok and isinstance(data, str)
                except (ValueError, TypeError, UnicodeDecodeError):
                    ok = False
                if not ok:
                    raise BastionError(f"{path}: line {number} is not an asciicast v2 event")
                yield float(t), code, data

    return header, events()


def replay(
    path: Path,
    out: IO[bytes],
    *,
    speed: float = 1.0,
    raw: bool = False,
    idle_limit: float | None = None,
    notes: IO[str] | None = None,
) -> dict[str, Any]:
    """Write the recording's output to ``out`` with its timing (``speed``
    times faster, pauses at most ``idle_limit`` seconds), or at once with
    ``raw``. Markers go to ``notes`` (stderr by default). Returns the header."""
    header, events = read_cast(path)
    notes = notes if notes is not None else sys.stderr
    start = time.monotonic()
    clock = 0.0  # where playback is, in the recording's seconds (pauses capped)
    last = 0.0
    for t, code, data in events:
        if not raw:
            gap = max(0.0, t - last)
            clock += min(gap, idle_limit) if idle_limit is not None else gap
            wait = clock / speed - (time.monotonic() - start)
            if wait > 0:
                time.sleep(wait)
        last = t
        if code == "o":
            out.write(data.encode("utf-8"))
            out.flush()
        elif code == "m":
            notes.write(f"\r\n[bastion replay: {t:.1f}s: {data}]\r\n")
            notes.flush()
    return header
