"""Broker identity: key persistence, address derivation, welcome signatures."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from teomq.errors import AddressError
from teomq.identity import (
    ADDRESS_ALPHABET,
    KEY_FILE_NAME,
    BrokerIdentity,
    address_from_public_key,
    is_address,
    verify_welcome,
    welcome_signature_payload,
)

FIXED_SEED = bytes(range(32))
# Pinned: changing the derivation changes every broker's address.
FIXED_PUBLIC_KEY = bytes.fromhex("03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8")
FIXED_ADDRESS = "HO5t6TTpXnVfN8nwmDiOheCQb1dccrkXlOj"


def _base62_decode(s: str) -> int:
    n = 0
    for c in s:
        n = n * 62 + ADDRESS_ALPHABET.index(c)
    return n


# --- address ----------------------------------------------------------------


def test_fixed_seed_address_is_pinned() -> None:
    ident = BrokerIdentity.from_seed(FIXED_SEED)
    assert ident.public_key == FIXED_PUBLIC_KEY
    assert ident.address == FIXED_ADDRESS
    assert address_from_public_key(FIXED_PUBLIC_KEY) == FIXED_ADDRESS


def test_address_is_base62_of_blake2b_digest() -> None:
    for i in range(50):
        pub = BrokerIdentity.from_seed(hashlib.sha256(bytes([i])).digest()).public_key
        addr = address_from_public_key(pub)
        assert len(addr) == 35
        assert is_address(addr)
        digest = hashlib.blake2b(pub, digest_size=26, person=b"teomq-address").digest()
        assert _base62_decode(addr) == int.from_bytes(digest, "big")
        assert address_from_public_key(pub) == addr  # deterministic


def test_address_alphabet_order() -> None:
    assert ADDRESS_ALPHABET == "0123456789" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "abcdefghijklmnopqrstuvwxyz"


def test_address_rejects_wrong_key_length() -> None:
    with pytest.raises(AddressError):
        address_from_public_key(b"\x00" * 31)


@pytest.mark.parametrize(
    "s, ok",
    [
        (FIXED_ADDRESS, True),
        ("0" * 35, True),
        ("z" * 35, True),
        (FIXED_ADDRESS[:-1], False),
        (FIXED_ADDRESS + "a", False),
        (FIXED_ADDRESS[:-1] + "-", False),
        (FIXED_ADDRESS[:-1] + "é", False),
        ("", False),
        ("localhost", False),
    ],
)
def test_is_address(s: str, ok: bool) -> None:
    assert is_address(s) is ok


# --- persistence ------------------------------------------------------------


def test_key_persists_across_loads(tmp_path: Path) -> None:
    data_dir = tmp_path / "a" / "broker"
    first = BrokerIdentity.load_or_create(data_dir)
    second = BrokerIdentity.load_or_create(data_dir)
    assert first.address == second.address
    assert first.public_key == second.public_key
    assert is_address(first.address)
    assert (data_dir / KEY_FILE_NAME).read_bytes() != b""
    assert second.key_path == data_dir / KEY_FILE_NAME


def test_different_dirs_different_addresses(tmp_path: Path) -> None:
    a = BrokerIdentity.load_or_create(tmp_path / "one")
    b = BrokerIdentity.load_or_create(str(tmp_path / "two"))
    assert a.address != b.address


def test_key_file_holds_raw_seed(tmp_path: Path) -> None:
    ident = BrokerIdentity.load_or_create(tmp_path)
    seed = (tmp_path / KEY_FILE_NAME).read_bytes()
    assert len(seed) == 32
    assert BrokerIdentity.from_seed(seed).address == ident.address


def test_existing_seed_is_used(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE_NAME).write_bytes(FIXED_SEED)
    assert BrokerIdentity.load_or_create(tmp_path).address == FIXED_ADDRESS


def test_file_and_dir_modes(tmp_path: Path) -> None:
    data_dir = tmp_path / "new"
    BrokerIdentity.load_or_create(data_dir)
    assert stat.S_IMODE(os.stat(data_dir / KEY_FILE_NAME).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    assert sorted(os.listdir(data_dir)) == [KEY_FILE_NAME]  # no temp file left behind


@pytest.mark.parametrize("content", [b"", b"\x01" * 31, b"\x01" * 33, b"not a key at all\n" * 10])
def test_malformed_key_raises_and_is_untouched(tmp_path: Path, content: bytes) -> None:
    key = tmp_path / KEY_FILE_NAME
    key.write_bytes(content)
    with pytest.raises(AddressError) as info:
        BrokerIdentity.load_or_create(tmp_path)
    assert str(key) in str(info.value)
    assert "malformed" in str(info.value)
    assert key.read_bytes() == content
    assert sorted(os.listdir(tmp_path)) == [KEY_FILE_NAME]


def _create_in(data_dir: str) -> str:
    return BrokerIdentity.load_or_create(data_dir).address


def test_concurrent_creators_agree_on_one_key(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "race")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(6) as pool:
        addresses = pool.map(_create_in, [data_dir] * 12)
    on_disk = BrokerIdentity.load_or_create(data_dir).address
    assert set(addresses) == {on_disk}


# --- signatures -------------------------------------------------------------


def test_sign_verifies_with_public_key() -> None:
    ident = BrokerIdentity.from_seed(FIXED_SEED)
    sig = ident.sign(b"data")
    assert len(sig) == 64
    Ed25519PublicKey.from_public_bytes(ident.public_key).verify(sig, b"data")


def test_welcome_payload() -> None:
    assert welcome_signature_payload(b"\x01\x02") == b"teomq-welcome\x00\x01\x02"


def test_welcome_round_trip(tmp_path: Path) -> None:
    ident = BrokerIdentity.load_or_create(tmp_path)
    nonce = os.urandom(16)
    sig = ident.sign(welcome_signature_payload(nonce))
    assert ident.sign_welcome(nonce) == sig  # Ed25519 is deterministic
    assert verify_welcome(ident.address, ident.public_key, sig, nonce) == ident.address
    assert verify_welcome(None, ident.public_key, sig, nonce) == ident.address


def test_tampered_signature_rejected() -> None:
    ident = BrokerIdentity.from_seed(FIXED_SEED)
    nonce = b"n" * 16
    sig = bytearray(ident.sign_welcome(nonce))
    sig[10] ^= 1
    with pytest.raises(AddressError, match="does not verify"):
        verify_welcome(ident.address, ident.public_key, bytes(sig), nonce)


def test_signature_over_other_nonce_rejected() -> None:
    ident = BrokerIdentity.from_seed(FIXED_SEED)
    sig = ident.sign_welcome(b"old nonce")
    with pytest.raises(AddressError, match="does not verify"):
        verify_welcome(None, ident.public_key, sig, b"new nonce")


def test_signature_without_welcome_prefix_rejected() -> None:
    ident = BrokerIdentity.from_seed(FIXED_SEED)
    nonce = b"n" * 16
    with pytest.raises(AddressError, match="does not verify"):
        verify_welcome(None, ident.public_key, ident.sign(nonce), nonce)


@pytest.mark.parametrize("pub_len, sig_len", [(31, 64), (33, 64), (32, 63), (32, 0)])
def test_bad_lengths_rejected(pub_len: int, sig_len: int) -> None:
    with pytest.raises(AddressError, match="does not verify"):
        verify_welcome(None, b"\x01" * pub_len, b"\x02" * sig_len, b"nonce")


def test_other_key_rejected() -> None:
    ident = BrokerIdentity.from_seed(FIXED_SEED)
    other = BrokerIdentity.generate()
    nonce = b"n" * 16
    with pytest.raises(AddressError, match="does not verify"):
        verify_welcome(None, other.public_key, ident.sign_welcome(nonce), nonce)


def test_wrong_expected_address_rejected() -> None:
    ident = BrokerIdentity.from_seed(FIXED_SEED)
    other = BrokerIdentity.generate()
    nonce = b"n" * 16
    with pytest.raises(AddressError) as info:
        verify_welcome(other.address, ident.public_key, ident.sign_welcome(nonce), nonce)
    assert str(info.value) == (
        f"broker at this endpoint has address {ident.address}, expected {other.address}"
    )


def test_from_seed_rejects_wrong_length() -> None:
    with pytest.raises(AddressError):
        BrokerIdentity.from_seed(b"\x00" * 31)
