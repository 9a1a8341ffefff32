"""Task-queue names and the prefix workflows derive from their own queue."""

from __future__ import annotations

import pytest

from workflows.queues import ALL_QUEUES, Queue, parse_queue, prefix_of, task_queue


class TestQueueNames:
    def test_six_pools(self) -> None:
        assert [q.value for q in ALL_QUEUES] == [
            "cp-orchestration",
            "cp-cluster",
            "cp-model",
            "cp-deploy",
            "cp-benchmark",
            "cp-sync",
        ]

    def test_prefix_round_trips_through_the_orchestration_queue(self) -> None:
        orchestration = task_queue(Queue.ORCHESTRATION, "staging-")
        assert orchestration == "staging-cp-orchestration"
        assert prefix_of(orchestration) == "staging-"
        assert task_queue(Queue.MODEL, prefix_of(orchestration)) == "staging-cp-model"

    def test_prefix_of_a_non_orchestration_queue_is_an_error(self) -> None:
        with pytest.raises(ValueError, match="not an orchestration task queue"):
            prefix_of("cp-model")

    def test_unknown_queue_names_the_valid_ones(self) -> None:
        with pytest.raises(ValueError, match="cp-orchestration, cp-cluster"):
            parse_queue("cp-gpu")
