"""Token models: where the patch tokens of a ``[N, T, C]`` tensor sit on the image, and the
attention matrices of a transformer.

A vision transformer cuts the image into a grid of patches (its patch-embedding Conv, the layer
that reads the image, has that grid as its output), keeps ``prefix`` extra tokens in front of
them (a class token, a distillation token) and works on ``[N, prefix + h·w, C]``. Layer methods
(Grad-CAM) and attention rollouts (Chefer et al.) map the patch tokens back onto that grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import onnx

from ..errors import CompileError
from .builder import GraphBuilder
from .graph import GraphView

#: At most this many tokens before the patch tokens (class, distillation and register tokens).
MAX_PREFIX_TOKENS = 8
#: Ops that pass an attention matrix on unchanged at inference.
_TRANSPARENT = ("Dropout", "Identity", "Cast")


@dataclass(frozen=True)
class TokenGrid:
    """``prefix`` leading tokens, then ``height × width`` patch tokens in row-major order."""

    prefix: int
    height: int
    width: int

    @property
    def patches(self) -> int:
        return self.height * self.width


def patch_grid(graph: GraphView, first_layers: Sequence[onnx.NodeProto], image_size: tuple[int, int],
               tokens: int) -> TokenGrid | None:
    """The grid of ``tokens`` patch tokens: the patch embedding's own grid when the count fits it,
    else the grid of the image's aspect ratio that holds them (a later stage of a hierarchical
    model); None when no grid fits."""
    for layer in first_layers:
        shape = graph.shape(layer.output[0])
        if len(shape) == 4 and 0 <= tokens - shape[2] * shape[3] <= MAX_PREFIX_TOKENS:
            return TokenGrid(tokens - shape[2] * shape[3], shape[2], shape[3])
    height, width = image_size
    for prefix in range(min(MAX_PREFIX_TOKENS, tokens - 1) + 1):
        patches = tokens - prefix
        columns = math.isqrt(patches * width // height) if height else 0
        for candidate in (columns, columns + 1):
            if candidate and patches % candidate == 0 and (patches // candidate) * width == candidate * height:
                return TokenGrid(prefix, patches // candidate, candidate)
    return None


def as_grid(b: GraphBuilder, tokens: str, grid: TokenGrid, channels: int) -> str:
    """``[N, T, C]`` → ``[N, C, h, w]``: the patch tokens laid out on their grid."""
    patches = b.Slice(tokens, b.ints([grid.prefix]), b.ints([grid.prefix + grid.patches]), b.ints([1]))
    return b.Reshape(b.Transpose(patches, perm=[0, 2, 1]), b.ints([0, channels, grid.height, grid.width]))


def _weights_values(reader: onnx.NodeProto, tensor: str) -> bool:
    """Whether ``reader`` computes ``A·V`` with ``tensor`` as ``A``: a MatMul with it on the left, or
    a two-operand Einsum that contracts its last index (the keys) and keeps the others (batch,
    heads, queries), as Chefer et al.'s reference ViT writes it: ``bhij,bhjd->bhid``."""
    if reader.op_type == "MatMul":
        return reader.input[0] == tensor
    if reader.op_type != "Einsum" or len(reader.input) != 2 or tensor not in reader.input:
        return False
    equation = next((a.s.decode() for a in reader.attribute if a.name == "equation"), "").replace(" ", "")
    terms, _, output = equation.partition("->")
    operands = terms.split(",")
    if len(operands) != 2 or not output or "." in equation:
        return False
    position = list(reader.input).index(tensor)
    weights, values = operands[position], operands[1 - position]
    keys = weights[-1:]
    return bool(keys) and keys in values and keys not in output and all(i in output for i in weights[:-1])


def attention_matrices(graph: GraphView, path: Sequence[onnx.NodeProto]) -> list[str]:
    """The outputs of the Softmax nodes whose result multiplies the values (``A`` in ``A·V``, a
    MatMul or an Einsum), in forward order."""
    found = []
    for node in path:
        if node.op_type != "Softmax":
            continue
        tensor, readers = node.output[0], graph.consumers.get(node.output[0], [])
        while len(readers) == 1 and readers[0].op_type in _TRANSPARENT or nan_guard(graph, tensor):
            tensor = nan_guard(graph, tensor) or readers[0].output[0]
            readers = graph.consumers.get(tensor, [])
        if any(_weights_values(r, tensor) for r in readers):
            found.append(node.output[0])
    return found


def nan_guard(graph: GraphView, tensor: str) -> str | None:
    """The output of ``Where(IsNaN(A), c, A)`` when that is all that reads ``A`` (PyTorch's
    ``scaled_dot_product_attention`` export zeroes the NaN rows of a fully masked softmax): the
    attention matrix as the values see it; None otherwise."""
    readers = graph.consumers.get(tensor, [])
    if sorted(r.op_type for r in readers) != ["IsNaN", "Where"]:
        return None
    check = next(r for r in readers if r.op_type == "IsNaN")
    where = next(r for r in readers if r.op_type == "Where")
    return where.output[0] if list(where.input[::2]) == [check.output[0], tensor] else None


def check_rollout(graph: GraphView, attentions: Sequence[str]) -> int:
    """The token count every attention matrix shares; refuses models where a rollout over blocks
    has no standard meaning."""
    if not attentions:
        raise CompileError("--method chefer: no attention (a Softmax whose output multiplies the values in a "
                           "MatMul or Einsum) on the path from the image to the logits")
    counts = set()
    for attention in attentions:
        shape, batch = graph.shape(attention), graph.batch(attention)
        producer = graph.producer[attention].name
        if len(shape) != 4 or batch != (0, 1):
            where = "lost" if batch is None else f"at axis {batch[0]}" + (f", merged with {batch[1]} elements"
                                                                           if batch[1] != 1 else "")
            raise CompileError(f"--method chefer: the attention of Softmax node '{producer}' has shape {list(shape)} "
                               f"with the batch {where}; the rollout needs [N, heads, T, T] per image (windowed "
                               "attention such as Swin's has no standard rollout)")
        if shape[2] != shape[3]:
            raise CompileError(f"--method chefer: the attention of Softmax node '{producer}' has {shape[2]} queries for "
                               f"{shape[3]} keys: the token set shrinks there (LeViT's subsampling attention), and "
                               "the rollout R = R + Ā·R has no standard meaning across it")
        counts.add(shape[2])
    if len(counts) > 1:
        raise CompileError(f"--method chefer: the token set changes between blocks (attention over "
                           f"{', '.join(map(str, sorted(counts)))} tokens); the rollout R = R + Ā·R needs one "
                           "token set (hierarchical models such as LeViT or Swin have no standard rollout)")
    return counts.pop()
