"""agf-onnx: compile an ONNX image classifier into one that also returns an AGF explanation."""

from __future__ import annotations

from .bank import bank
from .compiler import compile
from .contract import HEATMAP_OUTPUT, TARGET_INPUT
from .errors import CompileError, UnsupportedOpsError
from .explain import Explainer, Explanation

__version__ = "0.1.0"
__all__ = ["compile", "bank", "Explainer", "Explanation", "CompileError", "UnsupportedOpsError", "TARGET_INPUT", "HEATMAP_OUTPUT", "__version__"]
