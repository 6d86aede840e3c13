"""``agf-onnx inspect``: which rule each op of a model gets, what is unsupported, and whether
the model compiles."""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import onnx

from .. import contract, modelfile
from ..errors import CompileError
from ..rules import lookup
from . import deployed, passes
from .emit import compile_canonical
from .methods import get_method
from .modifiers import NONE, Modifiers, from_metadata
from .planning import plan
from .spec import CompileSpec


@dataclass
class OpReport:
    op_type: str
    count: int
    gradient: str  # the gradient rule's one-line description, or "unsupported"
    relevance: list[str]  # rule kinds used on the explained path ("—" above the start)
    unsupported_nodes: list[str] = field(default_factory=list)


@dataclass
class Report:
    model: str
    image: str | None
    logits: str | None
    nodes: int  # nodes on the path from the image to the logits
    covered: int
    ops: list[OpReport]
    compiles: bool
    error: str | None
    method: str = "agf"
    modifiers: str = "none"  # ``Modifiers.describe()`` of the modifiers checked, or those a compiled model records
    compiled: bool = False  # MODEL is itself a compiled model (its metadata names method and modifiers)

    @property
    def share(self) -> float:
        return self.covered / self.nodes if self.nodes else 0.0

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "share": self.share}, indent=2)

    def to_text(self) -> str:
        if self.image is None:  # the model could not even be planned: say why, and only that
            return "\n".join([f"model: {self.model}", f"compiles: no\n{self.error}"])
        lines = [f"model: {self.model}", f"image: {self.image}   logits: {self.logits}",
                 f"{'compiled with' if self.compiled else 'method'}: {self.method}   modifiers: {self.modifiers}",
                 f"{self.covered}/{self.nodes} nodes on the explained path have rules ({self.share:.0%})", "",
                 f"{'op':<22}{'nodes':>6}  {'relevance':<22}gradient"]
        for op in self.ops:
            relevance = ", ".join(op.relevance) if op.relevance else "—"
            lines.append(f"{op.op_type:<22}{op.count:>6}  {relevance:<22}{op.gradient}")
            if op.unsupported_nodes:
                lines.append(f"{'':<28}UNSUPPORTED: {', '.join(op.unsupported_nodes)}")
        lines += ["", "compiles: yes" if self.compiles else f"compiles: no\n{self.error}"]
        return "\n".join(lines)


def inspect(model: onnx.ModelProto | str | os.PathLike, *, method: str = "agf",
            input_shapes: Mapping[str, Sequence[int | str]] | None = None, logits: str | None = None,
            image: str | None = None, modifiers: Modifiers = NONE) -> Report:
    """Report the rule each op on the explained path gets and whether the model compiles (with
    ``modifiers``). A compiled model reports the method and modifiers its metadata records."""
    name = os.fspath(model) if not isinstance(model, onnx.ModelProto) else (model.graph.name or "<model>")
    loaded = modelfile.load(model)  # an unreadable file is the caller's error, not a report
    recorded = contract.metadata(loaded)
    compiled = contract.METHOD in recorded
    if compiled:  # the explained path is the original one; method and modifiers are the recorded ones
        method, modifiers = recorded[contract.METHOD], from_metadata(recorded.get(contract.MODIFIERS))
        logits = logits or recorded.get(contract.LOGITS)
        image = image or recorded.get(contract.IMAGE)
    try:
        if not compiled and deployed.needs_view(loaded):  # fp16, int8, fused ops: the view compile explains
            loaded = deployed.explained_view(loaded).model
        canonical = passes.canonicalise(loaded, input_shapes)
        found = plan(canonical, image=image, logits=logits, method=get_method(method), strict=False)
    except CompileError as error:
        return Report(name, image, logits, 0, 0, [], False, str(error), method, modifiers.describe(), compiled)
    counts = Counter(node.op_type for node in found.path)
    kinds: dict[str, set[str]] = defaultdict(set)
    for node in found.path:
        if node.name in found.kinds:
            kinds[node.op_type].add(found.kinds[node.name])
    ops = []
    for op_type, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        entry = lookup(op_type)
        missing = found.unsupported.get(op_type, [])
        ops.append(OpReport(op_type, count, entry.describe_gradient() if entry else "unsupported",
                            sorted(kinds[op_type]), missing))
    covered = sum(counts.values()) - sum(len(v) for v in found.unsupported.values())
    error = None
    if not compiled:  # a compiled model compiled once already; again, it would clash with its own outputs
        try:
            compile_canonical(canonical, CompileSpec(method=method, logits=logits, image=image, check=False,
                                                     modifiers=modifiers))
        except CompileError as failure:
            error = str(failure)
    return Report(name, found.image, found.logits, sum(counts.values()), covered, ops, error is None, error, method,
                  modifiers.describe(), compiled)
