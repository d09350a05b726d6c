"""Reading secrets and key lists from files and the environment, once, at
start or reload: a one-line secret (refused when group or others can read it,
or when it is not a regular file), OpenSSH public key lines, a token from an
environment variable. Every problem is a ConfigError naming what was read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from bastion.errors import ConfigError


def read_secret_file(path: Path, what: str) -> str:
    """Read a one-line secret, refusing files that group or others can read."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the event loop
        raise ConfigError(f"{what}: {path} is not a regular file")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{what}: {path} is mode {stat.S_IMODE(st.st_mode):o}; "
            "it must not be readable by group or others (chmod 600)"
        )
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: {path} is not text") from None
    if not value:
        raise ConfigError(f"{what}: {path} is empty")
    return value


def read_public_key_lines(path: Path, what: str) -> tuple[str, ...]:
    """The OpenSSH public key lines of ``path`` (blank and ``#`` lines skipped);
    ConfigError naming ``what`` when unreadable or a line is not a key."""
    import asyncssh  # only here: settings parsing itself needs no SSH library

    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            try:
                asyncssh.import_public_key(line)
            except (asyncssh.KeyImportError, ValueError):
                raise ConfigError(
                    f"{what}: {path} holds a line that is not an OpenSSH public key"
                ) from None
            lines.append(line)
    return tuple(lines)


def env_token(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise ConfigError(f"[consul] token_env: environment variable {name} is not set")
    return value
