"""Password hashing (argon2id), opaque secrets, and the control plane's own JWTs."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from control_plane.core.config import AuthSettings
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
