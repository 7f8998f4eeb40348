"""Broker identity: a persistent Ed25519 key and the address derived from it.

A broker's address is a name for its public key, so a client that knows the
address can check, on connect, that the process answering is the broker it
meant (the upstream Go broker's addresses were only vouched for by a public
rendezvous server; peers never verified each other).

Address format (35 characters)::

    digest  = blake2b(public_key, digest_size=26, person=b"teomq-address")   # 208 bits
    address = base62(int.from_bytes(digest, "big")), alphabet 0-9A-Za-z,
              left-padded with "0" to 35 characters                           # 62**35 > 2**208

Welcome proof: the broker signs ``b"teomq-welcome\\0" + nonce`` with its key,
the client checks it with :func:`verify_welcome`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from teomq.errors import AddressError

__all__ = [
    "ADDRESS_ALPHABET",
    "ADDRESS_LENGTH",
    "KEY_FILE_NAME",
    "BrokerIdentity",
    "address_from_public_key",
    "is_address",
    "verify_welcome",
    "welcome_signature_payload",
]

log = logging.getLogger("teomq.identity")

ADDRESS_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ADDRESS_LENGTH = 35
KEY_FILE_NAME = "broker.key"

_ADDRESS_CHARS = frozenset(ADDRESS_ALPHABET)
_DIGEST_SIZE = 26
_PERSON = b"teomq-address"
_SEED_SIZE = 32
_PUBLIC_KEY_SIZE = 32
_SIGNATURE_SIZE = 64
_WELCOME_PREFIX = b"teomq-welcome\0"


def address_from_public_key(pub: bytes) -> str:
    """Return the 35-character base62 address of a raw 32-byte Ed25519 public key."""
    if len(pub) != _PUBLIC_KEY_SIZE:
        raise AddressError(f"public key must be {_PUBLIC_KEY_SIZE} bytes, got {len(pub)}")
    n = int.from_bytes(
        hashlib.blake2b(bytes(pub), digest_size=_DIGEST_SIZE, person=_PERSON).digest(), "big"
    )
    chars: list[str] = []
    while n:
        n, r = divmod(n, 62)
        chars.append(ADDRESS_ALPHABET[r])
    return "".join(reversed(chars)).rjust(ADDRESS_LENGTH, "0")


def is_address(s: str) -> bool:
    """True if ``s`` has the shape of a teomq address (35 base62 characters)."""
    return isinstance(s, str) and len(s) == ADDRESS_LENGTH and _ADDRESS_CHARS.issuperset(s)


def welcome_signature_payload(nonce: bytes) -> bytes:
    """The bytes a broker signs to prove its identity to a client that sent ``nonce``."""
    return _WELCOME_PREFIX + bytes(nonce)


def verify_welcome(expected_address: str | None, pubkey: bytes, sig: bytes, nonce: bytes) -> str:
    """Check a broker's welcome signature and return its verified address.

    Raises :class:`AddressError` if the signature over
    :func:`welcome_signature_payload` does not verify with ``pubkey``, or if
    ``expected_address`` is given and is not the address of ``pubkey``.
    """
    pubkey = bytes(pubkey)
    sig = bytes(sig)
    if len(pubkey) != _PUBLIC_KEY_SIZE or len(sig) != _SIGNATURE_SIZE:
        raise AddressError("broker signature does not verify")
    try:
        Ed25519PublicKey.from_public_bytes(pubkey).verify(sig, welcome_signature_payload(nonce))
    except (InvalidSignature, ValueError):
        raise AddressError("broker signature does not verify") from None
    address = address_from_public_key(pubkey)
    if expected_address is not None and expected_address != address:
        raise AddressError(
            f"broker at this endpoint has address {address}, expected {expected_address}"
        )
    return address


class BrokerIdentity:
    """A broker's Ed25519 key pair and its address."""

    __slots__ = ("_private_key", "_public_key", "_address", "key_path")

    def __init__(self, private_key: Ed25519PrivateKey, key_path: Path | None = None) -> None:
        self._private_key = private_key
        self._public_key = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._address = address_from_public_key(self._public_key)
        #: The file the key was loaded from or saved to, if any.
        self.key_path = key_path

    @classmethod
    def generate(cls) -> BrokerIdentity:
        """A fresh identity that lives only in memory."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes, key_path: Path | None = None) -> BrokerIdentity:
        """The identity of a raw 32-byte Ed25519 private seed."""
        if len(seed) != _SEED_SIZE:
            raise AddressError(f"private key seed must be {_SEED_SIZE} bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(seed)), key_path)

    @classmethod
    def load_or_create(cls, data_dir: str | os.PathLike[str]) -> BrokerIdentity:
        """Load ``<data_dir>/broker.key``, creating it (and ``data_dir``) if missing.

        The key file holds the 32-byte raw private seed, mode 0o600. A new key is
        written to a temp file and hard-linked into place, so it appears whole or
        not at all and never replaces a key that another process created first.
        An existing file that is not a key raises :class:`AddressError` and is left as is.
        """
        directory = Path(data_dir)
        path = directory / KEY_FILE_NAME
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        identity = cls._load(path)
        if identity is not None:
            return identity
        identity = cls._create(path)
        log.info("created broker key %s, address %s", path, identity.address)
        return identity

    @classmethod
    def _load(cls, path: Path) -> BrokerIdentity | None:
        """Read an existing key file; None if there is none."""
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                seed = f.read(_SEED_SIZE + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise AddressError(f"cannot read broker key file {path}: {e}") from e
        if len(seed) != _SEED_SIZE:
            found = f"more than {_SEED_SIZE}" if len(seed) > _SEED_SIZE else str(len(seed))
            raise AddressError(
                f"broker key file {path} is malformed: expected a {_SEED_SIZE}-byte raw "
                f"Ed25519 seed, found {found} bytes; it was left untouched: restore it, or "
                "move it away to create a new key (the broker's address will change)"
            )
        if stat.S_IMODE(mode) & 0o077:
            log.warning("broker key file %s is readable by other users (mode %o)", path, stat.S_IMODE(mode))
        return cls.from_seed(seed, path)

    @classmethod
    def _create(cls, path: Path) -> BrokerIdentity:
        """Write a new key to ``path`` unless another process got there first."""
        private_key = Ed25519PrivateKey.generate()
        seed = private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        fd, tmp = tempfile.mkstemp(prefix=f".{KEY_FILE_NAME}.", suffix=".tmp", dir=path.parent)
        try:
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, seed)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                # link(), unlike replace(), fails if the name exists: two brokers starting at
                # once on an empty dir end up with the same key instead of one being overwritten.
                os.link(tmp, path)
            except FileExistsError:
                existing = cls._load(path)
                if existing is None:  # removed between link and load: give up loudly
                    raise AddressError(f"broker key file {path} vanished while being created")
                return existing
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        _fsync_dir(path.parent)
        return cls(private_key, path)

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self._public_key

    @property
    def address(self) -> str:
        """The broker's 35-character address."""
        return self._address

    def sign(self, data: bytes) -> bytes:
        """Sign ``data``; returns the 64-byte Ed25519 signature."""
        return self._private_key.sign(bytes(data))

    def sign_welcome(self, nonce: bytes) -> bytes:
        """Sign :func:`welcome_signature_payload` of a client's ``nonce``."""
        return self.sign(welcome_signature_payload(nonce))

    def __repr__(self) -> str:
        return f"BrokerIdentity(address={self._address!r})"


def _fsync_dir(directory: Path) -> None:
    """Make a new directory entry durable (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
