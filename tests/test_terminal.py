"""Interactive sessions through the bastion, in a real terminal.

tmux runs the OpenSSH client (``ssh -tt alice@bastion``) in a pane of a known
size; the tests type into it with ``send-keys`` and read the screen with
``capture-pane``, polling against deadlines. They prove that the PTY request
(terminal type, size, modes), window changes, Ctrl-C and the exit status pass
through the relay, and that only allow-listed environment variables reach the
host.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import Person

import devstack
from devstack import BastionProcess, SshdHost, ssh_command

PROMPT = "bastion-test$ "
# typed with the quotes split so the echoed command line never matches
SET_PROMPT = 'PS1="bastion""-test$ "'
TMUX_CONF = """\
set -g default-shell /bin/sh
set -g default-terminal tmux-256color
set -g remain-on-exit on
set -g history-limit 5000
"""


def ssh_argv(
    bastion: BastionProcess, person: Person, *command: str, extra: Sequence[str] = ()
) -> list[str]:
    return ssh_command(
        port=bastion.port, user=person.name, identity=person.key, extra=extra, command=command
    )


class Tmux:
    """One tmux server on its own socket, with one session ``t`` running a command."""

    def __init__(self, workdir: Path) -> None:
        # a socket of its own (-S, like -L but in the test's directory, so
        # nothing is left in /tmp/tmux-UID)
        self.socket = str(workdir / "tmux.sock")
        self.conf = workdir / "tmux.conf"
        self.conf.write_text(TMUX_CONF)
        # nothing of the caller's environment (TMUX, TERM, LANG...) leaks in
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir)}
        self.started = False
        self._marks = 0

    def tmux(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-S", self.socket, "-f", str(self.conf), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def start(self, argv: Sequence[str], width: int = 100, height: int = 30) -> None:
        """Run ``argv`` in the pane; its exit status is printed when it ends
        (tmux 3.3a's ``#{pane_dead_status}`` sometimes never gets the status)."""
        command = f'{shlex.join(argv)}; echo "[exited with status $?]"'
        self.tmux("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height), command)
        self.started = True

    def kill(self) -> None:
        if self.started:
            subprocess.run(
                ["tmux", "-S", self.socket, "kill-server"],
                env=self.env,
                capture_output=True,
                timeout=10,
                check=False,
            )
            self.started = False

    def screen(self) -> str:
        """The visible pane and its scroll-back, wrapped lines joined."""
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "t")

    def wait_for_screen(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            screen = self.screen()
            found = regex.search(screen)
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{pattern!r} not on the screen after {timeout}s:\n{screen.rstrip()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.1)

    def type(self, text: str) -> None:
        """Type ``text`` (literally) and press Enter."""
        self.tmux("send-keys", "-t", "t", "-l", text)
        self.tmux("send-keys", "-t", "t", "Enter")

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "t", *keys)

    def output_of(self, expression: str, timeout: float = 10.0) -> str:
        """Run ``echo <expression>`` in the remote shell and return what it printed.

        The output is tagged with a fresh mark whose typed form (``"mark""7:"``)
        differs from its printed form (``mark7:``), so the echoed command line
        never matches."""
        self._marks += 1
        n = self._marks
        self.type(f'echo "mark""{n}: {expression}"')
        return self.wait_for_screen(rf"^mark{n}: (.*)$", timeout).group(1).rstrip()

    def exit_status(self, timeout: float = 10.0) -> int:
        """Wait for the pane's program (the ssh client) to exit; its status."""
        return int(self.wait_for_screen(r"^\[exited with status (\d+)\]$", timeout).group(1))


@pytest.fixture
def alice(bastion: BastionProcess, people: dict[str, Person]) -> Person:
    return people["alice"]


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    term = Tmux(tmp_path)
    try:
        yield term
    finally:
        term.kill()


def login(tmux: Tmux, bastion: BastionProcess, alice: Person) -> None:
    """``ssh -tt alice@bastion`` (a login shell) in a 100x30 pane, with a known prompt."""
    tmux.start(ssh_argv(bastion, alice, extra=["-tt"]), width=100, height=30)
    tmux.wait_for_screen(r"^\$\s*$")  # dash's default prompt: the shell is up
    tmux.type(SET_PROMPT)
    tmux.wait_for_screen(r"^bastion-test\$")


# -- in a real terminal ------------------------------------------------------------


def test_interactive_shell(tmux: Tmux, bastion: BastionProcess, alice: Person) -> None:
    """Prompt, terminal type and size, window change, Ctrl-C, then ``exit``."""
    login(tmux, bastion, alice)
    assert tmux.output_of("$(hostname) $(id -un)") == "host-102 alice"
    assert tmux.output_of("$TERM") == "tmux-256color"
    assert tmux.output_of("$(tty)").startswith("/dev/pts/")
    assert tmux.output_of("$(stty size)") == "30 100"

    # the client's SIGWINCH becomes a window-change request, relayed upstream
    tmux.tmux("resize-window", "-t", "t", "-x", "120", "-y", "40")
    deadline = time.monotonic() + 10
    while (size := tmux.output_of("$(stty size)")) != "40 120":
        assert time.monotonic() < deadline, f"stty size still {size!r} after resize"

    # Ctrl-C interrupts the foreground program, not the session
    shell_pid = tmux.output_of("$$")
    tmux.type('echo "sleep""ing"; sleep 100')
    tmux.wait_for_screen(r"^sleeping$")
    interrupted = time.monotonic()
    tmux.keys("C-c")
    assert tmux.output_of("alive") == "alive"
    assert time.monotonic() - interrupted < 10  # not the 100 s of the sleep
    assert "^C" in tmux.screen()  # echoed by the host's terminal (modes relayed)
    assert tmux.output_of("$$") == shell_pid  # same shell, still running
    assert tmux.output_of("$(stty size)") == "40 120"

    tmux.type("exit")
    assert tmux.exit_status() == 0


def test_exit_status_from_interactive_shell(
    tmux: Tmux, bastion: BastionProcess, alice: Person
) -> None:
    login(tmux, bastion, alice)
    tmux.type("exit 7")
    assert tmux.exit_status() == 7


def test_interactive_command_in_terminal(
    tmux: Tmux, bastion: BastionProcess, alice: Person
) -> None:
    """An exec request with a PTY (``ssh -tt host cmd``): an interactive shell
    started as the command, sized like the pane it runs in."""
    tmux.start(
        ssh_argv(bastion, alice, "env PS1='bastion-test$ ' sh -i", extra=["-tt"]),
        width=90,
        height=25,
    )
    tmux.wait_for_screen(r"^bastion-test\$")
    assert tmux.output_of("$(stty size) $TERM") == "25 90 tmux-256color"
    tmux.type('read line; echo "got:$line"')
    tmux.type("typed into the terminal")
    tmux.wait_for_screen(r"^got:typed into the terminal$")
    tmux.keys("C-d")  # EOF at the prompt ends the shell
    assert tmux.exit_status() == 0


# -- PTY or not, without tmux ---------------------------------------------------------


def test_forced_pty(bastion: BastionProcess, alice: Person) -> None:
    env = {**os.environ, "TERM": "vt220"}
    result = subprocess.run(
        ssh_argv(bastion, alice, "tty; echo $TERM; stty size", extra=["-tt"]),
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().split("\r\n")  # the host's pty turns \n into \r\n
    assert re.fullmatch(r"/dev/pts/\d+", lines[0]), result.stdout
    assert lines[1] == "vt220"
    assert re.fullmatch(r"\d+ \d+", lines[2]), result.stdout


def test_no_pty(bastion: BastionProcess, alice: Person) -> None:
    result = subprocess.run(
        ssh_argv(bastion, alice, 'tty; echo "TERM=${TERM-unset}"', extra=["-T"]),
        env={**os.environ, "TERM": "vt220"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"not a tty\nTERM=unset\n"


# -- environment allow-list -------------------------------------------------------------

ENV_PROBE = 'for v in LANG LC_ALL LC_TIME BASTION_TEST_X; do eval "echo $v=\\${$v-unset}"; done'
SENT_ENV = {
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "LC_TIME": "C",
    "BASTION_TEST_X": "leaked",
}
SEND_ENV = ["-o", "SendEnv=LANG", "-o", "SendEnv=LC_*", "-o", "SendEnv=BASTION_TEST_X"]


def probe_env(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        argv,
        env={**os.environ, **SENT_ENV},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=False,
    )


def test_environment_allow_list(bastion: BastionProcess, alice: Person) -> None:
    result = probe_env(ssh_argv(bastion, alice, ENV_PROBE, extra=SEND_ENV))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [
        "LANG=C.UTF-8",
        "LC_ALL=C.UTF-8",
        "LC_TIME=C",
        "BASTION_TEST_X=unset",
    ]


def test_host_would_accept_the_filtered_variable(
    hosts: dict[str, SshdHost],
    known_hosts: Path,
    local_ca: Path,
    alice: Person,
    tmp_path: Path,
) -> None:
    """The control for the allow-list test: logged in directly (with a
    certificate from the hosts' CA), host-102 takes BASTION_TEST_X, so its
    absence above is the bastion's doing."""
    key = tmp_path / "id_alice"
    shutil.copy(alice.key, key)
    shutil.copy(alice.key.with_suffix(".pub"), key.with_suffix(".pub"))
    key.chmod(0o600)
    devstack.sign_user_key(local_ca, key.with_suffix(".pub"), ["alice"], "env-control", "+5m")
    host = hosts["host-102"]
    argv = ssh_command(
        port=host.port,
        user="alice",
        host=host.address,
        identity=key,
        known_hosts=known_hosts,
        extra=SEND_ENV,
        command=[ENV_PROBE],
    )
    result = probe_env(argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines()[-1] == "BASTION_TEST_X=leaked"
