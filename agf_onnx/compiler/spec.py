"""What to compile: one typed record of every compile option, validated once, when it is made.

The CLI builds a ``CompileSpec`` from its arguments, the API takes one (``agf_onnx.compile(model,
spec)``) or builds it from keyword arguments (``agf_onnx.compile(model, method="lrp", top_k=3)``),
``evaluate`` derives one per method (``dataclasses.replace(spec, method=…, modifiers=…)``), and the
compiled model records it in its metadata (``agf_onnx.spec``, JSON: ``CompileSpec.record``). What
can only be checked against the model (a ``--top-k`` above the class count, a ``--layer`` that is
not a node) is checked when the model is planned.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from ..errors import CompileError
from .methods import FLAT_POLICIES, get_method, with_options
from .modifiers import NONE, Modifiers

#: The method options ``options`` may hold, with their type (see ``methods.py``).
METHOD_OPTIONS = {"steps": int, "samples": int, "noise": float, "seed": int, "residual": str}
SSL_MODES = ("diff", "sum", "none")


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """Every compile option of ``agf_onnx.compile``.

    Attributes:
        method: the explanation method (``agf-onnx rules``; default ``"agf"``).
        input_shapes: fixed shapes for inputs with dynamic spatial axes, e.g. ``{"x": [1, 3, 48, 192]}``
            (the batch axis stays dynamic).
        logits: the tensor holding the class scores; default: the only 2-D float output, before a
            trailing Softmax/LogSoftmax.
        image: the explained input; default: the only 4-D input (or the token ids of a text model).
        flat_policy: which convs and token-wise linear layers get AGF's flat rule (``methods.FLAT_POLICIES``).
        flat: node names forced to the flat AGF rule.
        full: node names forced to the full AGF rule.
        layer: the node whose output a layer method (Grad-CAM) explains; default: the last Conv with
            a spatial output or the last transformer block's output.
        options: method options, e.g. ``{"steps": 50}`` (integrated-gradients), ``{"samples": 25,
            "noise": 0.15, "seed": 0}`` (smoothgrad), ``{"residual": "signed"}`` (rap).
        top_k: also output ``heatmaps`` ``[N, K, …]`` for the K best classes and their indices
            ``classes`` ``[N, K]``, in the same run.
        check: run ``onnx.checker.check_model(full_check=True)`` on the result.
        ssl_bank: a self-supervised model's bank ``[B, D]`` (array or ``.npy`` path, ``agf_onnx.bank``):
            the graph explains ``t = argmax head(L_I − L_N)`` (the paper's Algorithm 2, ``ssl.py``) and
            also outputs ``ssl_target`` and ``ssl_neighbour`` (int64 ``[N]``); ``target`` still overrides t.
        features: with ``ssl_bank``: the tensor that feeds the head (default: the data input of the op
            that makes the logits).
        ssl_mode: with ``ssl_bank``: ``"diff"`` (default, Algorithm 2), ``"sum"`` or ``"none"``.
        modifiers: ``Modifiers(smooth=S, noise=F, seed=N, square=…, contrast="others"|"softmax")``: the
            method's map averaged over S noisy copies and/or contrasted with the other classes', in
            the same run (``modifiers.py``).
    """

    method: str = "agf"
    input_shapes: Mapping[str, Sequence[int | str]] | None = None
    logits: str | None = None
    image: str | None = None
    flat_policy: str = "authors"
    flat: tuple[str, ...] = ()
    full: tuple[str, ...] = ()
    layer: str | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    top_k: int | None = None
    check: bool = True
    ssl_bank: np.ndarray | str | os.PathLike | None = None
    features: str | None = None
    ssl_mode: str | None = None
    modifiers: Modifiers = NONE

    def __post_init__(self) -> None:
        # normalise what callers pass loosely (lists, None), so that equal specs compare equal
        set_ = object.__setattr__
        set_(self, "flat", tuple(self.flat or ()))
        set_(self, "full", tuple(self.full or ()))
        set_(self, "options", MappingProxyType(dict(self.options or {})))
        set_(self, "modifiers", NONE if self.modifiers is None else self.modifiers)
        self._validate()

    def _validate(self) -> None:
        method = get_method(self.method)
        for name, value in self.options.items():
            if name not in METHOD_OPTIONS:
                raise CompileError(f"unknown method option '{name}' (expected one of {', '.join(METHOD_OPTIONS)})")
            if not isinstance(value, METHOD_OPTIONS[name]) or isinstance(value, bool):
                if not (METHOD_OPTIONS[name] is float and isinstance(value, int) and not isinstance(value, bool)):
                    raise CompileError(f"--{name} {value!r}: expected {METHOD_OPTIONS[name].__name__}")
        method = with_options(method, self.options)  # RAP's residual rule, refused for other methods
        method.under(self.modifiers)  # the modifiers' own checks, then those for this method
        if self.flat_policy not in FLAT_POLICIES:
            raise CompileError(f"--flat-policy {self.flat_policy}: expected one of {', '.join(FLAT_POLICIES)}")
        if self.top_k is not None and (not isinstance(self.top_k, (int, np.integer)) or isinstance(self.top_k, bool)
                                       or self.top_k < 1):
            raise CompileError(f"--top-k {self.top_k}: must be at least 1")
        if self.ssl_bank is None and (self.features is not None or self.ssl_mode is not None):
            raise CompileError("--features and --ssl-mode need --ssl-bank (a self-supervised model's bank)")
        if self.ssl_mode is not None and self.ssl_mode not in SSL_MODES:
            raise CompileError(f"--ssl-mode {self.ssl_mode}: expected one of {', '.join(SSL_MODES)}")

    @classmethod
    def of(cls, spec: CompileSpec | None, fields: Mapping[str, Any]) -> CompileSpec:
        """``spec``, or one made from keyword ``fields`` (not both: one way to say each option)."""
        if spec is None:
            unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise TypeError(f"unknown compile option(s): {', '.join(sorted(unknown))}")
            return cls(**fields)
        if fields:
            raise TypeError(f"give either a CompileSpec or keyword options, not both ({', '.join(sorted(fields))})")
        if not isinstance(spec, cls):
            raise TypeError(f"expected a CompileSpec, got {type(spec).__name__}")
        return spec

    def replace(self, **changes: Any) -> CompileSpec:
        """A copy with ``changes``, validated again."""
        return dataclasses.replace(self, **changes)

    def record(self) -> str:
        """The ``agf_onnx.spec`` metadata value: the options as JSON (a bank as its shape or path)."""
        entry = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        entry.update(flat=list(self.flat), full=list(self.full), options=dict(self.options),
                     modifiers=self.modifiers.as_dict(), ssl_bank=_bank_entry(self.ssl_bank),
                     input_shapes=None if self.input_shapes is None else
                     {name: list(dims) for name, dims in self.input_shapes.items()})
        return json.dumps(entry, sort_keys=True)


def _bank_entry(bank: np.ndarray | str | os.PathLike | None) -> str | list[int] | None:
    if bank is None:
        return None
    return list(np.shape(bank)) if isinstance(bank, np.ndarray) else os.fspath(bank)

