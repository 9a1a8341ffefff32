"""Payloads of endpoint autoscaling: the policy a user sets, the load samples the endpoint
workflow collects, the state it carries across continue-as-new, and the decision it acts on.

Times are float seconds on the workflow's clock (`workflow.now().timestamp()`); nothing
here reads a clock itself, so the logic in `workflows.autoscale` stays replay-safe.
"""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from workflows.contracts.common import Integer

# A day: longer windows would only mean a policy that never reacts, and the windows
# bound how much history the state carries.
MAX_WINDOW_S = 86_400.0
# Change points kept in `AutoscaleState.history`. Equal neighbours are merged, so this is
# only reached by a desired count that changes this often within the longest window.
MAX_HISTORY = 256


def _refuse_bool(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


# Like `Integer`: pydantic's lax mode would otherwise read `true` as 1.0. Infinity and NaN
# are refused because they poison every comparison the windows make.
Number = Annotated[float, BeforeValidator(_refuse_bool), Field(allow_inf_nan=False)]


class AutoscalePolicy(BaseModel):
    """How one endpoint scales. Part of the endpoint's settings."""

    # A typo in a policy key should be an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")

    min_replicas: Integer = Field(default=1, ge=0)
    max_replicas: Integer = Field(default=1, ge=1)
    # Requests in flight (running + waiting) one replica is meant to carry.
    target_concurrency_per_replica: Number = Field(default=4.0, gt=0)
    # How long the load must keep justifying more replicas before adding them; 0 = at once.
    scale_up_window_s: Number = Field(default=0.0, ge=0, le=MAX_WINDOW_S)
    scale_up_max_step: Integer = Field(default=4, ge=1)
    # Scale down only to the highest count wanted over this window (as the Kubernetes HPA
    # does), so a load that flaps does not flap replicas.
    scale_down_stabilization_s: Number = Field(default=60.0, ge=0, le=MAX_WINDOW_S)
    # Idle time (nothing running or waiting) before going to zero; min_replicas == 0 only.
    scale_to_zero_after_s: Number = Field(default=300.0, gt=0, le=MAX_WINDOW_S)

    @model_validator(mode="after")
    def _min_not_above_max(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed "
                f"max_replicas ({self.max_replicas})"
            )
        return self

    @property
    def history_horizon_s(self) -> float:
        """How far back the windows look; older history can be dropped."""
        return max(self.scale_up_window_s, self.scale_down_stabilization_s)


class ScalingSample(BaseModel):
    """One look at the endpoint's load, summed over its replicas."""

    time: Number
    # Floats because serving engines export these as (possibly averaged) gauges.
    running: Number = Field(default=0.0, ge=0)
    waiting: Number = Field(default=0.0, ge=0)
    # Informational (shown in reasons); readiness does not change the decision.
    replicas_ready: Integer = Field(default=0, ge=0)

    @property
    def load(self) -> float:
        return self.running + self.waiting


class DesiredPoint(BaseModel):
    """From `time` on (until the next point), the load wanted `desired` replicas."""

    time: Number
    desired: Integer = Field(ge=0)


class AutoscaleState(BaseModel):
    """What `decide` needs from earlier decisions; small and JSON-serialisable so the
    endpoint workflow can pass it to its next run on continue-as-new."""

    # Change points of the desired count, oldest first, equal neighbours merged. The
    # first point may be older than the longest window: it says what held at its start.
    history: list[DesiredPoint] = Field(default_factory=list, max_length=MAX_HISTORY)
    # Last sample time with any load; the first sample's time until load is seen, so an
    # endpoint that never gets traffic still counts as idle from when it was first watched.
    last_active_at: Number | None = None
    # Set by a manual `scale`: pins the replica count until cleared (None).
    manual_replicas: Integer | None = Field(default=None, ge=0)
    # The last sample saw replicas still starting: the first sample with all of them ready
    # counts as activity too, so the idle timer starts when they can serve.
    starting: bool = False

    def pinned(self, replicas: int | None) -> AutoscaleState:
        """A copy with a manual pin set, or cleared with None."""
        return AutoscaleState.model_validate({**self.model_dump(), "manual_replicas": replicas})


class Decision(BaseModel):
    replicas: Integer = Field(ge=0)
    # For people: events, `cpctl` output, the workflow's progress detail.
    reason: str
    # Total load the decision was made on (running + waiting).
    metric: float
    # Replicas the current load alone would want, within [max(1, min), max].
    desired: Integer = Field(ge=0)
    changed: bool
