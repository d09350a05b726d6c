"""/metrics and /health of a real bastion after real logins, parsed with
prometheus_client's own parser; the Grafana dashboard names only series the
bastion exports."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import ConsulTokens, Person, bastion_sections
from prometheus_client.parser import text_string_to_metric_families

import devstack
from devstack import BastionProcess, ConsulAgent, free_port, ssh_command

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "bastion.json"


def scrape(bastion: BastionProcess) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)]."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(bastion.metrics_text()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    return sum(
        v for got, v in samples.get(name, []) if all(got.get(k) == x for k, x in labels.items())
    )


def test_metrics_after_logins(bastion: BastionProcess, people: dict[str, Person]) -> None:
    before = scrape(bastion)
    alice = people["alice"]
    for _ in range(2):
        result = subprocess.run(
            ssh_command(port=bastion.port, user="alice", identity=alice.key, command=("true",)),
            capture_output=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stderr
    wrong = subprocess.run(
        ssh_command(port=bastion.port, user="bob", identity=alice.key, command=("true",)),
        capture_output=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert wrong.returncode == 255
    after = scrape(bastion)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("bastion_logins_total", outcome="accepted") >= 2
    assert grew("bastion_auth_failures_total", method="publickey") >= 1
    for step in ("auth", "route", "upstream_connect"):
        assert grew(f"bastion_{step}_seconds_count") >= 2, step
    assert grew("bastion_relayed_bytes_total", direction="down") >= 0
    assert value(after, "bastion_directory_entries", state="loaded") >= 3
    for watch in ("routes", "keys", "host_keys", "nodes", "health"):
        assert value(after, "bastion_directory_index", watch=watch) > 0
        assert 0 <= value(after, "bastion_directory_age_seconds", watch=watch) < 120
    assert value(after, "bastion_vault_token_ttl_seconds") > 0
    assert value(after, "bastion_ready") == 1 and value(after, "bastion_draining") == 0
    assert value(after, "bastion_fastpath_active") >= 1
    with urllib.request.urlopen(f"http://127.0.0.1:{bastion.metrics_port}/health") as resp:
        assert resp.status == 200
        assert json.loads(resp.read()) == {"ready": True, "draining": False}


def test_health_says_not_ready_without_a_directory(
    tmp_path: Path, consul_tokens: ConsulTokens, known_hosts: Path, local_ca: Path
) -> None:
    """A bastion that cannot load its directory answers 503 (a load balancer
    or a Consul HTTP check takes it out of service)."""
    nowhere = ConsulAgent(tmp_path / "none", http_port=free_port())  # never started
    sections = bastion_sections(consul_tokens, nowhere, known_hosts, ca_key=local_ca)
    sections["consul"]["request_timeout"] = 1
    proc = BastionProcess(tmp_path / "bastion", sections).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/health")
        assert answer.value.code == 503
        assert json.loads(answer.value.read()) == {"ready": False, "draining": False}
    finally:
        proc.stop()


def test_dashboard_queries_name_exported_series(
    bastion: BastionProcess, people: dict[str, Person]
) -> None:
    # every series the bastion declares, sampled yet or not (a labelled
    # counter has no sample before its first increment)
    exported: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    for family in text_string_to_metric_families(bastion.metrics_text()):
        exported.update(family.name + x for x in suffixes.get(family.type, ("",)))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    for expr in exprs:
        names = set(re.findall(r"\b(bastion_[a-z_]+)\b", expr))
        assert names, expr
        missing = names - exported
        assert not missing, f"{expr}: {sorted(missing)} are not exported"


def test_half_sent_requests_cannot_pin_the_metrics_endpoint(bastion: BastionProcess) -> None:
    """A local user holding many half-sent requests: each is cut at the
    deadline, the endpoint keeps answering, and they hold nothing after."""
    held = []
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", bastion.metrics_port), timeout=10)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
        held.append(s)
    try:
        # over the concurrent bound: the oldest half-sent request makes room
        devstack.wait_until(
            "health answers",
            lambda: (
                urllib.request.urlopen(
                    f"http://127.0.0.1:{bastion.metrics_port}/health", timeout=10
                ).status
                == 200
            ),
            15,
        )
        # each half-sent request is closed to make room or at its deadline (2 s)
        started = time.monotonic()
        for s in held:
            s.settimeout(15)
            # closed; with the half-sent request unread that may be a reset
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(100) == b""
        assert time.monotonic() - started < 12
    finally:
        for s in held:
            s.close()


def closed(s: socket.socket, within: float) -> bool:
    """Whether the peer closes ``s`` within ``within`` seconds."""
    s.settimeout(within)
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_half_sent_request_lines_cannot_take_health_offline(bastion: BastionProcess) -> None:
    """32 connections (twice the bound of 16) each send half a request line
    and hold it: each new one closes the oldest still sending, so /health
    answers at once, and the rest go at the 2 s request deadline."""
    started = time.monotonic()
    held = []
    for _ in range(32):
        s = socket.create_connection(("127.0.0.1", bastion.metrics_port), timeout=10)
        s.sendall(b"GET /hea")  # never finished
        held.append(s)
    try:
        # the 17th to 32nd closed the 1st to 16th at once, well before 2 s
        assert all(closed(s, 1.5) for s in held[:16])
        evicted = time.monotonic() - started
        asked = time.monotonic()
        url = f"http://127.0.0.1:{bastion.metrics_port}/health"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200
        answered = time.monotonic() - asked
        assert answered < 1.0, answered
        # the 16 still held are cut at the request deadline (2 s), not the 5 s one
        assert all(closed(s, 4.0) for s in held[16:])
        cut = time.monotonic() - started
        assert cut < 4.5, cut
        print(
            f"\n16 evicted in {evicted:.2f} s; /health in {answered:.3f} s; rest cut at {cut:.2f} s"
        )
    finally:
        for s in held:
            s.close()
