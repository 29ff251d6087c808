"""The SEV2 shrink rule: go on with the intact DP replicas while at least restart_min_replicas remain."""

from __future__ import annotations

from megatron_unicron.decisions import JobState
from megatron_unicron.events import Action, LayoutSpec
from megatron_unicron.replan import make_shrink_fn


def _state(tp: int, pp: int, dp: int) -> JobState:
    world = tp * pp * dp
    return JobState(job="j", generation=3, layout=LayoutSpec(tp=tp, pp=pp, dp=dp),
                    members=tuple(range(world)), live=tuple(range(world)),
                    rank_node={r: "node0" for r in range(world)}, iteration=7, save=None)


def test_the_intact_replicas_train_on_while_the_restarted_rank_comes_back() -> None:
    shrink = make_shrink_fn(lambda: {"global_batch_size": 8, "micro_batch_size": 1})
    decision = shrink(_state(1, 2, 4), (3,))  # rank 3 is in replica 1 (ranks 2, 3)
    assert decision is not None and decision.action is Action.RESTART
    assert decision.layout == LayoutSpec(tp=1, pp=2, dp=2)  # 8 % (1 * 3) != 0: two of the three go on
    assert decision.members == (0, 1, 4, 5)  # replica 3 waits as a spare with the restarted one's peer
    assert decision.generation == 4 and decision.resume_iteration == 7


def test_three_intact_replicas_all_train_when_the_batch_splits() -> None:
    shrink = make_shrink_fn(lambda: {"global_batch_size": 6, "micro_batch_size": 2})
    decision = shrink(_state(1, 1, 4), (0,))
    assert decision is not None and decision.layout == LayoutSpec(tp=1, pp=1, dp=3)
    assert decision.members == (1, 2, 3)


def test_no_shrink_to_a_single_replica_nor_when_the_batch_does_not_split() -> None:
    shrink = make_shrink_fn(lambda: {"global_batch_size": 8, "micro_batch_size": 2})
    # DP 2 -> 1 would leave a single live copy of every shard: everyone waits for the restart.
    assert shrink(_state(1, 2, 2), (3,)) is None
    odd = make_shrink_fn(lambda: {"global_batch_size": 10, "micro_batch_size": 2})
    assert odd(_state(1, 1, 4), (0,)) is None  # 10 = 2-sample micro-batches over neither 3 nor 2
    assert make_shrink_fn(lambda: None)(_state(1, 1, 4), (0,)) is None  # no config posted yet


def test_a_job_may_train_on_with_a_single_replica_when_it_says_so() -> None:
    config = {"global_batch_size": 8, "micro_batch_size": 2, "restart_min_replicas": 1}
    shrink = make_shrink_fn(lambda: config)
    decision = shrink(_state(1, 2, 2), (3,))
    assert decision is not None and decision.layout == LayoutSpec(tp=1, pp=2, dp=1)
    assert decision.members == (0, 1)
