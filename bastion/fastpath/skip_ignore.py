"""``skip_ignore``: no empty SSH_MSG_IGNORE before every packet with AEAD or CTR ciphers.

asyncssh sends one ahead of every encrypted non-kex packet: the old
countermeasure (RFC 4251 §9.3.1, OpenSSH's CBC-era mitigation) against
the chosen-plaintext attack on CBC mode, where the IV of the next packet
is the last ciphertext block of the previous one and so is known to an
observer. AES-GCM (fresh nonce per packet), chacha20-poly1305 (sequence
number as nonce) and AES-CTR (RFC 4344, designed as the fix for exactly
this attack) have no IV chaining, and OpenSSH sends nothing of the kind
with them. The IGNORE is empty, so it never hid lengths either. With every
other cipher (CBC, arcfour, anything unknown) it is still sent. Saves an
encryption and a packet per data packet.
"""

from __future__ import annotations

from typing import Any

from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_IGNORE
from asyncssh.encryption import BasicEncryption, ChachaEncryption, GCMEncryption
from cryptography.hazmat.primitives.ciphers.modes import CTR

from bastion.fastpath import pins

# what asyncssh passes as the payload of its empty IGNORE: String(b'')
_EMPTY_STRING = b"\x00\x00\x00\x00"


def ignore_is_redundant(encryption: object) -> bool:
    """True for ciphers without IV chaining (AEAD, CTR): the IGNORE adds nothing."""
    if isinstance(encryption, GCMEncryption | ChachaEncryption):
        return True
    if isinstance(encryption, BasicEncryption):  # also ETMEncryption
        basic = getattr(encryption, "_cipher", None)
        cipher = getattr(basic, "_cipher", None)
        return isinstance(getattr(cipher, "mode", None), CTR)
    return False


def install() -> None:
    send_packet = SSHConnection.send_packet

    def patched_send_packet(
        self: SSHConnection, pkttype: int, *args: bytes, handler: Any = None
    ) -> None:
        if (
            pkttype == MSG_IGNORE
            and args == (_EMPTY_STRING,)
            and ignore_is_redundant(self._send_encryption)
        ):
            return
        send_packet(self, pkttype, *args, handler=handler)

    pins.replace(SSHConnection, "send_packet", patched_send_packet)
