"""ConsulDirectory against a real Consul agent (ACLs on, default deny).

Most tests use the session's Consul secured by ``deploy/bootstrap-acl.sh``
and its real bastion token. The restart test runs its own agents and gives
them a token with the same rules (``BASTION_RULES``, a copy of
``acl-policies/bastion.hcl``'s grants).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from bastion.config import ConsulSettings
from bastion.directory import ConsulDirectory
from bastion.directory.explain import describe
from bastion.errors import (
    DirectoryUnavailable,
    ForwardDenied,
    HostUnhealthy,
    MalformedRoute,
    NoRoute,
    UnknownHost,
)
from bastion.model import Destination
from bastion.policy import LoginPolicy, first_usable
from bastion.trust import HostKeyPolicy
from devstack import ConsulAgent, StackError, free_port

BASTION_RULES = """
key_prefix "users/" { policy = "read" }
key_prefix "ssh-keys/" { policy = "read" }
key_prefix "host-keys/" { policy = "read" }
node_prefix "" { policy = "read" }
service "ssh-bastion" { policy = "write" }
"""

T = TypeVar("T")


class Tokens(Protocol):
    """What the conftest ``consul_tokens`` fixture provides."""

    management: str
    bastion: str


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def make_bastion_token(
    agent: ConsulAgent, secret: str | None = None, policy: str = "bastion-test"
) -> tuple[str, str]:
    """(accessor, secret) of a token with the bastion's policy (created from
    BASTION_RULES unless ``policy`` names an existing one)."""
    code, body = agent.api("GET", f"/v1/acl/policy/name/{policy}")
    if code != 200:
        code, body = agent.api(
            "PUT", "/v1/acl/policy", body={"Name": "bastion-test", "Rules": BASTION_RULES}
        )
        if code != 200:
            raise StackError(f"policy: {code} {body}")
    request: dict[str, Any] = {
        "Description": "bastion (test)",
        "Policies": [{"Name": policy}],
    }
    if secret:
        request["SecretID"] = secret
    code, body = agent.api("PUT", "/v1/acl/token", body=request)
    if code != 200:
        raise StackError(f"token: {code} {body}")
    return body["AccessorID"], body["SecretID"]


def register_node_without_checks(agent: ConsulAgent, node: str, address: str) -> None:
    code, body = agent.api("PUT", "/v1/catalog/register", body={"Node": node, "Address": address})
    if code != 200:
        raise StackError(f"register {node}: {code} {body}")


class Stack:
    def __init__(self, agent: ConsulAgent, token: str) -> None:
        self.agent = agent
        self.token = token

    def settings(self, **overrides: Any) -> ConsulSettings:
        values: dict[str, Any] = {
            "address": self.agent.http_addr,
            "wait": 5.0,
            "request_timeout": 2.0,
        }
        values.update(overrides)
        return ConsulSettings(**values)

    @contextlib.asynccontextmanager
    async def directory(
        self, token: str | None = None, **overrides: Any
    ) -> AsyncIterator[ConsulDirectory]:
        directory = ConsulDirectory(self.settings(**overrides), token or self.token)
        await directory.start()
        try:
            await directory.wait_loaded(5.0)
            yield directory
        finally:
            await directory.aclose()

    async def put(self, key: str, value: str | bytes) -> None:
        await asyncio.to_thread(self.agent.kv_put, key, value)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.agent.kv_delete, key)


@pytest.fixture(scope="module")
def stack(consul: ConsulAgent, consul_tokens: Tokens) -> Stack:
    """The session's Consul, secured by deploy/bootstrap-acl.sh, with the real
    bastion token. Extra nodes use 9xx names so other tests are not affected."""
    consul.register_node("host-101", "127.0.1.101")
    consul.register_node("host-102", "127.0.1.102")
    consul.register_node("host-903", "127.0.9.3", status="critical")
    register_node_without_checks(consul, "host-904", "127.0.9.4")
    return Stack(consul, consul_tokens.bastion)


async def eventually(probe: Callable[[], T | None], timeout: float, what: str = "condition") -> T:
    """Poll ``probe`` (every ms) until it returns a value other than None."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.001)


def raises(call: Callable[[], Any], exc: type[Exception]) -> Exception | None:
    try:
        call()
    except exc as caught:
        return caught
    return None


# --------------------------------------------------------------------------


def test_routes_load_and_resolve(stack: Stack) -> None:
    async def scenario() -> None:
        await stack.put("users/r-alice", "host-102")
        await stack.put("users/lit", "ops@10.0.0.5:2222, [2001:db8::1]")
        async with stack.directory() as directory:
            route = directory.route_for("r-alice")
            assert first_usable(directory, route) == Destination(
                "127.0.1.102", 22, "r-alice", "host-102", "host-102 (127.0.1.102:22)"
            )
            lit = first_usable(directory, directory.route_for("lit"))
            assert lit == Destination("10.0.0.5", 2222, "ops", None, "10.0.0.5:2222")
            stats = directory.stats
            assert stats.loaded and stats.routes >= 2 and stats.nodes >= 4
            assert all(w.index > 0 and w.consecutive_errors == 0 for w in stats.watches)

            # a login makes no Consul request: time route_for + resolve
            before = sum(w.requests for w in directory.stats.watches)
            n = 20000
            started = time.perf_counter()
            for _ in range(n):
                first_usable(directory, directory.route_for("r-alice"))
            per_call = (time.perf_counter() - started) / n * 1e6
            assert sum(w.requests for w in directory.stats.watches) == before
            print(f"\nroute_for+resolve: {per_call:.2f} us per call")

    run(scenario())


def test_put_is_in_force_within_one_second(stack: Stack) -> None:
    async def scenario() -> None:
        await stack.put("users/mover", "host-101")
        async with stack.directory() as directory:
            latencies = []
            values = ["host-102", "host-101", "admin@host-102:2222", "host-101, host-102"]
            for i in range(20):
                value = f"{values[i % len(values)]}"
                if i % len(values) == 0:
                    value += f", h{i}"  # every value differs from the one before
                started = time.perf_counter()
                await stack.put("users/mover", value)

                def in_force(expected: str = value) -> bool | None:
                    return True if directory.route_for("mover").raw == expected else None

                await eventually(in_force, 1.0, f"users/mover = {value}")
                latencies.append(time.perf_counter() - started)
            p50 = statistics.median(latencies) * 1000
            print(
                f"\nput -> in force: p50 {p50:.1f} ms, max {max(latencies) * 1000:.1f} ms "
                f"over {len(latencies)} changes (includes the PUT itself)"
            )
            assert max(latencies) < 1.0

            await stack.delete("users/mover")
            error = await eventually(
                lambda: raises(lambda: directory.route_for("mover"), NoRoute),
                1.0,
                "NoRoute after delete",
            )
            assert error.args[0] == "no route for mover: ask an operator to add users/mover"

    run(scenario())


def test_malformed_entry_affects_only_its_user(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "bastion.directory")

    async def scenario() -> None:
        await stack.put("users/mal-alice", "host-102")
        await stack.put("users/mal-bob", "host-102:99999")
        async with stack.directory() as directory:
            assert directory.route_for("mal-alice").targets[0].host == "host-102"
            for _ in range(10):
                with pytest.raises(MalformedRoute) as info:
                    directory.route_for("mal-bob")
            assert info.value.user_message == (
                "directory entry for mal-bob is malformed: bad port '99999' "
                "(ask an operator to fix users/mal-bob)"
            )
            # an unrelated change rebuilds the table but does not log bob again
            await stack.put("users/mal-alice", "host-101")
            await eventually(
                lambda: True if directory.route_for("mal-alice").raw == "host-101" else None, 1.0
            )
            assert directory.stats.malformed_routes >= 1
        lines = [r for r in caplog.records if "users/mal-bob" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING

    run(scenario())


def test_unknown_and_unhealthy_hosts(stack: Stack) -> None:
    async def scenario() -> None:
        await stack.put("users/u-unknown", "host-999")
        await stack.put("users/u-down", "host-903")
        await stack.put("users/u-nochecks", "host-904")
        await stack.put("users/u-fallback", "host-903, host-101")
        await stack.put("users/u-best", "host-999, host-903")
        await stack.put("users/u-live", "host-905, host-102")
        await asyncio.to_thread(stack.agent.register_node, "host-905", "127.0.9.5")
        async with stack.directory() as directory:

            def resolve(user: str) -> Destination:
                return first_usable(directory, directory.route_for(user))

            with pytest.raises(UnknownHost) as unknown:
                resolve("u-unknown")
            assert unknown.value.user_message == "host-999 is not a known host in the directory"
            with pytest.raises(HostUnhealthy) as down:
                resolve("u-down")
            assert down.value.user_message == "host-903 is down (health checks failing)"
            with pytest.raises(HostUnhealthy) as nochecks:
                resolve("u-nochecks")
            assert nochecks.value.user_message == (
                "host-904 has no health checks (treated as down)"
            )
            assert resolve("u-fallback").node == "host-101"
            with pytest.raises(HostUnhealthy) as best:
                resolve("u-best")
            assert best.value.user_message == "host-903 is down (health checks failing)"
            assert "host-999 is not a known host" in best.value.detail

            assert resolve("u-live").node == "host-905"
            await asyncio.to_thread(stack.agent.register_node, "host-905", "127.0.9.5", "critical")
            dest = await eventually(
                lambda: d if (d := resolve("u-live")).node == "host-102" else None,
                1.0,
                "fallback after check turns critical",
            )
            assert dest.label == "host-102 (127.0.1.102:22)"

            text = describe(directory, "u-live")
            assert "host-905 (node) skipped: host-905 is down (health checks failing)" in text
            assert "u-live@host-102 (127.0.1.102:22); WOULD BE USED" in text
            assert "routing table: index" in text
            assert "does not exist: no route" in describe(directory, "nobody")

    run(scenario())


def test_env_token_cannot_override(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bastion's token cannot read private/; the management token in
    CONSUL_HTTP_TOKEN must not change that."""
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", stack.agent.management_token)
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.1:1")

    async def scenario() -> None:
        await stack.put("private/alice", "host-102")
        async with stack.directory(routes_prefix="private/") as directory:
            with pytest.raises(NoRoute):
                directory.route_for("alice")
        # control: the entry exists and a token that may read it sees it
        async with stack.directory(
            token=stack.agent.management_token, routes_prefix="private/"
        ) as directory:
            assert directory.route_for("alice").targets[0].host == "host-102"

    run(scenario())


def test_jump_destination(stack: Stack) -> None:
    async def scenario() -> None:
        await stack.put(
            "users/jumper",
            '{"route": "host-102, host-101:2200", "jump": ["host-903", "nohost", "10.0.0.9:2222"]}',
        )
        async with stack.directory() as directory:
            policy = LoginPolicy(directory, HostKeyPolicy(None, None))

            def jump(host: str, port: int) -> Destination:
                dest = policy.tunnel("jumper", host, port).destination
                assert dest is not None
                return dest

            assert jump("host-102", 22).label == "host-102 (127.0.1.102:22)"
            assert jump("HOST-102", 22).node == "host-102"
            assert jump("127.0.1.102", 22).node == "host-102"
            assert jump("host-101", 2200).host == "127.0.1.101"
            assert jump("127.0.1.101", 2200).port == 2200
            assert jump("10.0.0.9", 2222) == Destination(
                "10.0.0.9", 2222, "jumper", None, "10.0.0.9:2222"
            )
            for host, port, why in [
                ("host-102", 2222, "host-102 is a jump host on port 22 only"),
                ("host-101", 22, "host-101 is a jump host on port 2200 only"),
                ("127.0.1.101", 22, "127.0.1.101 is a jump host on port 2200 only"),
                ("10.0.0.9", 22, "10.0.0.9 is a jump host on port 2222 only"),
                ("db.example.com", 22, None),
                ("host-905", 22, None),
                ("127.0.9.3", 2222, "127.0.9.3 is a jump host on port 22 only"),
            ]:
                with pytest.raises(ForwardDenied) as denied:
                    jump(host, port)
                assert denied.value.user_message == f"jumper may not connect to {host}:{port}: " + (
                    why or "not a jump host in the directory, and local forwarding (-L, -D) is off"
                )
            with pytest.raises(HostUnhealthy):
                jump("host-903", 22)
            with pytest.raises(HostUnhealthy):
                jump("127.0.9.3", 22)
            with pytest.raises(UnknownHost):
                jump("nohost", 22)
            with pytest.raises(NoRoute):
                policy.tunnel("nobody-here", "host-102", 22)

    run(scenario())


def test_authorized_keys_and_host_keys(stack: Stack) -> None:
    async def scenario() -> None:
        await stack.put(
            "ssh-keys/kalice",
            "ssh-ed25519 AAAAkey1 alice@laptop\n# old key\n\nssh-rsa AAAAkey2 x\n",
        )
        await stack.put("host-keys/host-102", "ssh-ed25519 AAAAhost1 host-102\nssh-rsa AAAAhost2\n")
        await stack.put("host-keys/127.0.1.102", "ssh-rsa AAAAhost2\necdsa-sha2 AAAAhost3\n")
        async with stack.directory() as directory:
            assert directory.authorized_keys("kalice") == [
                "ssh-ed25519 AAAAkey1 alice@laptop",
                "ssh-rsa AAAAkey2 x",
            ]
            assert directory.authorized_keys("nobody") == []
            assert directory.host_keys(["host-102", "127.0.1.102"]) == [
                "ssh-ed25519 AAAAhost1 host-102",
                "ssh-rsa AAAAhost2",
                "ecdsa-sha2 AAAAhost3",
            ]
            assert directory.host_keys(["127.0.1.102"]) == [
                "ssh-rsa AAAAhost2",
                "ecdsa-sha2 AAAAhost3",
            ]
            assert directory.host_keys(["host-101"]) == []

            await stack.put("ssh-keys/kalice", "ssh-ed25519 AAAAkey3 new")
            await eventually(
                lambda: (
                    True
                    if directory.authorized_keys("kalice") == ["ssh-ed25519 AAAAkey3 new"]
                    else None
                ),
                1.0,
                "key update",
            )
            await stack.delete("ssh-keys/kalice")
            await stack.delete("host-keys/127.0.1.102")
            await eventually(
                lambda: (
                    True
                    if not directory.authorized_keys("kalice")
                    and directory.host_keys(["127.0.1.102"]) == []
                    else None
                ),
                1.0,
                "key deletes",
            )

    run(scenario())


def test_revoked_token_is_unreachable(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "bastion.directory")
    accessor, secret = make_bastion_token(stack.agent, policy="bastion")

    async def scenario() -> None:
        await stack.put("users/revoked", "host-102")
        async with stack.directory(token=secret, wait=1.0, stale_after=2.0) as directory:
            code, body = await asyncio.to_thread(
                stack.agent.api, "DELETE", f"/v1/acl/token/{accessor}"
            )
            assert code == 200, body
            await eventually(
                lambda: True if "token rejected by Consul (revoked?)" in caplog.text else None,
                3.0,
                "token rejected log",
            )
            assert directory.route_for("revoked").raw == "host-102"  # within stale_after
            error = await eventually(
                lambda: raises(lambda: directory.route_for("revoked"), DirectoryUnavailable),
                4.0,
                "unavailable",
            )
            assert "directory unreachable for" in str(error)
        assert secret not in caplog.text

    run(scenario())


def test_not_loaded_and_wait_timeout(tmp_path: Path) -> None:
    async def scenario() -> None:
        settings = ConsulSettings(address=f"http://127.0.0.1:{free_port()}", request_timeout=0.5)
        directory = ConsulDirectory(settings, "some-token")
        try:
            with pytest.raises(DirectoryUnavailable) as before:
                directory.route_for("alice")
            assert before.value.user_message == (
                "the directory is unavailable: no routing table loaded yet"
            )
            await directory.start()
            with pytest.raises(DirectoryUnavailable) as timed_out:
                await directory.wait_loaded(0.5)
            assert "routes:" in timed_out.value.detail
            assert "some-token" not in repr(directory)
        finally:
            await directory.aclose()

    run(scenario())


def snapshot(agent: ConsulAgent, method: str, data: bytes | None = None) -> bytes:
    """``GET`` (save) or ``PUT`` (restore) ``/v1/snapshot``; binary, so not http_json."""
    request = urllib.request.Request(
        f"{agent.http_addr}/v1/snapshot",
        data=data,
        method=method,
        headers={"X-Consul-Token": agent.management_token},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return bytes(response.read())


def test_index_backwards_then_consul_down_then_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A snapshot restore sends the index backwards; a stopped Consul is
    served from cache within stale_after, refused after it; a fresh cluster on
    the same port (same token secret) is picked up again."""
    caplog.set_level(logging.INFO, "bastion.directory")
    agent = ConsulAgent(tmp_path / "c1")
    agent2: ConsulAgent | None = None
    secret = str(uuid.uuid4())
    try:
        agent.start()
        agent.bootstrap()
        make_bastion_token(agent, secret)
        agent.register_node("host-102", "127.0.1.102")
        agent.kv_put("users/alice", "host-102")
        saved = snapshot(agent, "GET")
        for i in range(10):
            agent.kv_put("users/alice", f"host-102, h{i}")
        stack = Stack(agent, secret)

        async def scenario() -> None:
            nonlocal agent2
            # Consul 1.8 does not wake blocking queries on a restore: the short
            # wait makes the watch see the lower index within about a second
            async with stack.directory(stale_after=3.0, wait=1.0) as directory:
                assert directory.route_for("alice").raw == "host-102, h9"
                await asyncio.to_thread(snapshot, agent, "PUT", saved)
                await eventually(
                    lambda: True if directory.route_for("alice").raw == "host-102" else None,
                    3.0,
                    "restored value",
                )
                assert "index went backwards" in caplog.text

                stopped = time.monotonic()
                await asyncio.to_thread(agent.stop)
                await eventually(
                    lambda: True if "serving the cached directory" in caplog.text else None,
                    2.0,
                    "outage warning",
                )
                assert directory.route_for("alice").raw == "host-102"
                assert first_usable(directory, directory.route_for("alice")).node == "host-102"
                await eventually(
                    lambda: raises(lambda: directory.route_for("alice"), DirectoryUnavailable),
                    5.0,
                    "stale",
                )
                assert time.monotonic() - stopped >= 3.0
                assert "is no longer used" in caplog.text

                # a fresh cluster on the same port: new ACLs, same token secret
                agent2 = ConsulAgent(tmp_path / "c2", http_port=agent.http_port)
                await asyncio.to_thread(agent2.start)
                await asyncio.to_thread(agent2.bootstrap)
                await asyncio.to_thread(make_bastion_token, agent2, secret)
                await asyncio.to_thread(agent2.register_node, "host-101", "127.0.1.101")
                await asyncio.to_thread(agent2.kv_put, "users/alice", "host-101")
                dest = await eventually(lambda: _try_resolve(directory), 15.0, "recovery")
                assert dest.node == "host-101"
                assert "reachable again" in caplog.text

        run(scenario())
    finally:
        agent.stop()
        if agent2 is not None:
            agent2.stop()


def _try_resolve(directory: ConsulDirectory) -> Destination | None:
    try:
        return first_usable(directory, directory.route_for("alice"))
    except (DirectoryUnavailable, NoRoute, UnknownHost, HostUnhealthy):
        return None
