"""Envelope encryption for credentials.

Each record gets its own random 32-byte data key. The secret fields (as JSON) are sealed
with AES-GCM under that data key, with associated data that names the record (tenant,
credential id, provider), so a ciphertext copied onto another row does not open. The
data key itself is wrapped with AES-GCM under a master key from settings, with the
master key id as associated data; the row stores that id.

Rotating the master key only re-wraps data keys: ciphertexts never change. Any failure
to open (missing master key, wrong key, tampered or swapped bytes) raises `VaultError`;
nothing here ever returns unauthenticated bytes.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from control_plane.core.codec import decode_key, generate_key, pick_active_key
from control_plane.core.config import Environment, Settings, VaultSettings
from control_plane.core.logging import get_logger
from control_plane.core.security import load_or_create_secret

log = get_logger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12
DEV_KEY_ID = "dev"
DEV_KEY_FILE = "vault-master.key"


class VaultError(RuntimeError):
    """A master key is missing or wrong, or sealed bytes do not authenticate."""


def record_aad(tenant_id: uuid.UUID, credential_id: uuid.UUID, provider: str) -> bytes:
    """Associated data binding a ciphertext to its row."""
    return f"cp.credential.v1|{tenant_id}|{credential_id}|{provider}".encode()


def _wrap_aad(master_key_id: str) -> bytes:
    return f"cp.vault.wrap.v1|{master_key_id}".encode()


@dataclass(frozen=True)
class Sealed:
    """What a credential row stores for its secret fields."""

    ciphertext: bytes
    nonce: bytes
    wrapped_key: bytes
    key_nonce: bytes
    master_key_id: str


@dataclass(frozen=True)
class Wrapped:
    wrapped_key: bytes
    key_nonce: bytes
    master_key_id: str


class Vault:
    """Seals and opens secret fields with envelope encryption under the master keys."""

    def __init__(self, master_keys: Mapping[str, bytes], active_key: str) -> None:
        if active_key not in master_keys:
            raise VaultError(f"active master key {active_key!r} is not configured")
        for kid, key in master_keys.items():
            if len(key) != KEY_BYTES:
                raise VaultError(f"master key {kid!r} must be {KEY_BYTES} bytes")
        self._keys = dict(master_keys)
        self.active_key = active_key

    @classmethod
    def from_settings(cls, settings: VaultSettings) -> Vault:
        """Validates every configured master key; raises `VaultError` naming the bad one."""
        if not settings.master_keys:
            raise VaultError("no master key configured (CP_VAULT__MASTER_KEYS)")
        try:
            keys = {
                kid: decode_key(f"CP_VAULT__MASTER_KEYS[{kid!r}]", value.get_secret_value())
                for kid, value in settings.master_keys.items()
            }
            active = pick_active_key(keys, settings.active_key, setting="CP_VAULT__ACTIVE_KEY")
        except ValueError as err:
            raise VaultError(str(err)) from None
        return cls(keys, active)

    def _master(self, kid: str) -> AESGCM:
        key = self._keys.get(kid)
        if key is None:
            raise VaultError(
                f"master key {kid!r} is not configured; add it to CP_VAULT__MASTER_KEYS "
                "(keep old keys until `cpctl credentials rotate-master-key` has re-wrapped "
                "every credential)"
            )
        return AESGCM(key)

    def _wrap(self, data_key: bytes) -> Wrapped:
        nonce = os.urandom(NONCE_BYTES)
        wrapped = self._master(self.active_key).encrypt(nonce, data_key, _wrap_aad(self.active_key))
        return Wrapped(wrapped, nonce, self.active_key)

    def _unwrap(self, wrapped_key: bytes, key_nonce: bytes, master_key_id: str) -> bytes:
        try:
            return self._master(master_key_id).decrypt(
                key_nonce, wrapped_key, _wrap_aad(master_key_id)
            )
        except InvalidTag:
            raise VaultError(
                f"the data key does not open with master key {master_key_id!r}: the key "
                "configured under that id is not the one that wrapped it, or the row was altered"
            ) from None

    def seal(self, fields: Mapping[str, str], *, aad: bytes) -> Sealed:
        data_key = AESGCM.generate_key(bit_length=KEY_BYTES * 8)
        nonce = os.urandom(NONCE_BYTES)
        plaintext = json.dumps(dict(fields), separators=(",", ":"), sort_keys=True).encode()
        ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, aad)
        wrapped = self._wrap(data_key)
        return Sealed(
            ciphertext=ciphertext,
            nonce=nonce,
            wrapped_key=wrapped.wrapped_key,
            key_nonce=wrapped.key_nonce,
            master_key_id=wrapped.master_key_id,
        )

    def open(self, sealed: Sealed, *, aad: bytes) -> dict[str, str]:
        data_key = self._unwrap(sealed.wrapped_key, sealed.key_nonce, sealed.master_key_id)
        try:
            plaintext = AESGCM(data_key).decrypt(sealed.nonce, sealed.ciphertext, aad)
        except InvalidTag:
            raise VaultError(
                "the secret fields do not authenticate: the ciphertext belongs to another "
                "record or was altered"
            ) from None
        fields: Any = json.loads(plaintext)
        if not isinstance(fields, dict):
            raise VaultError("the secret fields are not a JSON object")
        return {str(k): str(v) for k, v in fields.items()}

    def rewrap(self, sealed: Sealed) -> Sealed:
        """The same ciphertext with its data key wrapped by the active master key."""
        if sealed.master_key_id == self.active_key:
            return sealed
        data_key = self._unwrap(sealed.wrapped_key, sealed.key_nonce, sealed.master_key_id)
        wrapped = self._wrap(data_key)
        return Sealed(
            ciphertext=sealed.ciphertext,
            nonce=sealed.nonce,
            wrapped_key=wrapped.wrapped_key,
            key_nonce=wrapped.key_nonce,
            master_key_id=wrapped.master_key_id,
        )


def load_vault(settings: Settings) -> Vault:
    """The vault this process uses; called once at start so bad keys stop it early.

    Production without a master key refuses to start. In dev and test, a missing master
    key is generated once and kept in `<data_dir>/vault-master.key` (mode 0600) under
    the id `dev`, so restarts keep reading what was stored.
    """
    if settings.vault.master_keys:
        return Vault.from_settings(settings.vault)
    if settings.environment is Environment.PRODUCTION:
        raise VaultError(
            "refusing to start in production without a credential master key: set "
            'CP_VAULT__MASTER_KEYS=\'{"k1": "<base64 of 32 random bytes>"}\' and '
            "CP_VAULT__ACTIVE_KEY=k1 (`cpctl credentials generate-key` prints a new key)"
        )
    path = settings.data_dir / DEV_KEY_FILE
    key = _dev_key(path)
    log.info("credentials.vault.dev_key", path=str(path), key_id=DEV_KEY_ID)
    return Vault({DEV_KEY_ID: key}, DEV_KEY_ID)


def _dev_key(path: Path) -> bytes:
    if not path.exists():
        log.warning(
            "credentials.vault.dev_key_generated",
            path=str(path),
            key_id=DEV_KEY_ID,
            hint="dev only; back this file up or credentials stored with it are lost",
        )
    text = load_or_create_secret(path, generate_key)
    try:
        return decode_key(str(path), text)
    except ValueError as err:
        raise VaultError(str(err)) from None
