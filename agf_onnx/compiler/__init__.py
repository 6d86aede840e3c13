"""Compile time: an ONNX classifier in, the same model with its explanation graph out.

load (``modelfile``) → canonicalise (``passes``; ``deployed``/``contrib`` for fp16, int8 and
ONNX Runtime's fused ops) → plan (``planning``: the explained input, the logits, the path, the
rule of every node, ``methods``, ``tokens``, ``text``) → emit (``emit``: the gradient and
relevance streams through ``rules/``, written with ``builder``'s ``GraphBuilder``; ``maths``,
``modifiers``, the Algorithm-2 graph in ``ssl``). Nothing here runs a model; the run-time half
(``agf_onnx.runtime``) never imports this package: both share ``agf_onnx.contract``.
"""

from .emit import compile, compile_canonical, gradient_model

__all__ = ["compile", "compile_canonical", "gradient_model"]
