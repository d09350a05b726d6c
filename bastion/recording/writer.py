"""The recordings' writer thread: files, caps and oldest-first removal
(see :mod:`bastion.recording`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    pass

log = logging.getLogger("bastion.recording")

SUFFIX = ".cast"
# session ids are "<connection id>-<n>" (core/channels); nothing that could
# leave the directory is ever a file name
_SESSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\Z")
# encoded events waiting for the writer thread, all sessions together
MAX_BACKLOG = 32 * 1024 * 1024
# the command in an exec recording's header, at most (characters)
MAX_COMMAND_CHARS = 1000
DEFAULT_SIZE = (80, 24)

_OPEN, _LINE, _CLOSE = "open", "line", "close"


def _line(t: float, code: str, data: str) -> bytes:
    """One asciicast v2 event line."""
    return f"[{t:.6f}, {json.dumps(code)}, {json.dumps(data, ensure_ascii=False)}]\n".encode()


def _fitting(t: float, code: str, text: str, room: int) -> bytes | None:
    """The longest event line of a prefix of ``text`` within ``room`` bytes, if any."""
    keep = len(text)
    while keep > 0:
        line = _line(t, code, text[:keep])
        if len(line) <= room:
            return line
        keep = min(keep - 1, keep * max(room - 32, 0) // len(line))
    return None


class _Recording:
    """One session's file. ``file``, ``written`` belong to the writer thread;
    ``failed`` is set there and read by the tap (a plain flag)."""

    __slots__ = ("closed", "failed", "file", "name", "path", "started", "written")

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.file: IO[bytes] | None = None
        self.written = 0
        self.failed = False
        self.closed = False  # the session has ended (its close event was handled)
        self.started = time.monotonic()


class _Writer:
    """The one thread that touches recording files."""

    def __init__(self, directory: Path, max_total: int, count: Callable[[str], None]) -> None:
        self._dir = directory
        self._max_total = max_total
        self._count = count
        self._queue: queue.SimpleQueue[tuple[_Recording, str, bytes] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._backlog = 0
        # finished recordings, oldest first, and their sizes
        self._finished: dict[Path, int] = {}
        self._live: set[_Recording] = set()
        self._total = 0
        self._thread = threading.Thread(target=self._run, name="bastion-recording", daemon=True)

    # -- the event loop's side -------------------------------------------

    def prepare(self) -> None:
        """Create the directory (0700) and take stock of what is in it."""
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = self._dir.stat()
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(20, "not a directory")
            if st.st_mode & 0o077:
                log.warning(
                    "recordings directory %s is mode %o: others can list it (chmod 700)",
                    self._dir,
                    stat.S_IMODE(st.st_mode),
                )
            found = []
            for entry in os.scandir(self._dir):
                if entry.name.endswith(SUFFIX) and entry.is_file(follow_symlinks=False):
                    info = entry.stat(follow_symlinks=False)
                    found.append((info.st_mtime, Path(entry.path), info.st_size))
        except OSError as exc:
            self._count("error-dir")
            log.error(
                "recordings directory %s is unusable (%s): sessions that should be "
                "recorded are relayed unrecorded",
                self._dir,
                exc.strerror or exc,
            )
            return
        for _, path, size in sorted(found):
            self._finished[path] = size
            self._total += size
        self._make_room(0)

    def start(self) -> None:
        self._thread.start()

    def submit(self, rec: _Recording, kind: str, data: bytes, *, force: bool = False) -> bool:
        """Queue ``data`` for ``rec``; False (nothing queued) when the writer is
        more than MAX_BACKLOG behind, unless ``force`` (small closing lines)."""
        with self._lock:
            if not force and self._backlog + len(data) > MAX_BACKLOG:
                return False
            self._backlog += len(data)
        self._queue.put((rec, kind, data))
        return True

    def stop(self, timeout: float) -> None:
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the writer thread -----------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                while len(batch) < 256:
                    batch.append(self._queue.get_nowait())
            dirty: set[_Recording] = set()
            for item in batch:
                if item is None:
                    stopping = True
                    continue
                rec, kind, data = item
                with self._lock:
                    self._backlog -= len(data)
                try:
                    self._handle(rec, kind, data, dirty)
                except Exception:  # never let the writer die: that recording ends
                    log.exception("recording %s failed", rec.name)
                    self._fail(rec, "error-write", "internal error")
            for rec in dirty:
                if rec.file is not None:
                    try:
                        rec.file.flush()
                    except OSError as exc:
                        self._fail(rec, "error-write", exc.strerror or str(exc))
        for rec in list(self._live):
            self._finish(rec)

    def _handle(self, rec: _Recording, kind: str, data: bytes, dirty: set[_Recording]) -> None:
        if kind == _OPEN:
            self._open(rec)
        if data:
            self._write(rec, data)
            dirty.add(rec)
        if kind == _CLOSE:
            rec.closed = True
            self._finish(rec)
            dirty.discard(rec)

    def _open(self, rec: _Recording) -> None:
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(rec.path, flags, 0o600)
            try:
                os.fchmod(fd, 0o600)  # whatever the umask
                rec.file = os.fdopen(fd, "wb", buffering=64 * 1024)
            except BaseException:
                os.close(fd)
                raise
        except OSError as exc:
            rec.failed = True
            self._count("error-open")
            log.error(
                "cannot record session %s: %s: %s; the session goes on unrecorded",
                rec.name,
                rec.path,
                exc.strerror or exc,
            )
            return
        self._live.add(rec)
        self._count("recorded")

    def _write(self, rec: _Recording, data: bytes) -> None:
        if rec.file is None or rec.failed:
            return
        if self._total + len(data) > self._max_total:
            self._make_room(len(data))
            if self._total + len(data) > self._max_total:
                # a last marker line (a little over the cap), then this file stops
                marker = _line(
                    time.monotonic() - rec.started, "m", "recording stopped: max_total_bytes"
                )
                with contextlib.suppress(OSError):
                    assert rec.file is not None
                    rec.file.write(marker)
                    rec.written += len(marker)
                    self._total += len(marker)
                self._fail(
                    rec,
                    "error-total-cap",
                    f"max_total_bytes ({self._max_total}) is filled by live recordings",
                )
                return
        try:
            rec.file.write(data)
        except OSError as exc:
            self._fail(rec, "error-write", exc.strerror or str(exc))
            return
        rec.written += len(data)
        self._total += len(data)

    def _make_room(self, needed: int) -> None:
        """Remove the oldest finished recordings until ``needed`` more bytes fit."""
        while self._finished and self._total + needed > self._max_total:
            path = next(iter(self._finished))
            size = self._finished.pop(path)
            self._total -= size
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("cannot remove old recording %s: %s", path, exc.strerror or exc)
                continue
            self._count("removed")
            log.info("removed recording %s (%d bytes): max_total_bytes", path.name, size)

    def _fail(self, rec: _Recording, what: str, why: str) -> None:
        if rec.failed:
            return
        rec.failed = True
        self._count(what)
        log.error(
            "recording of session %s stopped: %s: %s; the session goes on unrecorded",
            rec.name,
            rec.path,
            why,
        )
        self._finish(rec)

    def _finish(self, rec: _Recording) -> None:
        f, rec.file = rec.file, None
        if f is None:
            if rec.closed and rec.failed and rec.path not in self._finished and rec.written:
                # stopped early, its session now over: removable from here on
                self._finished[rec.path] = rec.written
            return
        self._live.discard(rec)
        try:
            f.close()
        except OSError as exc:
            if not rec.failed:
                rec.failed = True
                self._count("error-write")
                log.error(
                    "recording of session %s: %s: %s", rec.name, rec.path, exc.strerror or exc
                )
        if rec.closed:  # a file whose session still runs is never removed for room
            self._finished[rec.path] = rec.written
        log.info("recording of session %s finished: %s (%d bytes)", rec.name, rec.path, rec.written)
