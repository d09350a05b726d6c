"""Helper process: hold many idle interactive SSH sessions open.

    python -m bench.idle --port P --user alice --key KEY --known-hosts KH --count 1000

Opens ``--count`` connections from one asyncio loop (``--concurrency`` at a
time), each with a PTY shell, and waits for every shell's first output (the
prompt), so a session counts only once it is live end to end. With
``--jump HOST:PORT`` each connection is tunnelled through that OpenSSH jump
host (``ssh -J``) to the target instead.

Prints one JSON line ``{"ready": N, "failed": F, "seconds": S, "errors": [...]}``,
then holds the sessions until stdin is closed, closes them and exits.
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

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(args.count)))
    ready = args.count - len(errors)
    report = {
        "ready": ready,
        "failed": len(errors),
        "seconds": round(time.monotonic() - started, 2),
        "errors": sorted(set(errors))[:5],
    }
    print(json.dumps(report), flush=True)
    # hold until the parent closes our stdin
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
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
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.count + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
