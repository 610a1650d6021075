"""Exact methods: each computes the same kernel from different per-sample factors."""

from .base import KernelMethod
from .jacobian import JacobianMethod
from .structured import StructuredMethod
from .vp import VPMethod

METHODS: dict[str, type[KernelMethod]] = {"jacobian": JacobianMethod, "vp": VPMethod, "structured": StructuredMethod}

__all__ = ["KernelMethod", "JacobianMethod", "VPMethod", "StructuredMethod", "METHODS"]
