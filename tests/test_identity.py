"""KeyDirectory: the authorized keys of one login, with policy applied."""

from __future__ import annotations

from pathlib import Path

import asyncssh

from bastion.identity import KeyDirectory


def _key() -> tuple[asyncssh.SSHKey, str]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    return key, key.export_public_key("openssh").decode().strip()


def test_agent_forwarding_denied_on_every_kind_of_line(tmp_path: Path) -> None:
    plain, plain_line = _key()
    limited, limited_line = _key()
    ca, ca_line = _key()
    lines = [
        "# a comment",
        plain_line,
        f'from="127.0.0.1",command="echo hi there" {limited_line}',
        "not a key at all",
    ]
    keys = KeyDirectory(lambda user: lines, None, (ca_line,))
    person_cert = ca.generate_user_certificate(plain, "c", principals=["alice"])

    for allowed in (True, False):
        got, problem = keys.authorized_keys("alice", agent_forwarding=allowed)
        assert problem is None and got is not None
        for options in (
            got.validate(plain.convert_to_public(), "h", "127.0.0.1"),
            got.validate(limited.convert_to_public(), "h", "127.0.0.1"),
            got.validate(person_cert.signing_key, "h", "127.0.0.1", ["alice"], ca=True),
        ):
            assert options is not None
            assert ("no-agent-forwarding" in options) is (not allowed), options
        # the options a line had are kept
        kept = got.validate(limited.convert_to_public(), "h", "127.0.0.1")
        assert kept is not None and kept["command"] == "echo hi there"
        # and its from= still applies
        assert got.validate(limited.convert_to_public(), "h", "10.0.0.9") is None
