"""Envelope encryption of credentials, provider field schemas, masking, and the Temporal
payload codec: pure logic, no servers."""

from __future__ import annotations

import base64
import json
import stat
import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr, TypeAdapter, ValidationError
from temporalio.api.common.v1 import Payload

from control_plane.core.codec import (
    CodecError,
    EncryptionCodec,
    decode_key,
    generate_key,
    payload_codec,
)
from control_plane.core.config import CodecSettings, Settings, VaultSettings
from control_plane.credentials.crypto import (
    DEV_KEY_FILE,
    DEV_KEY_ID,
    Sealed,
    Vault,
    VaultError,
    load_vault,
    record_aad,
)
from control_plane.credentials.providers import mask_secret
from control_plane.credentials.schemas import CredentialCreate

SECRET = {"api_key": "sk-proj-0123456789abcdefghijklmnop"}


def key() -> bytes:
    return decode_key("test", generate_key())


def vault_with(**keys: bytes) -> Vault:
    return Vault(keys, next(iter(keys)))


def aad(provider: str = "openai") -> bytes:
    return record_aad(uuid.uuid4(), uuid.uuid4(), provider)


class TestEnvelope:
    def test_round_trip(self) -> None:
        vault = vault_with(k1=key())
        binding = aad()
        sealed = vault.seal(SECRET, aad=binding)
        assert sealed.master_key_id == "k1"
        assert vault.open(sealed, aad=binding) == SECRET

    def test_ciphertext_never_contains_the_secret(self) -> None:
        sealed = vault_with(k1=key()).seal(SECRET, aad=aad())
        for blob in (sealed.ciphertext, sealed.wrapped_key):
            assert SECRET["api_key"].encode() not in blob
            assert b"api_key" not in blob

    def test_same_secret_in_two_records_gives_different_bytes(self) -> None:
        vault = vault_with(k1=key())
        first, second = vault.seal(SECRET, aad=aad()), vault.seal(SECRET, aad=aad())
        assert first.ciphertext != second.ciphertext
        assert first.nonce != second.nonce
        assert first.wrapped_key != second.wrapped_key

    def test_ciphertext_swapped_between_records_does_not_open(self) -> None:
        vault = vault_with(k1=key())
        aad_a, aad_b = aad(), aad()
        a = vault.seal({"api_key": "secret-of-a-0000000"}, aad=aad_a)
        b = vault.seal({"api_key": "secret-of-b-0000000"}, aad=aad_b)
        # Row A given all of row B's sealed columns: the binding to row A refuses them.
        with pytest.raises(VaultError, match="another record"):
            vault.open(b, aad=aad_a)
        # Only the ciphertext moved (with its nonce): it is not under A's data key.
        moved = Sealed(b.ciphertext, b.nonce, a.wrapped_key, a.key_nonce, a.master_key_id)
        with pytest.raises(VaultError):
            vault.open(moved, aad=aad_a)

    def test_provider_is_part_of_the_binding(self) -> None:
        vault = vault_with(k1=key())
        tenant, credential = uuid.uuid4(), uuid.uuid4()
        sealed = vault.seal(SECRET, aad=record_aad(tenant, credential, "openai"))
        with pytest.raises(VaultError):
            vault.open(sealed, aad=record_aad(tenant, credential, "anthropic"))

    def test_wrong_master_key_under_the_same_id_fails_loudly(self) -> None:
        binding = aad()
        sealed = vault_with(k1=key()).seal(SECRET, aad=binding)
        with pytest.raises(VaultError, match="master key 'k1'"):
            vault_with(k1=key()).open(sealed, aad=binding)

    def test_missing_master_key_fails_loudly(self) -> None:
        binding = aad()
        sealed = vault_with(old=key()).seal(SECRET, aad=binding)
        with pytest.raises(VaultError, match="'old' is not configured"):
            vault_with(new=key()).open(sealed, aad=binding)

    def test_tampered_wrapped_key_fails(self) -> None:
        vault = vault_with(k1=key())
        binding = aad()
        sealed = vault.seal(SECRET, aad=binding)
        flipped = bytes([sealed.wrapped_key[0] ^ 1]) + sealed.wrapped_key[1:]
        tampered = Sealed(
            sealed.ciphertext, sealed.nonce, flipped, sealed.key_nonce, sealed.master_key_id
        )
        with pytest.raises(VaultError):
            vault.open(tampered, aad=binding)


class TestRotation:
    def test_rewrap_changes_only_the_wrapping_and_old_data_stays_readable(self) -> None:
        old, new = key(), key()
        binding = aad()
        sealed = Vault({"old": old}, "old").seal(SECRET, aad=binding)

        during = Vault({"old": old, "new": new}, "new")
        assert during.open(sealed, aad=binding) == SECRET
        rewrapped = during.rewrap(sealed)
        assert rewrapped.master_key_id == "new"
        assert rewrapped.ciphertext == sealed.ciphertext
        assert rewrapped.nonce == sealed.nonce
        assert rewrapped.wrapped_key != sealed.wrapped_key

        after = Vault({"new": new}, "new")
        assert after.open(rewrapped, aad=binding) == SECRET
        with pytest.raises(VaultError):
            after.open(sealed, aad=binding)

    def test_rewrap_under_the_active_key_is_a_no_op(self) -> None:
        vault = vault_with(k1=key())
        sealed = vault.seal(SECRET, aad=aad())
        assert vault.rewrap(sealed) is sealed


class TestMasterKeySettings:
    def test_keys_are_validated_by_name(self) -> None:
        short = base64.b64encode(b"x" * 16).decode()
        with pytest.raises(VaultError, match=r"MASTER_KEYS\['k1'\] must be 32 bytes"):
            Vault.from_settings(VaultSettings(master_keys={"k1": SecretStr(short)}))
        with pytest.raises(VaultError, match="not valid base64"):
            Vault.from_settings(VaultSettings(master_keys={"k1": SecretStr("%%%")}))

    def test_active_key_must_be_configured(self) -> None:
        keys = {"a": SecretStr(generate_key()), "b": SecretStr(generate_key())}
        with pytest.raises(VaultError, match="ACTIVE_KEY must name one"):
            Vault.from_settings(VaultSettings(master_keys=keys))
        with pytest.raises(VaultError, match="'c', which is not among"):
            Vault.from_settings(VaultSettings(master_keys=keys, active_key="c"))
        assert Vault.from_settings(VaultSettings(master_keys=keys, active_key="b")).active_key == (
            "b"
        )

    def test_a_single_key_is_active_by_default(self) -> None:
        vault = Vault.from_settings(VaultSettings(master_keys={"only": SecretStr(generate_key())}))
        assert vault.active_key == "only"

    def test_production_without_a_master_key_refuses_to_start(self, tmp_path: Path) -> None:
        settings = Settings(
            _env_file=None,
            environment="production",
            data_dir=tmp_path,
            auth={"jwt_secret": "a-real-secret-value"},
            database={"url": "postgresql://cp:pw@db/cp"},
            redis={"url": "redis://cache"},
        )
        with pytest.raises(VaultError, match="refusing to start in production"):
            load_vault(settings)
        assert not (tmp_path / DEV_KEY_FILE).exists()

    def test_dev_generates_one_key_kept_private_and_reused(self, tmp_path: Path) -> None:
        settings = Settings(_env_file=None, environment="dev", data_dir=tmp_path / "data")
        first = load_vault(settings)
        path = tmp_path / "data" / DEV_KEY_FILE
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert first.active_key == DEV_KEY_ID
        binding = aad()
        sealed = first.seal(SECRET, aad=binding)
        assert load_vault(settings).open(sealed, aad=binding) == SECRET
        assert list(path.parent.iterdir()) == [path]


class TestProviderSchemas:
    adapter: TypeAdapter[CredentialCreate] = TypeAdapter(CredentialCreate)

    def errors(self, body: dict[str, object]) -> set[tuple[object, ...]]:
        with pytest.raises(ValidationError) as excinfo:
            self.adapter.validate_python(body)
        return {tuple(e["loc"]) for e in excinfo.value.errors()}

    def test_secret_and_plain_fields_are_split(self) -> None:
        body = self.adapter.validate_python(
            {
                "name": "aws-prod",
                "provider": "aws",
                "access_key_id": "AKIAEXAMPLE",
                "secret_access_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                "region": "eu-west-1",
            }
        )
        config, secrets = body.provider_fields().split()
        assert config == {"access_key_id": "AKIAEXAMPLE", "region": "eu-west-1"}
        assert set(secrets) == {"secret_access_key"}
        assert "wJalr" not in repr(body)

    def test_unknown_and_missing_fields_are_named(self) -> None:
        assert self.errors({"name": "x", "provider": "openai", "apikey": "k"}) == {
            ("openai", "api_key"),
            ("openai", "apikey"),
        }

    def test_gcp_needs_a_service_account_key(self) -> None:
        user_key = json.dumps({"type": "authorized_user"})
        assert self.errors({"name": "g", "provider": "gcp", "service_account_json": user_key}) == {
            ("gcp", "service_account_json")
        }
        account = {"type": "service_account", "client_email": "a@b.iam", "private_key": "k"}
        body = self.adapter.validate_python(
            {"name": "g", "provider": "gcp", "service_account_json": account}
        )
        assert body.provider_fields().masked()["service_account_json"].endswith("bytes>")

    def test_kubeconfig_needs_clusters_and_contexts(self) -> None:
        assert self.errors({"name": "k", "provider": "kubeconfig", "kubeconfig": "users: []"}) == {
            ("kubeconfig", "kubeconfig")
        }


class TestMasking:
    @pytest.mark.parametrize(
        ("secret", "masked"),
        [
            ("sk-proj-0123456789abcdefghijklmnop", "sk-proj-...mnop"),
            ("hf_abcdefghijklmnopqrstuvwxyz", "hf_...wxyz"),
            ("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "...EKEY"),
            ("abcdefghijklmn", "...klmn"),
            ("short", "****"),
            ("", "****"),
        ],
    )
    def test_at_most_the_last_four_characters_show(self, secret: str, masked: str) -> None:
        assert mask_secret(secret) == masked


def payload(data: bytes) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=data)


class TestPayloadCodec:
    async def test_round_trip(self) -> None:
        codec = EncryptionCodec({"c1": key()}, "c1")
        original = [payload(b'{"queue":"cp-orchestration"}'), payload(b"2")]
        encoded = await codec.encode(original)
        assert all(p.metadata["encoding"] == b"binary/encrypted" for p in encoded)
        assert all(p.metadata["encryption-key-id"] == b"c1" for p in encoded)
        assert b"cp-orchestration" not in encoded[0].data
        assert await codec.decode(encoded) == original

    async def test_unencrypted_payloads_pass_through(self) -> None:
        codec = EncryptionCodec({"c1": key()}, "c1")
        plain = [payload(b'"hello"')]
        assert await codec.decode(plain) == plain

    async def test_unknown_key_id_fails(self) -> None:
        encoded = await EncryptionCodec({"old": key()}, "old").encode([payload(b"1")])
        with pytest.raises(CodecError, match="'old', which is not configured"):
            await EncryptionCodec({"new": key()}, "new").decode(encoded)

    async def test_payloads_from_before_a_rotation_still_decode(self) -> None:
        old, new = key(), key()
        before = await EncryptionCodec({"old": old}, "old").encode([payload(b"1")])
        rotated = EncryptionCodec({"old": old, "new": new}, "new")
        after = await rotated.encode([payload(b"2")])
        assert after[0].metadata["encryption-key-id"] == b"new"
        assert [p.data for p in await rotated.decode([*before, *after])] == [b"1", b"2"]

    async def test_wrong_key_under_the_same_id_fails(self) -> None:
        encoded = await EncryptionCodec({"c1": key()}, "c1").encode([payload(b"1")])
        with pytest.raises(CodecError, match="does not authenticate"):
            await EncryptionCodec({"c1": key()}, "c1").decode(encoded)

    def test_built_from_settings_only_when_keys_are_configured(self) -> None:
        assert payload_codec(CodecSettings()) is None
        codec = payload_codec(CodecSettings(keys={"c1": SecretStr(generate_key())}))
        assert codec is not None
        assert codec.active_key == "c1"
        with pytest.raises(ValueError, match=r"CP_CODEC__KEYS\['c1'\] must be 32 bytes"):
            payload_codec(CodecSettings(keys={"c1": SecretStr("YWJj")}))
        with pytest.raises(ValueError, match="CP_CODEC__KEYS is empty"):
            payload_codec(CodecSettings(active_key="c1"))
