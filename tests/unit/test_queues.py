"""Task-queue names and the prefix workflows derive from their own queue."""

from __future__ import annotations

import pytest

from workflows.queues import ALL_QUEUES, Queue, parse_queue, task_queue


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

    def test_prefix_is_prepended(self) -> None:
        assert task_queue(Queue.MODEL, "staging-") == "staging-cp-model"
        assert task_queue(Queue.MODEL) == "cp-model"

    def test_unknown_queue_names_the_valid_ones(self) -> None:
        with pytest.raises(ValueError, match="cp-orchestration, cp-cluster"):
            parse_queue("cp-gpu")
