"""timm's transformer, ConvNeXt and GroupNorm families (issue 10), random seeded weights, exported
at opset 17 (``tests/timm_zoo.py``).

For every family, TorchScript export (and dynamo for ConvNeXt, ViT and BiT), every method:
it compiles (the seconds are printed, not asserted); the original outputs are bit-identical with
ONNX Runtime's optimisations off; the heatmaps of a two-image batch are finite ``[N, 1, H, W]``
and differ between the top and the lowest class of each image. The ``gradient`` map is checked
against ``torch.autograd`` through the timm model itself (float64), which checks the gradient
stream of the whole real graph. ``chefer`` (gradient-weighted attention rollout) compiles on the
models with a fixed token set and is refused, with a message that says why, on the others.

The sweep is ``slow`` (minutes; CI skips it). CI runs the smallest configuration of every family
(``timm_zoo.TINY``: a few seconds each) with AGF, the gradient and Chefer's rollout. A known limit
(``KNOWN_LIMITS``) excuses the one check it fails, strictly: where it stops reproducing, the test fails."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnx
import pytest
import torch

import agf_onnx
from agf_onnx import modelfile
from agf_onnx.compiler import passes
from agf_onnx.compiler.methods import METHODS

from . import oracle, timm_zoo
from .runtime import run, session

CHEFER = "chefer"
ALL_METHODS = sorted(set(METHODS) | {CHEFER})
"""Every method of ``agf-onnx compile``; ``chefer`` is named even before it exists, so its absence fails."""

VARIANTS = [(name, False) for name in timm_zoo.SPECS] + [(name, True) for name in timm_zoo.DYNAMO]
NO_ATTENTION = {"convnext", "mixer", "poolformer", "resnetv2", "nf"}  # families


def images(spec: timm_zoo.Spec, count: int = 2) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((count, 3, spec.image, spec.image)).astype(np.float32)


def compile_timed(path: str, label: str, **options) -> onnx.ModelProto:
    began = time.perf_counter()
    compiled = agf_onnx.compile(path, **options)
    print(f"\ncompile {label}: {time.perf_counter() - began:.1f} s")  # issue 10 asks for < 30 s on 2 cores
    return compiled


def check_explains(original: onnx.ModelProto, compiled: onnx.ModelProto, batch: np.ndarray,
                   known: KnownLimit | None = None) -> np.ndarray:
    """Original outputs bit-identical (no ORT fusions); finite [N, 1, H, W] maps; each image's top and
    lowest class give different maps. Returns the top-class maps and the top classes. A ``known``
    limit of kind ``same-map`` excuses the last check alone, strictly (``KnownLimit.excuse``)."""
    if [o.version for o in original.opset_import if o.domain in ("", "ai.onnx")] != [17]:
        original = passes.canonicalise(modelfile.load(original))  # dynamo exports may stay at opset 18
    before = run(original, {"x": batch}, optimize=False)
    explain = session(compiled, optimize=False)
    names = [o.name for o in explain.get_outputs()]
    top = dict(zip(names, explain.run(names, {"x": batch, "target": np.full(len(batch), -1)})))  # top classes
    for name, value in before.items():
        assert np.array_equal(top[name], value), f"original output {name} changed"
    scores = before[original.graph.output[0].name].reshape(len(batch), -1)
    lowest = scores.argmin(1).astype(np.int64)
    assert (lowest != scores.argmax(1)).all()
    low = dict(zip(names, explain.run(names, {"x": batch, "target": lowest})))
    for maps in (top["heatmap"], low["heatmap"]):
        assert maps.shape == (len(batch), 1, *batch.shape[2:]) and np.isfinite(maps).all()
    difference = np.abs(top["heatmap"] - low["heatmap"]).reshape(len(batch), -1).max(1)
    if known is not None and known.kind == "same-map":
        known.excuse(not (difference > 1e-3).all())
    assert (difference > 1e-3).all(), f"top and lowest class give the same map (max difference {difference})"
    return top["heatmap"], scores.argmax(1)


def saliency_oracle(spec: timm_zoo.Spec, batch: np.ndarray, targets: np.ndarray,
                    dtype: torch.dtype = torch.float64) -> np.ndarray:
    """``Σ_c |∂y_t/∂x| / max |∂y_t/∂x|`` per image, by ``torch.autograd`` through the timm model."""
    model = timm_zoo.build(spec).to(dtype)
    x = torch.from_numpy(batch).to(dtype).requires_grad_()
    logits = model(x)
    logits[torch.arange(len(batch)), torch.from_numpy(targets)].sum().backward()
    return oracle.heatmap(x.grad.abs()).numpy()


def assert_saliency_matches(spec: timm_zoo.Spec, batch: np.ndarray, targets: np.ndarray, maps: np.ndarray) -> None:
    """The compiled map is as close to the float64 gradient as PyTorch's own float32 autograd is (twice its
    error, at least 1e-4): BiT's GroupNorm over 2×2 maps makes float32 gradients differ by a few 1e-2."""
    exact = saliency_oracle(spec, batch, targets)
    single = saliency_oracle(spec, batch, targets, torch.float32)
    tolerance = np.maximum(2 * np.abs(single - exact).reshape(len(batch), -1).max(1), 1e-4)
    error = np.abs(maps - exact).reshape(len(batch), -1).max(1)
    assert (error <= tolerance).all(), f"saliency off by {error} (float32 autograd: {tolerance / 2})"


def chefer_oracle(spec: timm_zoo.Spec, batch: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Chefer, Gur, Wolf (ICCV 2021) on the timm ViT in float64, from the definition (spec, "Chefer"):
    ``Ā = mean_heads(relu(∇A ⊙ A))`` per block, ``R = I``, ``R ← R + Ā R`` in forward order, the class
    token's row over the patch tokens, on the patch grid, bilinearly upsampled (half-pixel), / max."""
    model = timm_zoo.build(spec).double()
    attentions = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        attentions.append(output)

    hooks = []
    for block in model.blocks:
        block.attn.fused_attn = False  # the explicit softmax(q kᵀ) path, whose attn_drop sees A
        hooks.append(block.attn.attn_drop.register_forward_hook(keep))
    logits = model(torch.from_numpy(batch).double())
    logits[torch.arange(len(batch)), torch.from_numpy(targets)].sum().backward()
    for hook in hooks:
        hook.remove()
    tokens = attentions[0].shape[-1]
    rollout = torch.eye(tokens, dtype=torch.float64).expand(len(batch), tokens, tokens)
    for attention in attentions:
        weighted = (attention.grad * attention).clamp(min=0).mean(1)
        rollout = rollout + weighted @ rollout
    prefix = model.num_prefix_tokens
    side = int(round((tokens - prefix) ** 0.5))
    grid = rollout[:, 0, prefix:].reshape(len(batch), 1, side, side)
    upsampled = torch.nn.functional.interpolate(grid, size=batch.shape[2:], mode="bilinear", align_corners=False)
    return (upsampled / upsampled.flatten(1).amax(1).reshape(-1, 1, 1, 1)).detach().numpy()


@dataclasses.dataclass(frozen=True)
class KnownLimit:
    """A (family, method) pair that does not meet the contract yet, and the one check it fails:
    ``same-map`` (top and lowest class give the same map on some image) or ``refused`` (the compile
    is refused with a message matching ``refusal``)."""

    kind: str
    reason: str
    refusal: str = ""

    def excuse(self, reproduced: bool) -> None:
        """Strict and narrow: the excused failure must happen (else the limit is gone and this fails,
        asking for its removal); then the test is an expected failure at this check, after every
        other check of the test passed."""
        assert reproduced, f"known limit no longer reproduces ({self.reason}): remove it from KNOWN_LIMITS"
        pytest.xfail(self.reason)


#: (family, method) → the check its maps fail and why (README, "Token models on the built-in benchmark" and
#: "Methods"): the full token rule's residual term, the class-token-free rollout and RAP on LeViT can be
#: class-independent, and RAP's first step needs a Gemm/MatMul head (BiT's is a 1×1 Conv). EfficientFormer's
#: RAP, listed until the residual sums were split by magnitude, now passes (`-m slow`)
KNOWN_LIMITS = {
    ("vit", "agf-full"): KnownLimit("same-map", "the full token rule's residual term can dominate: same map for "
                                                "every class on one image"),
    ("deit", "agf-full"): KnownLimit("same-map", "the full token rule's residual term can dominate: same map for "
                                                 "every class on one image"),
    ("efficientformer", CHEFER): KnownLimit("same-map", "no class token: the mean of the rollout's rows is dominated "
                                                        "by its identity"),
    ("levit", "rap"): KnownLimit("same-map", "RAP's map of one image is the same for its top and lowest class "
                                             "on LeViT-128S (max difference 4e-5), also with the magnitude split "
                                             "at residual sums"),
    ("resnetv2", "rap"): KnownLimit("refused", "RAP's first step needs a Gemm/MatMul computing the logits; BiT's "
                                               "head is a 1×1 Conv", refusal="needs a Gemm or MatMul|starts at a"),
}


def refusal_pattern(spec: timm_zoo.Spec) -> str | None:
    """What a refusal of ``chefer`` must say: no attention, or that the rollout does not apply (windows,
    a shrinking or re-folded token set); None: it compiles."""
    if spec.family in NO_ATTENTION:
        return "(?i)attention"
    return "(?i)rollout" if spec.tokens_change else None


@pytest.mark.slow
@pytest.mark.parametrize("method", ALL_METHODS + ["agf-full"])
@pytest.mark.parametrize("name, dynamo", VARIANTS, ids=[f"{n}-{'dynamo' if d else 'ts'}" for n, d in VARIANTS])
def test_timm_family_compiles_and_explains(name, dynamo, method):
    spec = timm_zoo.SPECS[name]
    check_family(spec, timm_zoo.export_path(spec, dynamo), method,
                 f"{name} ({'dynamo' if dynamo else 'TorchScript'}) --method {method}", chefer_atol=1e-3)


def check_family(spec: timm_zoo.Spec, path: str, method: str, label: str, chefer_atol: float) -> None:
    """Compile ``path`` with ``method`` and check its maps (``check_explains``; the gradient against
    ``torch.autograd``, Chefer's rollout against its oracle), or check that ``chefer`` is refused where
    the rollout does not apply. A known limit excuses its one check, strictly."""
    known = KNOWN_LIMITS.get((spec.family, method))
    options = {"method": "agf", "flat_policy": "none"} if method == "agf-full" else {"method": method}
    if method == CHEFER and refusal_pattern(spec):
        with pytest.raises(agf_onnx.CompileError, match=refusal_pattern(spec)):
            agf_onnx.compile(path, **options)
        return
    if known is not None and known.kind == "refused":
        with pytest.raises(agf_onnx.CompileError, match=known.refusal) as refused:
            agf_onnx.compile(path, **options)
        known.excuse(refused.value is not None)
    compiled = compile_timed(path, label, **options)
    batch = images(spec)
    maps, targets = check_explains(onnx.load(path), compiled, batch, known)  # targets from the same run: near ties
    if method == "gradient":
        assert_saliency_matches(spec, batch, targets, maps)
    if method == CHEFER:
        np.testing.assert_allclose(maps, chefer_oracle(spec, batch, targets), atol=chefer_atol)


def test_ci_has_a_representative_of_every_family():
    """The families of the slow sweep (the README's coverage table) each have a tiny model in CI."""
    assert set(timm_zoo.TINY) == {spec.family for spec in timm_zoo.SPECS.values()}
    for spec in timm_zoo.TINY.values():
        assert dict(spec.kwargs).get("num_classes") == 10 and spec.image <= 224


#: CI's methods on every family's tiny model: AGF, the gradient (checked against torch.autograd through
#: the timm model itself: the gradient stream of the whole real graph) and Chefer's rollout (its oracle,
#: or its refusal where the rollout has no meaning)
CI_METHODS = ["agf", "gradient", CHEFER]


@pytest.mark.parametrize("method", CI_METHODS)
@pytest.mark.parametrize("family", sorted(timm_zoo.TINY))
def test_tiny_timm_family(family, method):
    """One small representative of every architecture family, seeded, TorchScript export: seconds each."""
    spec = timm_zoo.TINY[family]
    check_family(spec, timm_zoo.export_path(spec), method, f"tiny {family} --method {method}", chefer_atol=1e-4)


def test_chefer_refuses_a_changing_token_set():
    """Swin's windows and patch merging have no standard rollout: a clear refusal, not a wrong map."""
    path = timm_zoo.export_path(timm_zoo.TINY["swin"])
    with pytest.raises(agf_onnx.CompileError, match="(?i)no standard rollout"):
        agf_onnx.compile(path, method=CHEFER)
