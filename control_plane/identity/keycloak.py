"""Keycloak mode: realm = tenant. (Being built; see the identity issue.)"""

from __future__ import annotations

from control_plane.core.config import Settings
from control_plane.identity.authn import ExternalIdentityProvider


def external_identity_provider(settings: Settings) -> ExternalIdentityProvider | None:
    if settings.auth.mode != "keycloak":
        return None
    raise NotImplementedError("keycloak mode is being built")
