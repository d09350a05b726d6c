"""Session recordings in asciicast v2, the format ``asciinema play`` and the
asciinema web player read.

:class:`Recorder` answers the front door's ``Recorder`` protocol: for each
session it decides, from the person's directory entry (``"record"`` in the
JSON form, :attr:`bastion.model.Route.record`) and ``[recording] default``,
whether to tap it. A tapped shell session (or an exec session with
``[recording] exec``; subsystems such as sftp never) becomes
``<dir>/<session id>.cast``, mode 0600 in a 0700 directory:

* a header line: ``version`` 2, ``width``, ``height``, ``timestamp`` (start,
  Unix seconds), ``title``, ``env`` {``TERM``}, ``command`` for exec
  sessions, and the bastion's own keys ``user``, ``route`` (the entry's
  targets), ``upstream`` (the host used), ``source``, ``session``
  (asciicast v2 allows extra keys);
* then one ``[time, code, data]`` line per event, ``time`` in seconds since
  the start: ``"o"`` what the host sent (stdout and stderr), ``"i"`` what the
  person typed (with ``[recording] input``), ``"r"`` a resize
  (``"COLSxROWS"``), ``"m"`` a marker: the recording stopped early and why.

Bytes become UTF-8 text through one incremental decoder per direction and
session (a character split across two packets survives; invalid bytes become
U+FFFD). ``max_session_bytes`` bounds each file: the event that would cross it
is replaced by a marker and the session is relayed on, unrecorded.
``max_total_bytes`` bounds the directory: the oldest finished recordings are
removed first; a live one is never removed (if the live ones alone fill it,
the one that needs room stops, with a marker).

The relay never waits for the disk: taps encode events on the event loop and
hand them to one writer thread, which writes, flushes after each batch
(so after each event unless it falls behind), enforces the total cap and
closes files. An unwritable directory, a full disk or a writer that falls
more than ``MAX_BACKLOG`` bytes behind is logged at ERROR, counted
(``bastion_recording_events_total{what="error-..."}``) and ends that
recording; the session itself goes on. Tap methods never raise.

:func:`replay` plays a recording back (``bastion replay``).
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import os
import queue
import re
import stat
import sys
import threading
import time
from collections import Counter as CountOf
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from bastion.config import RecordingSettings
from bastion.errors import BastionError
from bastion.model import UpstreamPlan

if TYPE_CHECKING:
    from bastion.core.relay import SessionTap

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

    __slots__ = ("failed", "file", "name", "path", "written")

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.file: IO[bytes] | None = None
        self.written = 0
        self.failed = False


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
        self._finished[rec.path] = rec.written
        log.info("recording of session %s finished: %s (%d bytes)", rec.name, rec.path, rec.written)


class _CastTap:
    """One session's :class:`~bastion.core.relay.SessionTap`: events to asciicast lines."""

    def __init__(
        self, recorder: Recorder, plan: UpstreamPlan, session_id: str, source: str
    ) -> None:
        self._recorder = recorder
        self._settings = recorder.settings
        self._plan = plan
        self._session = session_id
        self._source = source
        self._rec: _Recording | None = None
        self._done = True  # until started() decides to record
        self._t0 = 0.0
        self._last = 0.0
        self._size = 0
        self._out = codecs.getincrementaldecoder("utf-8")("replace")
        self._in = codecs.getincrementaldecoder("utf-8")("replace")

    # -- SessionTap ------------------------------------------------------

    def started(
        self, *, term: tuple[str, int, int] | None, command: bytes | None, subsystem: bytes | None
    ) -> None:
        try:
            if subsystem is not None or (command is not None and not self._settings.exec):
                return
            self._begin(term, command)
        except Exception:
            self._broken()

    def output(self, data: bytes) -> None:
        if not self._done:
            try:
                self._event("o", self._out.decode(data))
            except Exception:
                self._broken()

    def input(self, data: bytes) -> None:
        if not self._done and self._settings.input:
            try:
                self._event("i", self._in.decode(data))
            except Exception:
                self._broken()

    def resized(self, columns: int, rows: int) -> None:
        if not self._done:
            try:
                self._event("r", f"{columns}x{rows}")
            except Exception:
                self._broken()

    def ended(self) -> None:
        if self._done:
            return
        try:
            self._event("o", self._out.decode(b"", final=True))
            if self._settings.input:
                self._event("i", self._in.decode(b"", final=True))
            if not self._done and self._rec is not None:
                self._done = True
                self._recorder.writer.submit(self._rec, _CLOSE, b"", force=True)
        except Exception:
            self._broken()

    # -- inside ----------------------------------------------------------

    def _begin(self, term: tuple[str, int, int] | None, command: bytes | None) -> None:
        plan = self._plan
        width, height = (term[1], term[2]) if term is not None else DEFAULT_SIZE
        header: dict[str, Any] = {
            "version": 2,
            "width": width or DEFAULT_SIZE[0],
            "height": height or DEFAULT_SIZE[1],
            "timestamp": int(time.time()),
            "title": f"{plan.user} on {plan.destination.node or plan.destination.host}, "
            f"session {self._session}",
            "env": {"TERM": term[0]} if term is not None else {},
        }
        if command is not None:
            text = command.decode("utf-8", "replace")
            if len(text) > MAX_COMMAND_CHARS:
                text = text[:MAX_COMMAND_CHARS] + "..."
            header["command"] = text
        header.update(
            user=plan.user,
            route=", ".join(str(t) for t in plan.route.targets),
            upstream=plan.destination.label,
            source=self._source,
            session=self._session,
        )
        line = (json.dumps(header, ensure_ascii=False) + "\n").encode()
        rec = _Recording(self._session, self._recorder.path_for(self._session))
        self._t0 = time.monotonic()
        self._rec = rec
        self._done = False
        self._size = len(line)
        self._recorder.writer.submit(rec, _OPEN, line, force=True)

    def _event(self, code: str, text: str) -> None:
        rec = self._rec
        if not text or rec is None or self._done:
            return
        if rec.failed:  # the writer gave up on it (and said why)
            self._done = True
            return
        t = max(self._last, time.monotonic() - self._t0)
        self._last = t
        line = _line(t, code, text)
        cap = self._settings.max_session_bytes
        room = cap - self._size - self._recorder.marker_room
        if len(line) > room:
            # what fits of this event, then the marker
            part = _fitting(t, code, text, room) if code in ("o", "i") else None
            if part is not None and self._recorder.writer.submit(rec, _LINE, part):
                self._size += len(part)
            self._stop(t, f"recording stopped: max_session_bytes ({cap}) reached", "capped")
            log.warning(
                "recording of session %s stopped at max_session_bytes (%d); "
                "the session goes on unrecorded",
                self._session,
                cap,
            )
            return
        if not self._recorder.writer.submit(rec, _LINE, line):
            self._stop(t, "recording stopped: the disk is too slow", "error-backlog")
            log.error(
                "recording of session %s stopped: more than %d bytes waiting for the disk; "
                "the session goes on unrecorded",
                self._session,
                MAX_BACKLOG,
            )
            return
        self._size += len(line)

    def _stop(self, t: float, why: str, what: str) -> None:
        assert self._rec is not None
        self._done = True
        self._recorder.count(what)
        self._recorder.writer.submit(self._rec, _CLOSE, _line(t, "m", why), force=True)

    def _broken(self) -> None:
        """A bug here must not reach the relay: log it once, stop recording."""
        log.exception("recording of session %s failed; the session goes on", self._session)
        self._recorder.count("error-internal")
        if not self._done and self._rec is not None:
            self._done = True
            self._recorder.writer.submit(self._rec, _CLOSE, b"", force=True)
        self._done = True


class Recorder:
    """Decides per session whether to record it, and owns the writer thread.

    ``registry`` (a prometheus_client CollectorRegistry) gets
    ``bastion_recording_events_total{what}``: ``recorded``, ``capped``
    (max_session_bytes), ``removed`` (max_total_bytes), and the errors
    ``error-dir``, ``error-open``, ``error-write``, ``error-total-cap``,
    ``error-backlog``, ``error-internal``. ``counts`` holds the same numbers.
    """

    def __init__(self, settings: RecordingSettings, registry: Any = None) -> None:
        if settings.dir is None:
            raise ValueError("recording needs [recording] dir")
        self.settings = settings
        self.directory = settings.dir
        self.counts: CountOf[str] = CountOf()
        self._metric: Any = None
        if registry is not None:
            from prometheus_client import Counter

            self._metric = Counter(
                "bastion_recording_events",
                "Session recordings: recorded, capped, removed, and errors (what=error-*)",
                ["what"],
                registry=registry,
            )
        self.writer = _Writer(self.directory, settings.max_total_bytes, self.count)
        self.marker_room = len(
            _line(
                99_999_999.0,
                "m",
                f"recording stopped: max_session_bytes ({settings.max_session_bytes}) reached",
            )
        )
        self._closed = False

    def count(self, what: str) -> None:
        """Thread-safe enough: Counter updates under the GIL, prometheus locks."""
        self.counts[what] += 1
        if self._metric is not None:
            self._metric.labels(what).inc()

    def path_for(self, session_id: str) -> Path:
        return self.directory / f"{session_id}{SUFFIX}"

    def start(self) -> None:
        self.writer.prepare()
        self.writer.start()
        log.info(
            "recording sessions to %s (default %s, input %s, exec %s)",
            self.directory,
            "on" if self.settings.default else "off",
            "on" if self.settings.input else "off",
            "on" if self.settings.exec else "off",
        )

    def open(self, plan: UpstreamPlan, session_id: str, source: str) -> SessionTap | None:
        wanted = plan.route.record
        if wanted is None:
            wanted = self.settings.default
        if not wanted or self._closed:
            return None
        if not _SESSION_RE.match(session_id):
            log.error("not recording session %r: not a usable file name", session_id)
            self.count("error-open")
            return None
        return _CastTap(self, plan, session_id, source)

    def close(self, timeout: float = 10.0) -> None:
        """Finish every file (after the sessions have ended); blocks up to ``timeout``."""
        self._closed = True
        self.writer.stop(timeout)


# -- reading and playing back ------------------------------------------------------


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
