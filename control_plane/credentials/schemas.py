"""Request and response bodies for credentials. Nothing here ever carries a secret out:
`CredentialRead` has the non-secret fields and the masked secret fields only."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from control_plane.credentials.providers import (
    AnthropicFields,
    AWSFields,
    AzureFields,
    AzureOpenAIFields,
    GCPFields,
    HuggingFaceFields,
    KubeconfigFields,
    OpenAIFields,
    ProviderFields,
    fields_model,
)

CredentialName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Unique among the live credentials of its project (or of the tenant)",
        examples=["openai-prod"],
    ),
]


class CredentialStatus(StrEnum):
    ACTIVE = "active"
    DELETED = "deleted"


class _Named(BaseModel):
    name: CredentialName

    def provider_fields(self) -> ProviderFields:
        """The provider's fields alone (without `name`)."""
        assert isinstance(self, ProviderFields)
        return fields_model(self.provider).model_validate(self.model_dump(exclude={"name"}))


class OpenAICredentialCreate(OpenAIFields, _Named):
    pass


class AnthropicCredentialCreate(AnthropicFields, _Named):
    pass


class AzureOpenAICredentialCreate(AzureOpenAIFields, _Named):
    pass


class HuggingFaceCredentialCreate(HuggingFaceFields, _Named):
    pass


class AWSCredentialCreate(AWSFields, _Named):
    pass


class GCPCredentialCreate(GCPFields, _Named):
    pass


class AzureCredentialCreate(AzureFields, _Named):
    pass


class KubeconfigCredentialCreate(KubeconfigFields, _Named):
    pass


# One schema per provider, chosen by `provider`, so OpenAPI documents each one.
CredentialCreate = Annotated[
    OpenAICredentialCreate
    | AnthropicCredentialCreate
    | AzureOpenAICredentialCreate
    | HuggingFaceCredentialCreate
    | AWSCredentialCreate
    | GCPCredentialCreate
    | AzureCredentialCreate
    | KubeconfigCredentialCreate,
    Field(discriminator="provider"),
]


class CredentialUpdate(BaseModel):
    """Only what is sent changes (`name` or `fields` absent or null: unchanged).
    `fields` holds any of the provider's fields (as in that provider's create schema): a
    secret field sent replaces the stored secret, a `null` clears an optional field, and
    the result must be valid for the provider."""

    model_config = ConfigDict(extra="forbid")

    name: CredentialName | None = None
    fields: dict[str, Any] | None = Field(
        default=None, examples=[{"base_url": "https://gateway.example.com/v1"}]
    )


class CredentialRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    provider: str
    # None: a tenant-wide credential, usable by every project of the tenant.
    project_id: uuid.UUID | None
    config: dict[str, Any] = Field(description="Non-secret fields, in clear")
    masked: dict[str, str] = Field(
        description="Secret fields, masked: at most the last 4 characters",
        examples=[{"api_key": "sk-...abcd"}],
    )
    status: CredentialStatus
    created_by: uuid.UUID | None
    created_at: datetime
    updated_at: datetime


class CredentialList(BaseModel):
    items: list[CredentialRead]
    total: int
    page: int
    limit: int
