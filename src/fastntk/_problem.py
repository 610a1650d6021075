"""What one kernel computation is: the model as f(θ, x), its inputs as sources, O and the options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import numpy as np
import torch
from ._torch_private import pytree

from ._functional import FunctionalModel
from ._inputs import Batch, batch_size, check_finite, leaves
from .reduction import block_shape
from ._options import Options
from .blocks.budget import Sizing, block_cut
from .blocks.engine import Kernel
from .methods.base import KernelMethod
from .sources import Source


@dataclass
class Problem:
    """A kernel to compute: f, the inputs x1 and x2 (None: the Gram matrix of x1), O.

    ``probe1``/``probe2`` are the first samples of each side as the model takes them (on its
    device, in the compute dtype), which validation, the cost model and calibration look at.
    """

    f: FunctionalModel
    x1: Source
    x2: Source | None
    num_outputs: int
    probe1: Batch
    probe2: Batch | None
    options: Options
    kind: Hashable = None
    """What caches of the set-up are keyed by (set by :meth:`fastntk.NTKFunction._problem`)."""

    @property
    def symmetric(self) -> bool:
        return self.x2 is None

    @property
    def n1(self) -> int:
        return len(self.x1)

    @property
    def n2(self) -> int:
        return len(self.x1 if self.x2 is None else self.x2)

    @property
    def shape(self) -> tuple[int, ...]:
        return block_shape(self.options.mode, self.n1, self.n2, self.num_outputs)

    @property
    def pair_bytes(self) -> int:
        return int(np.prod(self.shape[2:], dtype=np.int64)) * self.f.dtype.itemsize

    @property
    def result_bytes(self) -> int:
        return self.n1 * self.n2 * self.pair_bytes

    @property
    def input_bytes(self) -> int:
        """Bytes of one sample's inputs, as the model receives them."""
        probe = self.probe1
        return -(-sum(t.numel() * t.element_size() for t in leaves(probe)) // batch_size(probe))

    def sizing(self, budget: int, partitioned: bool, reserved: int = 0) -> Sizing:
        """How blocks of this kernel are sized within ``budget`` bytes (``partitioned``: blocks
        are units of work shared between ranks or written to disk; ``reserved``: bytes of
        max_memory already taken, e.g. by the result)."""
        rows, smallest = block_cut(self.symmetric, partitioned)
        return Sizing(self.n1, self.n2, self.symmetric, self.input_bytes, self.pair_bytes, budget, rows, smallest, reserved)

    def load(self, side: int, start: int, stop: int) -> Batch:
        """Samples start:stop of x1 (side 1) or x2 (side 2) on the model's device, floating ones in
        its dtype; checked finite.

        Every tensor is copied into a fresh allocation of torch's: kernels such as GEMMs may round
        differently depending on the alignment of their operands, and a block's bits must not
        depend on where its inputs happened to lie (an array's offset, a malloc'ed buffer).
        """
        source = self.x1 if side == 1 or self.x2 is None else self.x2
        f = self.f

        def fresh(t: torch.Tensor) -> torch.Tensor:
            out = torch.empty(t.shape, dtype=f.dtype if t.is_floating_point() else t.dtype, device=f.device)
            return out.copy_(t)

        x = pytree.tree_map(fresh, source.take(start, stop))
        if self.options.check:  # after the cast too: a float64 value can overflow float32
            check_finite(x, source.name, first=start)
        return x

    def kernel(self, method: KernelMethod) -> Kernel:
        """What the block engine computes for ``method``."""
        return Kernel(method, self.load, self.n1, self.n2, self.symmetric, self.options.mean, self.options.check)
