"""OpenSSH user certificates: the ephemeral key, the checks on what is signed,
and a reader for the fields asyncssh keeps private (PROTOCOL.certkeys)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import asyncssh

from bastion.errors import SigningFailed

# OpenSSH and Vault both backdate certificates this much to absorb clock skew.
BACKDATE_SECONDS = 30
# Extensions every upstream certificate carries; X11 forwarding is left out.
CERT_EXTENSIONS = (
    "permit-pty",
    "permit-user-rc",
    "permit-agent-forwarding",
    "permit-port-forwarding",
)
CERT_TYPE_USER = 1
_EPHEMERAL_KEY_ALG = "ssh-ed25519"


def check_principal(principal: str) -> None:
    """Raise SigningFailed for a login name that could widen a certificate."""
    # Vault's valid_principals is a comma-separated list: "alice,root" would
    # mint a root certificate. Whitespace and control characters have no
    # business in a login name either.
    if (
        not principal
        or len(principal) > 256
        or "," in principal
        or any(c.isspace() or not c.isprintable() for c in principal)
    ):
        raise SigningFailed(
            "invalid login name for the upstream certificate",
            detail=f"refusing to sign for principal {principal!r}",
        )


def check_key_id(key_id: str) -> None:
    """Raise SigningFailed for a key id that is not one printable line."""
    # the key id lands in sshd's log lines: keep them one printable line
    if not key_id or len(key_id) > 512 or not key_id.isprintable():
        raise SigningFailed(
            "invalid certificate key id", detail=f"refusing to sign with key id {key_id!r}"
        )


def new_ephemeral_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key(_EPHEMERAL_KEY_ALG)


@dataclass(frozen=True)
class CertFields:
    public_key: bytes
    serial: int
    cert_type: int
    key_id: str
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int


def parse_ed25519_cert(blob: bytes) -> CertFields:
    """Decode the fields of an ``ssh-ed25519-cert-v01@openssh.com`` blob.

    asyncssh keeps key id and validity private; the wire format (PROTOCOL.certkeys)
    is short enough to read here, and checking what Vault returned is worth it.
    Raises ValueError for a blob that is not such a certificate.
    """
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(blob):
            raise ValueError("truncated certificate")
        chunk = blob[pos : pos + n]
        pos += n
        return chunk

    def string() -> bytes:
        (length,) = struct.unpack(">I", take(4))
        return take(length)

    def uint32() -> int:
        return int(struct.unpack(">I", take(4))[0])

    def uint64() -> int:
        return int(struct.unpack(">Q", take(8))[0])

    if string() != b"ssh-ed25519-cert-v01@openssh.com":
        raise ValueError("not an ed25519 certificate")
    string()  # nonce
    public_key = string()
    serial = uint64()
    cert_type = uint32()
    key_id = string().decode()
    packed = string()
    principals: list[str] = []
    inner = 0
    while inner < len(packed):
        if inner + 4 > len(packed):
            raise ValueError("truncated principals")
        (length,) = struct.unpack(">I", packed[inner : inner + 4])
        end = inner + 4 + length
        if end > len(packed):
            raise ValueError("truncated principals")
        principals.append(packed[inner + 4 : end].decode())
        inner = end
    valid_after = uint64()
    valid_before = uint64()
    return CertFields(
        public_key, serial, cert_type, key_id, tuple(principals), valid_after, valid_before
    )


def parse_ed25519_key(public_data: bytes) -> bytes:
    """The raw 32 bytes of an ``ssh-ed25519`` public key blob."""
    (alg_len,) = struct.unpack(">I", public_data[:4])
    rest = public_data[4 + alg_len :]
    (key_len,) = struct.unpack(">I", rest[:4])
    return rest[4 : 4 + key_len]
