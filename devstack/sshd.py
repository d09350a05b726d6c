"""OpenSSH: key pairs and user certificates, target hosts (``sshd`` in a UTS
namespace each), and client command lines."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from devstack.process import Process, free_port, ssh_bin, ssh_keygen_bin, sshd_bin, wait_until


def ssh_banner(host: str, port: int, timeout: float = 2.0) -> bytes:
    """The first line an SSH server sends (its identification string)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        data = b""
        while b"\n" not in data and len(data) < 256:
            chunk = sock.recv(256)
            if not chunk:
                break
            data += chunk
        return data.split(b"\n", 1)[0]


def keygen(path: Path, kind: str = "ed25519", comment: str = "") -> Path:
    """``ssh-keygen`` a key pair at ``path`` (no passphrase); returns ``path``."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                ssh_keygen_bin(),
                "-q",
                "-t",
                kind,
                "-N",
                "",
                "-C",
                comment or path.name,
                "-f",
                str(path),
            ],
            check=True,
            capture_output=True,
        )
    return path


def sign_user_key(
    ca_key: Path, pubkey: Path, principals: Sequence[str], key_id: str, validity: str = "+1h"
) -> Path:
    """Sign ``pubkey`` with ``ca_key``; the certificate lands next to it."""
    subprocess.run(
        [
            ssh_keygen_bin(),
            "-q",
            "-s",
            str(ca_key),
            "-I",
            key_id,
            "-n",
            ",".join(principals),
            "-V",
            validity,
            str(pubkey),
        ],
        check=True,
        capture_output=True,
    )
    return pubkey.with_name(pubkey.name.removesuffix(".pub") + "-cert.pub")


SSHD_CONFIG = """\
ListenAddress {listen}
HostKey {host_key}
PidFile {workdir}/sshd.pid
UsePAM no
StrictModes no
PermitRootLogin no
PubkeyAuthentication yes
TrustedUserCAKeys {user_ca_keys}
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication yes
KbdInteractiveAuthentication no
AllowAgentForwarding yes
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
PrintLastLog no
AcceptEnv LANG LC_* BASTION_TEST_*
Subsystem sftp internal-sftp
LogLevel VERBOSE
MaxStartups 200:30:400
MaxSessions {max_sessions}
"""


@dataclass
class SshdHost:
    """A real OpenSSH server with its own host name (UTS namespace) and address."""

    name: str
    address: str
    workdir: Path
    user_ca_keys: list[Path]
    port: int = 0
    process: Process | None = None
    # sshd's limit of sessions per connection (hardened hosts set 1 or 2)
    max_sessions: int = 100
    host_key: Path = field(init=False)

    def __post_init__(self) -> None:
        self.host_key = self.workdir / "ssh_host_ed25519_key"

    @property
    def host_pubkey(self) -> str:
        return self.host_key.with_suffix(".pub").read_text().strip()

    def known_hosts_line(self) -> str:
        """The line a client needs to trust this host, by address and by name."""
        key = " ".join(self.host_pubkey.split()[:2])
        return f"[{self.address}]:{self.port},{self.name} {key}"

    def start(self, timeout: float = 20.0) -> SshdHost:
        self.workdir.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(exist_ok=True)
        if not self.port:
            self.port = free_port(self.address)
        keygen(self.host_key, comment=f"host key of {self.name}")
        ca_file = self.workdir / "trusted_user_ca_keys"
        ca_file.write_text("".join(p.read_text() for p in self.user_ca_keys))
        cfg = self.workdir / "sshd_config"
        cfg.write_text(
            SSHD_CONFIG.format(
                listen=f"[{self.address}]:{self.port}"
                if ":" in self.address
                else f"{self.address}:{self.port}",
                host_key=self.host_key,
                workdir=self.workdir,
                user_ca_keys=ca_file,
                max_sessions=self.max_sessions,
            )
        )
        sshd = sshd_bin()
        # a UTS namespace per host so that `hostname` tells the hosts apart
        argv = [
            "unshare",
            "--uts",
            "sh",
            "-c",
            f'hostname "$0" && exec {sshd} -D -e -f "$1"',
            self.name,
            str(cfg),
        ]
        self.process = Process(f"sshd {self.name}", argv, self.workdir / "sshd.log")
        wait_until(
            f"sshd {self.name}",
            lambda: ssh_banner(self.address, self.port).startswith(b"SSH-2.0-"),
            timeout,
            self.process.proc,
            self.process.log,
        )
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def ssh_command(
    *,
    port: int,
    user: str,
    host: str = "127.0.0.1",
    identity: Path | None = None,
    known_hosts: Path | None = None,
    extra: Sequence[str] = (),
    command: Sequence[str] = (),
) -> list[str]:
    """An OpenSSH client command line that reads no user config and never prompts.

    ``extra`` comes first: for ssh the first value of an option wins.
    """
    argv = [
        ssh_bin(),
        "-F",
        "/dev/null",
        "-p",
        str(port),
        *extra,
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=10",
        "-o",
        f"UserKnownHostsFile={known_hosts or '/dev/null'}",
        "-o",
        "StrictHostKeyChecking=" + ("yes" if known_hosts else "no"),
        "-o",
        "GlobalKnownHostsFile=/dev/null",
    ]
    if identity is not None:
        argv += ["-o", "IdentitiesOnly=yes", "-i", str(identity)]
    argv.append(f"{user}@{host}")
    argv += list(command)
    return argv


def stop_ssh_client(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """End a running OpenSSH client and reap it (its pipes are drained and closed).

    SIGTERM is sent again every half second: OpenSSH 9.2's client loses a
    SIGTERM that arrives while it is not waiting in ``ppoll`` (it blocks no
    signals around the check), and with ``-N`` it then sleeps there forever.
    A second signal finds it asleep. SIGKILL after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.5)
    if proc.poll() is None:
        proc.kill()
    proc.communicate()
