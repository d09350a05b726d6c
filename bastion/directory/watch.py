"""Consul blocking queries for the directory: one watch per dataset, with
backoff, an outage clock and the staleness bound.

Each :class:`Watch` long-polls one Consul endpoint (``?index=N&wait=...``)
and hands every answer to its ``apply`` callback; a dataset that does not
change costs one idle request per ``[consul] wait``. The rules followed are
Consul's (https://developer.hashicorp.com/consul/api-docs/features/blocking):
an index that goes backwards resets to 0, the HTTP timeout exceeds
``wait + wait/16``, and an error re-reads from scratch after a jittered,
capped exponential backoff.

Freshness: until every watch has loaded once, :meth:`ConsulWatches.check_fresh`
raises ``DirectoryUnavailable``. While Consul is unreachable (errors,
timeouts, or a 403 from a revoked token) the cached directory is served for
up to ``[consul] stale_after`` seconds, with a WARNING at the start of the
outage and a reminder every minute; after that, lookups raise
``DirectoryUnavailable`` until Consul answers again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from bastion.config import ConsulSettings
from bastion.errors import DirectoryUnavailable

log = logging.getLogger("bastion.directory")

BACKOFF_START = 0.1
BACKOFF_CAP = 5.0
REMINDER_EVERY = 60.0


def next_index(previous: int, returned: int) -> int:
    """The index for the next blocking query (Consul's rules).

    An index that went backwards (a new cluster, a snapshot restore) resets to
    0 so the next query reads the current state; an index is never below 1.
    """
    if returned < previous:
        return 0
    return max(returned, 1)


class ConsulError(Exception):
    """One failed request: ``denied`` for a 403, ``timed_out`` for no answer."""

    def __init__(self, message: str, *, denied: bool = False, timed_out: bool = False) -> None:
        super().__init__(message)
        self.denied = denied
        self.timed_out = timed_out


@dataclass
class Watch:
    """One blocking query: ``path`` and ``params`` on Consul, answers to ``apply``."""

    name: str
    path: str
    params: dict[str, str]
    apply: Callable[[Any], None]
    index: int = 0
    loaded: bool = False
    requests: int = 0
    errors_total: int = 0
    consecutive_errors: int = 0
    failing_since: float | None = None
    last_error: str = ""
    last_success: float | None = None  # monotonic
    last_success_wall: float | None = None
    last_change_wall: float | None = None


class ConsulWatches:
    """Runs the watches on one aiohttp session with the bastion's token.

    Every request carries the token in ``X-Consul-Token``; nothing is read
    from ``CONSUL_*`` environment variables. ``on_loaded`` gives the line
    logged once every watch has answered.
    """

    def __init__(
        self,
        settings: ConsulSettings,
        base: str,
        token: str,
        watches: list[Watch],
        on_loaded: Callable[[], str],
    ) -> None:
        self._settings = settings
        self._base = base
        self._headers = {"X-Consul-Token": token.strip()}
        self._watches = watches
        self._on_loaded = on_loaded
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loaded = asyncio.Event()
        self._outage_since: float | None = None
        self._last_reminder = 0.0
        self._stale_logged = False
        self._denied_logged = False

    def set_token(self, token: str) -> None:
        """Use ``token`` from the next request on (a rotated token file)."""
        self._headers = {"X-Consul-Token": token.strip()}

    @property
    def watches(self) -> list[Watch]:
        return self._watches

    @property
    def loaded(self) -> bool:
        return self._loaded.is_set()

    @property
    def outage_since(self) -> float | None:
        """``time.monotonic()`` when Consul stopped answering, or None."""
        return self._outage_since

    async def start(self) -> None:
        """Open the session and start the watches (returns at once)."""
        if self._session is not None:
            return
        self._session = aiohttp.ClientSession(
            trust_env=False, timeout=aiohttp.ClientTimeout(total=None)
        )
        self._tasks = [
            asyncio.create_task(self._run(w), name=f"consul-watch-{w.name}") for w in self._watches
        ]

    async def wait_loaded(self, timeout: float) -> None:
        """Wait until every watch has answered once; DirectoryUnavailable after ``timeout``."""
        try:
            await asyncio.wait_for(self._loaded.wait(), timeout)
        except TimeoutError:
            missing = [
                f"{w.name}: {w.last_error or 'no answer yet'}"
                for w in self._watches
                if not w.loaded
            ]
            raise DirectoryUnavailable(
                "the directory is unavailable: no routing table loaded yet",
                detail=f"consul {self._base} not loaded after {timeout:g} s ({'; '.join(missing)})",
            ) from None

    async def aclose(self) -> None:
        """Stop the watches and close the session."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self, w: Watch) -> None:
        wait = self._settings.wait
        attempt = 0
        while True:
            params = dict(w.params)
            started = time.monotonic()
            if w.index:
                params["index"] = str(w.index)
                params["wait"] = f"{max(1, round(wait * 1000))}ms"
                # Consul adds up to wait/16 of jitter to the wait
                due = started + wait + wait / 16
                timeout = wait + wait / 16 + 5.0
            else:
                due = started
                timeout = self._settings.request_timeout
            before = w.index
            try:
                index, body = await self._get(w, params, timeout)
                # always applied: after a restart the same index can carry other data
                w.apply(body)  # before moving the index: a bad answer is retried
                if index != before:
                    w.last_change_wall = time.time()
                w.index = next_index(before, index)
                if w.index == 0 and before:
                    log.info(
                        "consul watch %s: index went backwards (%d -> %d), re-reading",
                        w.name,
                        before,
                        index,
                    )
            except Exception as exc:  # a watch must never die silently
                if not isinstance(exc, ConsulError):
                    log.exception("consul watch %s: unexpected error", w.name)
                    exc = ConsulError(f"{type(exc).__name__}: {exc}")
                attempt += 1
                # after an error, re-read from scratch: it may be another cluster by then
                w.index = 0
                # a silent Consul has been gone since its answer was due, not since now
                self._on_failure(w, exc, min(due, time.monotonic()) if exc.timed_out else None)
                delay = min(BACKOFF_CAP, BACKOFF_START * 2 ** (attempt - 1))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter
                continue
            attempt = 0
            self._on_success(w)
            if index == before and time.monotonic() - started < 0.01:
                # an unchanged index answered at once would spin: pace it
                await asyncio.sleep(0.1)

    async def _get(self, w: Watch, params: dict[str, str], timeout: float) -> tuple[int, Any]:
        assert self._session is not None
        w.requests += 1
        try:
            async with self._session.get(
                self._base + w.path,
                params=params,
                headers=self._headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                status = resp.status
                raw = await resp.read()
                index_h = resp.headers.get("X-Consul-Index", "")
        except TimeoutError:
            raise ConsulError(f"no answer within {timeout:g} s", timed_out=True) from None
        except aiohttp.ClientError as exc:
            raise ConsulError(f"{type(exc).__name__}: {exc}") from None
        if status == 403:
            raise ConsulError(f"403 {raw[:200].decode(errors='replace')}", denied=True)
        if status not in (200, 404) or (status == 404 and not w.path.startswith("/v1/kv/")):
            raise ConsulError(f"HTTP {status} {raw[:200].decode(errors='replace')}")
        if not index_h.isdigit():
            raise ConsulError("response without X-Consul-Index")
        if status == 404:
            return int(index_h), None
        try:
            return int(index_h), json.loads(raw)
        except ValueError:
            raise ConsulError("response is not JSON") from None

    def _on_failure(self, w: Watch, exc: ConsulError, since: float | None) -> None:
        now = time.monotonic()
        since = now if since is None else since
        w.consecutive_errors += 1
        w.errors_total += 1
        w.last_error = str(exc)
        if w.failing_since is None:
            w.failing_since = since
        log.debug("consul watch %s failed: %s", w.name, exc)
        if exc.denied and not self._denied_logged:
            self._denied_logged = True
            log.error("token rejected by Consul (revoked?): %s answered %s", self._base, exc)
        if self._outage_since is None:
            self._outage_since, self._last_reminder = since, now
            if self._loaded.is_set():
                log.warning(
                    "consul %s unreachable (%s: %s); serving the cached directory for up to %g s",
                    self._base,
                    w.name,
                    exc,
                    self._settings.stale_after,
                )
            else:
                log.warning(
                    "cannot load the directory from consul %s (%s: %s); logins are "
                    "refused until it answers",
                    self._base,
                    w.name,
                    exc,
                )
            return
        self._outage_since = min(self._outage_since, since)
        down = now - self._outage_since
        if self._loaded.is_set() and down > self._settings.stale_after:
            self._note_stale(down)
        elif now - self._last_reminder >= REMINDER_EVERY:
            self._last_reminder = now
            log.warning(
                "consul %s still unreachable after %.0f s (%s: %s)", self._base, down, w.name, exc
            )

    def _note_stale(self, down: float) -> None:
        if not self._stale_logged:
            self._stale_logged = True
            log.error(
                "consul %s unreachable for %.0f s (stale_after %g s): the cached "
                "directory is no longer used, logins are refused",
                self._base,
                down,
                self._settings.stale_after,
            )

    def _on_success(self, w: Watch) -> None:
        now = time.monotonic()
        w.consecutive_errors = 0
        w.failing_since = None
        w.last_error = ""
        w.last_success = now
        w.last_success_wall = time.time()
        if not w.loaded:
            w.loaded = True
            if all(x.loaded for x in self._watches):
                self._loaded.set()
                log.info("directory loaded from %s: %s", self._base, self._on_loaded())
        if self._outage_since is not None and all(x.failing_since is None for x in self._watches):
            log.warning(
                "consul %s reachable again after %.1f s", self._base, now - self._outage_since
            )
            self._outage_since = None
            self._stale_logged = self._denied_logged = False

    def check_fresh(self) -> None:
        """Raise DirectoryUnavailable unless the cached directory may be used."""
        if not self._loaded.is_set():
            raise DirectoryUnavailable("the directory is unavailable: no routing table loaded yet")
        since = self._outage_since
        if since is not None:
            down = time.monotonic() - since
            if down > self._settings.stale_after:
                self._note_stale(down)  # once per outage, whichever notices first
                errors = "; ".join(
                    f"{w.name}: {w.last_error}" for w in self._watches if w.last_error
                )
                raise DirectoryUnavailable(
                    f"the directory is unavailable: directory unreachable for {down:.0f} s",
                    detail=f"consul {self._base} unreachable for {down:.0f} s "
                    f"(stale_after {self._settings.stale_after:g} s): {errors}",
                )

    def describe_age(self) -> str:
        """One line on the routing table's index, last sync and Consul's state."""
        w = self._watches[0]
        if w.last_success_wall is None:
            return "routing table: never loaded"
        now = time.time()
        changed = (
            f", last change {now - w.last_change_wall:.1f} s ago" if w.last_change_wall else ""
        )
        state = (
            "reachable"
            if self._outage_since is None
            else (f"UNREACHABLE for {time.monotonic() - self._outage_since:.0f} s")
        )
        return (
            f"routing table: index {w.index}, last sync {now - w.last_success_wall:.1f} s "
            f"ago{changed}; consul {self._base} {state}"
        )
