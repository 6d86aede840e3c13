"""agf-onnx: compile an ONNX classifier into one that also returns an explanation of its decision.

Two halves and the commands above them (docs/architecture.md): ``agf_onnx.compiler`` (compile
time: canonicalise → plan → emit) and ``agf_onnx.runtime`` (run time: sessions, the
``Explainer``, outputs, metrics), which share ``contract`` (names and metadata), ``errors`` and
``modelfile``; ``cli``, ``evaluate``, ``bank``, ``text_explain``, ``distributed`` and ``web``
use both.
"""

from __future__ import annotations

from .bank import bank
from .compiler import compile
from .compiler.spec import CompileSpec
from .contract import HEATMAP_OUTPUT, TARGET_INPUT
from .errors import CompileError, UnsupportedOpsError
from .runtime import explain as _explain
from .runtime.explain import Explainer, Explanation

_explain.use_compiler(compile)  # an Explainer compiles an original model on the fly

__version__ = "0.1.0"
__all__ = ["compile", "CompileSpec", "bank", "Explainer", "Explanation", "CompileError", "UnsupportedOpsError", "TARGET_INPUT",
           "HEATMAP_OUTPUT", "__version__"]
