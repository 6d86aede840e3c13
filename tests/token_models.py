"""Small token models and normalised CNNs from plain ``torch.nn`` (no timm), seeded, float64-capable.

The architectures of issue 10 in miniature, written the way timm writes them so that their
ONNX exports have the same shape of graph:

- ``ViT``: Conv patch embedding (32×32 image, 8×8 patches → a 4×4 grid of 16 tokens), an
  optional class token, a learned position embedding, pre-norm blocks
  ``x + Attention(LN(x))``, ``x + MLP(LN(x))`` with timm's attention
  (``qkv(x).reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4)``, ``softmax(q kᵀ · d^-½) v``,
  ``proj``) and an exact-GELU MLP, then a final LayerNorm and class-token pooling (``pool="cls"``)
  or mean pooling over the tokens followed by timm's ``fc_norm`` (``pool="mean"``), and a Linear
  head. ``attention="torch"`` swaps timm's attention for ``torch.nn.MultiheadAttention``
  (``batch_first``, ``need_weights=False``, i.e. ``scaled_dot_product_attention`` inside).
- ``ConvNeXt``: stem Conv 4×4/4 → LayerNorm2d, blocks ``x + permute⁻¹(γ ⊙ Linear(GELU(Linear(
  LN(permute(dwconv7×7(x)))))))``, a LayerNorm2d + Conv 2×2/2 downsampling between the two
  stages, global average pool → LayerNorm → Linear head.
- ``GroupNormCNN``: a ResNet-like CNN with GroupNorm in place of BatchNorm: stem conv → GN →
  ReLU, a residual block with identity skip, a residual block with stride 2 and a 1×1 conv + GN
  downsampling skip, global average pool, Linear head.

``seeded`` draws every parameter from one generator; ``export`` is ``torch.onnx.export`` with a
dynamic batch (TorchScript at opset 17, dynamo at a chosen opset or its own default).
"""

from __future__ import annotations

import io
import warnings

import onnx
import torch
import torch.nn.functional as F
from torch import nn

IMAGE = 32


# -- ViT -----------------------------------------------------------------------------------------
class Attention(nn.Module):
    """timm's ``Attention``: one qkv Linear, heads split by reshape/permute, softmax(q kᵀ·s) v, proj."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(qkv output, q, k, v)`` with q, k, v of shape ``[B, heads, N, d]``."""
        b, n, c = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv.reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return qkv, q, k, v

    def weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The attention matrix ``A = softmax(q kᵀ · s)``, ``[B, heads, N, N]``."""
        return (q @ k.transpose(-2, -1) * self.scale).softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        _, q, k, v = self.split(x)
        return self.proj((self.weights(q, k) @ v).transpose(1, 2).reshape(b, n, c))


class TorchAttention(nn.Module):
    """``nn.MultiheadAttention`` used as self-attention, batch first, without returning weights."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2, attention: str = "timm") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads) if attention == "timm" else TorchAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A tiny ViT: patch embedding, class token or not, position embedding, blocks, pooling, head."""

    def __init__(self, dim: int = 16, depth: int = 2, heads: int = 2, patch: int = 8, image: int = IMAGE,
                 classes: int = 10, pool: str = "cls", attention: str = "timm") -> None:
        super().__init__()
        if pool not in ("cls", "mean") or attention not in ("timm", "torch"):
            raise ValueError(f"pool {pool!r}, attention {attention!r}")
        self.pool, self.grid = pool, image // patch
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2 + (pool == "cls"), dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, attention=attention) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim) if pool == "cls" else nn.Identity()
        self.fc_norm = nn.LayerNorm(dim) if pool == "mean" else nn.Identity()
        self.head = nn.Linear(dim, classes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``[B, T, C]`` (class token first when there is one) plus the position embedding."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        return x + self.pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.blocks(self.tokens(x)))
        x = x[:, 0] if self.pool == "cls" else x.mean(1)
        return self.head(self.fc_norm(x))


# -- ConvNeXt ------------------------------------------------------------------------------------
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (timm's: permute, layer_norm, permute back)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """dwconv 7×7 → NHWC → LayerNorm → Linear 4C → GELU → Linear C → ·γ → NCHW, plus the input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.norm(self.conv_dw(x).permute(0, 2, 3, 1))
        return x + (self.gamma * self.mlp(branch)).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """Two stages (8×8 and 4×4 maps for a 32×32 image) of ``ConvNeXtBlock``s."""

    def __init__(self, dims=(8, 16), depths=(1, 1), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0]))
        self.stages = nn.ModuleList()
        for index, (dim, depth) in enumerate(zip(dims, depths)):
            down = [] if index == 0 else [LayerNorm2d(dims[index - 1]), nn.Conv2d(dims[index - 1], dim, 2, 2)]
            self.stages.append(nn.Sequential(*down, *[ConvNeXtBlock(dim) for _ in range(depth)]))
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(self.norm(x.mean((2, 3))))


# -- GroupNorm CNN -------------------------------------------------------------------------------
class GroupNormBlock(nn.Module):
    """torchvision's BasicBlock with GroupNorm: conv → GN → ReLU → conv → GN, + skip, ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, groups: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.gn1 = nn.GroupNorm(groups, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(groups, planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.GroupNorm(groups, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.gn2(self.conv2(torch.relu(self.gn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class GroupNormCNN(nn.Module):
    def __init__(self, width: int = 8, groups: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.gn1 = nn.GroupNorm(groups, width)
        self.blocks = nn.Sequential(GroupNormBlock(width, width, 1, groups),
                                    GroupNormBlock(width, 2 * width, 2, groups))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.gn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# -- construction and export ---------------------------------------------------------------------
def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter drawn from one seeded generator, scaled so activations stay O(1); eval mode.

    Conv/Linear: He-normal weights, small biases; norms: affine parameters near (1, 0); class
    token, position embedding: N(0, 0.3²) (large enough to matter); layer-scale γ: 0.3 ± 0.1
    (timm's 1e-6 would make the blocks vanish)."""
    generator = torch.Generator().manual_seed(seed)

    def normal(shape, std, mean=0.0):
        return mean + std * torch.randn(shape, generator=generator)

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.weight.data = normal(module.weight.shape, (2.0 / module.weight[0].numel()) ** 0.5)
            if module.bias is not None:
                module.bias.data = normal(module.bias.shape, 0.05)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            module.weight.data = normal(module.weight.shape, 0.1, 1.0)
            module.bias.data = normal(module.bias.shape, 0.1)
        elif isinstance(module, nn.MultiheadAttention):
            module.in_proj_weight.data = normal(module.in_proj_weight.shape, (2.0 / module.embed_dim) ** 0.5)
            module.in_proj_bias.data = normal(module.in_proj_bias.shape, 0.05)
        if isinstance(module, ViT):
            if module.cls_token is not None:
                module.cls_token.data = normal(module.cls_token.shape, 0.3)
            module.pos_embed.data = normal(module.pos_embed.shape, 0.3)
        if isinstance(module, ConvNeXtBlock):
            module.gamma.data = normal(module.gamma.shape, 0.1, 0.3)
    return model.eval()


def vit(seed: int = 0, **options) -> ViT:
    return seeded(ViT(**options), seed)


def convnext(seed: int = 0, **options) -> ConvNeXt:
    return seeded(ConvNeXt(**options), seed)


def groupnorm_cnn(seed: int = 0, **options) -> GroupNormCNN:
    return seeded(GroupNormCNN(**options), seed)


def images(batch: int, seed: int = 0, size: int = IMAGE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def export(model: nn.Module, image: int = IMAGE, *, dynamo: bool = False, opset: int | None = None) -> onnx.ModelProto:
    """``torch.onnx.export`` with a dynamic batch, input ``x``: TorchScript (output ``y``) at ``opset``
    (default 17), or dynamo at ``opset`` (default: the exporter's own, as a user gets it: 20 with
    torch 2.13, where GELU is one ``Gelu`` node; at 18 it is written with Erf; asking for 17 fails in
    its version converter on ReduceMean's axes input)."""
    model = model.eval()
    example = torch.randn(2, 3, image, image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            options = {} if opset is None else {"opset_version": opset}
            program = torch.onnx.export(model, (example,), dynamo=True, input_names=["x"], optimize=True,
                                        dynamic_shapes={"x": {0: torch.export.Dim("N")}}, verbose=False, **options)
            return program.model_proto
        buffer = io.BytesIO()
        torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=opset or 17)
    return onnx.load_from_string(buffer.getvalue())


MODELS = {  # name: builder; the test ids
    "vit": lambda: vit(0),
    "vit-mean": lambda: vit(1, pool="mean"),
    "vit-mha": lambda: vit(2, attention="torch"),
    "convnext": lambda: convnext(3),
    "groupnorm": lambda: groupnorm_cnn(4),
}
