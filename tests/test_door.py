"""No lockout by one source: floods of idle and slowloris connections from
127.0.0.2 (and 127.0.0.3) while the real OpenSSH client logs in from
127.0.0.1, at a real bastion; MaxStartups random early drop at a small
bound. Penalties are off here (the bounds alone must hold;
tests/test_penalties.py covers penalties).

The flood figures are printed (``pytest -s``): logins during each flood,
their latency, the bastion's RSS before, during and after."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from conftest import Person

from devstack import BastionProcess, render_settings
from devstack.process import wait_until
from devstack.sshd import ssh_command

PER_SOURCE = 16


def rss_kib(bastion: BastionProcess) -> int:
    assert bastion.process is not None
    status = Path(f"/proc/{bastion.process.pid}/status").read_text()
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert found
    return int(found.group(1))


def series(bastion: BastionProcess, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{name}\{{{re.escape(wanted)}\}} (\S+)$", bastion.metrics_text(), re.M)
    return float(found.group(1)) if found else 0.0


@dataclass
class Flood:
    """Attackers that reconnect as soon as they are dropped: each holds one
    connection, idle or sending one byte a second (slowloris)."""

    port: int
    held: dict[str, int] = field(default_factory=dict)  # source → admitted now
    most: dict[str, int] = field(default_factory=dict)  # source → most admitted at once
    refused: int = 0
    admitted: int = 0
    stop: asyncio.Event | None = None
    # set by the test's thread: the flood ends
    stopping: threading.Event = field(default_factory=threading.Event)

    async def attacker(self, source: str, slow: bool) -> None:
        assert self.stop is not None
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", self.port, local_addr=(source, 0)
                )
            except OSError:
                await asyncio.sleep(0.2)
                continue
            try:
                first = await asyncio.wait_for(reader.read(64), 5)
            except (OSError, TimeoutError):
                first = b""
            if not first.startswith(b"SSH-"):
                self.refused += 1  # dropped at the door: try again soon
                writer.close()
                await asyncio.sleep(0.2)
                continue
            self.admitted += 1
            self.held[source] = self.held.get(source, 0) + 1
            self.most[source] = max(self.most.get(source, 0), self.held[source])
            try:
                while not self.stop.is_set():
                    if slow:
                        writer.write(b"S")  # never a whole version line
                        await writer.drain()
                    try:
                        if not await asyncio.wait_for(reader.read(4096), 1.0):
                            break
                    except TimeoutError:
                        continue
            except OSError:
                pass
            finally:
                self.held[source] -= 1
                writer.close()

    def run(self, plan: list[tuple[str, int, bool]], ready: threading.Event) -> None:
        async def main() -> None:
            self.stop = asyncio.Event()
            ready.set()
            tasks = [
                asyncio.create_task(self.attacker(source, slow))
                for source, count, slow in plan
                for _ in range(count)
            ]
            await asyncio.to_thread(self.stopping.wait)
            self.stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run(main())


def login(bastion: BastionProcess, key: Path) -> tuple[bool, float]:
    started = time.monotonic()
    result = subprocess.run(
        ssh_command(port=bastion.port, user="alice", identity=key, command=["hostname"]),
        capture_output=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return result.stdout == b"host-102\n", time.monotonic() - started


def during(
    bastion: BastionProcess,
    key: Path,
    plan: list[tuple[str, int, bool]],
    seconds: float,
    until_held: Callable[[Flood], bool],
) -> tuple[Flood, list[tuple[bool, float]], int]:
    """Run ``plan`` (source, attackers, slowloris?) and log in again and
    again for ``seconds`` once the flood holds its share; the logins and
    the bastion's RSS at the end."""
    flood = Flood(bastion.port)
    ready = threading.Event()
    thread = threading.Thread(target=flood.run, args=(plan, ready), daemon=True)
    thread.start()
    ready.wait(10)
    wait_until("the flood holding its share", lambda: until_held(flood), 15)
    logins = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        logins.append(login(bastion, key))
    rss = rss_kib(bastion)
    flood.stopping.set()
    thread.join(30)
    return flood, logins, rss


def test_one_source_cannot_lock_out_everyone(
    new_bastion: Callable[..., BastionProcess], people: dict[str, Person]
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # this test process only: 700 sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def no_penalties(sections: dict[str, dict[str, object]]) -> None:
        sections["penalties"] = {"enabled": False}

    bastion = new_bastion(tweak=no_penalties, login_grace_time=20)
    key = people["alice"].key
    for _ in range(3):  # warm: first logins load what later ones reuse
        assert login(bastion, key)[0]
    rss_before = rss_kib(bastion)
    figures = []
    floods = {
        "idle": [("127.0.0.2", 300, False), ("127.0.0.3", 50, False)],
        "slowloris": [("127.0.0.2", 300, True), ("127.0.0.3", 50, True)],
        "idle + slowloris": [
            ("127.0.0.2", 300, False),
            ("127.0.0.2", 300, True),
            ("127.0.0.3", 50, False),
            ("127.0.0.3", 50, True),
        ],
    }
    for name, plan in floods.items():
        flood, logins, rss = during(
            bastion,
            key,
            plan,
            6.0,
            lambda f: (
                f.held.get("127.0.0.2", 0) >= PER_SOURCE
                and f.held.get("127.0.0.3", 0) >= PER_SOURCE
            ),
        )
        times = sorted(t for _, t in logins)
        figures.append(
            f"{name}: {sum(ok for ok, _ in logins)}/{len(logins)} logins ok, "
            f"p50 {statistics.median(times):.2f} s, max {times[-1]:.2f} s; "
            f"flood admitted {flood.admitted}, dropped {flood.refused}; "
            f"RSS {rss_before // 1024} MB before, {rss // 1024} MB during"
        )
        assert all(ok for ok, _ in logins), logins
        assert len(logins) >= 5 and times[-1] < 5.0, times
        # a source never holds more than PerSourceMaxStartups at once
        assert flood.most["127.0.0.2"] == PER_SOURCE, flood.most
        assert flood.most["127.0.0.3"] == PER_SOURCE, flood.most
        assert flood.refused > 100
        assert rss - rss_before < 40 * 1024, (rss_before, rss)
    refused = series(bastion, "bastion_connections_refused_total", reason="per-source-max-startups")
    assert refused > 200
    # the flood's admitted connections go (disconnected, or at the grace time)
    wait_until(
        "the flood's connections gone",
        lambda: (bastion.metric("bastion_unauthenticated_connections") or 0) == 0,
        25,
    )
    rss_after = rss_kib(bastion)
    print("\n" + "\n".join(figures) + f"\nRSS after: {rss_after // 1024} MB")
    assert rss_after - rss_before < 40 * 1024


def test_max_startups_drops_early(
    new_bastion: Callable[..., BastionProcess], people: dict[str, Person]
) -> None:
    # MaxStartups 2:100:4: from 2 unauthenticated connections every new one
    # from a source already holding one is dropped (rate 100 %); a source
    # holding none is never dropped at random (the fair share); the person
    # then retries
    bastion = new_bastion(max_startups="2:100:4", max_unauthenticated=4)
    held = [
        socket.create_connection(("127.0.0.1", bastion.port), 5, ("127.0.0.6", 0)) for _ in range(2)
    ]
    try:
        for sock in held:
            assert sock.recv(64).startswith(b"SSH-2.0-")
        new = socket.create_connection(("127.0.0.1", bastion.port), 5, ("127.0.0.6", 0))
        with new, contextlib.suppress(ConnectionResetError):
            assert new.recv(64) == b""  # no version line: dropped at accept
        assert series(bastion, "bastion_connections_refused_total", reason="max-startups") == 1
        fresh = socket.create_connection(("127.0.0.1", bastion.port), 5, ("127.0.0.8", 0))
        held.append(fresh)
        assert fresh.recv(64).startswith(b"SSH-2.0-")  # a newcomer: let in
        assert series(bastion, "bastion_connections_refused_total", reason="max-startups") == 1
    finally:
        for sock in held:
            sock.close()
    # with the held ones gone the door is open again
    deadline = time.monotonic() + 10
    while not login(bastion, people["alice"].key)[0]:
        assert time.monotonic() < deadline


def test_reload_applies_new_bounds_to_new_connections(
    new_bastion: Callable[..., BastionProcess],
) -> None:
    bastion = new_bastion()
    source = ("127.0.0.9", 0)
    first = socket.create_connection(("127.0.0.1", bastion.port), 5, source)
    with first:
        assert first.recv(64).startswith(b"SSH-2.0-")
        settings = tomllib.loads(bastion.config.read_text())
        settings["server"]["per_source_max_startups"] = 1
        bastion.config.write_text(render_settings(settings))
        assert bastion.process is not None
        os.kill(bastion.process.pid, signal.SIGHUP)
        wait_until(
            "reload record",
            lambda: any(r["event"] == "reload" for r in bastion.audit_records()),
            15,
        )
        (record,) = [r for r in bastion.audit_records() if r["event"] == "reload"]
        assert "[server] per_source_max_startups" in record["applied"]
        second = socket.create_connection(("127.0.0.1", bastion.port), 5, source)
        with second, contextlib.suppress(ConnectionResetError):
            assert second.recv(64) == b""  # one unauthenticated connection per source now


def test_many_sources_at_their_share_cannot_lock_out_a_newcomer(
    new_bastion: Callable[..., BastionProcess], people: dict[str, Person]
) -> None:
    """21 addresses each hold PerSourceMaxStartups (16) idle connections: 336
    wanted, more than MaxStartups full (256). sshd would then drop every
    newcomer (random early drop at 100 %, or refused at full) while the
    holders pay nothing; the fair share lets 127.0.0.1 in by evicting the
    oldest connection of the biggest holder (docs/hostile-clients.md)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # this test process only: 336 sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def no_penalties(sections: dict[str, dict[str, object]]) -> None:
        sections["penalties"] = {"enabled": False}

    bastion = new_bastion(tweak=no_penalties, login_grace_time=20)
    key = people["alice"].key
    assert login(bastion, key)[0]  # warm
    full = 256  # max_unauthenticated's default, MaxStartups full
    plan = [(f"127.0.2.{n}", PER_SOURCE, False) for n in range(1, 22)]
    flood, logins, _ = during(
        bastion,
        key,
        plan,
        6.0,
        lambda f: (bastion.metric("bastion_unauthenticated_connections") or 0) >= full,
    )
    times = sorted(t for _, t in logins)
    evicted = series(bastion, "bastion_connections_refused_total", reason="evicted")
    print(
        f"\n21 sources x {PER_SOURCE} idle: {sum(ok for ok, _ in logins)}/{len(logins)} "
        f"logins ok from 127.0.0.1, p50 {statistics.median(times):.2f} s, "
        f"max {times[-1]:.2f} s; {evicted:.0f} evicted; flood admitted {flood.admitted}, "
        f"dropped {flood.refused}"
    )
    assert all(ok for ok, _ in logins), logins
    assert len(logins) >= 5 and times[-1] < 5.0, times
    assert evicted >= 1
    # the holders stay within their share
    assert max(flood.most.values()) <= PER_SOURCE, flood.most
