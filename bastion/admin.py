"""The admin socket: ``bastion sessions`` and ``bastion kill`` talk to the
running bastion over a local Unix socket (``[admin] socket``).

Who may use it: the file is mode 0600 (0660 with ``[admin] group``, the
group owning it) in a directory the bastion creates 0700 (0750), and every
connection's peer credentials (``SO_PEERCRED``) are checked again: root, the
bastion's own user or a member of ``[admin] group``; anyone else gets one
error line and the connection is closed.

Protocol: one JSON object per line each way. Requests are at most
``MAX_REQUEST`` bytes (a longer one is answered with an error and the
connection closed) and must arrive within ``READ_TIMEOUT`` seconds::

    {"op": "sessions"}                    -> {"ok": true, "sessions": [{...}, ...]}
    {"op": "kill", "conn": "3f2a9c0b11de"} -> {"ok": true, "ended": [{...}, ...]}
    {"op": "kill", "user": "alice", "why": "maintenance"}
    anything wrong                         -> {"ok": false, "error": "..."}

A kill ends the connections with a disconnect message the person's OpenSSH
client prints ("Received disconnect from ...: bastion: <why>") and is
audited (:class:`~bastion.events.OperatorAction`, a ``kill`` record).

The client side (:func:`request`, :func:`format_sessions`) is what the
command line uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import grp
import json
import logging
import os
import pwd
import socket
import stat
import struct
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from bastion.config import AdminSettings
from bastion.errors import BastionError, ConfigError, printable
from bastion.events import EventBus, OperatorAction

if TYPE_CHECKING:  # the command line's side needs no SSH library
    from bastion.core.listener import LiveConnection

log = logging.getLogger("bastion.admin")

MAX_REQUEST = 4096  # bytes in one request line
READ_TIMEOUT = 10.0  # seconds to send a request (and to read an answer)
MAX_WHY = 200  # characters of the notice a person reads
DEFAULT_WHY = "your session was ended by an operator"
MAX_ANSWER = 64 * 1024 * 1024  # what the client reads at most


class AdminError(BastionError):
    """The admin socket is missing, refused the caller, or answered an error."""

    reason = "admin-error"


class Sessions(Protocol):
    """The live connections (``BastionServer`` answers)."""

    def live(self) -> list[LiveConnection]: ...
    def end(self, *, conn: str | None = None, user: str | None = None, why: str) -> list[str]: ...


@dataclass(frozen=True)
class Peer:
    """The process at the other end of an admin connection (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int

    @property
    def name(self) -> str | None:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return None

    def __str__(self) -> str:
        name = self.name
        return f"{name} (uid {self.uid})" if name else f"uid {self.uid}"


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


class AdminServer:
    """The admin socket's listener (the application starts and stops it)."""

    def __init__(
        self,
        settings: AdminSettings,
        sessions: Sessions,
        events: EventBus,
        on_drain: Callable[[], None] | None = None,
    ) -> None:
        assert settings.socket_path is not None
        self._on_drain = on_drain
        self.path = settings.socket_path
        self._group = settings.group
        self._gid: int | None = None
        self._sessions = sessions
        self._events = events
        self._server: asyncio.Server | None = None
        # (st_dev, st_ino) of the socket file bound here: only that one is removed
        self._ident: tuple[int, int] | None = None
        self._clients: set[asyncio.StreamWriter] = set()

    # -- start and stop ------------------------------------------------------

    async def start(self) -> None:
        if self._group is not None:
            try:
                self._gid = grp.getgrnam(self._group).gr_gid
            except KeyError:
                raise ConfigError(f"[admin] group: no such group {self._group!r}") from None
        self._make_directory(self.path.parent)
        self._clear_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # until listen() (in start_unix_server) a connect is refused, so
            # nobody reaches the socket before its owner and mode are set
            sock.bind(str(self.path))
            st = os.lstat(self.path)
            self._ident = (st.st_dev, st.st_ino)
            if self._gid is not None:
                self._chown(self.path)
            os.chmod(self.path, 0o660 if self._gid is not None else 0o600)
            self._server = await asyncio.start_unix_server(
                self._serve_client, sock=sock, limit=MAX_REQUEST
            )
        except BaseException as exc:
            sock.close()
            self._remove()
            if isinstance(exc, OSError):
                raise ConfigError(
                    f"[admin] socket: cannot listen on {self.path}: {exc.strerror or exc}"
                ) from None
            raise
        log.info(
            "admin socket at %s (root, the bastion's user%s)",
            self.path,
            f" and group {self._group}" if self._group else "",
        )

    async def stop(self) -> None:
        """Stop listening, close the admin connections, remove the socket file."""
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._clients):
            writer.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2)
        self._server = None
        self._remove()

    def _chown(self, path: Path) -> None:
        try:
            os.chown(path, -1, self._gid if self._gid is not None else -1)
        except OSError as exc:
            raise ConfigError(
                f"[admin] group: cannot give {path} to group {self._group}: {exc.strerror} "
                "(the bastion's user must be a member of it)"
            ) from None

    def _make_directory(self, directory: Path) -> None:
        """Create the socket's directory 0700 (0750 and the group's with a
        group); an existing one is left as it is."""
        if directory.is_dir():
            st = directory.stat()
            if self._gid is not None and not (
                st.st_mode & stat.S_IXOTH or (st.st_gid == self._gid and st.st_mode & stat.S_IXGRP)
            ):
                log.warning(
                    "[admin] group %s cannot reach the admin socket: %s is mode %o, group %d",
                    self._group,
                    directory,
                    stat.S_IMODE(st.st_mode),
                    st.st_gid,
                )
            return
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
            directory.mkdir(mode=0o700)
            if self._gid is not None:
                self._chown(directory)
            directory.chmod(0o750 if self._gid is not None else 0o700)
        except OSError as exc:
            raise ConfigError(
                f"[admin] socket: cannot create {directory}: {exc.strerror or exc}"
            ) from None

    def _clear_stale(self) -> None:
        """Remove a socket file nobody answers on; a live one is an error."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"[admin] socket: {self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except ConnectionRefusedError:
            log.info("replacing the stale admin socket %s", self.path)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        except OSError as exc:
            raise ConfigError(
                f"[admin] socket: cannot check the existing {self.path}: {exc.strerror or exc}"
            ) from None
        finally:
            probe.close()
        raise ConfigError(
            f"[admin] socket: {self.path} is in use: another bastion is answering on it"
        )

    def _remove(self) -> None:
        """Remove the socket file if it is still the one bound here."""
        if self._ident is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                self.path.unlink()
        self._ident = None

    # -- one admin connection --------------------------------------------------

    def _allowed(self, peer: Peer) -> bool:
        if peer.uid in (0, os.geteuid()):
            return True
        if self._gid is None:
            return False
        if peer.gid == self._gid:
            return True
        # read now, not at start: membership changes take effect at once
        name = peer.name
        try:
            pw_gid = pwd.getpwuid(peer.uid).pw_gid
            members = grp.getgrgid(self._gid).gr_mem
        except KeyError:
            return False
        return pw_gid == self._gid or (name is not None and name in members)

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._clients.add(writer)
        try:
            peer = peer_of(writer.get_extra_info("socket"))
            if not self._allowed(peer):
                who = "root, the bastion's user" + (
                    f" or group {self._group}" if self._group else ""
                )
                log.warning("admin socket: refused %s (pid %d): not %s", peer, peer.pid, who)
                await self._answer(
                    writer, _error(f"refused: {peer} may not use the admin socket ({who} only)")
                )
                return
            while True:
                try:
                    line = await asyncio.wait_for(reader.readuntil(b"\n"), READ_TIMEOUT)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        await self._answer(writer, _error("a request must end with a newline"))
                    return
                except asyncio.LimitOverrunError:
                    await self._answer(
                        writer, _error(f"request longer than {MAX_REQUEST} bytes; closing")
                    )
                    return
                except TimeoutError:
                    await self._answer(
                        writer, _error(f"no request within {READ_TIMEOUT:.0f} seconds; closing")
                    )
                    return
                await self._answer(writer, self._handle(line, peer))
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            log.exception("admin socket: a request failed")
        finally:
            self._clients.discard(writer)
            writer.close()

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, answer: dict[str, Any]) -> None:
        writer.write(json.dumps(answer).encode() + b"\n")
        await asyncio.wait_for(writer.drain(), READ_TIMEOUT)

    def _handle(self, line: bytes, peer: Peer) -> dict[str, Any]:
        try:
            request = json.loads(line)  # RecursionError: a deeply nested array
        except (ValueError, RecursionError):  # UnicodeDecodeError included
            return _error("not a JSON request")
        if not isinstance(request, dict):
            return _error("a request is a JSON object with an 'op'")
        op = request.get("op")
        if op == "sessions":
            extra = sorted(set(request) - {"op"})
            if extra:
                return _error(f"sessions: unknown field(s) {', '.join(extra)}")
            return {"ok": True, "sessions": [dataclasses.asdict(c) for c in self._sessions.live()]}
        if op == "kill":
            return self._kill(request, peer)
        if op == "drain" and self._on_drain is not None:
            if set(request) != {"op"}:
                return _error("drain: takes no fields")
            log.warning("admin socket: drain asked by %s", peer)
            self._on_drain()
            return {"ok": True, "draining": True}
        return _error(f"unknown op {op!r} (sessions, kill, drain)")

    def _kill(self, request: dict[str, Any], peer: Peer) -> dict[str, Any]:
        extra = sorted(set(request) - {"op", "conn", "user", "why"})
        if extra:
            return _error(f"kill: unknown field(s) {', '.join(extra)}")
        conn, user = request.get("conn"), request.get("user")
        if (conn is None) == (user is None):
            return _error("kill: give exactly one of conn and user")
        value = conn if conn is not None else user
        if not isinstance(value, str) or not value or len(value) > 256:
            return _error(f"kill: {'conn' if conn is not None else 'user'} must be a name")
        why = request.get("why")
        if why is None:
            why = DEFAULT_WHY
        if (
            not isinstance(why, str)
            or not why.strip()
            or len(why) > MAX_WHY
            or any(unicodedata.category(ch).startswith("C") for ch in why)
        ):
            return _error(f"kill: why must be one line of 1 to {MAX_WHY} printable characters")
        why = why.strip()
        before = {c.conn: c for c in self._sessions.live()}
        ended = self._sessions.end(conn=conn, user=user, why=why)
        target = conn if conn is not None else f"user:{user}"
        self._events.emit(OperatorAction("kill", target, tuple(ended), str(peer), why))
        log.warning(
            "%s ended %d connection(s) of %s: %s",
            peer,
            len(ended),
            printable(target),
            printable(why),
        )
        return {
            "ok": True,
            "ended": [dataclasses.asdict(before[c]) if c in before else {"conn": c} for c in ended],
        }


# -- the client side (bastion sessions / kill) -------------------------------


def request_all(path: Path, message: dict[str, Any]) -> list[dict[str, Any]]:
    """Send ``message`` to the bastion at ``path``, or with ``[server]
    workers`` to every worker's socket (``<path>.<index>``, bastion/workers.py);
    the answers, in worker order. AdminError as :func:`request`."""
    try:
        workers = [] if path.exists() else list(path.parent.glob(f"{path.name}.*"))
    except OSError:  # a directory the caller may not read: request() says so
        workers = []
    workers = sorted(
        (p for p in workers if p.suffix[1:].isdigit()), key=lambda p: int(p.suffix[1:])
    )
    if workers:
        return [request(p, message) for p in workers]
    return [request(path, message)]


def request(path: Path, message: dict[str, Any], timeout: float = READ_TIMEOUT) -> dict[str, Any]:
    """Send one request to the admin socket at ``path``; its answer, or an
    AdminError with one line saying what went wrong."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    with sock:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise AdminError(
                f"no admin socket at {path}: is the bastion running with this [admin] socket?"
            ) from None
        except PermissionError:
            raise AdminError(
                f"permission denied opening {path}: "
                "only root, the bastion's user and the [admin] group may use it"
            ) from None
        except ConnectionRefusedError:
            raise AdminError(
                f"nothing answers at {path}: the bastion is not running (stale socket file)"
            ) from None
        except OSError as exc:
            raise AdminError(f"cannot open {path}: {exc.strerror or exc}") from None
        # a refusal may be sent (and the socket closed) before the request
        # is: the answer is read either way
        with contextlib.suppress(OSError):
            sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        try:
            while not data.endswith(b"\n") and len(data) < MAX_ANSWER:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise AdminError(f"no answer from {path} within {timeout:.0f} seconds") from None
        except OSError as exc:
            if not data:
                raise AdminError(f"{path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise AdminError(f"{path} closed the connection without an answer")
    try:
        answer = json.loads(data)
    except ValueError:
        raise AdminError(f"{path} answered something that is not JSON") from None
    if not isinstance(answer, dict):
        raise AdminError(f"{path} answered something that is not a JSON object")
    if not answer.get("ok"):
        raise AdminError(str(answer.get("error") or "the bastion refused the request"))
    return answer


def format_sessions(sessions: list[dict[str, Any]]) -> str:
    """The table ``bastion sessions`` prints (since in local time)."""
    headers = ("CONN", "USER", "SOURCE", "UPSTREAM", "SINCE", "CHANNELS", "UP", "DOWN", "IDLE")
    rows = [
        (
            str(s.get("conn", "")),
            str(s.get("user", "")),
            str(s.get("source", "")),
            str(s.get("upstream") or "-"),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(s.get("since", 0)))),
            str(s.get("channels", 0)),
            str(s.get("bytes_up", 0)),
            str(s.get("bytes_down", 0)),
            f"{float(s.get('idle', 0)):.0f}s",
        )
        for s in sessions
    ]
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    numeric = {5, 6, 7, 8}
    lines = [
        "  ".join(
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in [headers, *rows]
    ]
    return "\n".join(lines)


def describe_ended(ended: dict[str, Any]) -> str:
    """One line for a connection ``bastion kill`` ended."""
    who = ended.get("user")
    if who is None:
        return f"ended {ended.get('conn')}"
    where = f" to {ended['upstream']}" if ended.get("upstream") else ""
    return f"ended {ended.get('conn')} ({who} from {ended.get('source')}{where})"
