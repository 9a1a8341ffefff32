"""Credentials: project-scoped or tenant-wide, secrets sealed by the vault, every change
audited in the same transaction.

Deleting a credential marks the row `deleted` and destroys its sealed secret (the row
stays for the audit trail and for anything that still names its id); the name is free
again for a new credential at once.

Workflows carry credential ids only. Activities call `reveal` just before they need the
secret and keep it out of everything they return, log or heartbeat.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from control_plane.audit import service as audit
from control_plane.core.db import session_scope
from control_plane.core.errors import Conflict, NotFound
from control_plane.core.logging import get_logger
from control_plane.credentials.crypto import Sealed, Vault, record_aad
from control_plane.credentials.errors import InvalidFields
from control_plane.credentials.providers import ProviderFields, fields_model
from control_plane.credentials.repository import SORTABLE, CredentialRepository
from control_plane.credentials.schemas import (
    CredentialCreate,
    CredentialList,
    CredentialRead,
    CredentialStatus,
    CredentialUpdate,
)
from control_plane.credentials.tables import Credential
from control_plane.identity.permissions import Principal, authorize
from control_plane.identity.repository import IdentityRepository
from control_plane.identity.tables import ProjectStatus

log = get_logger(__name__)

RESOURCE_KIND = "credential"


def sealed_of(row: Credential) -> Sealed:
    return Sealed(
        ciphertext=row.ciphertext,
        nonce=row.nonce,
        wrapped_key=row.wrapped_key,
        key_nonce=row.key_nonce,
        master_key_id=row.master_key_id,
    )


def _store(row: Credential, sealed: Sealed) -> None:
    row.ciphertext = sealed.ciphertext
    row.nonce = sealed.nonce
    row.wrapped_key = sealed.wrapped_key
    row.key_nonce = sealed.key_nonce
    row.master_key_id = sealed.master_key_id


def _open(vault: Vault, row: Credential) -> dict[str, str]:
    return vault.open(sealed_of(row), aad=record_aad(row.tenant_id, row.id, row.provider))


class CredentialService:
    """`project_id=None` addresses the tenant-wide credentials (tenant admins write them;
    every user of the tenant may read their masked form)."""

    def __init__(self, session: AsyncSession, vault: Vault) -> None:
        self.session = session
        self.repo = CredentialRepository(session)
        self.vault = vault

    async def _authorize(
        self, principal: Principal, scope: str, project_id: uuid.UUID | None
    ) -> None:
        if project_id is None:
            authorize(principal, scope, tenant_id=principal.tenant_id, what="credential")
            return
        project = await IdentityRepository(self.session).project(project_id)
        if project is None or project.status != ProjectStatus.ACTIVE.value:
            raise NotFound("project not found")
        authorize(
            principal, scope, tenant_id=project.tenant_id, project_id=project.id, what="project"
        )

    async def _require(
        self,
        principal: Principal,
        project_id: uuid.UUID | None,
        credential_id: uuid.UUID,
        *,
        for_update: bool = False,
    ) -> Credential:
        row = await self.repo.live(
            principal.tenant_id, project_id, credential_id, for_update=for_update
        )
        if row is None:
            raise NotFound("credential not found")
        return row

    async def _ensure_name_free(
        self,
        tenant_id: uuid.UUID,
        project_id: uuid.UUID | None,
        name: str,
        other_than: uuid.UUID | None = None,
    ) -> None:
        # The unique index still decides under concurrency (and maps to 409 as well);
        # this check gives the common case a clear message.
        if await self.repo.name_taken(tenant_id, project_id, name, other_than=other_than):
            where = "this project" if project_id else "this tenant"
            raise Conflict(f"a credential named {name!r} already exists in {where}", name=name)

    async def create(
        self, principal: Principal, data: CredentialCreate, *, project_id: uuid.UUID | None
    ) -> CredentialRead:
        await self._authorize(principal, "credentials:write", project_id)
        tenant_id = principal.tenant_id
        await self._ensure_name_free(tenant_id, project_id, data.name)
        fields = data.provider_fields()
        config, secrets = fields.split()
        credential_id = uuid.uuid4()
        sealed = self.vault.seal(secrets, aad=record_aad(tenant_id, credential_id, data.provider))
        row = Credential(
            id=credential_id,
            tenant_id=tenant_id,
            project_id=project_id,
            name=data.name,
            provider=data.provider,
            config=config,
            masked=fields.masked(),
            ciphertext=sealed.ciphertext,
            nonce=sealed.nonce,
            wrapped_key=sealed.wrapped_key,
            key_nonce=sealed.key_nonce,
            master_key_id=sealed.master_key_id,
            status=CredentialStatus.ACTIVE.value,
            created_by=principal.user_id,
        )
        self.repo.add(row)
        await self.repo.flush()
        await audit.record(
            self.session,
            actor=principal,
            action="credential.create",
            resource_kind=RESOURCE_KIND,
            resource_id=row.id,
            project_id=project_id,
            details={"name": row.name, "provider": row.provider},
        )
        return CredentialRead.model_validate(row)

    async def list(
        self,
        principal: Principal,
        *,
        project_id: uuid.UUID | None,
        provider: str | None = None,
        page: int = 1,
        limit: int = 50,
        sort: str = "name",
        descending: bool = False,
    ) -> CredentialList:
        if sort not in SORTABLE:
            raise ValueError(f"sort must be one of {sorted(SORTABLE)}")
        await self._authorize(principal, "credentials:read", project_id)
        rows, total = await self.repo.list(
            principal.tenant_id,
            project_id,
            provider=provider,
            page=page,
            limit=limit,
            sort=sort,
            descending=descending,
        )
        return CredentialList(
            items=[CredentialRead.model_validate(r) for r in rows],
            total=total,
            page=page,
            limit=limit,
        )

    async def get(
        self, principal: Principal, credential_id: uuid.UUID, *, project_id: uuid.UUID | None
    ) -> CredentialRead:
        await self._authorize(principal, "credentials:read", project_id)
        return CredentialRead.model_validate(
            await self._require(principal, project_id, credential_id)
        )

    async def update(
        self,
        principal: Principal,
        credential_id: uuid.UUID,
        data: CredentialUpdate,
        *,
        project_id: uuid.UUID | None,
    ) -> CredentialRead:
        """Apply what was sent; `InvalidFields` (422) when the merged fields are not
        valid for the provider."""
        await self._authorize(principal, "credentials:write", project_id)
        row = await self._require(principal, project_id, credential_id, for_update=True)
        changed: list[str] = []
        if data.name is not None and data.name != row.name:
            await self._ensure_name_free(row.tenant_id, project_id, data.name, row.id)
            row.name = data.name
            changed.append("name")
        if data.fields:
            merged: dict[str, Any] = {"provider": row.provider, **row.config}
            merged.update(_open(self.vault, row))
            merged.update(data.fields)
            try:
                fields = fields_model(row.provider).model_validate(merged)
            except ValidationError as err:
                raise InvalidFields.from_validation(err) from None
            self._reseal(row, fields)
            changed.extend(sorted(data.fields))
        if changed:
            self.session.add(row)
            await self.repo.flush()
            await audit.record(
                self.session,
                actor=principal,
                action="credential.update",
                resource_kind=RESOURCE_KIND,
                resource_id=row.id,
                project_id=project_id,
                details={"name": row.name, "provider": row.provider, "changed": changed},
            )
        return CredentialRead.model_validate(row)

    def _reseal(self, row: Credential, fields: ProviderFields) -> None:
        # A fresh data key and nonce every time the secret fields are written.
        config, secrets = fields.split()
        row.config = config
        row.masked = fields.masked()
        _store(row, self.vault.seal(secrets, aad=record_aad(row.tenant_id, row.id, row.provider)))

    async def delete(
        self, principal: Principal, credential_id: uuid.UUID, *, project_id: uuid.UUID | None
    ) -> None:
        await self._authorize(principal, "credentials:write", project_id)
        row = await self._require(principal, project_id, credential_id, for_update=True)
        row.status = CredentialStatus.DELETED.value
        # Destroy the secret: without the wrapped data key nothing can ever open it.
        _store(row, Sealed(b"", b"", b"", b"", row.master_key_id))
        row.masked = {}
        self.session.add(row)
        await self.repo.flush()
        await audit.record(
            self.session,
            actor=principal,
            action="credential.delete",
            resource_kind=RESOURCE_KIND,
            resource_id=row.id,
            project_id=project_id,
            details={"name": row.name, "provider": row.provider},
        )


async def reveal(
    session: AsyncSession,
    vault: Vault,
    credential_id: uuid.UUID,
    *,
    tenant_id: uuid.UUID | None = None,
    project_id: uuid.UUID | None = None,
) -> dict[str, Any]:
    """Every field of a live credential in clear, plus `provider`: for activities, just
    in time. Given `tenant_id`/`project_id` (those of the resource the activity works
    for), a credential outside them is NotFound; a tenant-wide credential serves every
    project of its tenant. Never return, log or heartbeat what this gives back."""
    row = await CredentialRepository(session).get(credential_id)
    if (
        row is None
        or row.status == CredentialStatus.DELETED.value
        or (tenant_id is not None and row.tenant_id != tenant_id)
        or (project_id is not None and row.project_id not in (None, project_id))
    ):
        raise NotFound(f"credential {credential_id} not found")
    secrets = _open(vault, row)
    log.info("credentials.revealed", credential_id=str(row.id), provider=row.provider)
    return {"provider": row.provider, **row.config, **secrets}


@dataclass(frozen=True)
class RotationReport:
    active_key: str
    live: int
    rewrapped: int
    # Live credentials still under another key (created by a process that had not yet
    # switched its active key): run the rotation again.
    remaining: int

    @property
    def already_current(self) -> int:
        return self.live - self.rewrapped - self.remaining


async def rotate_master_key(
    sessions: async_sessionmaker[AsyncSession],
    vault: Vault,
    *,
    batch_size: int = 200,
    on_batch: Callable[[int], None] | None = None,
) -> RotationReport:
    """Re-wrap every live credential's data key with the active master key, one
    transaction per batch. Ciphertexts and data keys stay as they are. Idempotent: rows
    already under the active key are not touched, so a rerun after a failure (or a
    second run) only does what is left."""
    rewrapped = 0
    after: uuid.UUID | None = None
    while True:
        async with session_scope(sessions) as session:
            repo = CredentialRepository(session)
            rows = await repo.not_on_key(vault.active_key, after=after, limit=batch_size)
            if not rows:
                break
            previous = sorted({row.master_key_id for row in rows})
            for row in rows:
                _store(row, vault.rewrap(sealed_of(row)))
                session.add(row)
            await session.flush()
            await audit.record(
                session,
                actor=None,
                action="credential.rewrap",
                resource_kind=RESOURCE_KIND,
                details={
                    "master_key_id": vault.active_key,
                    "previous_master_key_ids": previous,
                    "credential_ids": [str(row.id) for row in rows],
                },
            )
            after = rows[-1].id
        rewrapped += len(rows)
        log.info("credentials.rotation.batch", rewrapped=len(rows), master_key_id=vault.active_key)
        if on_batch is not None:
            on_batch(len(rows))
    async with session_scope(sessions) as session:
        repo = CredentialRepository(session)
        live = await repo.count_live()
        remaining = await repo.count_live(not_on_key=vault.active_key)
    return RotationReport(
        active_key=vault.active_key, live=live, rewrapped=rewrapped, remaining=remaining
    )
