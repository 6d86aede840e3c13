"""Explanation methods as data over the rule registry, and AGF's "flat" conv policy.

A ``Method`` says which relevance rule kind each op type gets, which kind the linear layer that
reads the image gets, which kind the convs chosen by the flat policy get, and how the gradient
at the logits starts. Ops it does not list use their only relevance rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import numpy as np
from onnx import TensorProto

from ..errors import CompileError
from ..rules.normalization import batchnorm_shift
from .builder import GraphBuilder
from .graph import GraphView, NodeView
from .maths import resize
from .plan import Plan
from .tokens import attention_matrices, check_rollout, patch_grid

Start = Callable[[GraphBuilder, str, str, int], str]
#: The gradient stream at a tensor (``None`` where the explained score does not depend on it).
GradientAt = Callable[[str], "str | None"]


def agf_start(b: GraphBuilder, logits: str, target: str, classes: int) -> str:
    """``∂ŷ_t/∂y`` for ``ŷ = softmax(y_t·exp(−½((y − y_t)/σ)²))``, ``σ = max_i |y_i − y_t|``.

    The closed form of the derivative, through ``y_t`` and ``σ`` too (spec "Start"):
    with ``a = ∂ŷ_t/∂z = p_t(δ_t − p)``, ``u = (y − y_t)/σ``, ``e = exp(−u²/2)`` and
    ``w = −a·y_t·e·u``:
    ``∇y = δ_t·Σ a e + w/σ − δ_t·Σw/σ − (Σ w·(y − y_t))/σ² · sign(d_m)(δ_m − δ_t)``,
    where ``m`` is the class at which ``σ`` is attained. ``σ = 0`` (all logits equal) gives 0.
    ``target`` is ``[N, 1]`` int64.
    """
    classes_row = b.const(np.arange(classes, dtype=np.int64).reshape(1, classes), np.int64)

    def one_hot(index: str) -> str:
        return b.Cast(b.Equal(classes_row, index), to=1)

    target_hot = one_hot(target)
    target_logit = b.GatherElements(logits, target, axis=1)
    offset = b.Sub(logits, target_logit)
    spread = b.ReduceMax(b.Abs(offset), axes=[1], keepdims=1)
    zero = b.const(0.0)
    spread = b.Where(b.Greater(spread, zero), spread, b.const(1.0))
    scaled = b.Div(offset, spread)
    gaussian = b.Exp(b.Mul(b.Mul(scaled, scaled), b.const(-0.5)))
    probabilities = b.Softmax(b.Mul(target_logit, gaussian), axis=1)
    target_probability = b.GatherElements(probabilities, target, axis=1)
    d_softmax = b.Mul(target_probability, b.Sub(target_hot, probabilities))

    def row_sum(x: str) -> str:
        return b.ReduceSum(x, b.ints([1]), keepdims=1)

    weighted = b.Neg(b.Mul(b.Mul(b.Mul(d_softmax, target_logit), gaussian), scaled))
    through_target = b.Mul(target_hot, b.Sub(row_sum(b.Mul(d_softmax, gaussian)), b.Div(row_sum(weighted), spread)))
    through_offset = b.Div(weighted, spread)
    argmax = b.ArgMax(b.Abs(offset), axis=1, keepdims=1)
    sign = b.Sign(b.GatherElements(offset, argmax, axis=1))
    spread_coefficient = b.Div(row_sum(b.Mul(weighted, offset)), b.Mul(spread, spread))
    through_spread = b.Mul(b.Mul(spread_coefficient, sign), b.Sub(one_hot(argmax), target_hot))
    return b.Sub(b.Add(through_target, through_offset), through_spread)


def target_score_start(b: GraphBuilder, logits: str, target: str, classes: int) -> str:
    """``∂y_t/∂y``: the one-hot of the target class (the gradient of the target's logit)."""
    classes_row = b.const(np.arange(classes, dtype=np.int64).reshape(1, classes), np.int64)
    return b.Cast(b.Equal(classes_row, target), to=1)


class Kind(str, Enum):
    """How a method turns the model into a map; the compiler has one emitter per kind."""

    RELEVANCE = "relevance"  # a relevance stream through the registered rules (AGF, the LRP family, RAP)
    GRADIENT = "gradient"  # map(b, x, ∇x): per channel at the image (Saliency, Gradient × Input)
    LAYER = "layer"  # map(b, activation, ∇activation) → [N, 1, h, w] at a layer, upsampled (Grad-CAM)
    REPLICATED = "replicated"  # expand/combine: gradients at several inputs per image (IG, SmoothGrad)
    PATH = "path"  # map(b, plan, gradient_at, x): the gradient stream read at every layer (FullGrad)
    ATTENTION = "attention"  # map(b, plan, gradient_at) → ([N, 1, h, w], (h, w)) on the patch grid (Chefer)


#: The kinds whose map is one function of the gradient stream (``Method.map``).
_MAPPED = {Kind.GRADIENT, Kind.LAYER, Kind.PATH, Kind.ATTENTION}


@dataclass(frozen=True)
class Method:
    """One explanation method: its kind, how the gradient at the logits starts, and what its kind
    needs — the relevance rule kind each op gets (``Kind.RELEVANCE``), the map function
    (``GRADIENT``, ``LAYER``, ``PATH``, ``ATTENTION``), or the replicated inputs and how their
    gradients combine (``REPLICATED``). Every map is summed over channels and scaled like AGF's
    (spec "Output"), or upsampled from its layer and divided by its maximum."""

    name: str
    summary: str
    kind: Kind
    start: Start
    formula: str = ""
    #: Kind.RELEVANCE: op type → relevance rule kind; the kinds of the layer that reads the image,
    #: of the layer that computes the logits (RAP's first step) and of the flat policy's layers
    relevance: Mapping[str, str] = field(default_factory=dict)
    first_layer: str | None = None
    top_layer: str | None = None
    flat: str | None = None
    #: (b, scores [N, K], the start gradient — the target's one-hot for LRP) → relevance at the logits, for methods whose
    #: relevance stream starts there (LRP) instead of at the top linear layer's input (AGF)
    logit_relevance: Callable[[GraphBuilder, str, str], str] | None = None
    #: (b, scores, start gradient) → the seed of a second, contrastive relevance stream (CLRP):
    #: the map is ``R_t − R_o · ΣR_t / ΣR_o``
    contrast: Callable[[GraphBuilder, str, str], str] | None = None
    #: the map of the GRADIENT, LAYER, PATH and ATTENTION kinds (signatures in ``Kind``)
    map: Callable[..., Any] | None = None
    #: Kind.REPLICATED: (b, x, shape, options) → (inputs [count·N, ...], count), the inputs the
    #: method differentiates at; ``combine(b, x, shape, gradients, count, options)`` → ``[N, ...]``
    expand: Callable[..., tuple[str, int]] | None = None
    combine: Callable[..., str] | None = None

    def __post_init__(self) -> None:
        relevance_only = (self.relevance, self.first_layer, self.top_layer, self.flat, self.logit_relevance,
                          self.contrast)
        if (self.map is not None) != (self.kind in _MAPPED) or \
                (self.expand is not None or self.combine is not None) != (self.kind is Kind.REPLICATED) or \
                (self.kind is not Kind.RELEVANCE and any(relevance_only)):
            raise ValueError(f"method {self.name}: the fields given do not fit its kind {self.kind.value}")

    @property
    def relevance_stream(self) -> bool:
        return self.kind is Kind.RELEVANCE

    def kind_for(self, op_type: str, kinds: Iterable[str], *, first_layer: bool, flat: bool,
                 top_layer: bool = False) -> str | None:
        """The relevance rule kind an op gets; ``None`` when it has no fitting rule."""
        kinds = [kind for kind in kinds if kind not in OPT_IN_KINDS or kind == self.relevance.get(op_type)]
        for wanted in ([self.first_layer] if first_layer else []) + ([self.top_layer] if top_layer else []) + \
                ([self.flat] if flat else []) + [self.relevance.get(op_type)]:
            if wanted in kinds:
                return wanted
        return kinds[0] if len(kinds) == 1 else None


#: Relevance rule kinds only a method that names them for an op gets; other methods get that op's
#: other rule (RAP's ``magnitude`` split of residual sums; every other method keeps ``merge``).
OPT_IN_KINDS = frozenset({"magnitude"})


AGF = Method(
    name="agf",
    summary="Attribution Guided Factorization (Gur, Ali, Wolf, AAAI 2021), as docs/algorithm.md",
    formula="the spec's relevance stream; Σ_c Φ₀ / max Φ₀",
    kind=Kind.RELEVANCE,
    start=agf_start,
    relevance={"Conv": "agf", "Gemm": "agf", "MatMul": "agf"},
    first_layer="zB",
    flat="flat",
)

GRADIENT = Method(
    name="gradient",
    summary="Saliency (Simonyan et al. 2014): the absolute gradient of the target's logit",
    kind=Kind.GRADIENT,
    start=target_score_start,
    map=lambda b, x, gradient: b.Abs(gradient),
    formula="A = abs(∂y_t/∂x); Σ_c A / max A (Captum's Saliency(abs=True) per channel)",
)

GRADIENT_X_INPUT = Method(
    name="gradient-x-input",
    summary="Gradient × Input (Shrikumar et al. 2016): the input times the target logit's gradient",
    kind=Kind.GRADIENT,
    start=target_score_start,
    map=lambda b, x, gradient: b.Mul(x, gradient),
    formula="A = x ⊙ ∂y_t/∂x; Σ_c A / max A, or / max abs(A) where max A ≤ 0 (Captum's InputXGradient)",
)

def _gradcam(b: GraphBuilder, activation: str, gradient: str) -> str:
    weights = b.ReduceMean(gradient, axes=[2, 3], keepdims=1)  # α_k: the gradient averaged over space
    return b.Relu(b.ReduceSum(b.Mul(weights, activation), b.ints([1]), keepdims=1))


GRADCAM = Method(
    name="gradcam",
    summary="Grad-CAM (Selvaraju et al. 2017) at the last Conv with a spatial output, or --layer NODE",
    kind=Kind.LAYER,
    start=target_score_start,
    map=_gradcam,
    formula="relu(Σ_k mean_ij(∂y_t/∂A_k) · A_k), bilinear upsampling to the image, / max (Captum's "
            "LayerGradCam with relu_attributions=True, then LayerAttribution.interpolate)",
)

def _option(options: Mapping, name: str, default, kind=int, low=1):
    value = options.get(name, default)
    try:
        value = kind(value)
    except (TypeError, ValueError):
        raise CompileError(f"--{name} {value!r}: expected a {kind.__name__}") from None
    if value < low:
        raise CompileError(f"--{name} {value}: must be at least {low}")
    return value


def _stack(b: GraphBuilder, x: str, shape: tuple, coefficients: str) -> str:
    """``[count·N, ...]``: ``coefficients[s] ⊙ x`` for each of the ``count`` coefficients, ``s`` leading."""
    return b.Reshape(b.Mul(b.Unsqueeze(x, b.ints([0])), coefficients), b.ints([-1, *shape[1:]]))


def _weighted_sum(b: GraphBuilder, gradients: str, shape: tuple, weights: np.ndarray) -> str:
    """``Σ_s w_s g_s`` over the ``count`` replicas of each image → ``[N, ...]``."""
    per_replica = b.Reshape(gradients, b.ints([len(weights), -1, *shape[1:]]))
    weights = b.const(weights.reshape(-1, *[1] * len(shape)).astype(np.float32))
    return b.ReduceSum(b.Mul(per_replica, weights), b.ints([0]), keepdims=0)


def _ig_expand(b: GraphBuilder, x: str, shape: tuple, options: Mapping) -> tuple[str, int]:
    steps = _option(options, "steps", 50)
    alphas, _ = _gauss_legendre(steps)
    return _stack(b, x, shape, b.const(alphas.reshape(-1, *[1] * len(shape)))), steps


def _ig_combine(b: GraphBuilder, x: str, shape: tuple, gradients: str, count: int, options: Mapping) -> str:
    _, weights = _gauss_legendre(count)
    return b.Mul(x, _weighted_sum(b, gradients, shape, weights))  # zero baseline: (x − 0) ⊙ Σ_s w_s ∇F(α_s x)


def _gauss_legendre(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Captum's default quadrature: Gauss–Legendre nodes and weights mapped to [0, 1]."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return ((nodes + 1) / 2).astype(np.float32), (weights / 2).astype(np.float32)


INTEGRATED_GRADIENTS = Method(
    name="integrated-gradients",
    summary="Integrated Gradients (Sundararajan et al. 2017), zero baseline, --steps (default 50)",
    kind=Kind.REPLICATED,
    start=target_score_start,
    expand=_ig_expand,
    combine=_ig_combine,
    formula="A = x ⊙ Σ_s w_s ∂y_t/∂x(α_s x), Gauss–Legendre α_s, w_s on [0, 1] (Captum's default); "
            "Σ_c A / max A",
)

#: The noise's hash works in the prime field of ``p = 2**31 − 1``: ``MiMC``'s round ``x ↦ (x + c)⁵ mod p`` is a
#: permutation there (5 does not divide ``p − 1``), and every product of two residues fits in int64.
_PRIME = 2**31 - 1
_ROUND_CONSTANTS = (0x3C6EF372, 0x1B873593, 0x5BD1E995, 0x27D4EB2D)


def _hash_reference(counter: np.ndarray) -> np.ndarray:
    """Four MiMC rounds on int64 counters (non-negative, below ``2**62``) → int64 in ``[0, p)``."""
    x = np.asarray(counter, dtype=np.int64) % _PRIME
    for constant in _ROUND_CONSTANTS:
        x = (x + constant % _PRIME) % _PRIME
        square = x * x % _PRIME
        x = square * square % _PRIME * x % _PRIME
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


def _smoothgrad_expand(b: GraphBuilder, x: str, shape: tuple, options: Mapping) -> tuple[str, int]:
    samples = _option(options, "samples", 25)
    noise = _option(options, "noise", 0.15, float, 0.0)
    seed = _option(options, "seed", 0, int, 0)
    if seed >= _PRIME:
        raise CompileError(f"--seed {seed}: must be below {_PRIME} (2³¹ − 1)")
    axes = list(range(1, len(shape)))
    spread = b.Sub(b.ReduceMax(x, axes=axes, keepdims=1), b.ReduceMin(x, axes=axes, keepdims=1))
    # ε[s, n] = noise · spread[n] · z[s]: the same draw z[s] for every image, so an image's map does not
    # depend on its batch position or its batch mates; z is stored as float16 (2 bytes per pixel, channel
    # and copy) and widened once, when ONNX Runtime folds the Cast at load time
    gaussian = b.Cast(b.const(counter_normal((samples, 1, *shape[1:]), seed), np.float16), to=TensorProto.FLOAT)
    noisy = b.Add(b.Unsqueeze(x, b.ints([0])), b.Mul(gaussian, b.Mul(b.Unsqueeze(spread, b.ints([0])), b.const(noise))))
    return b.Reshape(noisy, b.ints([-1, *shape[1:]])), samples


def _smoothgrad_combine(b: GraphBuilder, x: str, shape: tuple, gradients: str, count: int, options: Mapping) -> str:
    return _weighted_sum(b, b.Abs(gradients), shape, np.full(count, 1.0 / count))


SMOOTHGRAD = Method(
    name="smoothgrad",
    summary="SmoothGrad (Smilkov et al. 2017): saliency averaged over noisy copies, --samples (25), --noise "
            "(0.15 of the image's range), --seed (0)",
    kind=Kind.REPLICATED,
    start=target_score_start,
    expand=_smoothgrad_expand,
    combine=_smoothgrad_combine,
    formula="A = mean_s abs(∂y_t/∂x(x + ε_s)), ε_s ~ N(0, (noise·(max x − min x))²), a counter-based draw fixed by "
            "the seed and the copy s, the same at every batch position (Captum's NoiseTunnel(Saliency) smoothgrad); "
            "Σ_c A / max A",
)

def _lrp(name: str, kind: str, alpha: int, beta: int) -> Method:
    linear = {"Conv": kind, "Gemm": kind, "MatMul": kind}
    return Method(
        name=name,
        summary=f"LRP-α{alpha}β{beta} (Bach et al. 2015) from R = y ⊙ onehot(t), z^B at the input layer",
        kind=Kind.RELEVANCE,
        start=target_score_start,
        relevance=linear,
        first_layer="zB",
        logit_relevance=lambda b, scores, one_hot: b.Mul(scores, one_hot),
        formula=f"α={alpha}, β={beta} on Conv/Gemm/MatMul (no bias), z-rule on ReLU, pools and residual sums; "
                "Σ_c R₀ / max R₀ (Zennit's AlphaBeta with ZBox first)",
    )


LRP = _lrp("lrp", "alpha1beta0", 1, 0)
LRP_AB = _lrp("lrp-ab", "alpha2beta1", 2, 1)


def _others(b: GraphBuilder, scores: str, one_hot: str) -> str:
    """``y_t / (K − 1)`` on every class but the target (spec "Baselines", CLRP)."""
    target_score = b.ReduceSum(b.Mul(scores, one_hot), b.ints([1]), keepdims=1)
    classes = b.ReduceSum(b.Add(one_hot, b.Sub(b.const(1.0), one_hot)), b.ints([1]), keepdims=1)
    return b.Mul(b.Sub(b.const(1.0), one_hot), b.Div(target_score, b.Sub(classes, b.const(1.0))))


def _contrastive_lrp(name: str, summary: str, target_seed, others_seed, seeds: str) -> Method:
    """LRP-α1β0 of the target minus that of the other classes: ``R_t − R_o · ΣR_t / ΣR_o``."""
    return Method(name=name, summary=summary, kind=Kind.RELEVANCE, start=target_score_start, relevance=LRP.relevance,
                  first_layer="zB", logit_relevance=target_seed, contrast=others_seed,
                  formula=f"R = R_t − R_o · ΣR_t / ΣR_o, {seeds}, both LRP-α1β0; Σ_c R / max R")


CLRP = _contrastive_lrp(
    "clrp", "Contrastive LRP (Gu et al. 2018): LRP-α1β0 of the target minus that of the other classes",
    LRP.logit_relevance, _others, "R_t from y ⊙ onehot(t), R_o from y_t/(K−1) on the other classes")


def _softmax_gradient_target(b: GraphBuilder, scores: str, one_hot: str) -> str:
    """``p_t(1 − p_t) + 1e-8`` on the target class, ``p = softmax(y)`` (SGLRP, the authors' ``sglrp_target``)."""
    p = b.Softmax(scores, axis=1)
    return b.Mul(one_hot, b.Add(b.Mul(p, b.Sub(b.const(1.0), p)), b.const(1e-8)))


def _softmax_gradient_others(b: GraphBuilder, scores: str, one_hot: str) -> str:
    """``p_t · p_j`` on every class ``j ≠ t``: the magnitude of ``∂p_t/∂y_j`` (the authors' ``sglrp_others``)."""
    p = b.Softmax(scores, axis=1)
    target_probability = b.ReduceSum(b.Mul(p, one_hot), b.ints([1]), keepdims=1)
    return b.Mul(b.Sub(b.const(1.0), one_hot), b.Mul(target_probability, p))


SGLRP = _contrastive_lrp(
    "sglrp", "Softmax-Gradient LRP (Iwana et al. 2019): CLRP started from the softmax's gradient",
    _softmax_gradient_target, _softmax_gradient_others,
    "R_t from p_t(1−p_t)+1e-8 on t, R_o from p_t·p_j on every j ≠ t (p = softmax(y); the authors' "
    "sglrp_target/sglrp_others)")


RAP = Method(
    name="rap",
    summary="Relative Attributing Propagation (Nam et al. 2019): positive and negative relevance "
            "propagated separately from the target's one-hot",
    kind=Kind.RELEVANCE,
    start=target_score_start,
    relevance={"Conv": "rap", "Gemm": "rap", "MatMul": "rap", "Add": "magnitude", "Sum": "magnitude"},
    first_layer="zB",
    top_layer="rap_first",
    logit_relevance=lambda b, scores, one_hot: one_hot,
    formula="the authors' RAP_relprop: first_prop + redistribute at the logits layer (needs a Gemm/MatMul "
            "there), the sign-split proportional rule with shift_rel on hidden Conv/Gemm/MatMul, z^B at the input, "
            "z-rule on pools (and on ReLU: their pass-through up to the 1e-9 stabiliser); residual sums split by "
            "magnitude Φ·abs(Xi)/(abs(X1)+abs(X2)+1e-9) (option residual=signed: the authors' Φ·Xi/Y); Σ_c R / max R",
)

#: RAP's rule at a residual sum ``Y = X1 + X2`` (option ``residual``): the stable split by magnitude
#: (default) or the authors' signed ratio ``Φ·Xi/Y`` (for parity with their code).
RESIDUAL_RULES = {"magnitude": "magnitude", "signed": "merge"}


def _normalised_abs(b: GraphBuilder, x: str, rank: int) -> str:
    """FullGrad's post-processing: |x| shifted to a minimum of 0 and divided by (max + 1e-6), per sample."""
    magnitude = b.Abs(x)
    axes = list(range(1, rank))
    shifted = b.Sub(magnitude, b.ReduceMin(magnitude, axes=axes, keepdims=1))
    return b.Div(shifted, b.Add(b.ReduceMax(shifted, axes=axes, keepdims=1), b.const(1e-6)))


def _bias(b: GraphBuilder, node: NodeView) -> str | None:
    """The per-channel bias a Conv adds, or a BatchNormalization's effective one ``β − μγ/√(σ²+ε)``."""
    if node.op_type == "Conv" and len(node.inputs) > 2 and node.inputs[2]:
        return node.inputs[2]
    return batchnorm_shift(b, node) if node.op_type == "BatchNormalization" else None


def _fullgrad(b: GraphBuilder, plan: Plan, gradient_at: GradientAt, x: str) -> str:
    height, width = plan.image_size
    input_term = b.Mul(x, gradient_at(plan.image))
    if plan.channels_last:
        input_term = b.Transpose(input_term, perm=[0, 3, 1, 2])
    total = b.ReduceSum(_normalised_abs(b, input_term, 4), b.ints([1]), keepdims=1)
    for node in plan.path:
        bias = _bias(b, NodeView(node, plan.graph, frozenset()))
        out_shape = plan.graph.shape(node.output[0])
        gradient = gradient_at(node.output[0])
        if bias is None or gradient is None or len(out_shape) != 4:
            continue
        term = _normalised_abs(b, b.Mul(gradient, b.Reshape(bias, b.ints([1, -1, 1, 1]))), 4)
        term = resize(b, term, out_shape[2:], (height, width), coordinate_transformation_mode="align_corners")
        total = b.Add(total, b.ReduceSum(term, b.ints([1]), keepdims=1))
    return total


FULLGRAD = Method(
    name="fullgrad",
    summary="FullGrad (Srinivas & Fleuret 2019): input-gradient plus every conv/BatchNorm bias-gradient",
    kind=Kind.PATH,
    start=target_score_start,
    map=_fullgrad,
    formula="ψ(x ⊙ ∂y_t/∂x) + Σ_layers upsample(ψ(b ⊙ ∂y_t/∂z)), ψ = abs, min-shift, / (max + 1e-6), summed "
            "over channels, bilinear (align_corners) upsampling (the authors' fullgrad.py); / max",
)

def _chefer(b: GraphBuilder, plan: Plan, gradient_at: GradientAt) -> tuple[str, tuple[int, int]]:
    """Gradient-weighted attention rollout on the patch grid, ``[N, 1, h, w]``, and ``(h, w)``; for a
    text model, the [CLS] (first) token's row of ``R − I`` over every token, ``[N, 1, T, 1]`` (the
    identity is no evidence: without it, [CLS] keeps only what attention brought it)."""
    graph = plan.graph
    attentions = attention_matrices(graph, plan.path)
    tokens = check_rollout(graph, attentions)
    grid = None
    if plan.tokens is None:
        grid = patch_grid(graph, [n for n in plan.path if n.name in plan.first_layers], plan.image_size, tokens)
        if grid is None:
            raise CompileError(f"--method chefer: {tokens} tokens fit no grid of patches of the "
                               f"{plan.image_size[0]}×{plan.image_size[1]} image")
    identity = b.const(np.eye(tokens, dtype=np.float32)[None])
    rollout = identity  # R = I
    for attention in attentions:
        gradient = gradient_at(attention)
        if gradient is None:  # a block the target does not depend on adds nothing
            continue
        weights = b.ReduceMean(b.Relu(b.Mul(gradient, attention)), axes=[1], keepdims=0)  # Ā = mean_h relu(∇A ⊙ A)
        rollout = b.Add(rollout, b.MatMul(weights, rollout))  # R = R + Ā·R
    if grid is None:
        row = b.Slice(b.Sub(rollout, identity), b.ints([0]), b.ints([1]), b.ints([1]))
        return b.Reshape(row, b.ints([0, 1, tokens, 1])), (tokens, 1)
    if grid.prefix:  # the class token's row
        row = b.Slice(rollout, b.ints([0]), b.ints([1]), b.ints([1]))
    else:  # no class token: the mean of the rows
        row = b.ReduceMean(rollout, axes=[1], keepdims=1)
    patches = b.Slice(row, b.ints([grid.prefix]), b.ints([tokens]), b.ints([2]))
    return b.Reshape(patches, b.ints([0, 1, grid.height, grid.width])), (grid.height, grid.width)


CHEFER = Method(
    name="chefer",
    summary="Gradient-weighted attention rollout (Chefer, Gur, Wolf, ICCV 2021, \"Generic Attention-model "
            "Explainability\"), for transformers with one token set",
    kind=Kind.ATTENTION,
    start=target_score_start,
    map=_chefer,
    formula="Ā = mean_heads(relu(∂y_t/∂A ⊙ A)) per attention block, R = I, R = R + Ā·R in forward order; the class "
            "token's row of R over the patch tokens (no class token: the mean of R's rows), on the patch grid, "
            "bilinear upsampling to the image, / max",
)

METHODS: dict[str, Method] = {method.name: method for method in (AGF, GRADIENT, GRADIENT_X_INPUT, GRADCAM,
                                                                 INTEGRATED_GRADIENTS, SMOOTHGRAD, LRP, LRP_AB,
                                                                 CLRP, SGLRP, RAP, FULLGRAD, CHEFER)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise CompileError(f"unknown method '{name}' (available: {', '.join(METHODS)})")
    return METHODS[name]


def with_options(method: Method, options: Mapping) -> Method:
    """The method as its options change its rules: RAP's ``residual`` (``RESIDUAL_RULES``) picks the
    rule of Add/Sum nodes with several data inputs; other methods take no such option."""
    residual = options.get("residual")
    if residual is None:
        return method
    if method.relevance.get("Add") not in RESIDUAL_RULES.values():
        raise CompileError(f"--residual {residual}: only RAP has a choice of residual-sum rule (--method rap)")
    if residual not in RESIDUAL_RULES:
        raise CompileError(f"--residual {residual}: expected one of {', '.join(RESIDUAL_RULES)}")
    kind = RESIDUAL_RULES[residual]
    return replace(method, relevance={**method.relevance, "Add": kind, "Sum": kind})


# -- the flat layer policy ----------------------------------------------------------------------

#: Ops between a layer and a residual Add that keep it "on the residual branch".
_BETWEEN_LAYER_AND_ADD = {"BatchNormalization", "Identity"}

FLAT_POLICIES = {
    "authors": "1×1 convs, token-wise linear layers (a 1×1 conv over the tokens), and convs whose output reaches "
               "a residual Add through BatchNormalization only",
    "pointwise": "1×1 convs and token-wise linear layers only",
    "none": "no layer is flat: every conv and token-wise linear layer but the input layer gets the full AGF rule",
}


def is_token_linear(graph: GraphView, node) -> bool:
    """A Gemm/MatMul with a constant 2-D weight applied to every token of a ``[N, T, C]`` (or
    ``[N, H, W, C]``, or ``[N·T, C]`` with the batch merged) tensor: a 1×1 conv over the tokens
    (docs/algorithm.md, "Token models")."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or not graph.is_constant(node.input[1]) \
            or len(graph.shape(node.input[1])) != 2:
        return False
    batch = graph.batch(node.input[0])
    return len(graph.shape(node.input[0])) >= 3 or (batch is not None and batch[1] > 1)


def _is_pointwise(graph: GraphView, node) -> bool:
    return node.op_type != "Conv" or all(k == 1 for k in graph.shape(node.input[1])[2:])


def _feeds_residual_add(graph: GraphView, node, data: set[str]) -> bool:
    tensor = node.output[0]
    while True:
        readers = graph.consumers.get(tensor, [])
        if len(readers) != 1:
            return False
        reader = readers[0]
        if reader.op_type in ("Add", "Sum"):
            return sum(i in data for i in reader.input) >= 2
        if reader.op_type not in _BETWEEN_LAYER_AND_ADD:
            return False
        tensor = reader.output[0]


def flat_layers(graph: GraphView, layers: Iterable, data: set[str], policy: str = "authors",
                flat: Iterable[str] = (), full: Iterable[str] = ()) -> set[str]:
    """Names of the layers (Convs and token-wise linear layers) that get the flat rule: the
    policy's choice, plus ``flat``, minus ``full``."""
    if policy not in FLAT_POLICIES:
        raise CompileError(f"unknown flat policy '{policy}' (available: {', '.join(FLAT_POLICIES)})")
    layers = list(layers)
    names = {node.name for node in layers}
    for option, chosen in (("--flat", flat), ("--full", full)):
        unknown = sorted(set(chosen) - names)
        if unknown:
            raise CompileError(f"{option}: no Conv node named {', '.join(unknown)} (nor a token-wise linear one) on "
                               f"the explained path (such nodes: {', '.join(sorted(names)) or 'none'})")
    selected = set()
    for node in layers:
        if policy == "none":
            continue
        if _is_pointwise(graph, node) or (policy == "authors" and _feeds_residual_add(graph, node, data)):
            selected.add(node.name)
    return (selected | set(flat)) - set(full)
