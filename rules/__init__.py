"""Per-op propagation rules, one module per op family; importing this package registers them.

``REGISTRY`` maps each supported op type to its gradient rule and its relevance rules;
``lookup(op_type, domain)`` is how the compiler reads it.
"""

from __future__ import annotations

from . import activation, conv, elementwise, gemm, normalization, pool, product, reduce, shape  # noqa: F401 - registers
from ._registry import REGISTRY, OpRules, gradient, label, lookup, relevance, unsupported

__all__ = ["REGISTRY", "OpRules", "gradient", "label", "lookup", "relevance", "unsupported"]
