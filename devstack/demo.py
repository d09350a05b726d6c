"""``bastion demo``: the whole product on one machine, to try by hand.

Starts a real Consul (ACLs deny by default, secured by
``deploy/bootstrap-acl.sh``), a real OpenBao (SSH CA set up by
``deploy/bootstrap-vault.sh``), two OpenSSH hosts host-101 and host-102, routes
the demo user alice to host-102, starts the bastion with the least-privilege
token (``--bastions N``: N of them, on consecutive ports), registers each with
``bastion register`` (its local script check, in the agent's config directory),
prints the ``ssh`` lines to type and how Consul DNS names "the bastion", and
cleans everything up on Ctrl-C.
"""

from __future__ import annotations

import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path

import devstack
from devstack import BaoServer, BastionProcess, ConsulAgent, SshdHost


def _port_free(addr: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((addr, port))
        except OSError:
            return False
        return True


# the demo's script-check interval: short, so a stopped bastion leaves DNS
# quickly (the default is 10 s)
DEMO_CHECK_INTERVAL = 3


def _fleet_text(consul: ConsulAgent, fleet: list[BastionProcess], key: Path) -> str:
    """How to find "the bastion" through Consul: DNS (SRV) and the catalog."""
    dns = consul.dns_port
    lines = [
        "",
        f'"The bastion" by Consul DNS ({len(fleet)} registered with `bastion register`,'
        f" script check every {DEMO_CHECK_INTERVAL} s):",
        "",
        f"    dig @127.0.0.1 -p {dns} ssh-bastion.service.consul SRV",
        f"    curl -s '{consul.http_addr}/v1/health/service/ssh-bastion?passing=1'",
        "",
        "and ssh to whichever it names:",
        "",
        f"    ssh -i {key} -o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no \\",
        f'        -p "$(dig @127.0.0.1 -p {dns} +short ssh-bastion.service.consul SRV'
        " | awk 'NR==1 {print $3}')\" alice@127.0.0.1",
    ]
    if len(fleet) > 1:
        pids = ", ".join(f"{b.port}: pid {b.process.pid}" for b in fleet if b.process is not None)
        lines += [
            "",
            f"Stop one ({pids}) with kill -9 PID: within {DEMO_CHECK_INTERVAL} s DNS names",
            "only the others; kill -TERM PID drains it (maintenance mode) at once.",
        ]
    return "\n".join(lines)


SSH_CONFIG = """\
# bastion demo: ssh -F {path} bastion | ssh -F {path} -J bastion host-102
Host bastion
  HostName 127.0.0.1
  Port {port}
{hosts}Host *
  User alice
  IdentityFile {key}
  CertificateFile {key}-cert.pub
  IdentitiesOnly yes
  UserKnownHostsFile /dev/null
  StrictHostKeyChecking no
  LogLevel ERROR
"""


def _ssh_config(base: Path, port: int, hosts: dict[str, SshdHost], key: Path) -> Path:
    """An ssh_config for the demo: ``-F`` reaches the ``-J`` hop too, which
    command-line ``-i``/``-o`` options do not."""
    path = base / "ssh_config"
    entries = "".join(
        f"Host {name}\n  HostName {h.address}\n  Port {h.port}\n" for name, h in hosts.items()
    )
    path.write_text(SSH_CONFIG.format(path=path, port=port, hosts=entries, key=key))
    return path


def run_demo(workdir: Path | None, port: int, bastions: int = 1, workers: int = 1) -> int:
    own_dir = workdir is None
    base = Path(tempfile.mkdtemp(prefix="bastion-demo-")) if workdir is None else workdir
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    parts: list[ConsulAgent | BaoServer | SshdHost | BastionProcess] = []
    fleet: list[BastionProcess] = []

    def step(msg: str) -> None:
        print(f"[demo] {msg}", flush=True)

    try:
        step("starting Consul 1.8 (ACLs on, default deny)")
        consul = ConsulAgent(base / "consul", dns_port=0)
        parts.append(consul.start())
        tokens = base / "consul-tokens"
        print(devstack.secure_consul(consul, tokens), end="")
        step(f"Consul DNS on 127.0.0.1:{consul.dns_port} answers ssh-bastion.service.consul")
        devstack.enable_service_dns(consul, "ssh-bastion")

        step("starting OpenBao and its SSH CA")
        bao = BaoServer(base / "bao")
        parts.append(bao.start())
        vault_out = base / "vault-out"
        print(devstack.setup_vault(bao, vault_out), end="")

        step("starting host-101 and host-102 (OpenSSH, trusting the Vault CA and the people's CA)")
        # people's own certificates for `ssh -J` (end to end: the host checks
        # the person, not the bastion), from a CA standing in for the company's
        people_ca = devstack.keygen(base / "people-ca", comment="demo people CA")
        hosts = {}
        for name, addr in (("host-101", "127.0.1.101"), ("host-102", "127.0.1.102")):
            # port 22 on the host's own address when free, so routes read "host-102"
            host = SshdHost(
                name,
                addr,
                base / name,
                [vault_out / "user_ca.pub", people_ca.with_suffix(".pub")],
                port=22 if _port_free(addr, 22) else 0,
            )
            parts.append(host.start())
            consul.register_node(name, addr)
            hosts[name] = host
        known_hosts = base / "known_hosts"
        known_hosts.write_text("".join(h.known_hosts_line() + "\n" for h in hosts.values()))

        def where(name: str) -> str:
            port = hosts[name].port
            return name if port == 22 else f"{name}:{port}"

        step(f"routing alice → host-102 (consul kv put users/alice {where('host-102')})")
        key = devstack.keygen(base / "id_alice", comment="alice@demo")
        devstack.sign_user_key(people_ca, key.with_suffix(".pub"), ["alice"], "alice", "+12h")
        consul.kv_put("ssh-keys/alice", key.with_suffix(".pub").read_text())
        consul.kv_put("users/alice", where("host-102"))
        # a second person: deleting the only entry of users/ looks like a
        # token that lost its read (docs/access.md) and closes nothing
        bob = devstack.keygen(base / "id_bob", comment="bob@demo")
        consul.kv_put("ssh-keys/bob", bob.with_suffix(".pub").read_text())
        consul.kv_put("users/bob", where("host-101"))

        for i in range(bastions):
            step(f"starting the bastion on 127.0.0.1:{port + i}")
            one = BastionProcess(
                base / ("bastion" if i == 0 else f"bastion-{i + 1}"),
                {
                    # a drain (SIGTERM) gives live sessions two minutes here
                    "server": {
                        "auth_methods": ["publickey"],
                        "drain_timeout": 120,
                        "workers": workers,
                    },
                    # bastion sessions / kill --socket (here, not /run/bastion)
                    "admin": {"socket": str(base / f"admin-{i}.sock")},
                    "consul": {
                        "address": consul.http_addr,
                        "token_file": str(tokens / "bastion.token"),
                        "check_interval": DEMO_CHECK_INTERVAL,
                    },
                    "vault": {
                        "address": bao.addr,
                        "role_id_file": str(vault_out / "role_id"),
                        "secret_id_file": str(vault_out / "secret_id"),
                    },
                    "upstream": {"known_hosts": str(known_hosts)},
                },
                port=port + i,
            )
            parts.append(one.start())
            fleet.append(one)
            print(one.register(consul, tokens / "agent-reload.token").stdout, end="")
        bastion = fleet[0]
        ssh_config = _ssh_config(base, port, hosts, key)

        def passing() -> bool:
            code, body = consul.api("GET", "/v1/health/service/ssh-bastion?passing=1")
            return code == 200 and len(body or []) == bastions

        devstack.wait_until("the bastions' checks passing in Consul", passing, 30)

        env = (
            f"CONSUL_HTTP_ADDR={consul.http_addr} CONSUL_HTTP_TOKEN=$(cat {tokens}/operator.token)"
        )
        mfa_entry = f'{{"route": "{where("host-102")}", "mfa": "totp"}}'
        print(
            f"""
The bastion is up. Log in as alice (lands on host-102):

    ssh -i {key} -o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no \\
        -p {port} alice@127.0.0.1

or with the demo's ssh_config, also jumping through it (end to end to the
host; alice's own certificate from the demo's people CA logs her in there):

    ssh -F {ssh_config} bastion
    ssh -F {ssh_config} -J bastion host-102

Live sessions, and ending them (the person reads why):

    {devstack.bastion_bin()} sessions --socket {base / "admin-0.sock"}
    {devstack.bastion_bin()} kill --socket {base / "admin-0.sock"} --user alice --why "demo"

Grant alice a jump to host-101 for five minutes (docs/access.md):

    {devstack.bastion_bin()} grant alice {where("host-101")} --for 5m --config {bastion.config} \\
        --consul-token-file {tokens}/operator.token
    ssh -F {ssh_config} -J bastion host-101

Move alice to host-101, as an operator would, and log in again:

    {env} \\
        {devstack.consul_bin()} kv put users/alice {where("host-101")}

Explain where alice goes, and why:

    {devstack.bastion_bin()} route alice --config {bastion.config}

Ask alice for a TOTP code after her key (docs/mfa.md): enrol her (scan
alice.png, or give the otpauth:// URL to an authenticator app), then:

    BAO_ADDR={bao.addr} BAO_TOKEN={bao.root_token} {devstack.bao_bin()} write \\
        -field=barcode totp/keys/alice generate=true issuer=bastion account_name=alice \\
        | base64 -d > alice.png
    {env} \\
        {devstack.consul_bin()} kv put users/alice '{mfa_entry}'

The hosts listen on their own ports here ({where("host-101")}, {where("host-102")}):
routes name them; in a fleet a bare node name means port 22.

Audit records: {bastion.audit_file}
Bastion log:   {bastion.log}
Metrics:       http://127.0.0.1:{bastion.metrics_port}/metrics (and /health)
{_fleet_text(consul, fleet, key)}
Press Ctrl-C to stop everything.""",
            flush=True,
        )
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        gone: set[int] = set()
        while not stop.wait(1):
            for part in parts:
                if part.process is None or part.process.alive():
                    continue
                if isinstance(part, BastionProcess) and len(fleet) > 1:
                    # one of several: Consul notices (the point of a fleet)
                    if part.port not in gone:
                        gone.add(part.port)
                        step(f"the bastion on port {part.port} exited; Consul's check notices")
                    if len(gone) < len(fleet):
                        continue
                raise devstack.StackError(f"{part.process.name} exited; see {part.process.log}")
        return 0
    except devstack.StackError as exc:
        print(f"[demo] failed: {exc}", flush=True)
        return 1
    finally:
        step("stopping")
        for part in reversed(parts):
            part.stop()
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)
