"""Which host keys the bastion accepts from an upstream host.

Keys come from a known_hosts file (``[upstream] known_hosts``; ``@cert-authority``
and ``@revoked`` lines work as in OpenSSH's known_hosts(5)) and/or host keys
published in the directory (``host-keys/<node or address>``). A host with no
known key is refused before any connection is made: there is no trust on
first use.

Lines are matched by the node name, the route's host name and, when the host
is an IP address, that address. A DNS name is matched by name only, as
OpenSSH does with its default ``CheckHostIP no``.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from pathlib import Path

import asyncssh

from bastion.errors import ConfigError
from bastion.model import Destination, TrustedHostKeys

log = logging.getLogger("bastion.trust")


def _ip_or_empty(host: str) -> str:
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return ""


class HostKeyPolicy:
    """Upstream host keys from a known_hosts file and/or the directory.

    The file is re-read when its modification time changes, so an operator's
    edit takes effect without a restart. Raises ConfigError at construction
    when the file cannot be loaded.
    """

    def __init__(
        self, known_hosts: Path | None, directory_keys: Callable[[list[str]], list[str]] | None
    ) -> None:
        self._path = known_hosts
        self._directory_keys = directory_keys
        self._mtime: float | None = None
        self._known: asyncssh.SSHKnownHosts | None = None
        if known_hosts is not None:
            self._reload()

    def _reload(self) -> None:
        assert self._path is not None
        try:
            mtime = self._path.stat().st_mtime
            if mtime != self._mtime:
                self._known = asyncssh.import_known_hosts(self._path.read_text())
                self._mtime = mtime
        except (OSError, ValueError) as exc:
            if self._known is None:
                raise ConfigError(
                    f"[upstream] known_hosts: cannot load {self._path}: {exc}",
                ) from None
            log.error("known_hosts %s unreadable, keeping the previous copy: %s", self._path, exc)

    def trusted_for(self, dest: Destination) -> TrustedHostKeys:
        """The keys ``dest`` may present (empty: refuse to connect)."""
        host_keys: list[asyncssh.SSHKey] = []
        ca_keys: list[asyncssh.SSHKey] = []
        revoked: list[asyncssh.SSHKey] = []
        port = None if dest.port == 22 else dest.port
        addr = _ip_or_empty(dest.host)
        if self._path is not None:
            self._reload()
            assert self._known is not None
            for name in {dest.node or dest.host, dest.host}:
                matched = self._known.match(name, addr, port)
                host_keys += matched[0]
                ca_keys += matched[1]
                revoked += matched[2]
        if self._directory_keys is not None:
            names = [n for n in (dest.node, dest.host) if n]
            for line in self._directory_keys(names):
                try:
                    host_keys.append(asyncssh.import_public_key(line))
                except (asyncssh.KeyImportError, ValueError):
                    log.warning(
                        "ignoring an unparsable host key for %s in the directory", dest.label
                    )
        return TrustedHostKeys(tuple(host_keys), tuple(ca_keys), tuple(revoked))
