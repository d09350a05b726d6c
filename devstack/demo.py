"""``bastion demo``: the whole product on one machine, to try by hand.

Starts a real Consul (ACLs deny by default, secured by
``deploy/bootstrap-acl.sh``), a real OpenBao (SSH CA set up by
``deploy/bootstrap-vault.sh``), two OpenSSH hosts host-101 and host-102, routes
the demo user alice to host-102, starts the bastion with the least-privilege
token, prints the ``ssh`` lines to type, and cleans everything up on Ctrl-C.
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


def run_demo(workdir: Path | None, port: int) -> int:
    own_dir = workdir is None
    base = Path(tempfile.mkdtemp(prefix="bastion-demo-")) if workdir is None else workdir
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    parts: list[ConsulAgent | BaoServer | SshdHost | BastionProcess] = []

    def step(msg: str) -> None:
        print(f"[demo] {msg}", flush=True)

    try:
        step("starting Consul 1.8 (ACLs on, default deny)")
        consul = ConsulAgent(base / "consul")
        parts.append(consul.start())
        tokens = base / "consul-tokens"
        print(devstack.secure_consul(consul, tokens), end="")

        step("starting OpenBao and its SSH CA")
        bao = BaoServer(base / "bao")
        parts.append(bao.start())
        vault_out = base / "vault-out"
        print(devstack.setup_vault(bao, vault_out), end="")

        step("starting host-101 and host-102 (OpenSSH, trusting the Vault CA)")
        hosts = {}
        for name, addr in (("host-101", "127.0.1.101"), ("host-102", "127.0.1.102")):
            # port 22 on the host's own address when free, so routes read "host-102"
            host = SshdHost(
                name,
                addr,
                base / name,
                [vault_out / "user_ca.pub"],
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
        consul.kv_put("ssh-keys/alice", key.with_suffix(".pub").read_text())
        consul.kv_put("users/alice", where("host-102"))

        step(f"starting the bastion on 127.0.0.1:{port}")
        bastion = BastionProcess(
            base / "bastion",
            {
                "server": {"auth_methods": ["publickey"]},
                "consul": {
                    "address": consul.http_addr,
                    "token_file": str(tokens / "bastion.token"),
                },
                "vault": {
                    "address": bao.addr,
                    "role_id_file": str(vault_out / "role_id"),
                    "secret_id_file": str(vault_out / "secret_id"),
                },
                "upstream": {"known_hosts": str(known_hosts)},
            },
            port=port,
        )
        parts.append(bastion.start())

        env = (
            f"CONSUL_HTTP_ADDR={consul.http_addr} CONSUL_HTTP_TOKEN=$(cat {tokens}/operator.token)"
        )
        print(
            f"""
The bastion is up. Log in as alice (lands on host-102):

    ssh -i {key} -o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no \\
        -p {port} alice@127.0.0.1

Move alice to host-101, as an operator would, and log in again:

    {env} \\
        {devstack.consul_bin()} kv put users/alice {where("host-101")}

Explain where alice goes, and why:

    {devstack.bastion_bin()} route alice --config {bastion.config}

The hosts listen on their own ports here ({where("host-101")}, {where("host-102")}):
routes name them; in a fleet a bare node name means port 22.

Audit records: {bastion.audit_file}
Bastion log:   {bastion.log}
Metrics:       http://127.0.0.1:{bastion.metrics_port}/metrics (and /health)
Press Ctrl-C to stop everything.""",
            flush=True,
        )
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1):
            for part in parts:
                if part.process is not None and not part.process.alive():
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
