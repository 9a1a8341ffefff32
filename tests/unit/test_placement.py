"""Placement ranking: which clusters hold a deployment, and why (pure, no I/O)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pytest

from control_plane.clusters.placement import Candidate, Demand, Recommendation, rank
from workflows.contracts.clusters import AcceleratorInfo, ClusterStatus, NodeInfo

GIB = 1024
H100 = ("NVIDIA H100 80GB HBM3", 81559)
A100 = ("NVIDIA A100-SXM4-80GB", 81920)
L4 = ("NVIDIA L4", 23034)
A10 = ("NVIDIA A10", 23028)


def gpus(model: tuple[str, int], count: int, allocatable: int | None = None) -> AcceleratorInfo:
    name, memory = model
    return AcceleratorInfo(
        vendor="NVIDIA",
        model=name,
        memory_mb=memory,
        count=count,
        allocatable=count if allocatable is None else allocatable,
    )


def node(
    name: str,
    *accelerators: AcceleratorInfo,
    ready: bool = True,
    cpu: float = 32.0,
    free_cpu: float | None = None,
    memory_gib: int = 256,
    free_memory_gib: float | None = None,
) -> NodeInfo:
    return NodeInfo(
        name=name,
        ready=ready,
        reason="" if ready else "KubeletNotReady",
        cpu_cores=cpu,
        memory_mb=memory_gib * GIB,
        allocatable_cpu=cpu if free_cpu is None else free_cpu,
        allocatable_memory_mb=int(
            (memory_gib if free_memory_gib is None else free_memory_gib) * GIB
        ),
        accelerators=list(accelerators),
    )


def cluster(
    name: str, *nodes: NodeInfo, status: ClusterStatus = ClusterStatus.AVAILABLE
) -> Candidate:
    return Candidate(cluster_id=uuid.uuid4(), name=name, status=status, nodes=nodes)


def only(candidate: Candidate, demand: Demand) -> Recommendation:
    (rec,) = rank([candidate], demand)
    assert rec.cluster_id == candidate.cluster_id
    return rec


def names(recs: Sequence[Recommendation]) -> list[str]:
    return [rec.name for rec in recs]


class TestGpuFitSingleNode:
    def test_replicas_on_one_gpu_each(self) -> None:
        rec = only(cluster("c", node("gpu-1", gpus(H100, 8))), Demand(40 * GIB, replicas=2))
        assert rec.fits
        assert rec.replicas_possible == 8
        assert rec.headroom_percent == 75.0
        assert rec.reason == (
            "fits: 2 replicas × 1 NVIDIA H100 80GB HBM3 (79.6 GiB) on node gpu-1; "
            "6 of 8 free GPUs stay free (room for 8 replicas in all)"
        )

    def test_a_replica_exactly_the_size_of_a_gpu_needs_one(self) -> None:
        rec = only(cluster("c", node("gpu-1", gpus(H100, 1))), Demand(81559))
        assert (rec.fits, rec.replicas_possible, rec.headroom_percent) == (True, 1, 0.0)

    def test_only_allocatable_gpus_count(self) -> None:
        rec = only(cluster("c", node("gpu-1", gpus(H100, 8, 2))), Demand(10 * GIB, replicas=3))
        assert not rec.fits
        assert rec.replicas_possible == 2


class TestTensorParallelWithinANode:
    def test_a_replica_spans_gpus_of_one_group(self) -> None:
        rec = only(cluster("c", node("n", gpus(L4, 8))), Demand(40 * GIB, replicas=3))
        assert rec.fits
        assert rec.replicas_possible == 4  # 2 L4 per replica
        assert "3 replicas × 2 NVIDIA L4 (22.5 GiB) on node n" in rec.reason
        assert "2 of 8 free GPUs stay free" in rec.reason
        assert rec.headroom_percent == 25.0

    def test_gpus_per_replica_rounds_up(self) -> None:
        # 50 GiB over 22.5 GiB L4s needs 3 GPUs; 8 GPUs hold 2 such replicas.
        rec = only(cluster("c", node("n", gpus(L4, 8))), Demand(50 * GIB))
        assert rec.replicas_possible == 2
        assert "1 replica × 3 NVIDIA L4" in rec.reason

    def test_more_gpus_than_the_node_has_free(self) -> None:
        rec = only(cluster("c", node("n", gpus(L4, 8, 4))), Demand(100 * GIB))
        assert not rec.fits
        assert rec.replicas_possible == 0
        assert rec.reason == (
            "does not fit: a replica needs 100 GiB; the largest free GPU group is "
            "4 × NVIDIA L4 (22.5 GiB each) on node n"
        )

    def test_different_models_on_one_node_are_not_combined(self) -> None:
        rec = only(cluster("c", node("n", gpus(L4, 1), gpus(A10, 1))), Demand(40 * GIB))
        assert not rec.fits
        assert rec.reason.startswith("does not fit: a replica needs 40 GiB;")


class TestNotAcrossNodes:
    def test_gpus_on_different_nodes_are_not_combined(self) -> None:
        rec = only(
            cluster("c", node("node-a", gpus(L4, 1)), node("node-b", gpus(L4, 1))),
            Demand(40 * GIB),
        )
        assert not rec.fits
        assert rec.replicas_possible == 0
        assert "the largest free GPU group is 1 × NVIDIA L4 (22.5 GiB each) on node node-a" in (
            rec.reason
        )


class TestReplicasAcrossNodes:
    def test_replicas_spread_over_nodes(self) -> None:
        rec = only(
            cluster(
                "c",
                node("gpu-1", gpus(A100, 2)),
                node("gpu-2", gpus(A100, 2)),
                node("gpu-3", gpus(A100, 2)),
            ),
            Demand(60 * GIB, replicas=5),
        )
        assert rec.fits
        assert rec.replicas_possible == 6
        assert rec.reason.startswith(
            "fits: 2 replicas × 1 NVIDIA A100-SXM4-80GB (80 GiB) on node gpu-1, "
            "2 replicas × 1 NVIDIA A100-SXM4-80GB (80 GiB) on node gpu-2, "
            "1 replica × 1 NVIDIA A100-SXM4-80GB (80 GiB) on node gpu-3; "
            "1 of 6 free GPUs stays free"
        )

    def test_smallest_sufficient_gpus_are_used_first(self) -> None:
        # Two L4s (45 GiB) spend less GPU memory on a 40 GiB replica than one H100.
        rec = only(
            cluster("c", node("big", gpus(H100, 1)), node("small", gpus(L4, 2))),
            Demand(40 * GIB),
        )
        assert rec.fits
        assert "1 replica × 2 NVIDIA L4 (22.5 GiB) on node small" in rec.reason
        assert "H100" not in rec.reason.split(";")[0]
        total = 81559 + 2 * 23034
        assert rec.headroom_percent == round(81559 / total * 100, 1)


class TestInsufficient:
    def test_not_enough_replicas(self) -> None:
        rec = only(cluster("c", node("n", gpus(L4, 2))), Demand(20 * GIB, replicas=3))
        assert not rec.fits
        assert rec.replicas_possible == 2
        assert rec.headroom_percent == 0.0
        assert rec.reason == (
            "does not fit: free GPUs hold 2 of the 3 replicas (a replica needs 20 GiB)"
        )

    def test_all_gpus_busy(self) -> None:
        rec = only(cluster("c", node("n", gpus(H100, 8, 0))), Demand(GIB))
        assert rec.reason == "does not fit: all 8 GPUs are in use"

    def test_no_gpus(self) -> None:
        rec = only(cluster("c", node("cpu-only")), Demand(GIB))
        assert rec.reason == "does not fit: no GPUs on the ready nodes"

    def test_no_nodes(self) -> None:
        rec = only(cluster("empty"), Demand(GIB))
        assert (rec.fits, rec.reason) == (False, "does not fit: no ready nodes")


class TestUnknownGpuMemory:
    UNKNOWN = ("NVIDIA GB10", 0)

    def test_unknown_memory_is_not_judged_and_said_so(self) -> None:
        rec = only(cluster("c", node("spark", gpus(self.UNKNOWN, 1))), Demand(GIB))
        assert not rec.fits
        assert rec.replicas_possible == 0
        assert rec.reason == (
            "does not fit: no free GPU reports its memory size; "
            "not judged, memory size unknown: 1 × NVIDIA GB10 on node spark"
        )

    def test_mentioned_next_to_a_too_small_group(self) -> None:
        rec = only(cluster("c", node("n", gpus(L4, 1), gpus(self.UNKNOWN, 2))), Demand(40 * GIB))
        assert "the largest free GPU group is 1 × NVIDIA L4" in rec.reason
        assert rec.reason.endswith("not judged, memory size unknown: 2 × NVIDIA GB10 on node n")

    def test_known_groups_still_place(self) -> None:
        rec = only(cluster("c", node("n", gpus(L4, 1), gpus(self.UNKNOWN, 2))), Demand(GIB))
        assert rec.fits
        # Free GPUs include the unjudged ones; headroom only counts known memory.
        assert "2 of 3 free GPUs stay free" in rec.reason
        assert rec.headroom_percent == 0.0


class TestCpuDemand:
    def test_fits_in_free_memory(self) -> None:
        rec = only(
            cluster("c", node("a", free_memory_gib=32), node("b", free_memory_gib=16)),
            Demand(8 * GIB, replicas=5, device="cpu"),
        )
        assert rec.fits
        assert rec.replicas_possible == 6
        assert rec.headroom_percent == round(8 / 48 * 100, 1)
        assert rec.reason == (
            "fits: 4 replicas on node a, 1 replica on node b (8 GiB each); "
            "8 GiB of 48 GiB free CPU memory stays free"
        )

    def test_gpu_nodes_offer_their_cpu_memory(self) -> None:
        rec = only(
            cluster("c", node("g", gpus(H100, 8, 0), free_memory_gib=64)),
            Demand(4 * GIB, device="cpu"),
        )
        assert rec.fits

    def test_memory_limited(self) -> None:
        rec = only(
            cluster("c", node("a", free_memory_gib=12)),
            Demand(8 * GIB, replicas=3, device="cpu"),
        )
        assert not rec.fits
        assert rec.replicas_possible == 1
        assert rec.reason == "does not fit: 12 GiB free CPU memory holds 1 of the 3 replicas"

    def test_memory_split_over_nodes_holds_nothing(self) -> None:
        rec = only(
            cluster("c", node("a", free_memory_gib=6), node("b", free_memory_gib=6.5)),
            Demand(8 * GIB, device="cpu"),
        )
        assert rec.replicas_possible == 0
        assert rec.reason == (
            "does not fit: 12.5 GiB free CPU memory holds 0 of the 1 replica; a replica "
            "needs 8 GiB and the most free on one node is 6.5 GiB on node b"
        )

    def test_each_replica_needs_a_free_core(self) -> None:
        rec = only(
            cluster("c", node("a", free_cpu=1.5, free_memory_gib=64)),
            Demand(4 * GIB, replicas=3, device="cpu"),
        )
        assert not rec.fits
        assert rec.replicas_possible == 1
        assert rec.reason == (
            "does not fit: 1.5 free CPU cores hold 1 of the 3 replicas (a replica needs 1 core)"
        )

    def test_a_fractional_request_packs_several_replicas_per_core(self) -> None:
        rec = only(
            cluster("c", node("a", free_cpu=1.5, free_memory_gib=64)),
            Demand(1 * GIB, replicas=6, device="cpu", cpu=0.25),
        )
        assert rec.fits
        assert rec.replicas_possible == 6


class TestNotReadyNodesIgnored:
    def test_not_ready_capacity_is_not_counted(self) -> None:
        rec = only(
            cluster("c", node("up", gpus(L4, 1)), node("down", gpus(H100, 8), ready=False)),
            Demand(40 * GIB),
        )
        assert not rec.fits
        assert "H100" not in rec.reason
        assert rec.reason.endswith("(1 node not ready, ignored)")

    def test_fitting_reason_mentions_ignored_nodes(self) -> None:
        rec = only(
            cluster(
                "c",
                node("up", gpus(H100, 1)),
                node("down-1", ready=False),
                node("down-2", ready=False),
            ),
            Demand(GIB),
        )
        assert rec.fits
        assert rec.reason.endswith("(2 nodes not ready, ignored)")

    def test_no_ready_node_at_all(self) -> None:
        rec = only(
            cluster("c", node("down", ready=False, free_memory_gib=64)),
            Demand(GIB, device="cpu"),
        )
        assert rec.reason == "does not fit: no ready nodes (1 node not ready, ignored)"


class TestStatusOrdering:
    def test_available_before_degraded_with_the_same_fit(self) -> None:
        degraded = cluster("a-degraded", node("n", gpus(H100, 2)), status=ClusterStatus.DEGRADED)
        available = cluster("b-available", node("n", gpus(H100, 2)))
        recs = rank([degraded, available], Demand(GIB))
        assert names(recs) == ["b-available", "a-degraded"]
        assert recs[1].fits
        assert recs[1].reason.endswith("(cluster is degraded)")

    def test_a_fitting_degraded_cluster_beats_a_non_fitting_available_one(self) -> None:
        degraded = cluster("d", node("n", gpus(H100, 2)), status=ClusterStatus.DEGRADED)
        too_small = cluster("a", node("n", gpus(L4, 1)))
        assert names(rank([too_small, degraded], Demand(40 * GIB))) == ["d", "a"]

    @pytest.mark.parametrize(
        "status",
        [
            ClusterStatus.UNREACHABLE,
            ClusterStatus.ONBOARDING,
            ClusterStatus.DELETING,
            ClusterStatus.FAILED,
        ],
    )
    def test_unplaceable_clusters_are_listed_last_without_capacity(
        self, status: ClusterStatus
    ) -> None:
        gone = cluster("a-gone", node("n", gpus(H100, 8)), status=status)
        small = cluster("b-small", node("n", gpus(L4, 1)))
        degraded = cluster("c-small", node("n", gpus(L4, 1)), status=ClusterStatus.DEGRADED)
        recs = rank([gone, degraded, small], Demand(40 * GIB))
        assert names(recs) == ["b-small", "c-small", "a-gone"]
        last = recs[-1]
        assert (last.fits, last.replicas_possible, last.headroom_percent) == (False, 0, 0.0)
        assert last.reason.startswith(f"cluster is {status.value};")


class TestHeadroomOrdering:
    def test_more_headroom_first(self) -> None:
        tight = cluster("a-tight", node("n", gpus(H100, 2)))
        roomy = cluster("b-roomy", node("n", gpus(H100, 8)))
        recs = rank([tight, roomy], Demand(40 * GIB, replicas=2))
        assert names(recs) == ["b-roomy", "a-tight"]
        assert [r.headroom_percent for r in recs] == [75.0, 0.0]

    def test_equal_headroom_sorts_by_name(self) -> None:
        recs = rank(
            [cluster(n, node("n", gpus(H100, 4))) for n in ("zeta", "alpha", "mid")],
            Demand(GIB),
        )
        assert names(recs) == ["alpha", "mid", "zeta"]

    def test_non_fitting_clusters_closest_to_fitting_first(self) -> None:
        one = cluster("a-one", node("n", gpus(L4, 1)))
        two = cluster("b-two", node("n", gpus(L4, 2)))
        none = cluster("c-none", node("n"))
        recs = rank([one, none, two], Demand(10 * GIB, replicas=3))
        assert names(recs) == ["b-two", "a-one", "c-none"]
        assert [r.replicas_possible for r in recs] == [2, 1, 0]


class TestValidation:
    @pytest.mark.parametrize("memory_mb", [0, -1])
    def test_memory_must_be_positive(self, memory_mb: int) -> None:
        with pytest.raises(ValueError, match="memory_mb"):
            Demand(memory_mb)

    def test_at_least_one_replica(self) -> None:
        with pytest.raises(ValueError, match="replicas"):
            Demand(GIB, replicas=0)

    def test_known_device(self) -> None:
        with pytest.raises(ValueError, match="device"):
            Demand(GIB, device="tpu")  # type: ignore[arg-type]

    def test_no_candidates(self) -> None:
        assert rank([], Demand(GIB)) == []

    def test_recommendation_serialises_for_the_api(self) -> None:
        rec = only(cluster("c", node("n", gpus(H100, 1))), Demand(GIB))
        data = rec.model_dump(mode="json")
        assert data["status"] == "available"
        assert data["cluster_id"] == str(rec.cluster_id)
        assert Recommendation.model_validate(data) == rec
