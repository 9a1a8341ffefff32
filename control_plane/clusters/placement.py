"""Which clusters can hold a model deployment: pure ranking by memory fit, no I/O.

The caller supplies each cluster's last discovered nodes and the per-replica memory a
model needs (weights plus KV cache). GPU replicas may span several GPUs of one group on
one node (tensor parallelism) but never several nodes or GPU models, because
cross-node or mixed-model sharding needs an interconnect and runtime support we do not
assume. CPU replicas need their memory on one node and at least one free core each.

Clusters that are neither `available` nor `degraded` are kept in the result with
`fits=False` and a reason, rather than dropped, so a UI listing "where can this run?"
can also say why a known cluster is not offered.

Ordering: fitting clusters first, then available before degraded (before any other
status), then more headroom, then more replicas possible, then name.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from workflows.contracts.clusters import AcceleratorInfo, ClusterStatus, NodeInfo

_PLACEABLE = (ClusterStatus.AVAILABLE, ClusterStatus.DEGRADED)


@dataclass(frozen=True)
class Demand:
    memory_mb: int  # per replica (weights + KV cache)
    replicas: int = 1
    device: Literal["gpu", "cpu"] = "gpu"
    # CPU replicas: the cores one replica asks for (a small server needs a fraction).
    cpu: float = 1.0

    def __post_init__(self) -> None:
        if self.memory_mb <= 0:
            raise ValueError(f"memory_mb must be positive, got {self.memory_mb}")
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        if self.device not in ("gpu", "cpu"):
            raise ValueError(f"device must be 'gpu' or 'cpu', got {self.device!r}")
        if not self.cpu > 0:
            raise ValueError(f"cpu must be positive, got {self.cpu}")


@dataclass(frozen=True)
class Candidate:
    cluster_id: uuid.UUID
    name: str
    status: ClusterStatus
    nodes: Sequence[NodeInfo]


class Recommendation(BaseModel):
    model_config = ConfigDict(frozen=True)

    cluster_id: uuid.UUID
    name: str
    status: ClusterStatus
    fits: bool
    # How many replicas of the demand the cluster's free capacity holds.
    replicas_possible: int
    # Free capacity (GPU memory of judgeable GPUs, or CPU memory) left after placing the
    # requested replicas, as a percentage of the free capacity before; 0 when it does
    # not fit.
    headroom_percent: float
    reason: str


@dataclass(frozen=True)
class _Fit:
    fits: bool
    replicas_possible: int
    headroom_percent: float
    reason: str


@dataclass(frozen=True)
class _GpuSlot:
    """One accelerator group on one node, judged for the demand."""

    node: str
    group: AcceleratorInfo
    gpus_per_replica: int
    replicas: int

    @property
    def cost_mb(self) -> int:
        return self.gpus_per_replica * self.group.memory_mb


def rank(candidates: Sequence[Candidate], demand: Demand) -> list[Recommendation]:
    """One recommendation per candidate, best first (see the module docstring)."""
    recommendations = [_recommend(candidate, demand) for candidate in candidates]
    return sorted(recommendations, key=_order)


def _order(rec: Recommendation) -> tuple[bool, int, float, int, str]:
    status_rank = _PLACEABLE.index(rec.status) if rec.status in _PLACEABLE else len(_PLACEABLE)
    return (not rec.fits, status_rank, -rec.headroom_percent, -rec.replicas_possible, rec.name)


def _recommend(candidate: Candidate, demand: Demand) -> Recommendation:
    if candidate.status not in _PLACEABLE:
        fit = _Fit(
            fits=False,
            replicas_possible=0,
            headroom_percent=0.0,
            reason=f"cluster is {candidate.status.value}; only available or degraded "
            "clusters take new replicas",
        )
    else:
        ready = [node for node in candidate.nodes if node.ready]
        fit = _gpu_fit(ready, demand) if demand.device == "gpu" else _cpu_fit(ready, demand)
        notes = []
        not_ready = len(candidate.nodes) - len(ready)
        if not_ready:
            notes.append(f"{_plural(not_ready, 'node')} not ready, ignored")
        if candidate.status is ClusterStatus.DEGRADED:
            notes.append("cluster is degraded")
        if notes:
            fit = _Fit(
                fits=fit.fits,
                replicas_possible=fit.replicas_possible,
                headroom_percent=fit.headroom_percent,
                reason=f"{fit.reason} ({'; '.join(notes)})",
            )
    return Recommendation(
        cluster_id=candidate.cluster_id,
        name=candidate.name,
        status=candidate.status,
        fits=fit.fits,
        replicas_possible=fit.replicas_possible,
        headroom_percent=fit.headroom_percent,
        reason=fit.reason,
    )


def _gpu_fit(nodes: Sequence[NodeInfo], demand: Demand) -> _Fit:
    slots: list[_GpuSlot] = []
    unknown: list[tuple[str, AcceleratorInfo]] = []
    free_gpus = 0
    free_mb = 0
    for node in nodes:
        for group in node.accelerators:
            if group.allocatable <= 0:
                continue
            free_gpus += group.allocatable
            if group.memory_mb <= 0:
                unknown.append((node.name, group))
                continue
            free_mb += group.allocatable * group.memory_mb
            per_replica = math.ceil(demand.memory_mb / group.memory_mb)
            slots.append(_GpuSlot(node.name, group, per_replica, group.allocatable // per_replica))
    possible = sum(slot.replicas for slot in slots)
    if possible >= demand.replicas:
        return _gpu_placed(slots, demand, free_gpus, free_mb, possible)
    return _Fit(False, possible, 0.0, _gpu_shortfall(nodes, slots, unknown, demand, possible))


def _gpu_placed(
    slots: Sequence[_GpuSlot], demand: Demand, free_gpus: int, free_mb: int, possible: int
) -> _Fit:
    # Best fit: fill the groups that spend the least GPU memory per replica first, so
    # large GPUs stay free for models that need them.
    remaining = demand.replicas
    used_gpus = 0
    used_mb = 0
    parts: list[str] = []
    for slot in sorted(slots, key=lambda s: (s.cost_mb, s.gpus_per_replica, s.node)):
        if remaining == 0:
            break
        take = min(slot.replicas, remaining)
        if take == 0:
            continue
        remaining -= take
        used_gpus += take * slot.gpus_per_replica
        used_mb += take * slot.cost_mb
        parts.append(
            f"{_plural(take, 'replica')} × {slot.gpus_per_replica} {slot.group.model} "
            f"({_gib(slot.group.memory_mb)}) on node {slot.node}"
        )
    headroom = round((free_mb - used_mb) / free_mb * 100, 1)
    left = free_gpus - used_gpus
    reason = (
        f"fits: {', '.join(parts)}; {left} of {free_gpus} free GPUs "
        f"{'stays' if left == 1 else 'stay'} free (room for {_plural(possible, 'replica')} in all)"
    )
    return _Fit(True, possible, headroom, reason)


def _gpu_shortfall(
    nodes: Sequence[NodeInfo],
    slots: Sequence[_GpuSlot],
    unknown: Sequence[tuple[str, AcceleratorInfo]],
    demand: Demand,
    possible: int,
) -> str:
    if not nodes:
        reason = "does not fit: no ready nodes"
    elif not any(node.accelerators for node in nodes):
        reason = "does not fit: no GPUs on the ready nodes"
    elif not slots and not unknown:
        total = sum(group.count for node in nodes for group in node.accelerators)
        reason = f"does not fit: all {_plural(total, 'GPU')} are in use"
    elif possible == 0 and slots:
        largest = min(slots, key=lambda s: (-s.group.allocatable * s.group.memory_mb, s.node))
        reason = (
            f"does not fit: a replica needs {_gib(demand.memory_mb)}; the largest free GPU "
            f"group is {largest.group.allocatable} × {largest.group.model} "
            f"({_gib(largest.group.memory_mb)} each) on node {largest.node}"
        )
    elif possible == 0:
        reason = "does not fit: no free GPU reports its memory size"
    else:
        reason = (
            f"does not fit: free GPUs hold {possible} of the "
            f"{_plural(demand.replicas, 'replica')} (a replica needs "
            f"{_gib(demand.memory_mb)})"
        )
    if unknown:
        listed = ", ".join(
            f"{group.allocatable} × {group.model} on node {node}" for node, group in unknown
        )
        reason += f"; not judged, memory size unknown: {listed}"
    return reason


def _cpu_fit(nodes: Sequence[NodeInfo], demand: Demand) -> _Fit:
    if not nodes:
        return _Fit(False, 0, 0.0, "does not fit: no ready nodes")
    per_node: list[tuple[NodeInfo, int]] = []
    by_memory_only = 0
    for node in nodes:
        by_memory = max(node.allocatable_memory_mb, 0) // demand.memory_mb
        # A replica needs the cores it asks for (one whole core unless it says less).
        by_cpu = max(math.floor(node.allocatable_cpu / demand.cpu + 1e-9), 0)
        by_memory_only += by_memory
        per_node.append((node, min(by_memory, by_cpu)))
    possible = sum(count for _, count in per_node)
    free_mb = sum(max(node.allocatable_memory_mb, 0) for node in nodes)
    if possible >= demand.replicas:
        remaining = demand.replicas
        parts: list[str] = []
        # Most free memory first: fewer nodes for the same replicas.
        for node, count in sorted(per_node, key=lambda p: (-p[0].allocatable_memory_mb, p[0].name)):
            take = min(count, remaining)
            if take == 0:
                continue
            remaining -= take
            parts.append(f"{_plural(take, 'replica')} on node {node.name}")
        used_mb = demand.replicas * demand.memory_mb
        headroom = round((free_mb - used_mb) / free_mb * 100, 1)
        reason = (
            f"fits: {', '.join(parts)} ({_gib(demand.memory_mb)} each); "
            f"{_gib(free_mb - used_mb)} of {_gib(free_mb)} free CPU memory stays free"
        )
        return _Fit(True, possible, headroom, reason)
    if by_memory_only >= demand.replicas:
        cores = sum(max(node.allocatable_cpu, 0.0) for node in nodes)
        reason = (
            f"does not fit: {_one_decimal(cores)} free CPU cores hold {possible} of the "
            f"{_plural(demand.replicas, 'replica')} "
            f"(a replica needs {_one_decimal(demand.cpu)} "
            f"core{'' if demand.cpu == 1 else 's'})"
        )
    else:
        reason = (
            f"does not fit: {_gib(free_mb)} free CPU memory holds {possible} of the "
            f"{_plural(demand.replicas, 'replica')}"
        )
        if possible == 0:
            roomiest = min(nodes, key=lambda n: (-n.allocatable_memory_mb, n.name))
            reason += (
                f"; a replica needs {_gib(demand.memory_mb)} and the most free on one node "
                f"is {_gib(max(roomiest.allocatable_memory_mb, 0))} on node {roomiest.name}"
            )
    return _Fit(False, possible, 0.0, reason)


def _gib(mb: int) -> str:
    return f"{_one_decimal(mb / 1024)} GiB"


def _one_decimal(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
