"""Where the samples come from: tensors, numpy arrays and memmaps, .npy files, torch Datasets/DataLoaders.

A :class:`Source` has N samples and hands out any range ``[start, stop)`` of them as a
batch of tensors (a tensor, or a tuple/dict of tensors batched on dim 0), so the inputs
need not fit in memory: a ``.npy`` path is read row range by row range (without mapping
it, so the rows read do not stay in this process's resident memory), a numpy memmap is
sliced, a map-style Dataset is indexed item by item and collated.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import numpy as np
import torch
from ._torch_private import pytree
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler
from torch.utils.data.dataloader import default_collate

from ._errors import InputError
from ._inputs import Batch

Select = Union[None, int, str, Callable[[Any], Any]]
"""Which part of each collated batch of a Dataset the model takes: None (all of it), an index
or key (e.g. 0 for ``(inputs, labels)`` items), or a function of the batch."""


class Source:
    """N samples, readable by range. Subclasses implement ``__len__`` and ``read``."""

    def __init__(self, name: str, select: Select = None) -> None:
        self.name = name
        self.select = select

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, start: int, stop: int) -> Any:
        """Samples start:stop as stored (before ``select``)."""
        raise NotImplementedError

    def take(self, start: int, stop: int) -> Batch:
        """Samples start:stop as the model's input: tensors batched on dim 0."""
        return as_tensors(pick(self.read(start, stop), self.select, self.name), self.name, stop - start)

    def digest(self, chunk_bytes: int = 64 * 2**20, dtype: torch.dtype | None = None) -> str:
        """sha256 of N and of every sample's tensors as the model receives them, read in chunks.

        Floating tensors are hashed cast to ``dtype`` (the compute dtype; None: as stored), so the
        same values given as a tensor, an array or a .npy file (of any floating dtype that casts
        to the same numbers) hash alike. Each leaf has its own running hash, and a leaf's dtype and
        per-sample shape are hashed where they first appear or change, never per chunk: the digest
        does not depend on ``chunk_bytes`` (nor on the memory budget it comes from).
        """
        n = len(self)
        first = self.take(0, 1)
        per_sample = max(1, sum(t.numel() * t.element_size() for t in pytree.tree_leaves(first)))
        step = max(1, chunk_bytes // per_sample)
        hashes: list[Any] = []
        kinds: list[str] = []
        for start in range(0, n, step):
            for k, t in enumerate(pytree.tree_leaves(self.take(start, min(n, start + step)))):
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                if k == len(hashes):
                    hashes.append(hashlib.sha256())
                    kinds.append("")
                kind = f"|{t.dtype}{tuple(t.shape[1:])}|"
                if kind != kinds[k]:
                    hashes[k].update(f"{start}{kind}".encode())
                    kinds[k] = kind
                hashes[k].update(tensor_bytes(t))
        h = hashlib.sha256(f"samples={n}|{pytree.tree_structure(first)!r}".encode())
        for leaf in hashes:
            h.update(leaf.digest())
        return h.hexdigest()

    def describe(self) -> str:
        return f"{self.name}: {len(self)} samples"


class ArraySource(Source):
    """A tensor or numpy array (memmaps included), or a tuple/list/dict of them, batched on dim 0."""

    def __init__(self, data: Any, name: str, select: Select = None) -> None:
        super().__init__(name, select)
        leaves, self.spec = pytree.tree_flatten(data)
        if not leaves:
            raise InputError(f"{name} holds no array: pass a tensor or numpy array batched on dim 0")
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, (torch.Tensor, np.ndarray)):
                raise InputError(
                    f"{name} contains a {type(leaf).__name__} (leaf {i}): every input must be a tensor or numpy array batched "
                    "on dim 0; bind constant arguments into the model instead (e.g. functools.partial or a wrapper nn.Module)"
                )
            if leaf.ndim == 0:
                kind = "tensor" if isinstance(leaf, torch.Tensor) else "array"
                raise InputError(f"{name} has a 0-d {kind} (leaf {i}): inputs must be batched on dim 0, e.g. x[None]")
            if isinstance(leaf, torch.Tensor) and leaf.is_meta:
                raise InputError(
                    f"{name} (leaf {i}) is on the meta device: it holds no values; pass real tensors (on any device: "
                    "fastntk moves each block to the model's)"
                )
        sizes = {leaf.shape[0] for leaf in leaves}
        if len(sizes) > 1:
            raise InputError(f"the tensors of {name} have different batch sizes {sorted(sizes)}: they must agree on dim 0")
        self.leaves = leaves
        self.n = sizes.pop()
        if self.n == 0:
            raise InputError(f"{name} is an empty batch (0 samples): pass at least one sample")

    def __len__(self) -> int:
        return self.n

    def read(self, start: int, stop: int) -> Any:
        return pytree.tree_unflatten([leaf[start:stop] for leaf in self.leaves], self.spec)


class NpyFileSource(Source):
    """A .npy file read row range by row range with plain reads (never mapped, never loaded whole)."""

    def __init__(self, path: str | os.PathLike, name: str, select: Select = None) -> None:
        super().__init__(name, select)
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{name}: no such file {str(self.path)!r}")
        try:  # numpy's own reader gives shape, dtype and where the data start; no page is touched
            mapped = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise InputError(f"{name}: {str(self.path)!r} is not a readable .npy file ({type(exc).__name__}: {exc})") from exc
        shape, dtype, self.offset = mapped.shape, mapped.dtype, int(getattr(mapped, "offset", 0))
        fortran = mapped.ndim > 1 and mapped.flags.f_contiguous and not mapped.flags.c_contiguous
        del mapped
        if dtype.hasobject or dtype.kind not in "biufc":
            raise InputError(f"{name}: {self.path} has numpy dtype {dtype}: inputs must be numeric arrays")
        if fortran:
            raise InputError(f"{name}: {self.path} is stored in Fortran order: save it in C order (np.save(path, np.ascontiguousarray(x)))")
        if len(shape) == 0 or shape[0] == 0:
            raise InputError(f"{name}: {self.path} holds no samples (shape {shape}): inputs must be batched on dim 0")
        self.shape, self.dtype = tuple(shape), dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        buffer = bytearray((stop - start) * self.row_bytes)
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(self.offset + start * self.row_bytes)
            view, done = memoryview(buffer), 0
            while done < len(buffer):
                got = fh.readinto(view[done:])
                if not got:
                    raise InputError(f"{self.name}: {self.path} is shorter than its header says (truncated?)")
                done += got
        return np.frombuffer(buffer, dtype=self.dtype).reshape((stop - start, *self.shape[1:]))

    def describe(self) -> str:
        return f"{self.name}: {self.path} {self.shape} {self.dtype}"


class DatasetSource(Source):
    """A map-style torch Dataset: items ``dataset[i]`` collated into batches."""

    def __init__(self, dataset: Any, name: str, select: Select = None, collate: Callable[[list], Any] | None = None) -> None:
        super().__init__(name, select)
        try:
            self.n = len(dataset)
        except TypeError:
            raise InputError(f"{name} is a {type(dataset).__name__} without len(): a Dataset needs __len__ and __getitem__") from None
        if self.n == 0:
            raise InputError(f"{name} is an empty dataset (0 samples): pass at least one sample")
        self.dataset, self.collate = dataset, collate or default_collate

    def __len__(self) -> int:
        return self.n

    def read(self, start: int, stop: int) -> Any:
        return self.collate([self.dataset[i] for i in range(start, stop)])

    def describe(self) -> str:
        return f"{self.name}: {type(self.dataset).__name__} of {self.n} samples"


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a flat uint8 array (any dtype, any device), for hashing."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def as_source(data: Any, name: str, select: Select = None) -> Source:
    """The :class:`Source` of ``data``; ``select`` applies to Datasets and DataLoaders only.

    Raises:
        InputError: an IterableDataset, a shuffling DataLoader, or something that is not data.
    """
    if isinstance(data, Source):
        return data
    if isinstance(data, (str, os.PathLike)):
        if Path(data).suffix.lower() != ".npy":
            raise InputError(f"{name}={str(data)!r}: a path must name a .npy file; load other formats yourself")
        return NpyFileSource(data, name)
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            raise iterable_error(name)
        if not isinstance(data.sampler, SequentialSampler):
            raise InputError(
                f"{name} is a DataLoader with a {type(data.sampler).__name__}: the kernel's rows need a fixed order; "
                "create it with shuffle=False and no sampler, or pass its Dataset"
            )
        return DatasetSource(data.dataset, name, select, data.collate_fn)
    if isinstance(data, IterableDataset):
        raise iterable_error(name)
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (tuple, list, Mapping))):
        if not isinstance(data, (torch.Tensor, np.ndarray)):
            return DatasetSource(data, name, select)
    return ArraySource(data, name)


def iterable_error(name: str) -> InputError:
    return InputError(
        f"{name} is an IterableDataset: blocks need random access to samples; write the inputs to a .npy file "
        "(numpy.lib.format.open_memmap(path, mode='w+', ...)) and pass its path, or use a map-style Dataset"
    )


def pick(batch: Any, select: Select, name: str) -> Any:
    """The part of a batch the model takes."""
    if select is None:
        return batch
    try:
        return select(batch) if callable(select) else batch[select]
    except Exception as exc:
        raise InputError(f"select={select!r} failed on a batch of {name} ({type(exc).__name__}: {exc})") from exc


def as_tensors(batch: Any, name: str, n: int) -> Batch:
    """A batch with numpy leaves turned into tensors, checked to be tensors of n samples."""
    def convert(leaf: Any) -> Any:
        if isinstance(leaf, np.ndarray):
            if leaf.dtype.hasobject or leaf.dtype.kind not in "biufc":
                raise InputError(f"{name} has numpy dtype {leaf.dtype}: inputs must be numeric arrays")
            if not leaf.dtype.isnative:
                leaf = leaf.astype(leaf.dtype.newbyteorder("="))
            return torch.from_numpy(np.array(leaf, copy=True, order="C") if not leaf.flags.writeable or not leaf.flags.c_contiguous else leaf)
        return leaf

    batch = pytree.tree_map(convert, batch)
    if isinstance(batch, list):
        batch = tuple(batch)
    for i, leaf in enumerate(pytree.tree_leaves(batch)):
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0 or leaf.shape[0] != n:
            what = f"a tensor of shape {tuple(leaf.shape)}" if isinstance(leaf, torch.Tensor) else f"a {type(leaf).__name__}"
            raise InputError(
                f"a batch of {n} samples of {name} holds {what} (leaf {i}): every input must be a tensor batched on dim 0; "
                "for datasets of (inputs, labels) pass select=0"
            )
    return batch
