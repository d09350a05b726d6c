"""A jump (``direct-tcpip``) channel closes once both directions have ended.

OpenSSH's ``ssh -W`` (and the ProxyJump child of ``ssh -J``) waits for the
server to close the channel after EOF has passed both ways, as sshd does. If
the bastion only forwarded the EOFs, ``ssh -W`` would hang; ``ssh -J`` hides it
by killing its child with SIGHUP, unless SIGHUP is ignored (nohup, CI runners).
"""

from __future__ import annotations

import subprocess
import time

from conftest import Person

from devstack import BastionProcess, SshdHost, ssh_command


def test_ssh_w_exits_when_both_sides_are_done(
    bastion: BastionProcess, people: dict[str, Person], hosts: dict[str, SshdHost]
) -> None:
    target = hosts["host-102"]
    argv = ssh_command(
        port=bastion.port,
        user="alice",
        identity=people["alice"].key,
        extra=["-W", f"{target.address}:{target.port}"],
    )
    started = time.monotonic()
    # our stdin ends at once: sshd sees EOF after our banner, answers and closes
    result = subprocess.run(
        argv, input=b"SSH-2.0-probe\r\n", capture_output=True, timeout=20, check=False
    )
    assert time.monotonic() - started < 10
    assert result.stdout.startswith(b"SSH-2.0-OpenSSH"), result.stderr
    assert result.returncode == 0, result.stderr
