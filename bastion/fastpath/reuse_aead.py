"""``reuse_aead``: one cipher context per key instead of new ones per packet.

AES-GCM: asyncssh built a new ``AESGCM`` object, which sets up an OpenSSL
context for the key, for every packet; it is now built once per key. The
nonce handling (asyncssh's ``_update_iv``) is untouched.

chacha20-poly1305@openssh.com: the Poly1305 key is the first 32 bytes of
ChaCha20 block 0 and the payload is encrypted from block 1 with the same
key and nonce; asyncssh set up two new ChaCha20 contexts for that per
packet, a third for the length, and copied header and payload into one
string to authenticate them. Now each cipher keeps one context per key
and moves it to the packet's nonce (``reset_nonce``, block counter 0: the
same key stream as a new context; cryptography >= 43, else new contexts
as before); the payload context yields block 0 and then continues at
block 1, and Poly1305 is fed header and payload in turn. Output is byte-identical
(``tests/test_fastpath.py`` compares against asyncssh's own functions), the
tag is still checked before anything is decrypted.
"""

from __future__ import annotations

from typing import Any

from asyncssh.crypto.chacha import ChachaCipher
from asyncssh.crypto.cipher import GCMCipher
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.ciphers.algorithms import ChaCha20
from cryptography.hazmat.primitives.poly1305 import Poly1305

from bastion.fastpath import pins


def install() -> None:
    _install_gcm()
    _install_chacha()


def _install_gcm() -> None:
    gcm_init = GCMCipher.__init__
    gcm_mac_size = 16
    update_iv = GCMCipher._update_iv

    def gcm_init_once(self: GCMCipher, cipher_name: str, key: bytes, iv: bytes) -> None:
        gcm_init(self, cipher_name, key, iv)
        self._bastion_aead = AESGCM(self._key)  # type: ignore[attr-defined]

    def gcm_encrypt_and_sign(self: GCMCipher, header: bytes, data: bytes) -> tuple[bytes, bytes]:
        data = self._bastion_aead.encrypt(self._iv, data, header)  # type: ignore[attr-defined]
        update_iv(self)
        return header + data[:-gcm_mac_size], data[-gcm_mac_size:]

    def gcm_verify_and_decrypt(
        self: GCMCipher, header: bytes, data: bytes, mac: bytes
    ) -> bytes | None:
        try:
            decrypted: bytes | None = self._bastion_aead.decrypt(  # type: ignore[attr-defined]
                self._iv, data + mac, header
            )
        except InvalidTag:
            decrypted = None
        update_iv(self)
        return decrypted

    pins.replace(GCMCipher, "__init__", gcm_init_once)
    pins.replace(GCMCipher, "encrypt_and_sign", gcm_encrypt_and_sign)
    pins.replace(GCMCipher, "verify_and_decrypt", gcm_verify_and_decrypt)


def _install_chacha() -> None:
    block0 = bytes(64)  # ChaCha20 block 0: its first 32 bytes are the Poly1305 key
    counter0 = bytes(8)  # asyncssh's ChaCha20 nonce: 64-bit block counter 0, then the seq
    # cryptography >= 43 re-starts a context at a new nonce (block counter 0),
    # the same key stream as a new context, without OpenSSL's cipher set-up
    resettable = hasattr(Cipher(ChaCha20(bytes(32), bytes(16)), None).encryptor(), "reset_nonce")

    def chacha_context(self: ChachaCipher, which: int, nonce: bytes) -> Any:
        """ChaCha20 at block 0 of ``nonce``, keyed with ``_adkey`` (0) or ``_key`` (1)."""
        key = self._adkey if which == 0 else self._key
        if not resettable:
            return Cipher(ChaCha20(key, counter0 + nonce), mode=None).encryptor()
        contexts = self.__dict__.get("_bastion_contexts")
        if contexts is None:
            contexts = tuple(
                Cipher(ChaCha20(k, bytes(16)), mode=None).encryptor()
                for k in (self._adkey, self._key)
            )
            self._bastion_contexts = contexts  # type: ignore[attr-defined]
        context = contexts[which]
        context.reset_nonce(counter0 + nonce)
        return context

    def chacha_stream(self: ChachaCipher, nonce: bytes) -> tuple[Any, bytes]:
        """The payload context at block 1 and the Poly1305 key from block 0."""
        stream = chacha_context(self, 1, nonce)
        return stream, stream.update(block0)[:32]

    def chacha_decrypt_header(self: ChachaCipher, header: bytes, nonce: bytes) -> bytes:
        return chacha_context(self, 0, nonce).update(header)  # type: ignore[no-any-return]

    def chacha_encrypt_and_sign(
        self: ChachaCipher, header: bytes, data: bytes, nonce: bytes
    ) -> tuple[bytes, bytes]:
        header = chacha_context(self, 0, nonce).update(header)
        stream, poly_key = chacha_stream(self, nonce)
        data = stream.update(data)
        mac = Poly1305(poly_key)
        mac.update(header)
        mac.update(data)
        return header + data, mac.finalize()

    def chacha_verify_and_decrypt(
        self: ChachaCipher, header: bytes, data: bytes, nonce: bytes, tag: bytes
    ) -> bytes | None:
        stream, poly_key = chacha_stream(self, nonce)
        mac = Poly1305(poly_key)
        mac.update(header)
        mac.update(data)
        try:
            mac.verify(tag)
        except InvalidSignature:
            return None
        return stream.update(data)  # type: ignore[no-any-return]

    pins.replace(ChachaCipher, "encrypt_and_sign", chacha_encrypt_and_sign)
    pins.replace(ChachaCipher, "verify_and_decrypt", chacha_verify_and_decrypt)
    pins.replace(ChachaCipher, "decrypt_header", chacha_decrypt_header)
