"""NKeys (Ed25519) for signed requests: generate, load, sign, verify.

The keys are NATS NKeys of the *user* kind — a seed ``SU...`` (secret, 58 characters) and its
public key ``U...`` (56 characters) — the same format ``nsc`` and ``nk`` produce, built on the
``nkeys`` package (which nats-py uses for NKey authentication). `pycluster.SignedAuth` signs
every call with the caller's seed; servers hold only public keys, so a server that verifies a
caller cannot impersonate it (unlike a shared secret).

Example::

    seed, public = generate_keypair()        # keep ``seed`` secret; publish ``public``
    key = SigningKey(seed)
    sig = key.sign(b"message")
    VerifyingKey(public).verify(b"message", sig)   # or SignatureError
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

import nacl.exceptions
import nacl.signing
import nkeys

from .kernel.errors import ConfigError, PyclusterError

__all__ = [
    "SignatureError",
    "SigningKey",
    "VerifyingKey",
    "generate_keypair",
    "load_seed",
]

_USER_PREFIX = nkeys.PREFIX_BYTE_USER


class SignatureError(PyclusterError):
    """A signature does not match the message and the public key."""


def generate_keypair() -> tuple[str, str]:
    """A new user NKey: ``(seed, public key)``, e.g. ``("SUAB...", "UCX...")``."""
    raw = nacl.signing.SigningKey.generate()
    seed = nkeys.encode_seed(bytes(raw), _USER_PREFIX).decode()
    return seed, SigningKey(seed).public_key


def load_seed(value: str | bytes | os.PathLike[str]) -> str:
    """An NKey seed given as its text (``SU...``) or as the path of a file that holds it."""
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    text = str(value).strip()
    if text.startswith("S") and len(text) == 58 and "/" not in text:
        return text
    path = Path(text).expanduser()
    try:
        content = path.read_text().strip()
    except OSError as exc:
        raise ConfigError("seed", "***" if text.startswith("S") else str(path),
                          f"neither an NKey seed (SU..., 58 characters) nor a readable file "
                          f"({exc.strerror or exc})") from None
    for line in content.splitlines():  # a seed file, or a .creds file with one seed line
        line = line.strip()
        if line.startswith("SU") and len(line) == 58:
            return line
    raise ConfigError("seed", str(path), "the file holds no user NKey seed (SU...)")


class SigningKey:
    """A user NKey seed that signs (the secret half; never logged or printed)."""

    def __init__(self, seed: str | bytes) -> None:
        raw = seed.encode() if isinstance(seed, str) else bytes(seed)
        try:
            self._kp = nkeys.from_seed(bytearray(raw.strip()))
            prefix, _ = nkeys.decode_seed(bytearray(raw.strip()))
        except (nkeys.NkeysError, ValueError, binascii.Error, IndexError) as exc:
            raise ConfigError("seed", "***", f"not an NKey seed ({type(exc).__name__})") from None
        if prefix != _USER_PREFIX:
            raise ConfigError("seed", "***", "not a user NKey seed (expected SU...)")
        self.public_key: str = self._kp.public_key.decode()

    def __repr__(self) -> str:
        return f"SigningKey(public_key={self.public_key!r})"

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        sig: bytes = self._kp.sign(data)
        return sig


class VerifyingKey:
    """A user NKey public key (``U...``) that checks signatures."""

    def __init__(self, public_key: str) -> None:
        self.public_key = public_key
        try:
            raw = base64.b32decode(public_key.encode())
        except (binascii.Error, ValueError, AttributeError):
            raise ConfigError("public key", public_key, "not base32 (expected U..., 56 "
                              "characters)") from None
        if len(raw) != 35 or raw[0] != _USER_PREFIX:
            raise ConfigError("public key", public_key, "not a user NKey public key (U...)")
        crc = int.from_bytes(raw[-2:], "little")
        if nkeys.crc16(bytearray(raw[:-2])) != crc:
            raise ConfigError("public key", public_key, "bad checksum (a typo?)")
        self._vk = nacl.signing.VerifyKey(raw[1:-2])

    def __repr__(self) -> str:
        return f"VerifyingKey({self.public_key!r})"

    def verify(self, data: bytes, signature: bytes) -> None:
        """Return if ``signature`` is ``data`` signed by this key; else `SignatureError`."""
        try:
            self._vk.verify(data, signature)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError) as exc:
            raise SignatureError("bad signature") from exc
