"""WeChat's message encryption for callbacks (消息加解密, "safe mode"), as WeChat documents it:

- ``msg_signature`` = sha1 of the sorted concatenation of the message token, ``timestamp``,
  ``nonce`` and the ``Encrypt`` text;
- the key is base64 of EncodingAESKey + "=" (32 bytes), AES-256-CBC with the key's first 16 bytes
  as IV, PKCS#7 padding to 32-byte blocks;
- the plaintext is 16 random bytes, the message's length (4 bytes, big-endian), the message, and
  the appid it is for (checked).

Standard library plus ``cryptography``'s AES; every failure is a :class:`CryptoError` with the
reason, never a traceback.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BLOCK = 32  # WeChat pads to 32 bytes, not AES's 16


class CryptoError(ValueError):
    """A message that does not verify or decrypt."""


def signature(token: str, timestamp: str, nonce: str, encrypt: str) -> str:
    parts = sorted([token, timestamp, nonce, encrypt])
    return hashlib.sha1("".join(parts).encode()).hexdigest()  # noqa: S324 - WeChat's scheme


class MessageCrypto:
    """Verify, decrypt and encrypt one component's callback messages."""

    def __init__(self, token: str, encoding_aes_key: str, appid: str) -> None:
        try:
            self.key = base64.b64decode(encoding_aes_key + "=", validate=True)
        except ValueError:  # binascii.Error, or a str that is not ASCII
            raise CryptoError("the EncodingAESKey is not base64") from None
        if len(self.key) != 32:
            raise CryptoError("the EncodingAESKey must decode to 32 bytes")
        self.token = token
        self.appid = appid

    def _cipher(self) -> Cipher[modes.CBC]:
        return Cipher(algorithms.AES(self.key), modes.CBC(self.key[:16]))

    def verify(self, msg_signature: str, timestamp: str, nonce: str, encrypt: str) -> None:
        expected = signature(self.token, timestamp, nonce, encrypt)
        # compare_digest raises TypeError on a str that is not ASCII: a stranger's input
        if not msg_signature.isascii() or not hmac.compare_digest(expected,
                                                                  msg_signature.lower()):
            raise CryptoError("msg_signature does not match")

    def decrypt(self, encrypt: str) -> bytes:
        """The message inside ``encrypt`` (base64 of the AES ciphertext)."""
        try:
            raw = base64.b64decode(encrypt, validate=True)
        except ValueError:  # binascii.Error, or a str that is not ASCII
            raise CryptoError("Encrypt is not base64") from None
        if not raw or len(raw) % 16:
            raise CryptoError("Encrypt is not whole AES blocks")
        decryptor = self._cipher().decryptor()
        plain = decryptor.update(raw) + decryptor.finalize()
        pad = plain[-1]
        if not 1 <= pad <= BLOCK or plain[-pad:] != bytes([pad]) * pad:
            raise CryptoError("bad padding (wrong EncodingAESKey?)")
        content = plain[16:-pad]
        if len(content) < 4:
            raise CryptoError("the message is truncated")
        (length,) = struct.unpack(">I", content[:4])
        if length > len(content) - 4:
            raise CryptoError("the message is truncated")
        message, appid = content[4:4 + length], content[4 + length:]
        if appid.decode(errors="replace") != self.appid:
            raise CryptoError("the message is for another appid")
        return message

    def encrypt(self, message: bytes, random16: bytes | None = None) -> str:
        body = (random16 or os.urandom(16)) + struct.pack(">I", len(message)) + message \
            + self.appid.encode()
        pad = BLOCK - len(body) % BLOCK
        body += bytes([pad]) * pad
        encryptor = self._cipher().encryptor()
        return base64.b64encode(encryptor.update(body) + encryptor.finalize()).decode()

    def seal(self, message: bytes, timestamp: str, nonce: str) -> tuple[str, str]:
        """(Encrypt, msg_signature) of ``message``: what WeChat would send."""
        encrypt = self.encrypt(message)
        return encrypt, signature(self.token, timestamp, nonce, encrypt)
