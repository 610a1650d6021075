"""Exact methods: each computes the same kernel from different per-sample factors."""

from .base import KernelMethod
from .jacobian import JacobianMethod
from .vp import VPMethod

METHODS: dict[str, type[KernelMethod]] = {"jacobian": JacobianMethod, "vp": VPMethod}

__all__ = ["KernelMethod", "JacobianMethod", "VPMethod", "METHODS"]
