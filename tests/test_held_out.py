"""Graphs found by the held-out sweeps of issue 26: BEiT's relative position bias (Hugging Face
``BeitForImageClassification``: the compiled model did not run), attention written with
``Einsum`` (Chefer et al.'s reference ViT, Hugging Face's CvT), convolutional q/k/v projections
(CvT; Grad-CAM was identically 0 for every class). Each exported with ``torch.onnx`` (TorchScript);
the compiled model keeps the original outputs bit-identical, gives finite maps that differ between
the top and the lowest class, or refuses by name where the method cannot apply."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import agf_onnx
from agf_onnx.errors import CompileError

from . import token_models as tm
from .runtime import run

IMAGE = 32


class _Logits(nn.Module):
    """A Hugging Face image classifier as ``x → logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _export(net: nn.Module) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.randn(2, 3, IMAGE, IMAGE),), buffer, dynamo=False, input_names=["x"],
                          output_names=["y"], opset_version=17, dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return onnx.load_from_string(buffer.getvalue())


def beit() -> onnx.ModelProto:
    from transformers import BeitConfig, BeitForImageClassification

    torch.manual_seed(0)
    config = BeitConfig(image_size=IMAGE, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, num_labels=10, use_relative_position_bias=True)
    return _export(_Logits(BeitForImageClassification(config)))


def cvt(stride_kv: int) -> onnx.ModelProto:
    from transformers import CvtConfig, CvtForImageClassification

    torch.manual_seed(0)  # depth[i] > i: Hugging Face's CvtStage indexes its drop-path rates by the stage
    config = CvtConfig(embed_dim=[8, 16, 16], num_heads=[1, 2, 2], depth=[1, 2, 3], num_labels=10,
                       stride_kv=[stride_kv] * 3)
    return _export(_Logits(CvtForImageClassification(config)))


class EinsumAttention(tm.Attention):
    """Chefer et al.'s reference ViT attention: ``einsum('bhid,bhjd->bhij')``, softmax, ``einsum('bhij,bhjd->bhid')``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        _, q, k, v = self.split(x)
        attention = (torch.einsum("bhid,bhjd->bhij", q, k) * self.scale).softmax(-1)
        return self.proj(torch.einsum("bhij,bhjd->bhid", attention, v).transpose(1, 2).reshape(b, n, c))


class ConvProjectionAttention(tm.Attention):
    """CvT's attention on one token set: q, k and v each a depthwise 3×3 conv + BatchNorm over the
    patch grid (the class token passed beside it), then the heads as timm splits them."""

    def __init__(self, dim: int, heads: int, grid: int) -> None:
        super().__init__(dim, heads)
        self.grid = grid
        self.project = nn.ModuleList(nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim), nn.BatchNorm2d(dim))
                                     for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        cls, patches = x[:, :1], x[:, 1:].transpose(1, 2).reshape(b, c, self.grid, self.grid)
        q, k, v = (torch.cat([cls, conv(patches).flatten(2).transpose(1, 2)], 1)
                   .reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for conv in self.project)
        return self.proj((self.weights(q, k) @ v).transpose(1, 2).reshape(b, n, c))


def vit_with(attention: type) -> tm.ViT:
    net = tm.vit(0)
    for block in net.blocks:
        replaced = attention(16, 2, net.grid) if attention is ConvProjectionAttention else attention(16, 2)
        replaced.qkv, replaced.proj = block.attn.qkv, block.attn.proj
        block.attn = replaced
    for name, parameter in net.named_parameters():  # the projections' own weights, seeded
        if ".project." in name:
            parameter.data = torch.randn(parameter.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3 + \
                (1.0 if name.endswith("1.weight") else 0.0)
    return net.eval()


def explained(model: onnx.ModelProto, method: str) -> tuple[np.ndarray, np.ndarray]:
    """The maps of the top and the lowest class, after checking the original outputs and finiteness."""
    compiled = agf_onnx.compile(model, method=method)
    x = tm.images(2, seed=5).numpy()
    top = run(compiled, {"x": x, "target": np.full(2, -1, np.int64)}, optimize=False)
    for output, value in run(model, {"x": x}, optimize=False).items():
        assert np.array_equal(top[output], value), f"original output {output} changed"
    lowest = top[model.graph.output[0].name].argmin(axis=1)
    low = run(compiled, {"x": x, "target": lowest}, optimize=False)
    for maps in (top["heatmap"], low["heatmap"]):
        assert maps.shape == (2, 1, IMAGE, IMAGE) and np.isfinite(maps).all()
    assert np.abs(top["heatmap"] - low["heatmap"]).max() > 1e-3, f"{method}: top and lowest class give the same map"
    return top["heatmap"], low["heatmap"]


@pytest.mark.parametrize("method", ["agf", "gradcam", "chefer"])
def test_beit_relative_position_bias(method):
    """The bias table gathered by a relative position index computed from shapes: its Reshape read the
    folded index where it wanted the folded target (one name for both), and did not run."""
    explained(beit(), method)


@pytest.mark.parametrize("method", ["agf", "lrp", "chefer"])
def test_einsum_attention_is_the_matmul_attention(method):
    einsum, matmul = tm.export(vit_with(EinsumAttention)), tm.export(tm.vit(0))
    assert sum(n.op_type == "Einsum" for n in einsum.graph.node) == 4
    maps, _ = explained(einsum, method)
    reference, _ = explained(matmul, method)
    for sample in range(2):
        assert np.corrcoef(maps[sample].reshape(-1), reference[sample].reshape(-1))[0, 1] >= 0.9999


@pytest.mark.parametrize("method", ["chefer", "gradcam", "agf"])
def test_convolutional_projections(method):
    explained(tm.export(vit_with(ConvProjectionAttention)), method)


def test_cvt_gradcam_is_not_zero_and_chefer_is_refused_by_name():
    """Hugging Face's CvT (strided k/v projections, three stages, a class token in the last): Grad-CAM
    chose the last block's query projection, whose patch outputs never reach the class token's
    logits (a zero gradient); chefer cannot apply where keys are fewer than queries."""
    model = cvt(stride_kv=2)
    explained(model, "gradcam")
    with pytest.raises(CompileError, match="64 queries for 16 keys"):
        agf_onnx.compile(model, method="chefer")
    with pytest.raises(CompileError, match="token set changes between blocks"):
        agf_onnx.compile(cvt(stride_kv=1), method="chefer")


class Padded(nn.Module):
    """Two 3×3 convs, each behind ``F.pad(mode=...)`` (reflect: style and image-to-image nets;
    replicate: a TF-converted ResNet's edge padding; circular), global pooling, a Linear head."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.mode = mode
        self.conv1, self.conv2, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(F.pad(x, (1, 2, 1, 1), mode=self.mode)))
        x = torch.relu(self.conv2(F.pad(x, (1, 1, 2, 1), mode=self.mode)))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_pad_modes_compile_end_to_end(mode):
    model = _export(Padded(mode))
    assert any(n.op_type == "Pad" for n in model.graph.node) or mode == "circular"  # circular: Slice + Concat
    explained(model, "agf")
    explained(model, "lrp")
