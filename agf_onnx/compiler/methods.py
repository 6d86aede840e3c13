"""Explanation methods, and AGF's "flat" conv policy.

A ``Method`` is how the gradient at the logits starts and a map of its own kind: ``RelevanceMap``
(the relevance rule kind each op type gets, the kinds of the layer that reads the image and of the
flat policy's layers: AGF, the LRP family, RAP), ``GradientMap``, ``LayerMap``, ``ReplicatedMap``,
``PathMap`` or ``AttentionMap``. The planner asks the method what each node gets; the compiler has
one emitter per kind. CLRP and SGLRP are presets: LRP with a contrast of its own (``modifiers.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import ClassVar

import numpy as np

from ..errors import CompileError
from ..rules.normalization import batchnorm_shift
from .builder import GraphBuilder
from .graph import GraphView, NodeView
from .maths import resize
from .modifiers import CONTRASTS, DEFAULT_SMOOTH, NONE, Modifiers
from .plan import Plan
from .replicate import counter_normal, noisy, scaled, weighted_sum
from .tokens import attention_matrices, check_rollout, patch_grid

__all__ = ["METHODS", "Kind", "Method", "counter_normal", "get_method", "parse_variant", "target_score_start"]

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
    """How a method turns the model into a map: one map class per kind, one emitter per kind
    (``emit._EMITTERS``)."""

    RELEVANCE = "relevance"  # a relevance stream through the registered rules (AGF, the LRP family, RAP)
    GRADIENT = "gradient"  # the gradient at the image, per channel (Saliency, Gradient × Input)
    LAYER = "layer"  # the activation and gradient at a layer → [N, 1, h, w], upsampled (Grad-CAM)
    REPLICATED = "replicated"  # gradients at copies of each image, combined (IG, SmoothGrad)
    PATH = "path"  # the gradient stream read at every layer (FullGrad)
    ATTENTION = "attention"  # the gradient stream read at the attention matrices → the patch grid (Chefer)


@dataclass(frozen=True)
class MethodMap:
    """What a method's kind answers the planner; the defaults are those of the kinds that read the
    gradient stream only (every node gets its gradient rule, none a relevance rule)."""

    kind: ClassVar[Kind]
    #: whether nodes below the start get relevance rules (``rule``)
    relevance_stream: ClassVar[bool] = False
    #: whether the map is taken at a layer (``--layer``, or the planner's default layer)
    at_layer: ClassVar[bool] = False

    @property
    def starts_at_logits(self) -> bool:
        """Whether the relevance stream starts at the logits (LRP) instead of at the top linear layer's input."""
        return False

    @property
    def needs_top_layer(self) -> bool:
        """Whether the planner must find the last linear layer before the logits."""
        return True

    def preferred(self, op_type: str) -> list[str]:
        """The relevance rule kinds this map names for ``op_type`` (the coverage table's column)."""
        return []

    def rule(self, op_type: str, kinds: Iterable[str], *, first_layer: bool, flat: bool, top_layer: bool) -> str | None:
        """The relevance rule kind a node gets; ``None`` when it has no fitting rule."""
        return None

    def fits_top(self, kind: str | None) -> bool:
        """Whether the top linear layer's rule ``kind`` is one this map can start from."""
        return True

    def text_refusal(self, layer: str | None) -> str | None:
        """Why this kind cannot explain a text model (after ``--method NAME``), ``None`` when it can."""
        return None

    def smooth_refusal(self) -> str | None:
        """Why ``--smooth`` makes no sense on this map (after ``--method NAME``), ``None`` when it does."""
        return None


@dataclass(frozen=True)
class RelevanceMap(MethodMap):
    """A relevance stream through the registered rules: the rule kind each op type gets, the kinds
    of the layer that reads the image, of the layer that computes the logits (RAP's first step) and
    of the flat policy's layers; ops it does not name use their only relevance rule."""

    kind: ClassVar[Kind] = Kind.RELEVANCE
    relevance_stream: ClassVar[bool] = True
    relevance: Mapping[str, str] = field(default_factory=dict)
    first_layer: str | None = None
    top_layer: str | None = None
    flat: str | None = None
    #: (b, scores [N, K], the start gradient — the target's one-hot for LRP) → relevance at the logits,
    #: for methods whose relevance stream starts there (LRP) instead of at the top linear layer's input (AGF)
    logit_relevance: Callable[[GraphBuilder, str, str], str] | None = None

    @property
    def starts_at_logits(self) -> bool:
        return self.logit_relevance is not None

    @property
    def needs_top_layer(self) -> bool:
        return self.logit_relevance is None or self.top_layer is not None

    def preferred(self, op_type: str) -> list[str]:
        return [k for k in (self.relevance.get(op_type), self.flat, self.first_layer) if k is not None]

    def rule(self, op_type: str, kinds: Iterable[str], *, first_layer: bool, flat: bool, top_layer: bool) -> str | None:
        kinds = [kind for kind in kinds if kind not in OPT_IN_KINDS or kind == self.relevance.get(op_type)]
        for wanted in ([self.first_layer] if first_layer else []) + ([self.top_layer] if top_layer else []) + \
                ([self.flat] if flat else []) + [self.relevance.get(op_type)]:
            if wanted in kinds:
                return wanted
        return kinds[0] if len(kinds) == 1 else None

    def fits_top(self, kind: str | None) -> bool:
        return self.top_layer is None or kind == self.top_layer


@dataclass(frozen=True)
class GradientMap(MethodMap):
    """``function(b, x, ∇x)``: a per-channel map from the gradient at the image."""

    kind: ClassVar[Kind] = Kind.GRADIENT
    function: Callable[[GraphBuilder, str, str], str]


@dataclass(frozen=True)
class LayerMap(MethodMap):
    """``function(b, activation, ∇activation)`` → ``[N, 1, h, w]`` at a layer, upsampled to the image."""

    kind: ClassVar[Kind] = Kind.LAYER
    at_layer: ClassVar[bool] = True
    function: Callable[[GraphBuilder, str, str], str]

    def text_refusal(self, layer: str | None) -> str | None:
        return None if layer is not None else (
            " on a text model: pass --layer NODE, a node whose output is a [N, T, C] token tensor (no default: "
            "only the [CLS] token of the last block reaches the classifier)")


@dataclass(frozen=True)
class ReplicatedMap(MethodMap):
    """Gradients at ``count`` copies of each image: ``copies(b, x, shape, options)`` → (the copies
    ``[count·N, ...]``, copy-major, and ``count``); ``combine(b, x, shape, gradients, count,
    options)`` → ``[N, ...]``. The path is cloned over the copies (``replicate.py``)."""

    kind: ClassVar[Kind] = Kind.REPLICATED
    copies: Callable[[GraphBuilder, str, tuple, Mapping], tuple[str, int]]
    combine: Callable[[GraphBuilder, str, tuple, str, int, Mapping], str]
    #: SmoothGrad's copies are noisy already: ``--smooth`` on it is refused
    noisy: bool = False

    def smooth_refusal(self) -> str | None:
        return " averages over noisy copies already; raise its --samples instead" if self.noisy else None


@dataclass(frozen=True)
class PathMap(MethodMap):
    """``function(b, plan, gradient_at, x)`` → ``[N, 1, H, W]``: the gradient stream read at every layer."""

    kind: ClassVar[Kind] = Kind.PATH
    function: Callable[[GraphBuilder, Plan, GradientAt, str], str]

    def text_refusal(self, layer: str | None) -> str | None:
        return ": needs an image (its bias terms are upsampled to the pixel grid); a text model's map is per token"


@dataclass(frozen=True)
class AttentionMap(MethodMap):
    """``function(b, plan, gradient_at)`` → (``[N, 1, h, w]``, ``(h, w)``) on the patch grid."""

    kind: ClassVar[Kind] = Kind.ATTENTION
    function: Callable[[GraphBuilder, Plan, GradientAt], tuple[str, tuple[int, int]]]


@dataclass(frozen=True)
class Method:
    """One explanation method: how the gradient at the logits starts, and its map (one class per
    kind, above), which says what the planner gives each node and what the compiler emits. Every
    map is summed over channels and scaled like AGF's (spec "Output"), or upsampled from its layer
    and divided by its maximum. A preset is a method with ``modifiers`` of its own (CLRP is LRP
    under ``--contrast others``): each idea exists once."""

    name: str
    summary: str
    formula: str
    start: Start
    map: MethodMap
    modifiers: Modifiers = NONE

    @property
    def kind(self) -> Kind:
        return self.map.kind

    def rule_for(self, node, kinds: Iterable[str], *, first_layer: bool, flat: bool, top_layer: bool) -> str | None:
        """The relevance rule kind ``node`` gets under this method; ``None``: none (no fitting rule, or a
        kind with no relevance stream). Refuses a top linear layer the method cannot start from."""
        kind = self.map.rule(node.op_type, kinds, first_layer=first_layer, flat=flat, top_layer=top_layer)
        if top_layer and not self.map.fits_top(kind):
            raise CompileError(f"--method {self.name} starts at a Gemm or MatMul that computes the logits; "
                               f"the last linear layer here is {node.op_type} '{node.name}'")
        return kind

    def under(self, chosen: Modifiers) -> Modifiers:
        """The modifiers the method runs under: its own (a preset's) and ``chosen``; refuses, naming the
        option, what makes no sense (``modifiers.py``)."""
        chosen.check()
        if chosen.contrast is not None and self.modifiers.contrast is not None:
            raise CompileError(f"--contrast: --method {self.name} is contrastive already "
                               f"({self.name} = lrp --contrast {self.modifiers.contrast})")
        refusal = self.map.smooth_refusal() if chosen.smooth else None
        if refusal is not None:
            raise CompileError(f"--smooth: {self.name}{refusal}")
        return replace(chosen, contrast=self.modifiers.contrast) if self.modifiers.contrast else chosen

    def seeded_by_others(self, contrast: str) -> Method:
        """The method started from the others' seed (``modifiers.CONTRASTS``) instead of the target's: at
        the logits' relevance for methods whose relevance starts there (LRP, RAP), else as the gradient
        seed (AGF, every gradient method)."""
        weights = CONTRASTS[contrast]
        if isinstance(self.map, RelevanceMap) and self.map.logit_relevance is not None:
            return replace(self, map=replace(self.map, logit_relevance=weights))

        def start(b: GraphBuilder, logits: str, target: str, classes: int) -> str:
            return weights(b, logits, target_score_start(b, logits, target, classes))

        return replace(self, start=start)


#: Relevance rule kinds only a method that names them for an op gets; other methods get that op's
#: other rule (RAP's ``magnitude`` split of residual sums; every other method keeps ``merge``).
OPT_IN_KINDS = frozenset({"magnitude"})


AGF = Method(
    name="agf",
    summary="Attribution Guided Factorization (Gur, Ali, Wolf, AAAI 2021), as docs/algorithm.md",
    formula="the spec's relevance stream; Σ_c Φ₀ / max Φ₀",
    start=agf_start,
    map=RelevanceMap(relevance={"Conv": "agf", "Gemm": "agf", "MatMul": "agf"}, first_layer="zB", flat="flat"),
)

GRADIENT = Method(
    name="gradient",
    summary="Saliency (Simonyan et al. 2014): the absolute gradient of the target's logit",
    start=target_score_start,
    map=GradientMap(lambda b, x, gradient: b.Abs(gradient)),
    formula="A = abs(∂y_t/∂x); Σ_c A / max A (Captum's Saliency(abs=True) per channel)",
)

GRADIENT_X_INPUT = Method(
    name="gradient-x-input",
    summary="Gradient × Input (Shrikumar et al. 2016): the input times the target logit's gradient",
    start=target_score_start,
    map=GradientMap(lambda b, x, gradient: b.Mul(x, gradient)),
    formula="A = x ⊙ ∂y_t/∂x; Σ_c A / max A, or / max abs(A) where max A ≤ 0 (Captum's InputXGradient)",
)

def _gradcam(b: GraphBuilder, activation: str, gradient: str) -> str:
    weights = b.ReduceMean(gradient, axes=[2, 3], keepdims=1)  # α_k: the gradient averaged over space
    return b.Relu(b.ReduceSum(b.Mul(weights, activation), b.ints([1]), keepdims=1))


GRADCAM = Method(
    name="gradcam",
    summary="Grad-CAM (Selvaraju et al. 2017) at the last Conv with a spatial output, or --layer NODE",
    start=target_score_start,
    map=LayerMap(_gradcam),
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


def _ig_copies(b: GraphBuilder, x: str, shape: tuple, options: Mapping) -> tuple[str, int]:
    steps = _option(options, "steps", 50)
    alphas, _ = _gauss_legendre(steps)
    return scaled(b, x, shape, alphas), steps


def _ig_combine(b: GraphBuilder, x: str, shape: tuple, gradients: str, count: int, options: Mapping) -> str:
    _, weights = _gauss_legendre(count)
    return b.Mul(x, weighted_sum(b, gradients, shape, weights))  # zero baseline: (x − 0) ⊙ Σ_s w_s ∇F(α_s x)


def _gauss_legendre(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Captum's default quadrature: Gauss–Legendre nodes and weights mapped to [0, 1]."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return ((nodes + 1) / 2).astype(np.float32), (weights / 2).astype(np.float32)


INTEGRATED_GRADIENTS = Method(
    name="integrated-gradients",
    summary="Integrated Gradients (Sundararajan et al. 2017), zero baseline, --steps (default 50)",
    start=target_score_start,
    map=ReplicatedMap(_ig_copies, _ig_combine),
    formula="A = x ⊙ Σ_s w_s ∂y_t/∂x(α_s x), Gauss–Legendre α_s, w_s on [0, 1] (Captum's default); "
            "Σ_c A / max A",
)

def _smoothgrad_copies(b: GraphBuilder, x: str, shape: tuple, options: Mapping) -> tuple[str, int]:
    samples = _option(options, "samples", 25)
    noise = _option(options, "noise", 0.15, float, 0.0)
    seed = _option(options, "seed", 0, int, 0)
    return noisy(b, x, shape, samples, noise, seed), samples


def _smoothgrad_combine(b: GraphBuilder, x: str, shape: tuple, gradients: str, count: int, options: Mapping) -> str:
    return weighted_sum(b, b.Abs(gradients), shape, np.full(count, 1.0 / count))


SMOOTHGRAD = Method(
    name="smoothgrad",
    summary="SmoothGrad (Smilkov et al. 2017): saliency averaged over noisy copies, --samples (25), --noise "
            "(0.15 of the image's range), --seed (0)",
    start=target_score_start,
    map=ReplicatedMap(_smoothgrad_copies, _smoothgrad_combine, noisy=True),
    formula="A = mean_s abs(∂y_t/∂x(x + ε_s)), ε_s ~ N(0, (noise·(max x − min x))²), a counter-based draw fixed by "
            "the seed and the copy s, the same at every batch position (Captum's NoiseTunnel(Saliency) smoothgrad); "
            "Σ_c A / max A",
)

def _lrp(name: str, kind: str, alpha: int, beta: int) -> Method:
    linear = {"Conv": kind, "Gemm": kind, "MatMul": kind}
    return Method(
        name=name,
        summary=f"LRP-α{alpha}β{beta} (Bach et al. 2015) from R = y ⊙ onehot(t), z^B at the input layer",
        start=target_score_start,
        map=RelevanceMap(relevance=linear, first_layer="zB", logit_relevance=lambda b, scores, one_hot: b.Mul(scores, one_hot)),
        formula=f"α={alpha}, β={beta} on Conv/Gemm/MatMul (no bias), z-rule on ReLU, pools and residual sums; "
                "Σ_c R₀ / max R₀ (Zennit's AlphaBeta with ZBox first)",
    )


LRP = _lrp("lrp", "alpha1beta0", 1, 0)
LRP_AB = _lrp("lrp-ab", "alpha2beta1", 2, 1)

#: Contrastive LRP: a preset, LRP under ``--contrast others`` (``modifiers.py``: ``R_t − R_o · ΣR_t / ΣR_o``)
CLRP = replace(
    LRP, name="clrp", summary="Contrastive LRP (Gu et al. 2018): LRP-α1β0 of the target minus that of the other classes",
    formula="R = R_t − R_o · ΣR_t / ΣR_o, R_t from y ⊙ onehot(t), R_o from y_t/(K−1) on the other classes, both "
            "LRP-α1β0; Σ_c R / max R",
    modifiers=Modifiers(contrast="others"))


def _softmax_gradient_target(b: GraphBuilder, scores: str, one_hot: str) -> str:
    """``p_t(1 − p_t) + 1e-8`` on the target class, ``p = softmax(y)`` (SGLRP, the authors' ``sglrp_target``)."""
    p = b.Softmax(scores, axis=1)
    return b.Mul(one_hot, b.Add(b.Mul(p, b.Sub(b.const(1.0), p)), b.const(1e-8)))


#: Softmax-Gradient LRP: a preset, LRP started from the softmax's gradient under ``--contrast softmax``
SGLRP = replace(
    CLRP, name="sglrp", summary="Softmax-Gradient LRP (Iwana et al. 2019): CLRP started from the softmax's gradient",
    formula="R = R_t − R_o · ΣR_t / ΣR_o, R_t from p_t(1−p_t)+1e-8 on t, R_o from p_t·p_j on every j ≠ t (p = "
            "softmax(y); the authors' sglrp_target/sglrp_others), both LRP-α1β0; Σ_c R / max R",
    map=replace(LRP.map, logit_relevance=_softmax_gradient_target), modifiers=Modifiers(contrast="softmax"))


RAP = Method(
    name="rap",
    summary="Relative Attributing Propagation (Nam et al. 2019): positive and negative relevance "
            "propagated separately from the target's one-hot",
    start=target_score_start,
    map=RelevanceMap(relevance={"Conv": "rap", "Gemm": "rap", "MatMul": "rap", "Add": "magnitude", "Sum": "magnitude"},
                     first_layer="zB", top_layer="rap_first", logit_relevance=lambda b, scores, one_hot: one_hot),
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
    start=target_score_start,
    map=PathMap(_fullgrad),
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
    start=target_score_start,
    map=AttentionMap(_chefer),
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
    if not isinstance(method.map, RelevanceMap) or method.map.relevance.get("Add") not in RESIDUAL_RULES.values():
        raise CompileError(f"--residual {residual}: only RAP has a choice of residual-sum rule (--method rap)")
    if residual not in RESIDUAL_RULES:
        raise CompileError(f"--residual {residual}: expected one of {', '.join(RESIDUAL_RULES)}")
    kind = RESIDUAL_RULES[residual]
    return replace(method, map=replace(method.map, relevance={**method.map.relevance, "Add": kind, "Sum": kind}))


def parse_variant(name: str, defaults: Modifiers = NONE) -> tuple[str, Modifiers]:
    """``agf+smooth+contrast`` → ("agf", Modifiers(smooth=…, contrast="others")).

    Tokens after the method: ``smooth[=S]``, ``smooth-square[=S]``, ``contrast[=others|softmax]``.
    ``defaults`` gives S (when ``defaults.smooth`` is set), the noise, the seed and the contrast
    a bare token takes. The modifiers returned are those named, not a preset's own."""
    method, *tokens = [part.strip() for part in name.split("+")]
    if method not in METHODS:
        raise CompileError(f"unknown method '{method}' in '{name}' (available: {', '.join(METHODS)})")
    changes: dict = {}
    for token in tokens:
        key, _, value = token.partition("=")
        if key in ("smooth", "smooth-square"):
            try:
                samples = int(value) if value else (defaults.smooth or DEFAULT_SMOOTH)
            except ValueError:
                raise CompileError(f"'{name}': '{token}' needs a whole number of copies (smooth=S)") from None
            changes.update(smooth=samples, square=key == "smooth-square")
        elif key == "contrast":
            changes["contrast"] = value or defaults.contrast or "others"
        else:
            raise CompileError(f"'{name}': unknown modifier '{token}' (available: smooth[=S], smooth-square[=S], "
                               f"contrast[=others|softmax])")
    modifiers = replace(defaults, **{"smooth": 0, "square": False, "contrast": None, **changes})
    METHODS[method].under(modifiers)
    return method, modifiers


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
