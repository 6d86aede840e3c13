"""A tiny ONNX graph builder: ``b.Mul(x, y)``, ``b.const(array)``, unique names per scope.

Rules emit the explanation graph through this class only; none of them touches protobuf.
Values are plain tensor names (``str``), so a rule can mix tensors of the original graph
(``node.inputs[0]``) with tensors it created. A node asked for twice (same op, inputs and
attributes) is emitted once: rules may recompute ``1[Φ≠0]`` or ``|X|`` freely, the graph holds
each once (common-subexpression elimination at the source). Arithmetic on small constants
(BatchNorm's ``γ/√(σ² + ε)``) is computed here, in float32 as ONNX Runtime would, and stored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: Ops whose every node draws new values: never merged with an identical-looking one.
_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}

#: Element-wise ops (and Reshape) computed at compile time on constants of at most ``FOLD_LIMIT``
#: elements: NumPy's float32 +, −, ×, ÷ and √ round exactly as ONNX Runtime's do.
_FOLDABLE = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Sqrt": np.sqrt,
             "Abs": np.abs, "Neg": np.negative, "Reshape": None}
FOLD_LIMIT = 4096

#: The lowest opset of ``ai.onnx`` a compiled model is written in: older models are upgraded to it
#: (``passes.upgrade_opset``); newer ones keep theirs, and the explanation is emitted at it
#: (docs/opsets-and-batch.md).
TARGET_OPSET = 17

#: Reductions whose ``axes`` became an input at opset 18 (ReduceSum's did at 13).
_AXES_INPUT_FROM_18 = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                       "ReduceLogSumExp", "ReduceSumSquare"}


class GraphBuilder:
    """Collects nodes and initializers; ``b.OpType(*inputs, **attributes)`` emits one node.

    ``outputs=k`` asks for ``k`` outputs and returns a tuple of names; an input may be ``""``
    for an omitted optional input. Names are ``<scope>/<op_type>_<n>``, unique within the
    builder and against ``reserved`` (the names of the original graph).
    """

    def __init__(self, reserved: Iterable[str] = (),
                 constant: Callable[[str], np.ndarray | None] = lambda name: None, opset: int = TARGET_OPSET) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._taken: set[str] = set(reserved)
        self._scopes: list[str] = ["agf"]
        self._constants: dict[tuple[str, tuple[int, ...], bytes], str] = {}
        self._counts: dict[str, int] = {}  # base name → the next suffix to try
        self._emitted: dict[tuple, tuple[str, ...]] = {}  # (op, inputs, attributes, outputs) → names
        self._values: dict[str, np.ndarray] = {}  # this builder's small constants by name
        self._constant = constant  # the value of a small constant of the original graph, else None
        #: the ``ai.onnx`` opset the nodes are written at (the model's own, at least TARGET_OPSET)
        self.opset = opset

    # -- naming -------------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Name everything emitted inside ``with b.scope("conv1/rel"):`` as ``agf/conv1/rel/…``."""
        self._scopes.append(name.strip("/"))
        try:
            yield
        finally:
            self._scopes.pop()

    def fresh(self, hint: str) -> str:
        """A tensor or node name not used anywhere yet: ``<scope>/<hint>``, then ``_1``, ``_2``… (a
        counter per base name, so that thousands of same-named nodes in one scope cost no search)."""
        base = "/".join([*self._scopes, hint])
        name, n = base, self._counts.get(base, 0)
        if n:
            name = f"{base}_{n}"
        while name in self._taken:
            n += 1
            name = f"{base}_{n}"
        self._counts[base] = n + 1
        self._taken.add(name)
        return name

    # -- nodes --------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attributes: Any) -> Any:
        """Emit one ``ai.onnx`` node and return its output name (a tuple if ``outputs > 1``); the
        names of an identical earlier node if there is one (random ops are always new)."""
        attributes = {k: v for k, v in attributes.items() if v is not None}
        inputs, attributes = self._at_opset(op_type, inputs, outputs, attributes)
        folded = self._fold(op_type, inputs, outputs, attributes)
        if folded is not None:
            return self.const(folded, folded.dtype)
        node = helper.make_node(op_type, list(inputs), [], **attributes)
        key = (op_type, tuple(inputs), outputs, tuple(a.SerializeToString(deterministic=True) for a in node.attribute))
        if key in self._emitted and op_type not in _RANDOM:
            names = self._emitted[key]
        else:
            node.name = self.fresh(op_type)
            names = tuple(node.name if i == 0 else f"{node.name}:{i}" for i in range(outputs))
            self._taken.update(names)
            node.output.extend(names)
            self.nodes.append(node)
            self._emitted[key] = names
        return names[0] if outputs == 1 else names

    def _at_opset(self, op_type: str, inputs: tuple[str, ...], outputs: int,
                  attributes: dict) -> tuple[tuple[str, ...], dict]:
        """Rules write ops in their opset-17 form; this is the same op at ``self.opset``: from 18 the
        ``axes`` of ReduceMean/Max/Min… is an input, and a Split without sizes names its number of
        outputs (``num_outputs``)."""
        if self.opset < 18:
            return inputs, attributes
        if op_type in _AXES_INPUT_FROM_18 and "axes" in attributes:
            attributes = dict(attributes)
            inputs = (inputs[0], self.ints(attributes.pop("axes")))
        elif op_type == "Split" and (len(inputs) < 2 or not inputs[1]) and "num_outputs" not in attributes:
            attributes = {**attributes, "num_outputs": outputs}
        return inputs, attributes

    def _fold(self, op_type: str, inputs: tuple[str, ...], outputs: int, attributes: dict) -> np.ndarray | None:
        """The value of ``op_type`` on small constant inputs, or None (not foldable here)."""
        if op_type not in _FOLDABLE or outputs != 1 or attributes or not inputs:
            return None
        values = [self._values[i] if i in self._values else self._constant(i) for i in inputs]
        if any(v is None for v in values):
            return None
        data = values[:1] if op_type == "Reshape" else values
        if any(v.dtype != np.float32 for v in data):
            return None
        if op_type == "Reshape":
            target = [d if d != 0 else values[0].shape[i] for i, d in enumerate(values[1].tolist())]
            result = values[0].reshape(target)
        else:
            with np.errstate(all="ignore"):  # 1/0 is ∞ here as in ONNX Runtime
                result = np.asarray(_FOLDABLE[op_type](*values), np.float32)
        return result if result.size <= FOLD_LIMIT else None

    def remove(self, unwanted: Iterable[onnx.NodeProto]) -> None:
        """Drop ``unwanted`` nodes; a later identical request emits them anew."""
        drop = {id(node) for node in unwanted}
        self.nodes[:] = [node for node in self.nodes if id(node) not in drop]
        kept = {name for node in self.nodes for name in node.output}
        self._emitted = {key: names for key, names in self._emitted.items() if names[0] in kept}

    def __getattr__(self, op_type: str) -> Any:
        if not op_type[:1].isupper():
            raise AttributeError(op_type)
        return lambda *inputs, **attributes: self.op(op_type, *inputs, **attributes)

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        """An initializer holding ``value``; identical constants are stored once."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._constants[key] = name
            if array.size <= FOLD_LIMIT:
                self._values[name] = array
        return self._constants[key]

    def ints(self, values: Iterable[int]) -> str:
        """An int64 1-D constant, the form shape and axes inputs take."""
        return self.const(list(values), np.int64)
