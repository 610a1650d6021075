"""What a structured rule is: the functional op it covers and how it turns a call into factors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from ....reduction import Mode
from ..factors import Factor, FactorShape

if TYPE_CHECKING:
    from ..chain import RowsCotangents

Saved = dict[str, Any]
Roles = dict[str, str]
"""Parameter role in the op ("weight", "bias") -> the selected parameter's name."""


def bind(names: Sequence[str], args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The op's arguments by name (positional ones named in order)."""
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


class Rule(ABC):
    """A structured derivative rule for one family of functional ops (F.linear, conv, ...).

    Attributes:
        functions: the torch functions it covers, as seen by a TorchFunctionMode.
        arguments: their argument names in order.
    """

    functions: tuple[Callable, ...] = ()
    arguments: tuple[str, ...] = ()

    def bind(self, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        return bind(self.arguments, args, kwargs)

    def parameters(self, call: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """Tensors in parameter roles (weight, bias), or None when this call is outside the rule."""
        return {role: call[role] for role in ("weight", "bias") if call.get(role) is not None}

    def groups(self, roles: Roles) -> list[tuple[str, ...]]:
        """The parameter groups ``factors`` returns for these roles (by default one per role)."""
        return [(name,) for name in roles.values()]

    @abstractmethod
    def save(self, call: dict[str, Any], output: torch.Tensor) -> Saved:
        """What the factors need, detached (the tensors are checked for later in-place changes)."""

    def factor_shapes(self, saved: Saved, output: torch.Tensor, roles: Roles, sizes: Mapping[str, int], mode: Mode, num_outputs: int) -> dict[tuple[str, ...], FactorShape]:
        """What ``factors`` would return, as shapes (for the cost model and the block sizes, before
        any backward pass).

        By default each group keeps its per-sample Jacobian.
        """
        return {group: FactorShape("jacobian", sum(sizes[name] for name in group)) for group in self.groups(roles)}

    def rows_factors(self, saved: Saved, cotangents: "RowsCotangents", roles: Roles, mode: Mode, num_outputs: int) -> dict[tuple[str, ...], Factor] | None:
        """Factors from cotangents of the form derivative ⊙ rows kept compact, or None when
        this rule has no such form (then the cotangents are formed and ``factors`` used)."""
        return None

    @abstractmethod
    def factors(self, saved: Saved, cotangents: torch.Tensor, roles: Roles, mode: Mode, num_outputs: int) -> dict[tuple[str, ...], Factor]:
        """Factors by parameter-name group, from output cotangents (N, K, *output shape[1:]).

        K may be a slice of the model's ``num_outputs`` outputs (factors are built one output
        at a time and concatenated); ``num_outputs`` is for cost decisions that depend on O.
        """


def position_sum(cotangents: torch.Tensor, channel_dims: int) -> torch.Tensor:
    """Σ over positions of cotangents (N, O, *positions, *channels) -> (N, O, prod(channels)): a bias Jacobian."""
    n, o = cotangents.shape[:2]
    channels = cotangents.shape[cotangents.dim() - channel_dims:].numel()
    return cotangents.reshape(n, o, -1, channels).sum(2)
