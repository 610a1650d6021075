"""The schedule of blocks between ranks, and the factor cache."""

from __future__ import annotations

import pytest

from fastntk.blocks import schedule


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("symmetric", [True, False])
def test_split_is_contiguous_balanced_and_complete(world: int, symmetric: bool) -> None:
    blocks = schedule.all_blocks(103, 103 if symmetric else 61, 10, symmetric)
    parts = schedule.split(blocks, world)
    assert [b for part in parts for b in part] == blocks  # every block once, in order
    costs = [sum(b.cost for b in part) for part in parts]
    assert max(costs) - min(costs) <= 2 * max(b.cost for b in blocks)
    assert parts == schedule.split(list(blocks), world)  # deterministic


def test_factor_cache_evicts_the_farthest_next_use() -> None:
    uses = ["a", "b", "c", "a", "b", "a", "c"]
    cache = schedule.FactorCache(capacity=2, uses=uses)
    computed = []
    for t, key in enumerate(uses):
        cache.get(key, t, 1, lambda key=key: computed.append(key) or key)
    # Belady with room for two: at t=2, c (next used at 6) is needed later than a (3) and b (4): not kept.
    assert computed == ["a", "b", "c", "c"]
    assert cache.used <= 2 and not cache.entries  # nothing is kept past its last use


def test_factor_cache_without_room_recomputes() -> None:
    cache = schedule.FactorCache(capacity=0, uses=["a", "a"])
    values = [cache.get("a", t, 1, lambda: object()) for t in range(2)]
    assert values[0] is not values[1] and cache.computed == 2
