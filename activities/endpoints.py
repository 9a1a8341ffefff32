"""Endpoint activities: bookkeeping and placement on the orchestration pool
(`prepare_endpoint`, `save_endpoint_state`), replica work on the `cp-deploy` pool
(`ensure_endpoint_replicas`, `wait_endpoint_ready`, `observe_endpoint`,
`delete_endpoint_replicas`).

Replica activities reach the cluster through the same providers as cluster onboarding
(credentials revealed just before use, heartbeating while they wait). Before a local
replica of a stored model starts, its files are copied from the object store into a
content-checked cache under the data directory, which the launch spec's `{model_dir}`
then names.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.clusters import ClusterActivities
from control_plane.clusters.placement import Demand, rank
from control_plane.clusters.repository import ClusterRepository
from control_plane.clusters.service import placement_candidates, target_of
from control_plane.core.db import session_scope
from control_plane.core.logging import get_logger
from control_plane.core.storage import ObjectStore
from control_plane.endpoints.engines.base import (
    EngineArgsError,
    EngineRequest,
    ModelInfo,
    engine_for,
    render,
)
from control_plane.endpoints.repository import EndpointRepository
from control_plane.endpoints.tables import Endpoint
from control_plane.models.metadata import memory_mb_for
from control_plane.models.repository import ModelRepository
from control_plane.routing.changes import ChangeKind, publish_change
from workflows.contracts.clusters import ClusterKind, ClusterStatus, ClusterTarget
from workflows.contracts.endpoints import (
    ENDPOINT_GONE,
    INVALID_ENDPOINT,
    LABEL_ENDPOINT,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    MODEL_DIR_PLACEHOLDER,
    MODEL_NOT_DEPLOYABLE,
    NO_PLACEMENT,
    REPLICA_FAILED,
    ArtifactFile,
    EndpointSnapshot,
    EndpointStatus,
    EndpointTarget,
    EngineKind,
    ModelFiles,
    Observation,
    PreparedEndpoint,
    ReplicaCall,
    ReplicaInfo,
    ReplicaLoad,
    ReplicaSetSpec,
    ReplicaState,
    replica_set_name,
)
from workflows.contracts.models import ModelMetadataInfo, ModelStatus, SourceKind

log = get_logger(__name__)

RUNNING_METRIC = "vllm:num_requests_running"
WAITING_METRIC = "vllm:num_requests_waiting"
SCRAPE_TIMEOUT_S = 3.0
PROBE_TIMEOUT_S = 30.0
READY_POLL_S = 0.5
# A replica that exits this often while the endpoint first starts will not come up.
MAX_START_FAILURES = 3
LOG_TAIL_LINES = 20
_CHUNK = 1024 * 1024


def _permanent(message: str, kind: str) -> ApplicationError:
    return ApplicationError(message, type=kind, non_retryable=True)


def parse_load(name: str, text: str) -> ReplicaLoad:
    """Sum the vLLM queue gauges of one replica's `/metrics` (all label sets)."""
    running = waiting = 0.0
    for family in text_string_to_metric_families(text):
        if family.name not in (RUNNING_METRIC, WAITING_METRIC):
            continue
        total = sum(sample.value for sample in family.samples if sample.name == family.name)
        if family.name == RUNNING_METRIC:
            running += total
        else:
            waiting += total
    return ReplicaLoad(name=name, running=running, waiting=waiting)


async def _beat_while(task: asyncio.Future[Any]) -> Any:
    while True:
        done, _ = await asyncio.wait({task}, timeout=2.0)
        activity.heartbeat()
        if done:
            return task.result()


def _ready_routes(replicas: Sequence[ReplicaInfo] | None) -> frozenset[tuple[str, str | None]]:
    """What the gateway routes to: the ready replicas' names and URLs."""
    return frozenset((r.name, r.url) for r in replicas or () if r.state is ReplicaState.READY)


async def _routes(repo: EndpointRepository, endpoint_id: Any) -> frozenset[tuple[str, str | None]]:
    return frozenset(
        (r.name, r.url) for r in await repo.replicas(endpoint_id) if r.state == ReplicaState.READY
    )


class EndpointActivities:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        clusters: ClusterActivities,
        objects: ObjectStore,
        *,
        model_cache: Path,
        redis: Redis | None = None,
    ) -> None:
        self.sessions = sessions
        self.clusters = clusters
        self.objects = objects
        self.model_cache = model_cache
        self.redis = redis

    # --- orchestration pool ---------------------------------------------------------

    @activity.defn(name="prepare_endpoint")
    async def prepare_endpoint(self, target: EndpointTarget) -> PreparedEndpoint:
        """Validate the model, choose the cluster, render the launch spec, record them."""
        async with session_scope(self.sessions) as session:
            repo = EndpointRepository(session)
            row = await repo.get(target.endpoint_id, for_update=True)
            if row is None or row.status in (EndpointStatus.DELETED, EndpointStatus.DELETING):
                raise _permanent(f"endpoint {target.endpoint_id} no longer exists", ENDPOINT_GONE)
            model = await self._model_info(session, row)
            engine = engine_for(_engine(row))
            cluster_kind, cluster, placement = await self._place(session, row, model)
            request = EngineRequest(
                engine=engine.kind,
                served_model_name=row.name,
                cluster_kind=cluster_kind,
                model=model,
                context_length=row.context_length,
            )
            try:
                launch = render(request, row.engine_args)
            except EngineArgsError as err:
                raise _permanent(str(err), INVALID_ENDPOINT) from None
            row.cluster_id = cluster.cluster_id
            row.launch_spec = launch.model_dump(mode="json")
            row.status = EndpointStatus.DEPLOYING.value
            row.status_reason = placement
            session.add(row)
            spec = ReplicaSetSpec(
                endpoint_id=row.id,
                name=replica_set_name(row.id),
                launch=launch,
                replicas=0,
                labels={
                    LABEL_ENDPOINT: str(row.id),
                    "cp/project": str(row.project_id),
                    LABEL_MANAGED_BY: MANAGED_BY,
                },
            )
            return PreparedEndpoint(cluster=cluster, spec=spec, placement=placement)

    async def _model_info(self, session: AsyncSession, row: Endpoint) -> ModelInfo | None:
        if row.model_id is None:
            return None
        models = ModelRepository(session)
        model = await models.get(row.model_id)
        if model is None or model.tenant_id != row.tenant_id:
            raise _permanent("the endpoint's model no longer exists", MODEL_NOT_DEPLOYABLE)
        status = ModelStatus(model.status)
        if status is ModelStatus.QUARANTINED:
            raise _permanent(
                f"model {model.name!r} is quarantined: {model.status_reason}", MODEL_NOT_DEPLOYABLE
            )
        if status is not ModelStatus.READY:
            raise _permanent(
                f"model {model.name!r} is {status.value}, not ready", MODEL_NOT_DEPLOYABLE
            )
        if model.source_kind == SourceKind.CLOUD.value:
            raise _permanent(
                f"model {model.name!r} is a cloud model: it is served by its provider, "
                "route to it through the gateway instead",
                MODEL_NOT_DEPLOYABLE,
            )
        meta_row = await models.metadata(model.id)
        meta = ModelMetadataInfo.model_validate(meta_row.details) if meta_row else None
        artifacts = await models.artifacts(model.id)
        return ModelInfo(
            model_id=model.id,
            name=model.name,
            source_kind=model.source_kind,
            source_ref=model.source_ref,
            pinned_revision=model.pinned_revision,
            architecture=meta.architecture if meta else None,
            context_length=meta.context_length if meta else None,
            weights_bytes=meta.weights_bytes if meta else None,
            kv_cache_bytes_per_token=meta.kv_cache_bytes_per_token if meta else None,
            modality=model.modality,
            memory_mb=_memory_mb(meta, row.context_length),
            files=ModelFiles(
                model_id=model.id,
                files=[
                    ArtifactFile(path=a.path, object_key=a.object_key, sha256=a.sha256, size=a.size)
                    for a in artifacts
                ],
            ),
        )

    async def _place(
        self, session: AsyncSession, row: Endpoint, model: ModelInfo | None
    ) -> tuple[ClusterKind, ClusterTarget, str]:
        clusters = ClusterRepository(session)
        if row.requested_cluster_id is not None:
            cluster = await clusters.get(row.requested_cluster_id)
            if cluster is None or cluster.tenant_id != row.tenant_id:
                raise _permanent("the requested cluster does not exist", NO_PLACEMENT)
            status = ClusterStatus(cluster.status)
            if status not in (ClusterStatus.AVAILABLE, ClusterStatus.DEGRADED):
                raise _permanent(
                    f"cluster {cluster.name!r} is {status.value}; only available or degraded "
                    "clusters take new replicas",
                    NO_PLACEMENT,
                )
            return ClusterKind(cluster.kind), target_of(cluster), f"on cluster {cluster.name}"
        # No cluster named: the best fit for one replica's memory.
        engine = engine_for(_engine(row))
        probe = EngineRequest(
            engine=engine.kind,
            served_model_name=row.name,
            cluster_kind=ClusterKind.LOCAL,
            model=model,
            context_length=row.context_length,
        )
        try:
            resources = render(probe, row.engine_args).resources
        except EngineArgsError as err:
            raise _permanent(str(err), INVALID_ENDPOINT) from None
        gpu = resources.gpus > 0
        device = "gpu" if gpu else "cpu"
        memory_mb = resources.memory_mb
        if gpu and model is not None and model.memory_mb:
            memory_mb = model.memory_mb
        demand = Demand(memory_mb=memory_mb, device="gpu" if gpu else "cpu", cpu=resources.cpu)
        ranked = rank(await placement_candidates(session, row.tenant_id), demand)
        fitting = [rec for rec in ranked if rec.fits]
        if not fitting:
            why = "; ".join(f"{rec.name}: {rec.reason}" for rec in ranked) or "no clusters"
            raise _permanent(
                f"no cluster fits one replica ({memory_mb} MiB on {device}): {why}", NO_PLACEMENT
            )
        best = fitting[0]
        cluster = await clusters.get(best.cluster_id)
        assert cluster is not None
        return (
            ClusterKind(cluster.kind),
            target_of(cluster),
            f"placed on {best.name}: {best.reason}",
        )

    @activity.defn(name="save_endpoint_state")
    async def save_endpoint_state(self, snapshot: EndpointSnapshot) -> EndpointStatus:
        """Mirror what the workflow saw; returns the status stored afterwards."""
        now = datetime.now(UTC)
        async with session_scope(self.sessions) as session:
            repo = EndpointRepository(session)
            row = await repo.get(snapshot.endpoint_id, for_update=True)
            if row is None:
                raise _permanent(f"endpoint {snapshot.endpoint_id} does not exist", ENDPOINT_GONE)
            current = EndpointStatus(row.status)
            if current in snapshot.unless_in:
                return current
            routing_before = (row.published, row.status, await _routes(repo, row.id))
            row.status = snapshot.status.value
            row.status_reason = snapshot.reason[:2000]
            row.replicas_desired = snapshot.replicas_desired
            row.manual_replicas = snapshot.manual_replicas
            row.last_load = snapshot.load
            if snapshot.autoscale is not None:
                row.autoscale = snapshot.autoscale.model_dump(mode="json")
            if snapshot.published and not row.published:
                row.published_at = now
            row.published = snapshot.published
            if snapshot.replicas is not None:
                await repo.replace_replicas(row.id, snapshot.replicas, snapshot.loads, now)
                row.replicas_ready = sum(
                    1 for r in snapshot.replicas if r.state is ReplicaState.READY
                )
            repo.add_events(row, snapshot.events)
            routes = (
                routing_before[2] if snapshot.replicas is None else _ready_routes(snapshot.replicas)
            )
            rerouted = (row.published, row.status, routes) != routing_before
            if rerouted:
                row.routing_version += 1
            session.add(row)
            if current is not snapshot.status:
                log.info(
                    "endpoints.status.changed",
                    endpoint_id=str(row.id),
                    status=snapshot.status.value,
                    previous=current.value,
                    reason=snapshot.reason,
                )
        # After the commit: a gateway that reloads on the notice must see the new state.
        if rerouted and self.redis is not None:
            await publish_change(self.redis, ChangeKind.ENDPOINT, snapshot.endpoint_id)
        return snapshot.status

    # --- deploy pool ----------------------------------------------------------------

    async def _materialise(self, files: ModelFiles) -> Path:
        """Copy a model's files from the object store into the cache (once; checked)."""
        root = self.model_cache / str(files.model_id)
        manifest = root / ".complete"
        wanted = sorted(f"{f.path}:{f.sha256}" for f in files.files)
        with contextlib.suppress(OSError, ValueError):
            if json.loads(manifest.read_text()) == wanted:
                return root
        for item in files.files:
            relative = PurePosixPath(item.path)
            if relative.is_absolute() or ".." in relative.parts:
                raise _permanent(f"unsafe artifact path {item.path!r}", INVALID_ENDPOINT)
            target = root.joinpath(*relative.parts)
            if target.exists() and target.stat().st_size == item.size:
                if await asyncio.to_thread(_sha256, target) == item.sha256:
                    continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            digest = hashlib.sha256()
            with partial.open("wb") as out:
                async with contextlib.aclosing(self.objects.get_stream(item.object_key)) as chunks:
                    async for chunk in chunks:
                        digest.update(chunk)
                        await asyncio.to_thread(out.write, chunk)
                        activity.heartbeat(f"copying {item.path}")
            if digest.hexdigest() != item.sha256:
                partial.unlink(missing_ok=True)
                raise _permanent(
                    f"stored {item.path} does not match its recorded sha256", INVALID_ENDPOINT
                )
            partial.replace(target)
        manifest.write_text(json.dumps(wanted))
        return root

    async def _resolved(self, call: ReplicaCall) -> ReplicaSetSpec:
        """The spec with `{model_dir}` filled in where the provider needs local files."""
        launch = call.spec.launch
        if not any(MODEL_DIR_PLACEHOLDER in part for part in launch.command):
            return call.spec
        if call.cluster.kind is not ClusterKind.LOCAL or launch.model_files is None:
            raise _permanent(
                "this launch spec needs the model's files on a local cluster", INVALID_ENDPOINT
            )
        root = await self._materialise(launch.model_files)
        command = [part.replace(MODEL_DIR_PLACEHOLDER, str(root)) for part in launch.command]
        return call.spec.model_copy(
            update={"launch": launch.model_copy(update={"command": command})}
        )

    @activity.defn(name="ensure_endpoint_replicas")
    async def ensure_endpoint_replicas(self, call: ReplicaCall) -> list[ReplicaInfo]:
        async with self.clusters.replica_provider(call.cluster) as provider:
            spec = await self._resolved(call)
            replicas: list[ReplicaInfo] = await provider.ensure_replicas(spec)
            return replicas

    @activity.defn(name="delete_endpoint_replicas")
    async def delete_endpoint_replicas(self, call: ReplicaCall) -> list[str]:
        async with self.clusters.replica_provider(call.cluster) as provider:
            removed: list[str] = await provider.delete_replicas(call.spec.name)
            return removed

    @activity.defn(name="observe_endpoint")
    async def observe_endpoint(self, call: ReplicaCall) -> Observation:
        async with self.clusters.replica_provider(call.cluster) as provider:
            replicas: list[ReplicaInfo] = await provider.list_replicas(call.spec)
        ready = [r for r in replicas if r.state is ReplicaState.READY and r.url]
        async with httpx.AsyncClient(timeout=SCRAPE_TIMEOUT_S) as client:
            loads = await asyncio.gather(
                *(self._scrape(client, r, call.spec.launch.metrics_path) for r in ready)
            )
        return Observation(replicas=replicas, loads=list(loads))

    @staticmethod
    async def _scrape(client: httpx.AsyncClient, replica: ReplicaInfo, path: str) -> ReplicaLoad:
        try:
            response = await client.get(f"{replica.url}{path}")
            response.raise_for_status()
            return parse_load(replica.name, response.text)
        except (httpx.HTTPError, ValueError) as err:
            return ReplicaLoad(name=replica.name, ok=False, error=str(err) or type(err).__name__)

    @activity.defn(name="wait_endpoint_ready")
    async def wait_endpoint_ready(self, call: ReplicaCall) -> list[ReplicaInfo]:
        """Wait until the set's replicas are healthy and answer a real request; replace
        replicas that exit meanwhile, and give up (with their logs) when they keep
        exiting or do not come up within the engine's start-up time."""
        launch = call.spec.launch
        deadline = time.monotonic() + launch.startup_timeout_s
        failures: dict[str, int] = {}
        probed: set[str] = set()
        async with (
            self.clusters.replica_provider(call.cluster) as provider,
            httpx.AsyncClient(timeout=PROBE_TIMEOUT_S) as client,
        ):
            spec = await self._resolved(call)
            while True:
                activity.heartbeat()
                replicas: list[ReplicaInfo] = await provider.list_replicas(spec)
                exited = [r for r in replicas if r.state is ReplicaState.EXITED]
                for replica in exited:
                    failures[replica.name] = failures.get(replica.name, 0) + 1
                    if failures[replica.name] >= MAX_START_FAILURES:
                        logs = await _logs(provider, spec.name, replica.name)
                        raise _permanent(
                            f"replica {replica.name} exited {failures[replica.name]} times "
                            f"while starting ({replica.reason}); last log lines:\n{logs}",
                            REPLICA_FAILED,
                        )
                if exited or len(replicas) != spec.replicas:
                    replicas = await provider.ensure_replicas(spec)
                for replica in replicas:
                    if replica.state is ReplicaState.READY and replica.name not in probed:
                        if await _probe(client, replica, launch.probe_path, launch.probe_body):
                            probed.add(replica.name)
                serving = [r for r in replicas if r.name in probed]
                activity.heartbeat(f"{len(serving)}/{spec.replicas} replicas serving")
                if len(serving) >= spec.replicas and len(replicas) == spec.replicas:
                    return replicas
                if time.monotonic() > deadline:
                    waiting = [r for r in replicas if r.name not in probed]
                    name = waiting[0].name if waiting else ""
                    logs = await _logs(provider, spec.name, name) if name else ""
                    raise _permanent(
                        f"{len(serving)}/{spec.replicas} replicas serving after "
                        f"{launch.startup_timeout_s:.0f} s; "
                        + "; ".join(f"{r.name}: {r.state.value} {r.reason}" for r in waiting)
                        + (f"; last log lines of {name}:\n{logs}" if logs else ""),
                        REPLICA_FAILED,
                    )
                await asyncio.sleep(READY_POLL_S)


async def _probe(
    client: httpx.AsyncClient,
    replica: ReplicaInfo,
    path: str | None,
    body: dict[str, object] | None,
) -> bool:
    """A real request through the engine (not only its health check)."""
    if path is None or replica.url is None:
        return True
    try:
        response = await client.post(f"{replica.url}{path}", json=body or {})
    except httpx.HTTPError:
        return False
    return response.status_code < 300


async def _logs(provider: Any, name: str, replica: str) -> str:
    try:
        logs: dict[str, str] = await provider.replica_logs(name, replica, LOG_TAIL_LINES)
    except Exception:  # logs are a courtesy in an error message
        return ""
    return logs.get(replica, "")[-4000:]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _engine(row: Endpoint) -> EngineKind:
    return EngineKind(row.engine)


def _memory_mb(meta: ModelMetadataInfo | None, context_length: int | None) -> int | None:
    if meta is None:
        return None
    try:
        return memory_mb_for(meta, context_length=context_length)
    except ValueError:
        return None
