"""``static_server_options``: no per-login rebuild of options that cannot differ.

At the start of every login asyncssh rebuilds the server's options in a
worker thread (``reload_config``) so that ``Match`` blocks of an
sshd-style config file can be applied for this user and address. The
bastion's listener has no config file (``config=None``) and no reverse
DNS, so the rebuild yields the same values again; it is now skipped when
the options carry no loaded config file and no reverse DNS lookup, and
done as before otherwise (``tests/test_fastpath.py`` checks a ``Match User``
block still takes effect). Saves a thread round trip and an options
object per login.
"""

from __future__ import annotations

from asyncssh.connection import SSHServerConnection

from bastion.fastpath import pins


def install() -> None:
    reload_config = SSHServerConnection.reload_config

    async def reload_config_if_it_can_differ(self: SSHServerConnection) -> None:
        # only a loaded config file (its Match blocks) or a reverse DNS
        # name can make the rebuilt options differ from the listener's
        config = getattr(self._options, "config", None)
        if getattr(config, "loaded", True) or self._rdns_lookup:
            await reload_config(self)

    pins.replace(SSHServerConnection, "reload_config", reload_config_if_it_can_differ)
