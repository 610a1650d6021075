"""The pieces of fastntk.gram: sources, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastntk
from fastntk import OptionError
from fastntk import sources as data
from gram_helpers import inputs, mlp


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from inputs(4, 1)


@pytest.mark.parametrize("bad, match", [
    (Stream(), "IterableDataset"),
    (torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs(4, 1)), shuffle=True), "RandomSampler"),
    ("inputs.csv", ".npy"),
    ("missing.npy", "no such file"),
    ([np.zeros((3, 5)), np.zeros((4, 5))], "different batch sizes"),
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
        fastntk.gram(mlp(), inputs(30, 1), progress=False, **{"mode": "trace", **kwargs})


def test_tuple_dataset_without_select_gets_a_hint() -> None:
    dataset = torch.utils.data.TensorDataset(inputs(6, 1), torch.zeros(6))
    with pytest.raises(fastntk.ModelError, match="select=0"):
        fastntk.gram(mlp(), dataset, progress=False, mode="trace")


def test_non_finite_inputs_named_by_global_index() -> None:
    x = inputs(12, 1)
    x[9, 2] = float("nan")
    with pytest.raises(fastntk.NonFiniteError, match="sample 9"):
        fastntk.gram(mlp(), x, block_size=4, progress=False, mode="trace")
