"""Route propagation: from ``PUT /v1/kv/users/bob`` to the new route in force.

Two measurements, both against the running bastion:

* **in force** (every change): one authenticated connection keeps opening
  ``direct-tcpip`` channels (what ``ssh -J`` does) to the *new* host. The
  bastion answers them from the same in-memory route table that routes
  logins, and refuses a jump to a host the user is not routed to; the first
  accepted open marks the change in force. Probes run back to back (about
  1 ms apart); the figure is from the start of the PUT to the *send* time of
  the first accepted probe (an upper bound: the previous probe was refused).
* **first login** (a subset): ``ssh bob@bastion hostname`` in a loop from
  the PUT on; the figure is from the start of the PUT to the start of the
  first login that landed on the new host. Each login takes tens of
  milliseconds, so this one is coarse; it shows that logins follow the table.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from bench.measure import BenchError
from bench.stack import PROBE_USER, BenchStack


@dataclass
class PropagationResult:
    in_force_ms: list[float] = field(default_factory=list)
    probes: list[int] = field(default_factory=list)
    first_login_ms: list[float] = field(default_factory=list)
    first_login_done_ms: list[float] = field(default_factory=list)
    logins_confirmed: int = 0


class _Sink(asyncssh.SSHTCPSession[bytes]):
    pass


async def _jump_allowed(conn: asyncssh.SSHClientConnection, host: str, port: int) -> bool:
    try:
        chan, _ = await conn.create_connection(_Sink, host, port, encoding=None)
    except asyncssh.ChannelOpenError:
        return False
    chan.close()
    return True


async def _in_force(
    stack: BenchStack, conn: asyncssh.SSHClientConnection, new_host: str, timeout: float = 10.0
) -> tuple[float, int]:
    """Put ``users/bob`` → new_host; ms until a jump to it is accepted, probes sent."""
    assert stack.consul is not None
    target = stack.hosts[new_host]
    if await _jump_allowed(conn, target.address, target.port):
        raise BenchError(f"route already points at {new_host}")
    started = time.perf_counter()
    put = asyncio.get_running_loop().run_in_executor(
        None, stack.consul.kv_put, f"users/{PROBE_USER}", stack.route(new_host)
    )
    probes = 0
    try:
        while True:
            sent = time.perf_counter()
            probes += 1
            if await _jump_allowed(conn, target.address, target.port):
                return (sent - started) * 1000, probes
            if sent - started > timeout:
                raise BenchError(f"route to {new_host} not in force after {timeout}s")
    finally:
        await put


def _login_host(stack: BenchStack) -> str:
    assert stack.bastion is not None
    options = ["-l", PROBE_USER, "-i", str(stack.probe_key)]
    argv = [*stack.paths("aes128-gcm", options)["bastion"], "hostname"]
    proc = subprocess.run(
        argv, capture_output=True, stdin=subprocess.DEVNULL, timeout=30, check=False
    )
    return proc.stdout.decode().strip()


def _first_login(stack: BenchStack, new_host: str, timeout: float = 10.0) -> tuple[float, float]:
    """ms from the PUT to the start and to the end of the first login on new_host."""
    assert stack.consul is not None
    started = time.perf_counter()
    stack.consul.kv_put(f"users/{PROBE_USER}", stack.route(new_host))
    while True:
        begun = time.perf_counter()
        landed = _login_host(stack)
        if landed == new_host:
            return (begun - started) * 1000, (time.perf_counter() - started) * 1000
        if begun - started > timeout:
            raise BenchError(f"logins not routed to {new_host} after {timeout}s (got {landed!r})")


async def _run(stack: BenchStack, changes: int, login_changes: int) -> PropagationResult:
    assert stack.bastion is not None
    result = PropagationResult()
    conn = await asyncssh.connect(
        "127.0.0.1",
        stack.bastion.port,
        username=PROBE_USER,
        client_keys=[str(stack.probe_key)],
        known_hosts=str(stack.known_hosts),
        config=None,
        agent_path=None,
    )
    try:
        current = "host-101"
        for i in range(changes):
            new = "host-102" if current == "host-101" else "host-101"
            ms, probes = await _in_force(stack, conn, new)
            result.in_force_ms.append(ms)
            result.probes.append(probes)
            current = new
            if i % max(1, changes // 10) == 0:
                # a real login lands where the table says
                got = await asyncio.get_running_loop().run_in_executor(None, _login_host, stack)
                if got != current:
                    raise BenchError(f"login landed on {got!r}, route says {current}")
                result.logins_confirmed += 1
        for _ in range(login_changes):
            new = "host-102" if current == "host-101" else "host-101"
            begun, done = await asyncio.get_running_loop().run_in_executor(
                None, _first_login, stack, new
            )
            result.first_login_ms.append(begun)
            result.first_login_done_ms.append(done)
            current = new
    finally:
        conn.close()
        await conn.wait_closed()
        assert stack.consul is not None
        stack.consul.kv_put(f"users/{PROBE_USER}", stack.route("host-101"))
    return result


def measure(stack: BenchStack, changes: int, login_changes: int) -> dict[str, Any]:
    from bench.measure import percentile, summary

    res = asyncio.run(_run(stack, changes, login_changes))
    out: dict[str, Any] = {
        "changes": changes,
        "in_force_ms": {
            "p50": round(percentile(res.in_force_ms, 50), 2),
            "p99": round(percentile(res.in_force_ms, 99), 2),
            **summary(res.in_force_ms, 2),
        },
        "probes_per_change": summary([float(p) for p in res.probes], 1),
        "logins_confirmed": res.logins_confirmed,
        "first_login_ms": {
            "p50": round(percentile(res.first_login_ms, 50), 1),
            "p99": round(percentile(res.first_login_ms, 99), 1),
            **summary(res.first_login_ms, 1),
        },
        "first_login_done_ms": {
            "p50": round(percentile(res.first_login_done_ms, 50), 1),
            "p99": round(percentile(res.first_login_done_ms, 99), 1),
            **summary(res.first_login_done_ms, 1),
        },
        "method": (
            "in force: start of HTTP PUT to the send time of the first ssh -J "
            "(direct-tcpip) channel the bastion accepts to the new host, probed back "
            "to back on one connection (same in-memory route table as logins); "
            "first login: start of PUT to the start (and to the end) of the first "
            "`ssh bob@bastion hostname` that lands on the new host, logins back to back"
        ),
    }
    return out
