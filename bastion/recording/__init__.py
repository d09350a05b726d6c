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
import json
import logging
import time
from collections import Counter as CountOf
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bastion.config import RecordingSettings
from bastion.model import UpstreamPlan

if TYPE_CHECKING:
    from bastion.core.relay import SessionTap

from bastion.recording.cast import CastEvent, read_cast, recording_path, replay
from bastion.recording.writer import (
    _CLOSE,
    _LINE,
    _OPEN,
    _SESSION_RE,
    DEFAULT_SIZE,
    MAX_BACKLOG,
    MAX_COMMAND_CHARS,
    SUFFIX,
    _fitting,
    _line,
    _Recording,
    _Writer,
)

log = logging.getLogger("bastion.recording")


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


__all__ = ["CastEvent", "Recorder", "read_cast", "recording_path", "replay"]
