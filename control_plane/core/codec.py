"""Temporal payload encryption: every payload the API, workers and `cpctl` send to
Temporal is sealed with AES-GCM, so histories hold no clear-text inputs or results.

An encrypted payload has metadata `encoding: binary/encrypted` and
`encryption-key-id: <kid>`; its data is the 12-byte nonce followed by the AES-GCM
ciphertext of the original payload (serialised protobuf, metadata included), with the
key id as associated data. Decoding uses the key the payload names, so a payload written
before a key rotation still opens while its key stays configured; payloads that were
never encrypted pass through unchanged.

Enabled when `CP_CODEC__KEYS` is set (kid -> base64 of 32 bytes); `CP_CODEC__ACTIVE_KEY`
names the key that encrypts (optional with a single key). Search attributes are never
encrypted: Temporal must index them.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from collections.abc import Mapping, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

from control_plane.core.config import CodecSettings

ENCODING_KEY = "encoding"
ENCODING = b"binary/encrypted"
KEY_ID_KEY = "encryption-key-id"
KEY_BYTES = 32
NONCE_BYTES = 12


class CodecError(ValueError):
    """A payload names a key this process does not have, or does not authenticate."""


def generate_key() -> str:
    """A new AES-256 key as settings hold it: base64 of 32 random bytes (codec keys and
    credential master keys alike)."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def decode_key(name: str, encoded: str) -> bytes:
    """Base64 -> 32 bytes, or a `ValueError` that says which key is wrong and how."""
    try:
        raw = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name} is not valid base64") from None
    if len(raw) != KEY_BYTES:
        raise ValueError(
            f"{name} must be {KEY_BYTES} bytes (base64 of {KEY_BYTES} random bytes), got {len(raw)}"
        )
    return raw


def pick_active_key(keys: Mapping[str, object], active: str, *, setting: str) -> str:
    """The key id that encrypts new data: `active`, or the only key when there is one."""
    if active:
        if active not in keys:
            raise ValueError(f"{setting} names {active!r}, which is not among the configured keys")
        return active
    if len(keys) == 1:
        return next(iter(keys))
    raise ValueError(f"{setting} must name one of the configured keys: {sorted(keys)}")


class EncryptionCodec(PayloadCodec):
    def __init__(self, keys: Mapping[str, bytes], active_key: str) -> None:
        if active_key not in keys:
            raise ValueError(f"active codec key {active_key!r} is not configured")
        self._ciphers = {kid: AESGCM(key) for kid, key in keys.items()}
        self.active_key = active_key
        self._active_id = active_key.encode()

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        cipher = self._ciphers[self.active_key]
        encoded = []
        for payload in payloads:
            nonce = os.urandom(NONCE_BYTES)
            sealed = cipher.encrypt(nonce, payload.SerializeToString(), self._active_id)
            encoded.append(
                Payload(
                    metadata={ENCODING_KEY: ENCODING, KEY_ID_KEY: self._active_id},
                    data=nonce + sealed,
                )
            )
        return encoded

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decode_one(payload) for payload in payloads]

    def decode_one(self, payload: Payload) -> Payload:
        if payload.metadata.get(ENCODING_KEY) != ENCODING:
            return payload
        kid = payload.metadata.get(KEY_ID_KEY, b"").decode(errors="replace")
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise CodecError(
                f"payload encrypted with codec key {kid!r}, which is not configured "
                "(CP_CODEC__KEYS must keep old keys while histories still use them)"
            )
        data = payload.data
        try:
            plain = cipher.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], kid.encode())
        except InvalidTag:
            raise CodecError(f"payload does not authenticate with codec key {kid!r}") from None
        return Payload.FromString(plain)


def payload_codec(settings: CodecSettings) -> EncryptionCodec | None:
    """The codec for this process, or None when no codec key is configured. Raises a
    `ValueError` naming the setting when a key is malformed."""
    if not settings.keys:
        if settings.active_key:
            raise ValueError("CP_CODEC__ACTIVE_KEY is set but CP_CODEC__KEYS is empty")
        return None
    keys = {
        kid: decode_key(f"CP_CODEC__KEYS[{kid!r}]", value.get_secret_value())
        for kid, value in settings.keys.items()
    }
    active = pick_active_key(keys, settings.active_key, setting="CP_CODEC__ACTIVE_KEY")
    return EncryptionCodec(keys, active)
