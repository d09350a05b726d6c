"""Running the bastion as a process: signals and the drain.

The first SIGTERM (or ``bastion drain``) drains, a second SIGTERM or SIGINT
ends at once, SIGHUP reloads (:class:`bastion.app.Application` does the
work). With ``[server] workers`` this runs in each worker, given its role by
the supervisor (:mod:`bastion.workers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket

from bastion.app import Application
from bastion.config import Settings
from bastion.workers import WorkerRole, worker_settings

log = logging.getLogger("bastion")


async def serve(
    settings: Settings, drain_timeout: float | None = None, role: WorkerRole | None = None
) -> None:
    """Run until SIGTERM or SIGINT.

    The first SIGTERM drains (:meth:`Application.drain`: out of Consul first,
    then no new connections, live sessions told and given ``drain_timeout``);
    a second SIGTERM, or SIGINT, ends at once. ``role``: this process is one
    of several workers (:mod:`bastion.workers`), serving the listening socket
    its supervisor passed.
    """
    app = Application(settings if role is None else worker_settings(settings, role))
    if role is not None:
        app.listen_sock = socket.socket(fileno=role.listen_fd)
        app.as_worker = functools.partial(worker_settings, role=role)
    drain = asyncio.Event()
    now = asyncio.Event()
    loop = asyncio.get_running_loop()

    terms = [0]

    def on_term() -> None:
        # the first SIGTERM drains (also after `bastion drain`); a second ends at once
        terms[0] += 1
        (now if terms[0] > 1 else drain).set()

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(app.reload()))
    loop.add_signal_handler(signal.SIGINT, now.set)
    why = ["SIGTERM"]

    def on_admin_drain() -> None:  # `bastion drain` through the admin socket
        if not drain.is_set():
            why[0] = "bastion drain (admin socket)"
        drain.set()

    app.on_drain = on_admin_drain
    if role is not None:
        # `bastion drain` reaches every worker: the supervisor drains them all
        # once (SIGUSR1), so none is left accepting alone
        app.on_drain = functools.partial(os.kill, os.getppid(), signal.SIGUSR1)
    try:
        await app.start()
        waiting = [asyncio.ensure_future(drain.wait()), asyncio.ensure_future(now.wait())]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if drain.is_set() and not now.is_set():
            log.info("draining (a second SIGTERM ends at once)")
            draining = asyncio.ensure_future(app.drain(drain_timeout, why=why[0]))
            ending = asyncio.ensure_future(now.wait())
            await asyncio.wait([draining, ending], return_when=asyncio.FIRST_COMPLETED)
            if not draining.done():
                log.info("ending at once")
                draining.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await draining
            ending.cancel()
        for task in waiting:
            task.cancel()
        log.info("shutting down")
    finally:
        with contextlib.suppress(Exception):
            await app.stop(0)
