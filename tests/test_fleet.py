"""Bastions that register themselves, and two of them behind one name.

Against a real Consul 1.8.7 agent (ACLs on, deny by default, secured by
``deploy/bootstrap-acl.sh``, DNS on a free port): ``bastion register`` writes
the service definition with its local script check into the agent's config
directory and reloads the agent with the least-privilege ``agent-reload``
token; the check passes while the bastion runs, goes critical when it stops,
and ``--deregister`` removes the service. Two bastions on one agent are both
named by ``ssh-bastion.service.consul`` (SRV, through Consul's DNS); one
killed outright drops out of DNS and the passing catalog within its check
interval.
"""

from __future__ import annotations

import grp
import json
import os
import signal
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rdatatype
import pytest

import devstack
from bastion.config import parse_settings
from bastion.errors import ConfigError
from bastion.register import bastion_executable, check_address, plan
from devstack import BastionProcess, ConsulAgent, wait_until

SERVICE = "ssh-bastion"
# short, so the test is quick; the default is 10 s (deploy: [consul] check_interval)
INTERVAL = 2.0
# what "within the check interval" may add: the check's own run, the sync
# to the catalog, a DNS query
SLACK = 3.0


@dataclass
class Fleet:
    agent: ConsulAgent
    tokens: Path
    ca_key: Path
    base: Path
    dns_token: str

    @property
    def reload_token(self) -> Path:
        return self.tokens / "agent-reload.token"

    def bastion(self, name: str, **consul: object) -> BastionProcess:
        """A bastion of this test (the caller starts and stops it)."""
        sections: dict[str, dict[str, Any]] = {
            "server": {"auth_methods": ["publickey"]},
            "consul": {
                "address": self.agent.http_addr,
                "token_file": str(self.tokens / "bastion.token"),
                "check_interval": INTERVAL,
                "check_timeout": 1,
                **consul,
            },
            "upstream": {"ca_key": str(self.ca_key)},
        }
        return BastionProcess(self.base / name, sections)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    base = tmp_path_factory.mktemp("fleet")
    base.chmod(0o755)
    agent = ConsulAgent(base / "consul", dns_port=0)
    try:
        agent.start()
        tokens = base / "consul-tokens"
        devstack.secure_consul(agent, tokens)
        dns_token = devstack.enable_service_dns(agent, SERVICE)
        ca_key = devstack.keygen(base / "user-ca", comment="fleet test CA")
        yield Fleet(agent, tokens, ca_key, base, dns_token)
    finally:
        agent.stop()


# --------------------------------------------------------------------------
# helpers


def health(agent: ConsulAgent, passing: bool = False) -> dict[str, tuple[int, str, str]]:
    """service ID -> (port, status of its banner check, its output) from the catalog."""
    query = "?passing=1" if passing else ""
    status, entries = agent.api("GET", f"/v1/health/service/{SERVICE}{query}")
    assert status == 200, entries
    found = {}
    for entry in entries or []:
        sid = entry["Service"]["ID"]
        checks = [c for c in entry["Checks"] if c["CheckID"] == f"{sid}-banner"]
        state = checks[0]["Status"] if checks else "none"
        output = checks[0]["Output"] if checks else ""
        found[sid] = (entry["Service"]["Port"], state, output)
    return found


def srv(agent: ConsulAgent, name: str = f"{SERVICE}.service.consul") -> set[tuple[str, int]]:
    """(address, port) of every SRV answer for ``name``, asked of the agent's
    DNS interface (addresses from the answer's additional A records)."""
    query = dns.message.make_query(name, dns.rdatatype.SRV)
    response = dns.query.udp(query, "127.0.0.1", port=agent.dns_port, timeout=2)
    addresses = {
        rrset.name.to_text(): item.address
        for rrset in response.additional
        if rrset.rdtype == dns.rdatatype.A
        for item in rrset
    }
    return {
        (addresses.get(item.target.to_text(), item.target.to_text()), item.port)
        for rrset in response.answer
        if rrset.rdtype == dns.rdatatype.SRV
        for item in rrset
    }


def service_file(fleet: Fleet, bastion: BastionProcess) -> Path:
    return fleet.agent.config_dir / f"{SERVICE}-{bastion.port}.json"


def register(fleet: Fleet, bastion: BastionProcess, *extra: str) -> str:
    res = bastion.register(fleet.agent, fleet.reload_token, *extra)
    assert not res.stderr, res.stderr
    return res.stdout


# --------------------------------------------------------------------------
# one bastion: registered -> passing; again -> nothing changes; stopped ->
# critical; deregistered -> gone


def test_register_check_passes_then_critical_then_deregistered(fleet: Fleet) -> None:
    agent = fleet.agent
    bastion = fleet.bastion("one").start()
    sid = f"{SERVICE}-{bastion.port}"
    path = service_file(fleet, bastion)
    try:
        out = register(fleet, bastion)
        assert f"wrote {path}" in out and f"agent: service {SERVICE} (id {sid}" in out, out
        assert "consul validate" in out and "consul reload" in out, out
        # the file: mode 0640, the directory's owner, the consul group if any; its token
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o640
        dir_st = agent.config_dir.stat()
        try:
            want_gid = grp.getgrnam("consul").gr_gid
        except KeyError:
            want_gid = dir_st.st_gid
        assert (st.st_uid, st.st_gid) == (dir_st.st_uid, want_gid)
        service = json.loads(path.read_text())["service"]
        assert service["token"] == (fleet.tokens / "bastion.token").read_text().strip()
        assert (service["id"], service["name"], service["port"]) == (sid, SERVICE, bastion.port)
        assert service["check"]["args"] == [
            devstack.bastion_bin(),
            "check",
            f"127.0.0.1:{bastion.port}",
            "--timeout",
            "0.5",
        ]
        assert (service["check"]["interval"], service["check"]["timeout"]) == ("2s", "1s")
        assert not [p for p in agent.config_dir.iterdir() if p.name.startswith(".")]

        # the agent runs the check (it really ran: its output) and the catalog has it
        wait_until(
            "check passing in the catalog",
            lambda: health(agent, passing=True).get(sid, (0, "", ""))[2].startswith("OK: SSH-2.0-"),
            20,
        )
        assert health(agent)[sid][:2] == (bastion.port, "passing")
        # synced with the definition's own token (Consul 1.8): not "blocked by ACLs"
        log = (agent.workdir / "consul.log").read_text()
        assert f"Synced service: service={sid}" in log
        assert "blocked by ACLs" not in log.split("Updated agent's ACL token", 1)[1]

        # running it twice changes nothing: same file (inode, mtime), same catalog entry
        _, before = agent.api("GET", f"/v1/catalog/service/{SERVICE}")
        out = register(fleet, bastion)
        assert out.strip() == f"[register] {path}: unchanged and loaded by the agent", out
        again = path.stat()
        assert (again.st_ino, again.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
        assert agent.api("GET", f"/v1/catalog/service/{SERVICE}")[1] == before

        # the bastion stops: its check goes critical (connection refused)
        bastion.stop()
        wait_until(
            "check critical",
            lambda: health(agent).get(sid, (0, "", ""))[1] == "critical",
            INTERVAL + 10,
        )
        assert health(agent)[sid][2].startswith(
            f"CRITICAL: connection refused by 127.0.0.1:{bastion.port}"
        )
        assert sid not in health(agent, passing=True)

        # deregistered: the file and the service are gone; a second time: nothing to do
        out = register(fleet, bastion, "--deregister")
        assert f"removed {path}" in out and "deregistered" in out, out
        assert not path.exists()
        wait_until("service gone from the catalog", lambda: sid not in health(agent), 10)
        out = register(fleet, bastion, "--deregister")
        assert out.strip() == f"[register] {path}: unchanged and absent from the agent", out
    finally:
        bastion.stop()
        bastion.register(fleet.agent, fleet.reload_token, "--deregister", check=False)


def test_without_reload_token_the_service_manager_reloads(fleet: Fleet) -> None:
    agent = fleet.agent
    bastion = fleet.bastion("no-reload-token").start()
    sid = f"{SERVICE}-{bastion.port}"
    path = service_file(fleet, bastion)
    try:
        res = bastion.register(agent, None)
        assert res.returncode == 0, res.stderr
        assert "systemctl reload consul" in res.stdout, res.stdout
        assert path.exists()
        # written and valid, not loaded: that is the service manager's job
        assert agent.api("GET", f"/v1/agent/service/{sid}")[0] == 404
        # what `systemctl reload consul` does (ExecReload: kill -HUP); no token
        assert agent.process is not None
        os.kill(agent.process.pid, signal.SIGHUP)
        wait_until(
            "the agent loaded it on SIGHUP",
            lambda: agent.api("GET", f"/v1/agent/service/{sid}")[0] == 200,
            10,
        )
        # then a run with the reload token finds nothing to do
        out = register(fleet, bastion)
        assert "unchanged and loaded by the agent" in out, out
    finally:
        bastion.stop()
        bastion.register(agent, fleet.reload_token, "--deregister", check=False)
    assert not path.exists()


def test_failed_validation_puts_the_previous_file_back(fleet: Fleet) -> None:
    agent = fleet.agent
    bastion = fleet.bastion("broken-dir").start()
    path = service_file(fleet, bastion)
    broken = agent.config_dir / "zz-broken.hcl"
    try:
        register(fleet, bastion)
        previous = path.read_bytes()
        # the settings change (check interval), but the directory does not validate
        text = bastion.config.read_text().replace(
            f"check_interval = {INTERVAL!r}", "check_interval = 5"
        )
        assert text != bastion.config.read_text()
        bastion.config.write_text(text)
        broken.write_text("this is not = = hcl\n")
        res = bastion.register(agent, fleet.reload_token, check=False)
        assert res.returncode == 1
        assert res.stderr.startswith(f"bastion: consul validate {agent.config_dir} failed"), (
            res.stderr
        )
        assert f"{path.name} is back as it was" in res.stderr
        assert path.read_bytes() == previous
        assert not [p for p in agent.config_dir.iterdir() if p.name.startswith(".")]
        broken.unlink()
        out = register(fleet, bastion)
        assert f"updated {path}" in out and "every 5s" in out, out
        assert json.loads(path.read_text())["service"]["check"]["interval"] == "5s"
    finally:
        broken.unlink(missing_ok=True)
        bastion.stop()
        bastion.register(agent, fleet.reload_token, "--deregister", check=False)


def test_remote_script_checks_stay_refused(fleet: Fleet, tmp_path: Path) -> None:
    """Registering a script check over the HTTP API is refused by the agent,
    with the bastion's token and with the management token: `bastion
    register` can only work through the config directory."""
    marker = tmp_path / "pwned"
    args = ["/bin/sh", "-c", f"touch {marker}"]
    bastion_token = (fleet.tokens / "bastion.token").read_text().strip()
    for token in (bastion_token, None):  # None: the management token
        status, body = fleet.agent.api(
            "PUT",
            "/v1/agent/service/register",
            {
                "ID": "ssh-bastion-rce",
                "Name": SERVICE,
                "Port": 1,
                "Check": {"Args": args, "Interval": "1s"},
            },
            token=token,
        )
        assert status == 500 and "Scripts are disabled on this agent from remote calls" in body
    status, body = fleet.agent.api(
        "PUT", "/v1/agent/check/register", {"Name": "rce", "Args": args, "Interval": "1s"}
    )
    assert status == 500 and "Scripts are disabled" in body
    assert fleet.agent.api("GET", "/v1/agent/service/ssh-bastion-rce")[0] == 404
    assert not marker.exists()


# --------------------------------------------------------------------------
# two bastions behind ssh-bastion.service.consul


def test_two_bastions_by_dns_killed_one_drops_out_drained_one_leaves(fleet: Fleet) -> None:
    agent = fleet.agent
    first, second = fleet.bastion("fleet-1"), fleet.bastion("fleet-2")
    try:
        for b in (first, second):
            register(fleet, b.start())
        ids = {b.port: f"{SERVICE}-{b.port}" for b in (first, second)}
        both = {("127.0.0.1", first.port), ("127.0.0.1", second.port)}
        wait_until("both bastions in Consul DNS", lambda: srv(agent) == both, 20)
        assert set(health(agent, passing=True)) == set(ids.values())
        # the DNS token answers for ssh-bastion only; token-less HTTP gets no more
        assert srv(agent, "consul.service.consul") == set()
        assert agent.api("GET", "/v1/kv/users/alice", token="")[0] == 403
        assert agent.api("GET", "/v1/catalog/services", token="") == (200, {SERVICE: ["ssh"]})

        # kill one outright: no shutdown, no maintenance mode, the check notices
        assert first.process is not None
        os.killpg(first.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        first.process.proc.wait(5)
        wait_until(
            "DNS names only the survivor",
            lambda: srv(agent) == {("127.0.0.1", second.port)},
            INTERVAL + SLACK + 5,
        )
        elapsed = time.monotonic() - killed
        print(
            f"\nSIGKILL -> DNS stops naming the killed bastion: {elapsed:.2f} s "
            f"(check interval {INTERVAL:g} s)"
        )
        assert list(health(agent, passing=True)) == [ids[second.port]]
        assert health(agent)[ids[first.port]][1] == "critical"
        assert elapsed <= INTERVAL + SLACK, elapsed

        # it comes back (same port, same registration): its check passes, DNS names both
        first.start()
        wait_until("the restarted bastion in DNS again", lambda: srv(agent) == both, 20)

        # drain the other (SIGTERM: maintenance mode first, bastion/service.py):
        # DNS and the passing catalog drop it without waiting for a check
        assert second.process is not None
        os.killpg(second.process.pid, signal.SIGTERM)
        drained = time.monotonic()
        wait_until(
            "DNS names only the bastion not drained",
            lambda: srv(agent) == {("127.0.0.1", first.port)},
            INTERVAL + SLACK,
        )
        elapsed = time.monotonic() - drained
        print(f"SIGTERM (drain) -> DNS stops naming the drained bastion: {elapsed:.2f} s")
        assert list(health(agent, passing=True)) == [ids[first.port]]
        assert elapsed < INTERVAL, elapsed
        second.process.proc.wait(30)  # no sessions: the drain ends at once
    finally:
        for b in (first, second):
            b.stop()
            b.register(agent, fleet.reload_token, "--deregister", check=False)
    gone = {f"{SERVICE}-{b.port}" for b in (first, second)}
    wait_until("both gone", lambda: not gone & set(health(agent)), 10)


# --------------------------------------------------------------------------
# the definition itself, from the settings


def settings(**sections: dict[str, Any]) -> Any:
    raw: dict[str, dict[str, Any]] = {
        "server": {"host_keys": ["/k"], "listen": "0.0.0.0:2222"},
        "upstream": {"ca_key": "/ca"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_settings(raw, Path("/etc/bastion/bastion.toml"))


def test_definition_from_settings(tmp_path: Path) -> None:
    s = settings()
    p = plan(s, tmp_path, "tok", Path("/opt/bastion/bin/bastion"))
    assert p.path == tmp_path / "ssh-bastion-2222.json"
    service = json.loads(p.content)["service"]
    assert service == {
        "id": "ssh-bastion-2222",
        "name": "ssh-bastion",
        "port": 2222,
        "tags": ["ssh"],
        "token": "tok",
        "check": {
            "id": "ssh-bastion-2222-banner",
            "name": "SSH banner on 127.0.0.1:2222",
            "args": ["/opt/bastion/bin/bastion", "check", "127.0.0.1:2222", "--timeout", "2"],
            "interval": "10s",
            "timeout": "3s",
        },
    }
    s = settings(
        server={"listen": "10.0.0.5:22"},
        consul={"service_id": "bastion-a", "check_interval": 5, "check_timeout": 1.5},
    )
    service = json.loads(plan(s, tmp_path, "t", Path("/b")).content)["service"]
    assert (service["id"], service["address"], service["port"]) == ("bastion-a", "10.0.0.5", 22)
    assert service["check"]["args"] == ["/b", "check", "10.0.0.5:22", "--timeout", "0.75"]
    assert (service["check"]["interval"], service["check"]["timeout"]) == ("5s", "1.5s")
    assert check_address(settings(server={"listen": "[::]:2222"})) == "[::1]:2222"
    assert check_address(settings(server={"listen": "[2001:db8::5]:2222"})) == "[2001:db8::5]:2222"


def test_definition_validates_with_the_shipped_agent_config(tmp_path: Path) -> None:
    """Consul 1.8.7 accepts the generated file next to deploy/consul.d/client.hcl."""
    conf = tmp_path / "consul.d"
    conf.mkdir()
    (conf / "client.hcl").write_text((devstack.ROOT / "deploy/consul.d/client.hcl").read_text())
    p = plan(settings(), conf, "00000000-0000-0000-0000-000000000001", bastion_executable())
    p.path.write_bytes(p.content)
    res = ConsulAgent(tmp_path).run_cli("validate", str(conf), check=False)
    assert res.returncode == 0 and "Configuration is valid" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize(
    ("consul", "needle"),
    [
        ({"service_id": "../etc/x"}, "[consul] service_id"),
        ({"service_id": "a_b"}, "[consul] service_id"),
        ({"service_name": "ssh bastion"}, "[consul] service_name"),
        ({"check_interval": 0.5}, "[consul] check_interval"),
        ({"check_timeout": 20}, "[consul] check_timeout"),
    ],
)
def test_bad_registration_settings(consul: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        settings(consul=consul)


def test_bastion_executable_is_absolute() -> None:
    found = bastion_executable("bastion/cli.py")
    assert found.is_absolute() and found.name == "bastion"
    assert found == Path(devstack.bastion_bin())
