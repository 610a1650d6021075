"""The pieces of fastntk.scale: sizes, block sizes, the schedule, the factor cache, sources, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastntk
from fastntk import OptionError
from fastntk.scale import budget, data, schedule
from fastntk.scale.budget import block_for_budget, parse_memory, working_bytes
from gram_helpers import inputs, mlp


@pytest.mark.parametrize("text, value", [
    ("4GB", 4 * 10**9), ("512MiB", 512 * 2**20), ("1.5 GiB", 3 * 2**29), ("2e9", 2 * 10**9), (1234, 1234),
    ("10k", 10**4), ("3gi", 3 * 2**30), (np.int64(7), 7),
])
def test_parse_memory(text, value) -> None:
    assert parse_memory(text) == value


@pytest.mark.parametrize("bad", ["", "four GB", "-1GB", "4 XB", 0, -5, 1.5, True, None, "0.1"])
def test_parse_memory_refuses(bad) -> None:
    with pytest.raises(OptionError, match="max_memory"):
        parse_memory(bad)


@pytest.mark.parametrize("n1, n2, factor, inp, pair, memory", [
    (50_000, 50_000, 176_000, 3136, 4, 2 * 10**9),
    (1000, 30, 9_000_000, 12_288, 400, 4 * 10**9),
    (777, 777, 10, 10, 4, 10**5),
])
def test_block_for_budget_fits_and_is_the_largest(n1, n2, factor, inp, pair, memory) -> None:
    block = block_for_budget(n1, n2, factor, inp, pair, memory)
    assert working_bytes(block, block, factor, inp, pair) <= memory
    cap = max(budget.MIN_BLOCK, -(-max(n1, n2) // budget.ROWS))
    assert block == min(cap, max(n1, n2)) or working_bytes(block + 1, block + 1, factor, inp, pair) > memory


def test_block_for_budget_cuts_a_kernel_into_rows() -> None:
    assert block_for_budget(600, 600, 10, 10, 4, 10**9) == 75  # 8 block rows
    assert block_for_budget(100, 100, 10, 10, 4, 10**9) == 64  # not below 64 samples


def test_block_for_budget_refuses_a_budget_below_one_sample() -> None:
    with pytest.raises(OptionError, match="too small"):
        block_for_budget(100, 100, 10**6, 10, 4, 10**5)


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


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from inputs(4, 1)


@pytest.mark.parametrize("bad, match", [
    (Stream(), "IterableDataset"),
    (torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs(4, 1)), shuffle=True), "RandomSampler"),
    ("inputs.csv", ".npy"),
    ("missing.npy", "no such file"),
    ([np.zeros((3, 5)), np.zeros((4, 5))], "different numbers of samples"),
    (np.array(["a", "b"]), "numeric"),
    (3.0, "float"),
])
def test_sources_refuse(bad, match) -> None:
    with pytest.raises(fastntk.InputError, match=match):
        source = data.as_source(bad, "data1")
        source.take(0, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(resume=True), "needs out="),
    (dict(out="k.npy", resume=True, overwrite=True), "contradict"),
    (dict(out="k.txt"), ".npy"),
    (dict(out="no/such/dir/k.npy"), "does not exist"),
    (dict(block_size=0), "block_size"),
    (dict(max_memory="lots"), "max_memory"),
    (dict(mode="sum"), "mode"),
    (dict(method="fast"), "method"),
    (dict(max_memory="2kB"), "kernel alone"),
    (dict(max_memory=300, out="k.npy"), "too small"),
    (dict(on_block=3), "callable"),
])
def test_options_refused(tmp_path, monkeypatch, kwargs, match) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OptionError, match=match):
        fastntk.gram(mlp(), inputs(30, 1), progress=False, **kwargs)


def test_tuple_dataset_without_select_gets_a_hint() -> None:
    dataset = torch.utils.data.TensorDataset(inputs(6, 1), torch.zeros(6))
    with pytest.raises(fastntk.ModelError, match="select=0"):
        fastntk.gram(mlp(), dataset, progress=False)


def test_non_finite_inputs_named_by_global_index() -> None:
    x = inputs(12, 1)
    x[9, 2] = float("nan")
    with pytest.raises(fastntk.NonFiniteError, match="sample 9"):
        fastntk.gram(mlp(), x, block_size=4, progress=False)
