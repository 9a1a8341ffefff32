"""Request and response bodies of the routers API, and the stored form of a router's
targets, fallbacks and cooldown policy (the gateway parses its rows with these too)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    model_validator,
)

from control_plane.core.pagination import Page
from control_plane.identity.schemas import NO_NUL_PATTERN
from control_plane.routing.cooldown import MAX_COOLDOWN_S, CooldownPolicy
from control_plane.routing.strategies import DEFAULT_STRATEGY, Strategy
from control_plane.routing.tables import Router
from workflows.contracts.common import _not_a_bool

# The endpoint name rule (DNS-safe), at the full DNS label length: a router creates no
# resource on a cluster, so it needs no room for a prefix. Routers and endpoints share
# one namespace per project.
RouterName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=63, pattern=r"^[a-z]([a-z0-9-]*[a-z0-9])?$"),
]
MAX_TARGETS = 32
MAX_FALLBACKS = 8
MAX_RETRIES = 5

# Bounds inside the types: on an optional field they would sit beside `anyOf` in the
# JSON Schema, where clients (and fuzzers) ignore them. (The bool refusal goes after the
# bounds, as in the endpoints' schemas.)


def _a_number(value: object) -> object:
    # pydantic's lax mode reads JSON `true` as 1.0; the schema says number.
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


Weight = Annotated[
    float, Field(gt=0, le=1_000_000, allow_inf_nan=False), BeforeValidator(_a_number)
]
PerMinute = Annotated[int, Field(ge=1, le=1_000_000_000), BeforeValidator(_not_a_bool)]
Retries = Annotated[int, Field(ge=0, le=MAX_RETRIES), BeforeValidator(_not_a_bool)]
Backoff = Annotated[float, Field(ge=0, le=30, allow_inf_nan=False), BeforeValidator(_a_number)]
Timeout = Annotated[float, Field(ge=1, le=3600, allow_inf_nan=False), BeforeValidator(_a_number)]
AllowedFails = Annotated[int, Field(ge=0, le=1000), BeforeValidator(_not_a_bool)]
Window = Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False), BeforeValidator(_a_number)]
CooldownSeconds = Annotated[
    float, Field(gt=0, le=MAX_COOLDOWN_S, allow_inf_nan=False), BeforeValidator(_a_number)
]
Description = Annotated[str, StringConstraints(max_length=2000, pattern=NO_NUL_PATTERN)]

RefKind = Literal["endpoint", "model", "router"]
_STRATEGY: TypeAdapter[Strategy] = TypeAdapter(Strategy)


class RouterStatus(StrEnum):
    ACTIVE = "active"
    DELETED = "deleted"


def _exactly_one(model: BaseModel, fields: Sequence[str]) -> None:
    given = [name for name in fields if getattr(model, name) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(fields)} (got {len(given)})")


class RouterTarget(BaseModel):
    """Where the router may send a request: a deployed endpoint of the project or a cloud
    model (`source_kind` `cloud`) of the project or tenant, with its share of the
    traffic and its own limits."""

    model_config = ConfigDict(extra="forbid")

    endpoint_id: uuid.UUID | None = None
    model_id: uuid.UUID | None = Field(default=None, description="A `ready` cloud model")
    weight: Weight = Field(default=1.0, description="Relative share of the traffic (> 0)")
    rpm: PerMinute | None = Field(default=None, description="Requests per minute; null: none")
    tpm: PerMinute | None = Field(default=None, description="Tokens per minute; null: none")

    @model_validator(mode="after")
    def _one_reference(self) -> Self:
        _exactly_one(self, ("endpoint_id", "model_id"))
        return self

    @property
    def ref(self) -> tuple[RefKind, uuid.UUID]:
        if self.endpoint_id is not None:
            return "endpoint", self.endpoint_id
        assert self.model_id is not None
        return "model", self.model_id


class RouterFallback(BaseModel):
    """Where a request goes, in order, once every target failed: another router of the
    project, an endpoint of the project or a cloud model."""

    model_config = ConfigDict(extra="forbid")

    router_id: uuid.UUID | None = None
    endpoint_id: uuid.UUID | None = None
    model_id: uuid.UUID | None = None

    @model_validator(mode="after")
    def _one_reference(self) -> Self:
        _exactly_one(self, ("router_id", "endpoint_id", "model_id"))
        return self

    @property
    def ref(self) -> tuple[RefKind, uuid.UUID]:
        if self.router_id is not None:
            return "router", self.router_id
        if self.endpoint_id is not None:
            return "endpoint", self.endpoint_id
        assert self.model_id is not None
        return "model", self.model_id


class CooldownSettings(BaseModel):
    """Tolerate `allowed_fails` failures of a target per `window_s` seconds; the next one
    takes it out of rotation for `cooldown_s` seconds (a 429 does at once)."""

    model_config = ConfigDict(extra="forbid")

    allowed_fails: AllowedFails = 3
    window_s: Window = 60.0
    cooldown_s: CooldownSeconds = 30.0

    def policy(self) -> CooldownPolicy:
        return CooldownPolicy(
            allowed_fails=self.allowed_fails, window_s=self.window_s, cooldown_s=self.cooldown_s
        )

    @model_validator(mode="after")
    def _a_valid_policy(self) -> Self:
        # The gateway builds its policy from these values: refuse what it would refuse.
        self.policy()
        return self


class CooldownPatch(BaseModel):
    """Part of a cooldown policy: what is sent replaces those fields of the current one."""

    model_config = ConfigDict(extra="forbid")

    allowed_fails: AllowedFails | None = None
    window_s: Window | None = None
    cooldown_s: CooldownSeconds | None = None


def _distinct(items: Sequence[RouterTarget] | Sequence[RouterFallback]) -> list[str]:
    seen: set[tuple[RefKind, uuid.UUID]] = set()
    repeated: list[str] = []
    for item in items:
        if item.ref in seen:
            repeated.append(f"{item.ref[0]} {item.ref[1]}")
        seen.add(item.ref)
    return repeated


def _no_repeated_target(targets: list[RouterTarget]) -> list[RouterTarget]:
    if repeated := _distinct(targets):
        raise ValueError(f"a target appears more than once: {', '.join(repeated)}")
    return targets


def _no_repeated_fallback(fallbacks: list[RouterFallback]) -> list[RouterFallback]:
    if repeated := _distinct(fallbacks):
        raise ValueError(f"a fallback appears more than once: {', '.join(repeated)}")
    return fallbacks


def fallback_repeats(
    targets: Sequence[RouterTarget], fallbacks: Sequence[RouterFallback]
) -> list[str]:
    """Fallbacks that are also targets (they would be tried twice), as `kind id`."""
    refs = {t.ref for t in targets}
    return [f"{f.ref[0]} {f.ref[1]}" for f in fallbacks if f.ref in refs]


Targets = Annotated[
    list[RouterTarget],
    Field(min_length=1, max_length=MAX_TARGETS),
    AfterValidator(_no_repeated_target),
]
Fallbacks = Annotated[
    list[RouterFallback], Field(max_length=MAX_FALLBACKS), AfterValidator(_no_repeated_fallback)
]


class RouterSpec(BaseModel):
    """A whole router as configured: a create body, and a router's merged state after a
    PATCH (validated again as a whole)."""

    model_config = ConfigDict(extra="forbid")

    name: RouterName = Field(
        description="DNS-safe (lowercase letters, digits, '-'), unique among the project's "
        "routers and endpoints; clients send it as `model`."
    )
    description: Description = ""
    strategy: Strategy = Field(
        default=DEFAULT_STRATEGY, description="How the next target is picked"
    )
    targets: Targets = Field(description=f"1 to {MAX_TARGETS} distinct targets")
    fallbacks: Fallbacks = Field(
        default_factory=list,
        description=f"Up to {MAX_FALLBACKS}, tried in order once the targets failed; "
        "none may also be a target.",
    )
    retries: Retries = Field(
        default=2, description="More attempts after the first, on retryable errors"
    )
    retry_backoff_s: Backoff = Field(
        default=0.1, description="Base of the exponential back-off between attempts"
    )
    timeout_s: Timeout = Field(default=600.0, description="Limit of one upstream attempt")
    cooldown: CooldownSettings = Field(default_factory=CooldownSettings)

    @model_validator(mode="after")
    def _fallbacks_are_not_targets(self) -> Self:
        if repeated := fallback_repeats(self.targets, self.fallbacks):
            raise ValueError(f"a fallback is also a target: {', '.join(repeated)}")
        return self


class RouterCreate(RouterSpec):
    project_id: uuid.UUID


class RouterUpdate(BaseModel):
    """Only what is sent changes (a field absent or null keeps its value); `targets` and
    `fallbacks` replace the whole list, `cooldown` the fields it names. A merged router
    that contradicts itself (a fallback that is also a target, a fallback to itself) is a
    409 naming the conflict."""

    model_config = ConfigDict(extra="forbid")

    name: RouterName | None = None
    description: Description | None = None
    strategy: Strategy | None = None
    targets: Targets | None = None
    fallbacks: Fallbacks | None = None
    retries: Retries | None = None
    retry_backoff_s: Backoff | None = None
    timeout_s: Timeout | None = None
    cooldown: CooldownPatch | None = None

    @model_validator(mode="after")
    def _fallbacks_are_not_targets(self) -> Self:
        if self.targets is not None and self.fallbacks is not None:
            if repeated := fallback_repeats(self.targets, self.fallbacks):
                raise ValueError(f"a fallback is also a target: {', '.join(repeated)}")
        return self


class RefState(BaseModel):
    """What a target or fallback points at, as it is now."""

    kind: RefKind
    name: str | None = Field(description="Its name; null if it no longer exists")
    status: str = Field(
        description="Its status now (an endpoint's, a model's or a router's); `deleted` "
        "for what was deleted since: the gateway skips it"
    )


class RouterTargetRead(RouterTarget):
    target: RefState


class RouterFallbackRead(RouterFallback):
    target: RefState


Resolved = dict[tuple[RefKind, uuid.UUID], RefState]


def _state(resolved: Resolved, ref: tuple[RefKind, uuid.UUID]) -> RefState:
    return resolved.get(ref) or RefState(kind=ref[0], name=None, status="deleted")


class RouterRead(BaseModel):
    id: uuid.UUID
    tenant_id: uuid.UUID
    project_id: uuid.UUID
    name: str
    description: str
    strategy: Strategy
    targets: list[RouterTargetRead]
    fallbacks: list[RouterFallbackRead]
    retries: int
    retry_backoff_s: float
    timeout_s: float
    cooldown: CooldownSettings
    status: RouterStatus
    created_by: uuid.UUID | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None

    @classmethod
    def of(cls, row: Router, resolved: Resolved) -> RouterRead:
        targets = [RouterTarget.model_validate(t) for t in row.targets]
        fallbacks = [RouterFallback.model_validate(f) for f in row.fallbacks]
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            project_id=row.project_id,
            name=row.name,
            description=row.description,
            strategy=_STRATEGY.validate_python(row.strategy),
            targets=[
                RouterTargetRead(**t.model_dump(), target=_state(resolved, t.ref)) for t in targets
            ],
            fallbacks=[
                RouterFallbackRead(**f.model_dump(), target=_state(resolved, f.ref))
                for f in fallbacks
            ],
            retries=row.retries,
            retry_backoff_s=row.retry_backoff_s,
            timeout_s=row.timeout_s,
            cooldown=CooldownSettings.model_validate(row.cooldown),
            status=RouterStatus(row.status),
            created_by=row.created_by,
            created_at=row.created_at,
            updated_at=row.updated_at,
            deleted_at=row.deleted_at,
        )


def spec_of(row: Router) -> dict[str, Any]:
    """The router's configuration as `RouterSpec` input (JSON types)."""
    return {
        "name": row.name,
        "description": row.description,
        "strategy": row.strategy,
        "targets": row.targets,
        "fallbacks": row.fallbacks,
        "retries": row.retries,
        "retry_backoff_s": row.retry_backoff_s,
        "timeout_s": row.timeout_s,
        "cooldown": row.cooldown,
    }


class RouterList(Page[RouterRead]):
    pass
