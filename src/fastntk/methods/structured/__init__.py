"""Method "structured": structured derivatives with an exact Jacobian fallback."""

from .method import StructuredMethod

__all__ = ["StructuredMethod"]
