"""Helper process: hold many idle interactive SSH sessions open.

    python -m bench.idle --port P --user alice --key KEY --known-hosts KH --count 1000

Opens ``--count`` connections from one asyncio loop (``--concurrency`` at a
time), each with a PTY shell, and waits for every shell's first output (the
prompt), so a session counts only once it is live end to end. With
``--exec CMD`` each session runs CMD without a PTY instead (the machine has
4096 PTYs in all; CMD must print something, e.g. ``echo ready; exec cat``).
With ``--jump HOST:PORT`` each connection is tunnelled through that OpenSSH
jump host (``ssh -J``) to the target instead.

Prints one JSON line ``{"ready": N, "failed": F, "seconds": S, "errors": [...]}``,
then reads stdin: a line with a number opens more sessions up to that total
and prints another such line (``ready``: all live sessions; ``failed`` and
``seconds``: this step). At the end of stdin it closes the sessions and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import time

import asyncssh


class _Shell(asyncssh.SSHClientSession[bytes]):
    def __init__(self) -> None:
        self.prompt = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if not self.prompt.done():
            self.prompt.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.prompt.done():
            self.prompt.set_exception(exc or ConnectionError("session closed"))


async def _open(
    args: argparse.Namespace, key: asyncssh.SSHKey, certs: list[asyncssh.SSHCertificate]
) -> list[asyncssh.SSHClientConnection]:
    """One live session: returns the connections to keep (jump host first)."""
    client_keys: list[object] = [(key, certs[0])] if certs else [key]
    common: dict[str, object] = {
        "username": args.user,
        "client_keys": client_keys,
        "known_hosts": args.known_hosts,
        "config": None,
        "agent_path": None,
        "connect_timeout": 60,
        "login_timeout": 60,
    }
    held: list[asyncssh.SSHClientConnection] = []
    try:
        if args.jump:
            jhost, _, jport = args.jump.rpartition(":")
            jconn = await asyncssh.connect(jhost, int(jport), **common)
            held.append(jconn)
            conn = await asyncssh.connect(
                args.host,
                args.port,
                tunnel=jconn,
                **common,
            )
        else:
            conn = await asyncssh.connect(args.host, args.port, **common)
        held.append(conn)
        if args.exec:
            _chan, session = await conn.create_session(_Shell, args.exec, encoding=None)
        else:
            _chan, session = await conn.create_session(
                _Shell, term_type="xterm", term_size=(80, 24), encoding=None
            )
        assert isinstance(session, _Shell)
        await asyncio.wait_for(session.prompt, 60)
    except BaseException:
        for c in held:
            c.close()
        raise
    return held


async def main_async(args: argparse.Namespace) -> int:
    key = asyncssh.read_private_key(args.key)
    certs = [asyncssh.read_certificate(args.cert)] if args.cert else []
    sem = asyncio.Semaphore(args.concurrency)
    conns: list[asyncssh.SSHClientConnection] = []
    errors: list[str] = []

    async def one() -> None:
        async with sem:
            try:
                conns.extend(await _open(args, key, certs))
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    async def step(count: int) -> None:
        errors.clear()
        started = time.monotonic()
        await asyncio.gather(*(one() for _ in range(count)))
        report = {
            "ready": len(conns) // (2 if args.jump else 1),
            "failed": len(errors),
            "seconds": round(time.monotonic() - started, 2),
            "errors": sorted(set(errors))[:5],
        }
        print(json.dumps(report), flush=True)

    await step(args.count)
    loop = asyncio.get_running_loop()
    # more steps, or hold until the parent closes our stdin
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        total = int(line)
        await step(max(0, total - len(conns) // (2 if args.jump else 1)))
    for conn in conns:
        conn.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            asyncio.gather(*(c.wait_closed() for c in conns), return_exceptions=True), 30
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--cert", default=None)
    parser.add_argument("--known-hosts", required=True)
    parser.add_argument("--jump", default=None, help="HOST:PORT of an OpenSSH jump host")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--exec", default=None, help="run this command, no PTY")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    # one descriptor per connection: this process only, up to the hard limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
