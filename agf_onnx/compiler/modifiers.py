"""Method modifiers: noise-tunnel smoothing and class contrast, for every method, in the graph.

Let ``A(x, s)`` be a method's map *before* its per-sample scaling (AGF's and LRP's per-channel
relevance Φ₀ at the image, Saliency's ``|∇x|``, Grad-CAM's coarse ``relu(Σ_k α_k A_k)``,
FullGrad's summed terms, …) for the image ``x`` and the seed ``s`` at the logits (the target's,
``s_t``, is the method's own start). The heatmap is then ``finish(A)`` — ``Σ_c A / max A`` or
the upsampling of a coarse map divided by its maximum — as without modifiers.

**Contrast** (``--contrast others|softmax``; Gu et al. 2018, CLRP; Iwana et al. 2019, SGLRP)::

    A_c = A(x, s_t) − A(x, s_o) · Σ A(x, s_t) / Σ A(x, s_o)          (sums per sample; 0 where Σ A(x, s_o) = 0)

with the others' seed ``s_o`` on every class ``j ≠ t``: ``y_t / (K − 1)`` (``others``, CLRP's)
or ``p_t · p_j``, ``p = softmax(y)`` (``softmax``, SGLRP's, the magnitude of ``∂p_t/∂y_j``). The
others are one extra backward seed, not K − 1 runs: a second stream through the same forward pass
(gradient methods: a second gradient stream; relevance methods: a second relevance stream, with
its own gradient stream where the rules read one, as AGF's do). The ratio makes the two maps' masses
equal, so only the *relative* weights of the other classes matter, and ``A_c`` sums to zero. It
is taken on ``A`` as defined above, i.e. *after* a method's own non-linearity (Saliency's abs,
Grad-CAM's ReLU, FullGrad's abs): CLRP's ratio matches masses, and the signed quantity before
those non-linearities (a gradient, a pre-ReLU CAM) has no mass — its sum cancels and can be any
sign or zero, so the ratio would flip or blow up. Contrast therefore turns every map signed:
positive where the target's evidence exceeds the others', negative where theirs dominates.
``lrp --contrast others`` is ``clrp``, and ``lrp --contrast softmax`` is ``sglrp`` whenever
``y_t > 0`` (LRP is linear in its seed, and the ratio cancels the target seed's scale).

**Smooth** (``--smooth S [--noise F --seed N] [--smooth-square]``; Smilkov et al. 2017, Captum's
``NoiseTunnel``)::

    A_s = mean_{s<S} A(x + ε_s)          (--smooth-square: mean_{s<S} A(x + ε_s)²)

``ε_s = F · (max x − min x) · z_s`` per image, ``z_s`` SmoothGrad's counter-based noise
(``replicate.counter_normal``), fixed by the seed and the copy and the same for every image: an
image's map is the same at any batch position, in any session. Like NoiseTunnel the raw maps are averaged, before the
per-sample scaling (averaging scaled maps would weight each copy by one over its own peak). The
S copies of a batch of N are one batch of S·N through a clone of the path; the method's own
emitter runs on the clone, and with contrast each copy is contrasted before the average (the
tunnel wraps the contrastive method, as NoiseTunnel wraps any attribution). With ``--top-k K``
the clone holds K·S copies of each image: memory and time grow with K·S·N.
"""

from __future__ import annotations

import dataclasses
import json

from ..errors import CompileError
from .builder import GraphBuilder


def _others(b: GraphBuilder, scores: str, one_hot: str) -> str:
    """``y_t / (K − 1)`` on every class but the target (spec "Baselines", CLRP)."""
    target_score = b.ReduceSum(b.Mul(scores, one_hot), b.ints([1]), keepdims=1)
    classes = b.ReduceSum(b.Add(one_hot, b.Sub(b.const(1.0), one_hot)), b.ints([1]), keepdims=1)
    return b.Mul(b.Sub(b.const(1.0), one_hot), b.Div(target_score, b.Sub(classes, b.const(1.0))))


def _softmax_gradient_others(b: GraphBuilder, scores: str, one_hot: str) -> str:
    """``p_t · p_j`` on every class ``j ≠ t``: the magnitude of ``∂p_t/∂y_j`` (the authors' ``sglrp_others``)."""
    p = b.Softmax(scores, axis=1)
    target_probability = b.ReduceSum(b.Mul(p, one_hot), b.ints([1]), keepdims=1)
    return b.Mul(b.Sub(b.const(1.0), one_hot), b.Mul(target_probability, p))


#: The others' seed per contrast (b, scores [N, K], the target's one-hot) → [N, K]: CLRP's and SGLRP's own.
CONTRASTS = {"others": _others, "softmax": _softmax_gradient_others}
#: Copies per image when a variant name says ``+smooth`` without a number (SmoothGrad's default).
DEFAULT_SMOOTH = 25
DEFAULT_NOISE, DEFAULT_SEED = 0.15, 0


@dataclasses.dataclass(frozen=True)
class Modifiers:
    """What wraps a method: ``smooth`` noisy copies (0: none) and a ``contrast`` (None: none)."""

    smooth: int = 0
    noise: float = DEFAULT_NOISE
    seed: int = DEFAULT_SEED
    square: bool = False
    contrast: str | None = None

    def __bool__(self) -> bool:
        return bool(self.smooth or self.contrast)

    def check(self) -> None:
        """Refuse settings that make no sense, naming the option (``Method.under`` refuses those that make
        none for a method)."""
        if self.smooth < 0 or isinstance(self.smooth, bool):
            raise CompileError(f"--smooth {self.smooth}: must be at least 1")
        if self.noise < 0:
            raise CompileError(f"--noise {self.noise}: must be at least 0")
        if self.seed < 0:
            raise CompileError(f"--seed {self.seed}: must be at least 0")
        if self.square and not self.smooth:
            raise CompileError("--smooth-square needs --smooth S")
        if self.contrast is not None and self.contrast not in CONTRASTS:
            raise CompileError(f"--contrast {self.contrast}: expected one of {', '.join(CONTRASTS)}")

    def as_dict(self) -> dict:
        """The modifiers in use, e.g. ``{"smooth": 8, "noise": 0.15, "seed": 0, "square": False}`` ({} for none)."""
        entry: dict = {}
        if self.smooth:
            entry.update(smooth=self.smooth, noise=self.noise, seed=self.seed, square=self.square)
        if self.contrast:
            entry["contrast"] = self.contrast
        return entry

    def metadata(self) -> str:
        """The ``agf_onnx.modifiers`` metadata value: ``as_dict`` as JSON."""
        return json.dumps(self.as_dict(), sort_keys=True)

    def describe(self) -> str:
        """One line for people: ``smooth 25 copies (noise 0.15, seed 0), contrast others``, or ``none``."""
        parts = []
        if self.smooth:
            parts.append(f"smooth{'-square' if self.square else ''} {self.smooth} copies "
                         f"(noise {self.noise:g} of the image's range, seed {self.seed})")
        if self.contrast:
            parts.append(f"contrast {self.contrast} (" + ("y_t/(K−1)" if self.contrast == "others" else "p_t·p_j")
                         + " on every other class, CLRP-normalised)")
        return ", ".join(parts) or "none"


NONE = Modifiers()


def from_metadata(text: str | None) -> Modifiers:
    """The modifiers recorded in a compiled model (``agf_onnx.modifiers``); none when absent."""
    if not text:
        return NONE
    entry = json.loads(text)
    return Modifiers(smooth=int(entry.get("smooth", 0)), noise=float(entry.get("noise", DEFAULT_NOISE)),
                     seed=int(entry.get("seed", DEFAULT_SEED)), square=bool(entry.get("square", False)),
                     contrast=entry.get("contrast"))
