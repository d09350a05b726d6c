"""Bulk data through the relay: real OpenSSH clients (ssh, scp, sftp, rsync)
through the real bastion to alice's host (host-102).

Every transfer is checked byte for byte (sha256 or an exact count) against a
deadline, so a relay that deadlocks, loses, reorders or mixes bytes fails.
Files land in alice's home (both test hosts share this machine's file system)
under unique names and are removed afterwards.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import Person

from devstack import BastionProcess, ssh_bin, ssh_command, wait_until

MiB = 1024 * 1024
ALICE_HOME = Path("/home/alice")


# -- helpers -----------------------------------------------------------------


def ssh_argv(
    bastion: BastionProcess, person: Person, *command: str, extra: Sequence[str] = ()
) -> list[str]:
    return ssh_command(
        port=bastion.port, user=person.name, identity=person.key, extra=extra, command=command
    )


def ssh(
    bastion: BastionProcess,
    person: Person,
    *command: str,
    input: bytes | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ssh_argv(bastion, person, *command),
        check=False,
        input=input,
        capture_output=True,
        timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


def client_options(bastion: BastionProcess, person: Person) -> list[str]:
    """The options of :func:`ssh_command` (``-F``, ``-o ...``, ``-i``), without
    the program, the port and the destination: for scp, sftp and rsync."""
    argv = ssh_argv(bastion, person)[1:-1]
    i = argv.index("-p")
    del argv[i : i + 2]
    return argv


def run_shell(script: str, timeout: float) -> subprocess.CompletedProcess[bytes]:
    """``sh -c script`` in its own process group; the whole pipeline is killed
    on timeout (a plain ``subprocess.run`` would wait for the pipes forever)."""
    proc = subprocess.Popen(
        ["sh", "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {script}\nstdout={out[-500:]!r} stderr={err!r}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree_digest(root: Path) -> dict[str, tuple[int, str]]:
    """relative path → (size, sha256) of every file below ``root``."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, sha256(p.read_bytes()))
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def new_session_records(bastion: BastionProcess, seen: int) -> list[dict[str, object]]:
    """Session audit records after the first ``seen`` records. A client may
    exit before the bastion has seen its connection close (scp kills its
    ssh), so the record is waited for."""

    def sessions() -> list[dict[str, Any]]:
        return [r for r in bastion.audit_records()[seen:] if r["event"] == "session"]

    wait_until("a session audit record", lambda: bool(sessions()), 10)
    return sessions()


@pytest.fixture
def alice(bastion: BastionProcess, people: dict[str, Person]) -> Person:
    return people["alice"]


@pytest.fixture
def remote_prefix() -> Iterator[str]:
    """A unique path prefix in alice's home; everything starting with it is
    removed afterwards."""
    prefix = ALICE_HOME / f"bastion-test-{uuid.uuid4().hex[:12]}"
    yield str(prefix)
    for path in ALICE_HOME.glob(prefix.name + "*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A random ~8 MiB file, a few small binary files and an empty file."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(8 * MiB + 12345))
    (src / "one.bin").write_bytes(os.urandom(1))
    (src / "small.bin").write_bytes(os.urandom(1000))
    (src / "odd.bin").write_bytes(os.urandom(65537))
    (src / "text.txt").write_bytes(b"line one\r\nline two\n\x00\xff tail without newline")
    (src / "empty").write_bytes(b"")
    return src


def assert_landed_as_alice(remote: Path, expected: dict[str, tuple[int, str]]) -> None:
    """The upload is on host-102's disk, byte-exact and owned by alice."""
    assert tree_digest(remote) == expected
    uid = pwd.getpwnam("alice").pw_uid
    assert {p.stat().st_uid for p in remote.rglob("*")} == {uid}


# -- both directions at once, and big one-way streams --------------------------


def test_both_directions_at_once_do_not_deadlock(alice: Person, bastion: BastionProcess) -> None:
    """The classic relay deadlock: 100 MiB in and out of a remote ``cat`` at once."""
    cmd = shlex.join(ssh_argv(bastion, alice, "cat"))
    started = time.monotonic()
    result = run_shell(f"head -c 100M /dev/zero | {cmd} | wc -c", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == b"104857600", result.stderr
    assert result.stderr == b""
    assert time.monotonic() - started < 120


def test_random_payload_round_trips_byte_exact(alice: Person, bastion: BastionProcess) -> None:
    payload = os.urandom(64 * MiB)
    result = ssh(bastion, alice, "cat", input=payload, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == len(payload)
    assert sha256(result.stdout) == sha256(payload)


def test_big_download(alice: Person, bastion: BastionProcess) -> None:
    cmd = shlex.join(ssh_argv(bastion, alice, "head -c 256M /dev/zero"))
    result = run_shell(f"{cmd} | wc -c", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == b"268435456"


def test_big_upload(alice: Person, bastion: BastionProcess) -> None:
    cmd = shlex.join(ssh_argv(bastion, alice, "wc -c"))
    result = run_shell(f"head -c 256M /dev/zero | {cmd}", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == b"268435456"


def test_random_upload_checked_remotely(alice: Person, bastion: BastionProcess) -> None:
    payload = os.urandom(16 * MiB + 7)
    result = ssh(bastion, alice, "sha256sum", input=payload, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{sha256(payload)}  -\n".encode()


# -- stdout and stderr kept apart -------------------------------------------------


def test_stdout_and_stderr_stay_apart_under_volume(alice: Person, bastion: BastionProcess) -> None:
    """10 MiB on each stream, written at the same time by two writers."""
    n = 10 * MiB
    command = f"(yes o | head -c {n}) & (yes e | head -c {n} >&2) & wait"
    result = ssh(bastion, alice, command, timeout=60)
    assert result.returncode == 0
    assert len(result.stdout) == n
    assert len(result.stderr) == n
    assert result.stdout == b"o\n" * (n // 2)
    assert result.stderr == b"e\n" * (n // 2)


def test_interleaved_small_writes_keep_their_stream(alice: Person, bastion: BastionProcess) -> None:
    """Strictly alternating small writes: every line arrives on its own stream, in order."""
    command = "i=0; while [ $i -lt 300 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done"
    result = ssh(bastion, alice, command)
    assert result.returncode == 0
    assert result.stdout == b"".join(b"out%d\n" % i for i in range(300))
    assert result.stderr == b"".join(b"err%d\n" % i for i in range(300))


# -- EOF -------------------------------------------------------------------------


def test_eof_with_early_data(alice: Person, bastion: BastionProcess) -> None:
    """Bytes and EOF sent at once (they reach the bastion before the host does)."""
    data = b"some bytes\x00\xff\nno newline at the end"
    result = ssh(bastion, alice, "cat; echo done", input=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data + b"done\n"


def test_eof_after_the_command_runs(alice: Person, bastion: BastionProcess) -> None:
    """Bytes and EOF sent once the remote command is known to be running."""
    proc = subprocess.Popen(
        ssh_argv(bastion, alice, "echo ready; cat; echo done"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == b"ready\n"
        # communicate() writes the bytes, then closes stdin (EOF)
        out, err = proc.communicate(b"late bytes\n", timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert out == b"late bytes\ndone\n"


def test_eof_with_no_data(alice: Person, bastion: BastionProcess) -> None:
    result = ssh(bastion, alice, "cat; echo done", input=b"")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"done\n"


@pytest.mark.parametrize(("command", "times"), [("echo ok", 5), ("sleep 1; echo ok", 1)])
def test_command_that_ignores_stdin_does_not_hang(
    alice: Person, bastion: BastionProcess, command: str, times: int
) -> None:
    """The client keeps sending (up to 1 GiB) to a command that never reads
    stdin: the command's output and exit status come back, nothing hangs.

    The host closes the channel while the person's data is still arriving;
    the relay once wrote it to the closed upstream channel, and the exception
    tore down the person's connection before the exit status got out
    ("client_loop: send disconnect: Broken pipe", status 255): repeated,
    because it was a race."""
    cmd = shlex.join(ssh_argv(bastion, alice, command))
    for _ in range(times):
        result = run_shell(f"head -c 1G /dev/zero | {cmd}", timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"ok\n"
        assert result.stderr == b""


# -- several logins at once --------------------------------------------------------


def test_parallel_logins_each_get_their_own_bytes(alice: Person, bastion: BastionProcess) -> None:
    payloads = [os.urandom(2 * MiB + i) for i in range(8)]

    def one(payload: bytes) -> subprocess.CompletedProcess[bytes]:
        return ssh(bastion, alice, "sha256sum", input=payload, timeout=90)

    with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
        results = list(pool.map(one, payloads))
    for payload, result in zip(payloads, results, strict=True):
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"{sha256(payload)}  -\n".encode()


# -- scp, sftp, rsync ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sftp", "legacy"])
def test_scp_upload_and_download(
    alice: Person,
    bastion: BastionProcess,
    files: Path,
    remote_prefix: str,
    tmp_path: Path,
    mode: str,
) -> None:
    """scp both ways; ``-O`` is the legacy protocol (an ``exec scp -t``/``scp -f``
    that the bastion must relay, not answer with asyncssh's own scp server)."""
    opts = ["-F", "/dev/null", "-P", str(bastion.port), *client_options(bastion, alice)[2:]]
    if mode == "legacy":
        opts.insert(0, "-O")
    expected = tree_digest(files)
    remote = f"{remote_prefix}-scp-{mode}"
    target = f"{alice.name}@127.0.0.1:{remote}"
    seen = len(bastion.audit_records())
    up = subprocess.run(
        ["scp", "-q", "-r", *opts, str(files), target],
        capture_output=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert up.returncode == 0, up.stderr
    assert_landed_as_alice(Path(remote), expected)
    # relayed to host-102 as a session: the sftp subsystem, or (legacy) an
    # exec of the host's own `scp -t`
    sessions = new_session_records(bastion, seen)
    assert {r["request"] for r in sessions} == {"subsystem" if mode == "sftp" else "exec"}
    assert {str(r["upstream"]).split()[0] for r in sessions} == {"host-102"}

    # a single file to a new name, and the tree back
    single = subprocess.run(
        ["scp", "-q", *opts, str(files / "big.bin"), f"{target}/big-copy.bin"],
        capture_output=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert single.returncode == 0, single.stderr
    assert sha256(Path(remote, "big-copy.bin").read_bytes()) == expected["big.bin"][1]

    down = tmp_path / "down"
    result = subprocess.run(
        ["scp", "-q", "-r", *opts, target, str(down)],
        capture_output=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert tree_digest(down) == {**expected, "big-copy.bin": expected["big.bin"]}


def test_sftp_batch(
    alice: Person, bastion: BastionProcess, files: Path, remote_prefix: str, tmp_path: Path
) -> None:
    opts = ["-F", "/dev/null", "-P", str(bastion.port), *client_options(bastion, alice)[2:]]
    expected = tree_digest(files)
    remote = f"{remote_prefix}-sftp"
    down = tmp_path / "down"
    down.mkdir()

    def batch(lines: list[str]) -> subprocess.CompletedProcess[bytes]:
        path = tmp_path / "batch"
        path.write_text("\n".join(lines) + "\n")
        return subprocess.run(
            ["sftp", "-b", str(path), *opts, f"{alice.name}@127.0.0.1"],
            capture_output=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    names = sorted(expected)
    put = batch(
        [f"mkdir {remote}", f"cd {remote}"]
        + [f"put {files / n} {n}" for n in names]
        + ["ls -l", "pwd"]
    )
    assert put.returncode == 0, put.stderr
    listing = put.stdout.decode()
    for name in names:
        assert name in listing
    assert f"Remote working directory: {remote}" in listing
    assert_landed_as_alice(Path(remote), expected)

    got = batch(
        [f"cd {remote}"]
        + [f"get {n} {down / n}" for n in names]
        + [f"rm {n}" for n in names]
        + ["cd ..", f"rmdir {remote}"]
    )
    assert got.returncode == 0, got.stderr
    assert tree_digest(down) == expected
    assert not Path(remote).exists()


def test_rsync_both_ways(
    alice: Person, bastion: BastionProcess, files: Path, remote_prefix: str, tmp_path: Path
) -> None:
    rsh = shlex.join([ssh_bin(), "-p", str(bastion.port), *client_options(bastion, alice)])
    expected = tree_digest(files)
    remote = f"{remote_prefix}-rsync"
    target = f"{alice.name}@127.0.0.1:{remote}/"

    def rsync(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["rsync", "-a", "-e", rsh, *args],
            capture_output=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    up = rsync(f"{files}/", target)
    assert up.returncode == 0, up.stderr
    assert_landed_as_alice(Path(remote), expected)

    # a changed file goes over with rsync's delta protocol (both directions busy)
    big = files / "big.bin"
    data = bytearray(big.read_bytes())
    data[4 * MiB : 4 * MiB + 100] = os.urandom(100)
    big.write_bytes(bytes(data))
    expected = tree_digest(files)
    again = rsync("--no-whole-file", "--checksum", f"{files}/", target)
    assert again.returncode == 0, again.stderr
    assert tree_digest(Path(remote)) == expected

    down = tmp_path / "down"
    back = rsync(target, f"{down}/")
    assert back.returncode == 0, back.stderr
    assert tree_digest(down) == expected
