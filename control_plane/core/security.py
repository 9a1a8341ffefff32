"""Password hashing (argon2id), opaque secrets, and the control plane's own JWTs."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pydantic import SecretStr

from control_plane.core.config import PLACEHOLDER_SECRETS, AuthSettings, Environment, Settings
from control_plane.core.db import utcnow
from control_plane.core.errors import Unauthenticated

_hasher = PasswordHasher()
ALGORITHM = "HS256"


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def load_or_create_secret(path: Path, generate: Callable[[], str]) -> str:
    """A secret kept in a 0600 file, created once (dev stacks that must survive restarts).

    Written aside and linked into place, so processes starting together end up with one
    value, never a torn or replaced file.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(generate() + "\n")
                out.flush()
                os.fsync(out.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(staging, path)
        finally:
            staging.unlink(missing_ok=True)
    return path.read_text().strip()


def with_dev_signing_key(settings: Settings) -> Settings:
    """In dev, a placeholder JWT secret is replaced by a random one kept in the data dir:
    a publicly known signing key would let anyone forge tokens for a dev stack."""
    secret = settings.auth.jwt_secret.get_secret_value()
    if settings.environment is not Environment.DEV or secret not in PLACEHOLDER_SECRETS:
        return settings
    key = load_or_create_secret(settings.data_dir / "auth-signing.key", lambda: new_secret(48))
    auth = settings.auth.model_copy(update={"jwt_secret": SecretStr(key)})
    return settings.model_copy(update={"auth": auth})


def new_secret(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass(frozen=True)
class AccessClaims:
    subject: uuid.UUID
    tenant_id: uuid.UUID
    expires_at: datetime
    token_id: str


class LocalTokens:
    """HS256 access tokens with a `kid` header; previous keys keep verifying."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self.keys = {kid: key.get_secret_value() for kid, key in settings.jwt_previous_keys.items()}
        self.keys[settings.jwt_kid] = settings.jwt_secret.get_secret_value()

    def issue(self, user_id: uuid.UUID, tenant_id: uuid.UUID) -> tuple[str, datetime]:
        now = utcnow()
        expires = now + timedelta(minutes=self.settings.access_token_minutes)
        claims: dict[str, Any] = {
            "sub": str(user_id),
            "tid": str(tenant_id),
            "iss": self.settings.issuer,
            "aud": self.settings.audience,
            "iat": now,
            "nbf": now,
            "exp": expires,
            "jti": uuid.uuid4().hex,
        }
        token = jwt.encode(
            claims,
            self.keys[self.settings.jwt_kid],
            algorithm=ALGORITHM,
            headers={"kid": self.settings.jwt_kid},
        )
        return token, expires

    def verify(self, token: str) -> AccessClaims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as err:
            raise Unauthenticated("malformed token") from err
        key = self.keys.get(str(header.get("kid")))
        if key is None:
            raise Unauthenticated("token signed with an unknown key")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self.settings.audience,
                issuer=self.settings.issuer,
                options={"require": ["exp", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as err:
            raise Unauthenticated("token expired") from err
        except jwt.PyJWTError as err:
            raise Unauthenticated(f"invalid token: {err}") from err
        try:
            return AccessClaims(
                subject=uuid.UUID(claims["sub"]),
                tenant_id=uuid.UUID(claims["tid"]),
                expires_at=datetime.fromtimestamp(claims["exp"]).astimezone(),
                token_id=str(claims.get("jti", "")),
            )
        except (KeyError, ValueError) as err:
            raise Unauthenticated("token claims are incomplete") from err
