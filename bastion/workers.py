"""Several worker processes behind one address (``[server] workers = N``).

One Python process uses one core; OpenSSH's sshd forks per connection. With
``workers > 1``, ``bastion serve`` becomes a supervisor:

* it opens ``N`` listening sockets on the same address with ``SO_REUSEPORT``
  (socket(7)) and hands socket *i* to worker *i* (a ``bastion serve
  --worker i`` child). The sockets stay open in the supervisor, so a worker
  that dies loses no queued connection: its replacement accepts them.
* A classic BPF program on the group (``SO_ATTACH_REUSEPORT_CBPF``) steers
  each connection by its source address (IPv4: the address modulo N), so one
  person's logins from one machine land on the same worker and find its
  upstream connections to reuse (``[upstream] reuse_idle``). With the
  kernel's default 4-tuple hash (``[server] worker_steering = "kernel"``,
  for many people behind one NAT address) the spread is even, but each
  worker the person meets opens (and keeps) an upstream connection of its
  own: up to N per person and host, and the first login on each worker
  misses (measured: 18 of 19 repeated logins reused with 2 workers, 19 of
  19 steered; bench/results).
* A worker that dies (killed, crashed) is started again, with a back-off
  (1 s doubling to 30 s, reset after a minute up). A worker that exits 0
  (drained or stopped) is not.
* Signals go to every worker: SIGTERM drains all (a second ends at once),
  SIGHUP reloads all, SIGINT ends all at once. The supervisor exits when
  every worker has.
* One audit stream: every worker appends whole records to the same file
  (``O_APPEND``: each record is one write). One ``/metrics`` view: each worker
  serves its page on a private Unix socket; the supervisor's ``[metrics]
  listen`` merges them, each sample labelled ``worker="i"``, plus its own
  ``bastion_workers`` and ``bastion_worker_restarts_total``. ``/health`` is
  200 while at least one worker is ready and none drains.
* ``bastion sessions`` / ``kill`` talk to every worker's admin socket
  (``[admin] socket`` + ``.i``); ``bastion drain`` makes a worker ask the
  supervisor (SIGUSR1), which drains them all as for SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from bastion.addresses import split_host_port
from bastion.config import Settings
from bastion.errors import ConfigError
from bastion.httpd import Answer, SmallHTTP, fetch

log = logging.getLogger("bastion.workers")

# linux/socket.h and linux/filter.h
SO_ATTACH_REUSEPORT_CBPF = 51
SKF_NET_OFF = -0x100000
BPF_LD_W_ABS = 0x20
BPF_ALU_MOD_K = 0x94
BPF_RET_A = 0x16

PR_SET_PDEATHSIG = 1  # linux/prctl.h

RESTART_MIN = 1.0
RESTART_MAX = 30.0
STABLE_AFTER = 60.0


@dataclass(frozen=True)
class WorkerRole:
    """What a worker process is told by its supervisor (``bastion serve --worker``)."""

    index: int
    listen_fd: int
    metrics_socket: str | None


def worker_settings(settings: Settings, role: WorkerRole) -> Settings:
    """A worker's settings: its own admin socket (``<socket>.<index>``) and its
    metrics page on the supervisor's private Unix socket."""
    import dataclasses

    admin = settings.admin
    if admin.socket:
        admin = dataclasses.replace(admin, socket=f"{admin.socket}.{role.index}")
    metrics = dataclasses.replace(settings.metrics, listen=role.metrics_socket)
    return dataclasses.replace(settings, admin=admin, metrics=metrics)


def _steering_program(workers: int, family: int) -> tuple[ctypes.Array[ctypes.c_char], bytes]:
    """``A = source address word; return A % workers`` as a struct sock_fprog.

    The program runs with the packet's data at the transport header; the
    network header is reached through ``SKF_NET_OFF`` (filter.h). IPv4's
    source address is at offset 12; for IPv6 the last 32 bits of the source
    (offset 8 + 12) stand for it. Returns the filter buffer (keep it alive
    until setsockopt returns) and the fprog bytes."""
    offset = 12 if family == socket.AF_INET else 20
    program = [
        (BPF_LD_W_ABS, 0, 0, (SKF_NET_OFF + offset) & 0xFFFFFFFF),
        (BPF_ALU_MOD_K, 0, 0, workers),
        (BPF_RET_A, 0, 0, 0),
    ]
    raw = b"".join(struct.pack("HBBI", *ins) for ins in program)
    buf = ctypes.create_string_buffer(raw, len(raw))
    return buf, struct.pack("HxxxxxxQ", len(program), ctypes.addressof(buf))


def listen_sockets(
    listen: str, workers: int, backlog: int = 1024, steer: bool = True
) -> list[socket.socket]:
    """``workers`` listening sockets on ``listen`` (host:port) in one
    SO_REUSEPORT group, steered by source address (``steer``) or left to the
    kernel's hash. Raises ConfigError."""
    host, port = split_host_port(listen, 2222)
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"[server] listen: cannot resolve {listen}: {exc}") from None
    family, _, _, _, address = infos[0]
    socks: list[socket.socket] = []
    try:
        for _ in range(workers):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.set_inheritable(True)
        if steer:
            buf, fprog = _steering_program(workers, family)
            socks[0].setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
            del buf
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise ConfigError(f"[server] listen: cannot listen on {listen}: {exc}") from exc
    return socks


@dataclass
class _Worker:
    index: int
    sock: socket.socket
    metrics_socket: str
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = RESTART_MIN
    done: bool = False  # exited 0: drained or stopped, not restarted


@dataclass
class Supervisor:
    """Starts, watches and signals the workers; serves the merged metrics."""

    settings: Settings
    config: Path
    drain_timeout: float | None = None
    log_level: str = "INFO"
    _workers: list[_Worker] = field(default_factory=list)
    _stopping: bool = False
    _dir: Path | None = None

    def __post_init__(self) -> None:
        self.registry = CollectorRegistry()
        self._running = Gauge("bastion_workers", "Worker processes running", registry=self.registry)
        self._restarts = Counter(
            "bastion_worker_restarts",
            "Workers started again after they died",
            registry=self.registry,
        )

    # -- processes -----------------------------------------------------------

    def _argv(self, w: _Worker) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "bastion.cli",
            "--log-level",
            self.log_level,
            "serve",
            "--config",
            str(self.config),
            "--worker",
            str(w.index),
            "--listen-fd",
            str(w.sock.fileno()),
        ]
        if self.settings.metrics.listen:
            argv += ["--metrics-socket", w.metrics_socket]
        if self.drain_timeout is not None:
            argv += ["--drain-timeout", str(self.drain_timeout)]
        return argv

    async def _spawn(self, w: _Worker) -> None:
        w.process = await asyncio.create_subprocess_exec(
            *self._argv(w), pass_fds=(w.sock.fileno(),), preexec_fn=_drain_when_orphaned
        )
        w.started = time.monotonic()
        log.info("worker %d started (pid %d)", w.index, w.process.pid)

    async def _watch(self, w: _Worker) -> None:
        """Wait for the worker to exit; start it again unless it meant to."""
        while True:
            assert w.process is not None
            code = await w.process.wait()
            self._running.set(sum(1 for x in self._workers if _alive(x)))
            if code == 0 or self._stopping:
                w.done = True
                log.info("worker %d exited (status %d)", w.index, code)
                return
            up = time.monotonic() - w.started
            if up > STABLE_AFTER:
                w.backoff = RESTART_MIN
            log.error(
                "worker %d (pid %d) died (%s) after %.0f s; starting it again in %.0f s",
                w.index,
                w.process.pid,
                f"signal {-code}" if code < 0 else f"status {code}",
                up,
                w.backoff,
            )
            await asyncio.sleep(w.backoff)
            w.backoff = min(w.backoff * 2, RESTART_MAX)
            if self._stopping:
                w.done = True
                return
            w.restarts += 1
            self._restarts.inc()
            await self._spawn(w)
            self._running.set(sum(1 for x in self._workers if _alive(x)))

    def signal_all(self, signum: int) -> None:
        for w in self._workers:
            if _alive(w):
                assert w.process is not None
                with contextlib.suppress(ProcessLookupError):
                    w.process.send_signal(signum)

    # -- metrics -------------------------------------------------------------

    async def _metrics_page(self) -> Answer:
        pages = await asyncio.gather(*(self._worker_page(w, "/metrics") for w in self._workers))
        merged = _merge(
            (w.index, body.decode())
            for w, (status, body) in zip(self._workers, pages, strict=True)
            if status == 200
        )
        body = generate_latest(self.registry) + merged
        return "200 OK", CONTENT_TYPE_LATEST, body

    async def _health_page(self) -> Answer:
        pages = await asyncio.gather(*(self._worker_page(w, "/health") for w in self._workers))
        states = []
        for status, body in pages:
            try:
                states.append(json.loads(body) if body else {})
            except ValueError:
                states.append({})
            del status
        ready = sum(1 for s in states if s.get("ready"))
        draining = any(s.get("draining") for s in states)
        ok = ready > 0 and not draining
        body = json.dumps(
            {"ready": ok, "draining": draining, "workers": len(states), "workers_ready": ready}
        ).encode()
        return ("200 OK" if ok else "503 Service Unavailable"), "application/json", body

    async def _worker_page(self, w: _Worker, what: str) -> tuple[int, bytes]:
        try:
            return await fetch(w.metrics_socket, what)
        except (OSError, TimeoutError):
            return 0, b""

    # -- the whole life ------------------------------------------------------

    async def run(self) -> int:
        s = self.settings
        n = s.server.workers
        socks = listen_sockets(s.server.listen, n, steer=s.server.worker_steering == "source")
        self._dir = Path(tempfile.mkdtemp(prefix="bastion-workers-"))
        self._workers = [
            _Worker(i, sock, str(self._dir / f"metrics-{i}.sock")) for i, sock in enumerate(socks)
        ]
        http: SmallHTTP | None = None
        loop = asyncio.get_running_loop()
        terms = [0]

        def on_term() -> None:
            terms[0] += 1
            self._stopping = True
            # the workers close theirs as their drain stops accepting; with the
            # supervisor's copies open too, new connections would queue unseen
            for sock in socks:
                sock.close()
            log.info(
                "SIGTERM: %s every worker",
                "draining" if terms[0] == 1 else "ending at once",
            )
            self.signal_all(signal.SIGTERM)

        def on_int() -> None:
            self._stopping = True
            for sock in socks:
                sock.close()
            self.signal_all(signal.SIGINT)

        def on_drain_request() -> None:  # a worker's `bastion drain` (admin socket)
            if terms[0] == 0:
                on_term()

        loop.add_signal_handler(signal.SIGTERM, on_term)
        loop.add_signal_handler(signal.SIGUSR1, on_drain_request)
        loop.add_signal_handler(signal.SIGINT, on_int)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.signal_all(signal.SIGHUP))
        try:
            if s.metrics.listen:
                http = SmallHTTP({"/metrics": self._metrics_page, "/health": self._health_page})
                try:
                    await http.start(s.metrics.listen)
                except OSError as exc:
                    raise ConfigError(
                        f"[metrics] listen: cannot listen on {s.metrics.listen}: {exc}"
                    ) from exc
            for w in self._workers:
                await self._spawn(w)
            self._running.set(n)
            log.info("supervising %d workers on %s", n, s.server.listen)
            await asyncio.gather(*(self._watch(w) for w in self._workers))
        finally:
            self._stopping = True
            self.signal_all(signal.SIGINT)
            for w in self._workers:
                if w.process is not None and w.process.returncode is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(w.process.wait(), 10)
            if http is not None:
                await http.stop()
            for sock in socks:
                sock.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(signum)
        log.info("all workers stopped")
        return 0

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process is not None]


def _drain_when_orphaned() -> None:
    """In the worker before exec: SIGTERM (a drain) when the supervisor dies,
    however it dies (prctl(2) PR_SET_PDEATHSIG), so no worker outlives it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _alive(w: _Worker) -> bool:
    return w.process is not None and w.process.returncode is None


def _merge(pages: Iterable[tuple[int, str]]) -> bytes:
    """The workers' exposition texts as one, each sample labelled ``worker``."""
    families: dict[str, Metric] = {}
    for index, text in pages:
        for fam in text_string_to_metric_families(text):
            merged = families.get(fam.name)
            if merged is None:
                merged = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                families[fam.name] = merged
            for sample in fam.samples:
                labels = {**sample.labels, "worker": str(index)}
                merged.add_sample(sample.name, labels, sample.value, sample.timestamp)

    class _Collected:
        def collect(self) -> Iterator[Metric]:
            yield from families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected())
    return generate_latest(registry)
