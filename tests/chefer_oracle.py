"""Chefer, Gur & Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers" (ICCV 2021), from its definition in ``../shared/agf-spec.md``, for
the ViTs of ``token_models.py``; and Grad-CAM on a token tensor.

This is the ICCV 2021 variant (gradient ⊙ attention), not the CVPR 2021 one ("Transformer
Interpretability Beyond Attention Visualization", which weights ∇A by the LRP relevance of A):

    Ā_b = mean_heads( relu(∇A_b ⊙ A_b) )     ∇A_b = ∂y_t/∂A_b, y_t the target *logit*
    R   = I (tokens × tokens);  R = R + Ā_b R  for the blocks b in forward order
    map = R[cls, patches]  (class token), or  mean_rows(R)  (no class token: every token a patch)

reshaped to the patch grid, bilinearly upsampled to the image (``align_corners=False``) and
divided by its per-sample maximum (a zero map stays zero).

Grad-CAM on tokens: with ``T`` the block output ``[N, tokens, C]``, the class token dropped and
the patch tokens laid out on their grid as ``[N, C, g, g]``: ``relu(Σ_c mean_{grid}(∂y_t/∂T)_c ·
T_c)``, bilinearly upsampled, divided by its per-sample maximum |·| (as Captum's LayerGradCam
followed by ``oracle.heatmap``-style normalisation in ``test_methods.gradcam_oracle``).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .oracle_tokens import forward
from .token_models import ViT


def _target_logit(logits, target):
    target = logits.argmax(1) if target is None else torch.as_tensor(target).expand(logits.shape[0])
    target = torch.where(target < 0, logits.argmax(1), target)
    return logits.gather(1, target[:, None]).sum()


def _upsample(grid_map, size):
    """``[N, g·g]`` on the patch grid → ``[N, 1, H, W]`` (bilinear, align_corners=False)."""
    n, tokens = grid_map.shape
    side = int(round(tokens ** 0.5))
    return F.interpolate(grid_map.reshape(n, 1, side, side), size=size, mode="bilinear", align_corners=False)


def _divide_by_peak(maps, peak):
    peak = peak.reshape(-1, 1, 1, 1)
    return torch.where(peak > 0, maps / torch.where(peak > 0, peak, torch.ones_like(peak)), torch.zeros_like(maps))


def _run(model: ViT, images, target, dtype):
    model = copy.deepcopy(model).to(dtype).eval()
    x = images.to(dtype).detach().requires_grad_(True)
    record = forward(model, x)
    _target_logit(record["logits"], target).backward()
    return model, record


def rollout(model: ViT, images: torch.Tensor, target=None, dtype=torch.float64) -> torch.Tensor:
    """The token-relevance matrix ``R`` ``[N, tokens, tokens]`` after the last block."""
    _, record = _run(model, images, target, dtype)
    blocks = [block["attn"]["a"] for block in record["blocks"]]
    n, _, tokens, _ = blocks[0].shape
    relevance = torch.eye(tokens, dtype=dtype).expand(n, tokens, tokens)
    for a in blocks:  # forward order
        weighted = torch.relu(a.grad * a).mean(1).detach()
        relevance = relevance + weighted @ relevance
    return relevance


def chefer(model: ViT, images: torch.Tensor, target=None, dtype=torch.float64) -> torch.Tensor:
    """The Chefer (ICCV 2021) map ``[N, 1, H, W]`` of the ViT ``model`` for class ``target`` (default: top)."""
    relevance = rollout(model, images, target, dtype)
    row = relevance[:, 0, 1:] if model.cls_token is not None else relevance.mean(1)
    maps = _upsample(row, tuple(images.shape[2:]))
    return _divide_by_peak(maps, maps.flatten(1).max(1).values).detach()


def token_gradcam(model: ViT, images: torch.Tensor, target=None, block: int = -1, dtype=torch.float64,
                  tensor: str = "x2") -> torch.Tensor:
    """Grad-CAM ``[N, 1, H, W]`` at the output of ``model.blocks[block]`` (``tensor="x1"``: its attention
    residual ``x + attn(norm1(x))``), the patch tokens on their grid."""
    model, record = _run(model, images, target, dtype)
    tokens = record["blocks"][block][tensor]
    activation, gradient = tokens.detach(), tokens.grad
    if model.cls_token is not None:
        activation, gradient = activation[:, 1:], gradient[:, 1:]
    weights = gradient.mean(1, keepdim=True)  # [N, 1, C]: the mean over the grid
    cam = torch.relu((weights * activation).sum(2))  # [N, g·g]
    maps = _upsample(cam, tuple(images.shape[2:]))
    return _divide_by_peak(maps, maps.flatten(1).abs().max(1).values).detach()
