"""One way to replicate the explained path, for top-K, ``--smooth``, Integrated Gradients and SmoothGrad.

Each runs a clone of the path from the image to the logits on ``count`` copies of the batch,
copy-major (copy ``c`` of sample ``n`` at row ``c·N + n``), each copy with a target of its own,
then reduces the copies per image::

    top-K          the image repeated K times          copy k explains the k-th best class
    --smooth S     x + F·(max x − min x)·z_s            z_s: a counter-based draw per seed and copy
    SmoothGrad     the same noisy copies                mean_s |∇(x + ε_s)|
    IG             α_s·x, Gauss–Legendre α_s            x ⊙ Σ_s w_s ∇(α_s x)

``Copies`` says what the clone reads and explains; ``replicate`` emits the clone and returns the
plan on it, on which any method's emitter runs unchanged. The builders below make the copies and
reduce them. Nested replication (top-K of a smoothed method) clones the clone: K·S·N copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import CompileError
from . import passes
from .builder import GraphBuilder
from .graph import GraphView
from .plan import Plan


@dataclass(frozen=True)
class Copies:
    """``count`` copies of a batch of N that a clone of the path reads instead of the image:
    ``source`` ``[count·N, ...]`` (copy-major), ``targets`` ``[count·N, 1]`` the class each copy
    explains, ``name`` the suffix of the cloned nodes, ``dtype`` the element type of ``source``."""

    source: str
    count: int
    targets: str
    name: str
    dtype: int = TensorProto.FLOAT


def replicate(b: GraphBuilder, plan: Plan, copies: Copies) -> Plan:
    """``plan`` on a clone of the path that reads ``copies.source`` instead of the image.

    The shape computations that read the path's tensors (``Shape → … → Expand`` of a class token to
    the batch) are cloned with it, so that they see the new batch; a text model's other per-sample
    inputs (the attention mask, token types) are repeated ``count`` times, and what the path computes
    from them is cloned too."""
    graph, suffix = plan.graph, copies.name
    sources = {plan.image: (copies.source, copies.dtype)}
    for name in plan.tokens.per_sample if plan.tokens is not None else ():
        with b.scope(suffix):
            sources[name] = (b.Tile(name, b.ints([copies.count, 1])), graph.dtypes[name])
    above, depends, cloned = graph.ancestors([plan.logits]), set(sources), []
    below = graph.ancestors([plan.image])  # what computes a text model's E from its ids stays as it is
    for node in graph.nodes:  # topological order
        if node.name in above and node.name not in below and any(i in depends for i in node.input):
            depends.update(o for o in node.output if o)
            cloned.append(node)
    renamed = {tensor: f"{tensor}/{suffix}" for tensor in depends}
    renamed.update((name, repeated) for name, (repeated, _) in sources.items())
    names = {node.name: f"{node.name}/{suffix}" for node in cloned}
    on_path = {node.name for node in plan.path}
    clones, path_clones = [], []
    for node in cloned:
        clone = onnx.NodeProto()
        clone.CopyFrom(node)
        clone.name = names[node.name]
        clone.input[:] = [renamed.get(i, i) for i in node.input]
        clone.output[:] = [renamed.get(o, o) for o in node.output]
        clones.append(clone)
        if node.name in on_path:
            path_clones.append(clone)
    b.nodes.extend(clones)
    data = {renamed[tensor] for tensor in plan.data if tensor in renamed}
    return Plan(_view(b, graph, sources), copies.source, renamed[plan.logits], renamed.get(plan.start, plan.start),
                path_clones, data, {names[n]: k for n, k in plan.kinds.items()},
                {names[n] for n in plan.first_layers}, plan.channels_last, {},
                renamed.get(plan.layer, plan.layer) if plan.layer else None, plan.layer_grid,
                plan.tokens.renamed(renamed) if plan.tokens is not None else None)


def _view(b: GraphBuilder, graph: GraphView, sources: dict[str, tuple[str, int]]) -> GraphView:
    """A view of the graph with everything ``b`` emitted so far, in which the copies are inputs with a
    batch of their own: inferred from the nodes that build them, their batch would be "N*k", which the
    rules read as k merged copies and would mix. Weights-free: its weights stay those of the original
    model (a copy of them was the largest allocation of a compile with --smooth, IG or top-K,
    docs/memory.md)."""
    augmented = passes.weightless(graph.model)
    present = {node.name for node in augmented.graph.node}
    inputs = {tensor.name for tensor in augmented.graph.input} | {s for s, _ in sources.values()}  # earlier ones too
    augmented.graph.node.extend(node for node in b.nodes
                                if node.name not in present and not inputs.intersection(node.output))
    present = {tensor.name for tensor in augmented.graph.initializer}
    augmented.graph.initializer.extend(t for t in b.initializers if t.name not in present)
    for name, (repeated, element_type) in sources.items():
        augmented.graph.input.append(helper.make_tensor_value_info(
            repeated, element_type, [passes.BATCH_DIM, *graph.shape(name)[1:]]))
    return GraphView(passes.infer_shapes(augmented)[0], weights=graph.initializers)


# -- the copies ---------------------------------------------------------------------------------------

def tiled(b: GraphBuilder, target: str, count: int) -> str:
    """``[count·N, 1]``: each sample's target for each of its copies, copy-major."""
    return b.Tile(target, b.ints([count, 1]))


def repeated(b: GraphBuilder, image: str, shape: tuple, count: int) -> str:
    """``[count·N, ...]``: the batch ``count`` times, copy-major (top-K)."""
    copies = b.Expand(b.Unsqueeze(image, b.ints([0])), b.ints([count] + [1] * len(shape)))
    return b.Reshape(copies, b.ints([-1, *shape[1:]]))


def scaled(b: GraphBuilder, x: str, shape: tuple, coefficients: np.ndarray) -> str:
    """``[count·N, ...]``: ``coefficients[s] · x`` for each of the ``count`` coefficients (IG's α_s)."""
    coefficients = b.const(np.asarray(coefficients, np.float32).reshape(-1, *[1] * len(shape)))
    return b.Reshape(b.Mul(b.Unsqueeze(x, b.ints([0])), coefficients), b.ints([-1, *shape[1:]]))


def noisy(b: GraphBuilder, x: str, shape: tuple, samples: int, noise: float, seed: int) -> str:
    """``[S·N, ...]``: copy s of sample n is ``x_n + noise · (max x_n − min x_n) · z_s`` (``counter_normal``:
    the same draw z_s for every image, so an image's map does not depend on its batch position or its
    batch mates, in any session)."""
    if seed >= PRIME:
        raise CompileError(f"--seed {seed}: must be below {PRIME} (2³¹ − 1)")
    axes = list(range(1, len(shape)))
    spread = b.Sub(b.ReduceMax(x, axes=axes, keepdims=1), b.ReduceMin(x, axes=axes, keepdims=1))
    # z is stored as float16 (2 bytes per pixel, channel and copy) and widened once, when ONNX Runtime
    # folds the Cast at load time
    gaussian = b.Cast(b.const(counter_normal((samples, 1, *shape[1:]), seed), np.float16), to=TensorProto.FLOAT)
    copies = b.Add(b.Unsqueeze(x, b.ints([0])), b.Mul(gaussian, b.Mul(b.Unsqueeze(spread, b.ints([0])), b.const(noise))))
    return b.Reshape(copies, b.ints([-1, *shape[1:]]))


# -- the reductions -----------------------------------------------------------------------------------

def weighted_sum(b: GraphBuilder, gradients: str, shape: tuple, weights: np.ndarray) -> str:
    """``Σ_s w_s g_s`` over the ``count`` copies of each image → ``[N, ...]``."""
    per_copy = b.Reshape(gradients, b.ints([len(weights), -1, *shape[1:]]))
    weights = b.const(weights.reshape(-1, *[1] * len(shape)).astype(np.float32))
    return b.ReduceSum(b.Mul(per_copy, weights), b.ints([0]), keepdims=0)


def average(b: GraphBuilder, maps: str, count: int, shape: tuple, square: bool) -> str:
    """``mean_s A_s`` (or ``mean_s A_s²``) of ``[count·N, *shape]`` maps → ``[N, *shape]`` (``--smooth``)."""
    per_copy = b.Reshape(maps, b.ints([count, -1, *shape]))
    if square:
        per_copy = b.Mul(per_copy, per_copy)
    return b.ReduceMean(per_copy, axes=[0], keepdims=0)


# -- the noise ------------------------------------------------------------------------------------------

#: The noise's hash works in the prime field of ``p = 2**31 − 1``: ``MiMC``'s round ``x ↦ (x + c)⁵ mod p`` is a
#: permutation there (5 does not divide ``p − 1``), and every product of two residues fits in int64.
PRIME = 2**31 - 1
_ROUND_CONSTANTS = (0x3C6EF372, 0x1B873593, 0x5BD1E995, 0x27D4EB2D)


def _hash_reference(counter: np.ndarray) -> np.ndarray:
    """Four MiMC rounds on int64 counters (non-negative, below ``2**62``) → int64 in ``[0, p)``."""
    x = np.asarray(counter, dtype=np.int64) % PRIME
    for constant in _ROUND_CONSTANTS:
        x = (x + constant % PRIME) % PRIME
        square = x * x % PRIME
        x = square * square % PRIME * x % PRIME
    return x


def counter_normal(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Standard normal noise of ``shape``, a pure function of ``(seed, element index)`` (float64).

    Counter-based: element ``i`` (row-major) draws two uniforms
    ``u_j = (⌊hash(hash(2i + j) + key) / 2⁷⌋ + ½) / 2²⁴``, ``j ∈ {0, 1}``, ``key = hash(seed)``, with
    ``hash`` four MiMC rounds ``x ↦ (x + c)⁵ mod (2³¹ − 1)``; Box–Muller turns them into
    ``√(−2 ln u₀) · cos(2π u₁)``. Integer arithmetic only up to the last step, so the numbers do not
    depend on the platform, and a leading axis of copies keeps its first rows when it grows.
    """
    counters = np.arange(int(np.prod(shape)), dtype=np.int64) * 2
    key = _hash_reference(np.array([seed]))[0]
    uniforms = [(_hash_reference(_hash_reference(counters + stream) + key) // 2**7 + 0.5) * 2.0**-24
                for stream in (0, 1)]  # in (0, 1): the logarithm stays finite
    return (np.sqrt(-2.0 * np.log(uniforms[0])) * np.cos(2 * np.pi * uniforms[1])).reshape(shape)
