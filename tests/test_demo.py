"""README's first command, ``bastion demo``: the whole stack comes up, the
printed ``ssh`` and ``consul kv put`` lines work as printed, and Ctrl-C
stops everything it started."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import devstack


class _Output:
    """The demo's output, collected by a thread (the demo keeps running)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.text = ""
        self._thread = threading.Thread(target=self._collect, args=(proc,), daemon=True)
        self._thread.start()

    def _collect(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.text += line

    def wait_for(self, marker: str, proc: subprocess.Popen[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while marker not in self.text:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError(f"no {marker!r} from the demo; it printed:\n{self.text}")
            time.sleep(0.1)
        return self.text

    def finish(self) -> str:
        self._thread.join(timeout=30)
        return self.text


@pytest.mark.timeout(180)
def test_demo_runs_as_the_readme_says(tmp_path: Path) -> None:
    port = devstack.free_port()
    workdir = tmp_path / "demo"
    proc = subprocess.Popen(
        [devstack.bastion_bin(), "demo", "--port", str(port), "--workdir", str(workdir)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output = _Output(proc)
        out = output.wait_for("Press Ctrl-C", proc, 120)
        # the two commands the demo tells a newcomer to type, as printed
        ssh_line = re.search(r"\n\s+(ssh -i .*?alice@127\.0\.0\.1)\n", out.replace("\\\n", ""))
        kv_line = re.search(
            r"\n\s+(CONSUL_HTTP_ADDR=.*?kv put users/alice \S+)\n", out.replace("\\\n", "")
        )
        assert ssh_line and kv_line, out
        ssh = [*shlex.split(ssh_line.group(1)), "-o", "BatchMode=yes", "hostname"]
        first = subprocess.run(ssh, capture_output=True, timeout=60, check=False)
        assert first.returncode == 0, first.stderr
        assert first.stdout == b"host-102\n"

        move = subprocess.run(
            ["bash", "-c", kv_line.group(1)], capture_output=True, timeout=30, check=False
        )
        assert move.returncode == 0, move.stderr
        deadline = time.monotonic() + 10
        while True:
            again = subprocess.run(ssh, capture_output=True, timeout=60, check=False)
            if again.stdout == b"host-101\n" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert again.stdout == b"host-101\n", again.stderr
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends
    assert proc.wait(timeout=60) == 0
    assert "[demo] stopping" in output.finish()
    assert proc.stdout is not None
    proc.stdout.close()
    # nothing it started is left running
    left = subprocess.run(
        ["pgrep", "-f", str(workdir)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert left == [], left
