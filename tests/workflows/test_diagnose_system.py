"""`DiagnoseSystem` on the time-skipping test server, activities stood in by name
(no PostgreSQL here: bookkeeping is recorded in memory), plus replay of a recorded
history to guard determinism."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from temporalio import activity
from temporalio.client import WorkflowFailureError, WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from control_plane.core.temporal import data_converter
from workers.main import _workflow_runner
from workflows.contracts.common import Progress, RunRecord, RunStatus
from workflows.contracts.system import DiagnoseRequest, DiagnoseResult, PingRequest, PoolPing
from workflows.queues import QUEUE_PREFIX_MEMO, Queue, task_queue
from workflows.system import DiagnoseSystem

HISTORIES = Path(__file__).parent / "histories"


class Recorder:
    def __init__(self) -> None:
        self.records: list[RunRecord] = []
        self.first = asyncio.Event()

    @activity.defn(name="record_workflow_run")
    async def record(self, record: RunRecord) -> None:
        self.records.append(record)
        self.first.set()


@activity.defn(name="ping_pool")
async def ping(request: PingRequest) -> PoolPing:
    return PoolPing(
        queue=request.queue,
        task_queue=activity.info().task_queue,
        worker_host="stand-in",
        worker_pid=1,
        version="test",
        answered_at=datetime.now(UTC),
    )


def workers_for(
    env: WorkflowEnvironment, prefix: str, recorder: Recorder, answering: list[Queue]
) -> list[Worker]:
    orchestration = Worker(
        env.client,
        task_queue=task_queue(Queue.ORCHESTRATION, prefix),
        workflows=[DiagnoseSystem],
        activities=[recorder.record] + ([ping] if Queue.ORCHESTRATION in answering else []),
        workflow_runner=_workflow_runner(),
    )
    others = [
        Worker(env.client, task_queue=task_queue(q, prefix), activities=[ping])
        for q in answering
        if q is not Queue.ORCHESTRATION
    ]
    return [orchestration, *others]


async def run_with(
    env: WorkflowEnvironment, request: DiagnoseRequest, answering: list[Queue]
) -> tuple[DiagnoseResult, Recorder, str]:
    prefix = f"w{uuid.uuid4().hex[:8]}-"
    recorder = Recorder()
    workers = workers_for(env, prefix, recorder, answering)
    tasks = [asyncio.create_task(w.run()) for w in workers]
    workflow_id = f"diag-{uuid.uuid4()}"
    try:
        result = await env.client.execute_workflow(
            DiagnoseSystem.run,
            request,
            id=workflow_id,
            task_queue=task_queue(Queue.ORCHESTRATION, prefix),
            memo={QUEUE_PREFIX_MEMO: prefix},
        )
    finally:
        await asyncio.gather(*(w.shutdown() for w in workers))
        await asyncio.gather(*tasks, return_exceptions=True)
    return result, recorder, workflow_id


class TestDiagnoseSystem:
    async def test_every_answering_pool_is_reported(
        self, time_skipping_env: WorkflowEnvironment
    ) -> None:
        queues = [Queue.ORCHESTRATION, Queue.MODEL, Queue.SYNC]
        result, recorder, _ = await run_with(
            time_skipping_env, DiagnoseRequest(queues=queues), queues
        )
        assert result.healthy
        assert sorted(p.queue for p in result.answered) == sorted(queues)
        assert result.answered[0].task_queue.endswith(result.answered[0].queue.value)

    async def test_a_pool_without_workers_fails_its_step_after_the_timeout(
        self, time_skipping_env: WorkflowEnvironment
    ) -> None:
        # Nothing polls cp-deploy; the test server enforces schedule-to-start in real time.
        request = DiagnoseRequest(queues=[Queue.CLUSTER, Queue.DEPLOY], timeout_seconds=3)
        result, recorder, _ = await run_with(time_skipping_env, request, [Queue.CLUSTER])
        assert not result.healthy
        assert [f.queue for f in result.failed] == [Queue.DEPLOY]
        assert "no worker answered on" in result.failed[0].reason
        assert "within 3s" in result.failed[0].reason
        final = recorder.records[-1]
        assert final.status is RunStatus.COMPLETED
        steps = {s.name: s.status.value for s in final.progress.steps}
        assert steps == {"ping cp-cluster": "completed", "ping cp-deploy": "failed"}

    async def test_bookkeeping_records_start_and_finish(
        self, time_skipping_env: WorkflowEnvironment
    ) -> None:
        _, recorder, workflow_id = await run_with(
            time_skipping_env, DiagnoseRequest(queues=[Queue.SYNC]), [Queue.SYNC]
        )
        first, last = recorder.records[0], recorder.records[-1]
        assert first.workflow_id == last.workflow_id == workflow_id
        assert first.status is RunStatus.RUNNING
        assert first.finished_at is None
        assert last.status is RunStatus.COMPLETED
        assert last.finished_at is not None
        assert last.progress.percent == 100.0
        assert last.kind == "DiagnoseSystem"
        assert last.resource.kind == "system"

    async def test_cancelling_records_cancelled_steps(
        self, time_skipping_env: WorkflowEnvironment
    ) -> None:
        env = time_skipping_env
        prefix = f"w{uuid.uuid4().hex[:8]}-"
        recorder = Recorder()
        workers = workers_for(env, prefix, recorder, [])
        tasks = [asyncio.create_task(w.run()) for w in workers]
        try:
            handle = await env.client.start_workflow(
                DiagnoseSystem.run,
                DiagnoseRequest(queues=[Queue.MODEL], timeout_seconds=3600),
                id=f"diag-{uuid.uuid4()}",
                task_queue=task_queue(Queue.ORCHESTRATION, prefix),
                memo={QUEUE_PREFIX_MEMO: prefix},
            )
            await asyncio.wait_for(recorder.first.wait(), 10)
            # The first record precedes the pings; the step turns `running` just after.
            for _ in range(100):
                progress = await handle.query(DiagnoseSystem.progress)
                assert isinstance(progress, Progress)
                if progress.steps[0].status.value == "running":
                    break
                await asyncio.sleep(0.05)
            assert progress.steps[0].status.value == "running"
            await handle.cancel()
            with pytest.raises(WorkflowFailureError):
                await handle.result()
        finally:
            await asyncio.gather(*(w.shutdown() for w in workers))
            await asyncio.gather(*tasks, return_exceptions=True)
        final = recorder.records[-1]
        assert final.status is RunStatus.CANCELLED
        assert final.progress.steps[0].status.value == "cancelled"


class TestReplay:
    async def test_fresh_history_replays(self, time_skipping_env: WorkflowEnvironment) -> None:
        _, _, workflow_id = await run_with(
            time_skipping_env,
            DiagnoseRequest(queues=[Queue.CLUSTER, Queue.MODEL], timeout_seconds=5),
            [Queue.CLUSTER],
        )
        history = await time_skipping_env.client.get_workflow_handle(workflow_id).fetch_history()
        await Replayer(
            workflows=[DiagnoseSystem],
            data_converter=data_converter(),
            workflow_runner=_workflow_runner(),
        ).replay_workflow(history)

    @pytest.mark.parametrize(
        "path", sorted(HISTORIES.glob("diagnose_*.json")), ids=lambda p: p.name
    )
    async def test_recorded_histories_replay(self, path: Path) -> None:
        text = await asyncio.to_thread(path.read_text)
        history = WorkflowHistory.from_json(path.stem, json.loads(text))
        await Replayer(
            workflows=[DiagnoseSystem],
            data_converter=data_converter(),
            workflow_runner=_workflow_runner(),
        ).replay_workflow(history)
