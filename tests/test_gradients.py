"""One gradient check per registered op, generated from the registry.

Each case is a one-node ONNX model (built with ``onnx.helper``, so every attribute can be set)
and the same op written in PyTorch. The emitted gradient graph (``gradient_model``) runs in ONNX
Runtime; ``torch.autograd`` in float64 is the oracle. A registered op without a case fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from agf_onnx.rules import REGISTRY
from onnx import TensorProto, helper, numpy_helper

from agf_onnx.compiler.emit import gradient_model

from .runtime import run

RNG = np.random.default_rng(0)


def weights(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


@dataclass
class Case:
    op: str
    shape: tuple  # of the data input x, batch first
    reference: object  # torch function of (x, *constants)
    attrs: dict = field(default_factory=dict)
    constants: list = field(default_factory=list)  # numpy arrays, inputs after x ("" = omitted)
    data_inputs: int = 1  # x fed this many times (Add(x, x), Sum(x, x, c))
    id: str = ""
    outputs: int = 1  # node outputs; the check differentiates the first
    #: shapes (batch first) of several different data operands: x is then [N, Σ sizes], split and
    #: reshaped into them in front of the node, and the reference gets them as its first arguments
    operands: list = field(default_factory=list)
    order: str = ""  # the node's inputs as data 'x' and constants 'c' (default: all data first)
    positive: bool = False  # x drawn from |N(0, 1)| + 0.5 (Sqrt, Pow by a fraction, a divisor)
    opset: int = 17  # of the one-node model: the op in that opset's form


def _pad(x, pads):  # ONNX begin/end pads (2-D) → F.pad order
    return F.pad(x, (pads[1], pads[3], pads[0], pads[2]))


CASES = [
    Case("Conv", (2, 3, 9, 8), lambda x, w, b: F.conv2d(x, w, b), constants=[weights(4, 3, 3, 3), weights(4)],
         id="plain"),
    Case("Conv", (2, 3, 9, 8), lambda x, w: F.conv2d(_pad(x, [1, 0, 2, 1]), w, stride=2, dilation=(1, 2)),
         attrs=dict(strides=[2, 2], pads=[1, 0, 2, 1], dilations=[1, 2]), constants=[weights(5, 3, 3, 3)],
         id="stride-asymmetric-pad-dilation"),
    Case("Conv", (2, 4, 10, 10), lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1, groups=2),
         attrs=dict(strides=[2, 2], pads=[1, 1, 1, 1], group=2), constants=[weights(6, 2, 3, 3), weights(6)],
         id="groups"),
    Case("Conv", (2, 3, 7, 7), lambda x, w: F.conv2d(F.pad(x, (0, 1, 0, 1)), w, stride=2),
         attrs=dict(strides=[2, 2], auto_pad="SAME_UPPER"), constants=[weights(2, 3, 2, 2)], id="same-upper"),
    Case("Conv", (2, 3, 8, 8), lambda x, w: F.conv2d(x, w, stride=3), attrs=dict(strides=[3, 3]),
         constants=[weights(2, 3, 3, 3)], id="uncovered-rows"),
    # stride 1: the VJP is a conv with the flipped, transposed kernel
    Case("Conv", (2, 3, 9, 8), lambda x, w: F.conv2d(_pad(x, [2, 0, 1, 1]), w, dilation=(2, 1)),
         attrs=dict(pads=[2, 0, 1, 1], dilations=[2, 1]), constants=[weights(5, 3, 3, 2)], id="stride1-asymmetric-dilation"),
    Case("Conv", (2, 4, 7, 7), lambda x, w: F.conv2d(x, w, padding=1, groups=2),
         attrs=dict(pads=[1, 1, 1, 1], group=2), constants=[weights(6, 2, 3, 3)], id="stride1-groups"),
    Case("Conv", (2, 4, 7, 7), lambda x, w: F.conv2d(x, w, padding=2, groups=4),
         attrs=dict(pads=[2, 2, 2, 2], group=4), constants=[weights(8, 1, 5, 5)], id="stride1-depthwise-multiplier"),
    Case("Conv", (2, 3, 6, 6), lambda x, w: F.conv2d(F.pad(x, (0, 1, 0, 1)), w),
         attrs=dict(auto_pad="SAME_UPPER"), constants=[weights(2, 3, 2, 2)], id="stride1-same-upper"),
    Case("Conv", (2, 3, 6, 6), lambda x, w: F.conv2d(x, w, padding=1), attrs=dict(pads=[1, 1, 1, 1]),
         constants=[weights(2, 3, 1, 1)], id="pointwise-padded"),
    # strided grouped convs: a conv over G spread with zeros
    Case("Conv", (2, 4, 7, 7), lambda x, w: F.conv2d(x, w, stride=2, padding=1, groups=4),
         attrs=dict(strides=[2, 2], pads=[1, 1, 1, 1], group=4), constants=[weights(4, 1, 3, 3)],
         id="depthwise-stride2-odd"),
    Case("Conv", (2, 4, 11, 9), lambda x, w: F.conv2d(x, w, stride=(3, 2), groups=2),
         attrs=dict(strides=[3, 2], group=2), constants=[weights(6, 2, 3, 3)], id="grouped-stride3-uncovered"),
    # strided depthwise convs: a stride-1 conv over G spread with zeros
    Case("Conv", (2, 4, 8, 8), lambda x, w: F.conv2d(F.pad(x, (0, 1, 0, 1)), w, stride=2, groups=4),
         attrs=dict(strides=[2, 2], pads=[0, 0, 1, 1], group=4), constants=[weights(4, 1, 3, 3)],
         id="depthwise-stride2-same-upper"),
    Case("Conv", (2, 3, 10, 9), lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=2, groups=3),
         attrs=dict(strides=[2, 2], pads=[2, 2, 2, 2], group=3), constants=[weights(3, 1, 5, 5), weights(3)],
         id="depthwise-stride2-5x5-bias"),
    Case("Conv", (2, 2, 11, 10), lambda x, w: F.conv2d(x, w, stride=(3, 2), dilation=2, groups=2),
         attrs=dict(strides=[3, 2], dilations=[2, 2], group=2), constants=[weights(2, 1, 3, 3)],
         id="depthwise-stride3-dilated-uncovered"),
    Case("Conv", (2, 3, 13), lambda x, w: F.conv1d(x, w, stride=2, padding=1, groups=3),
         attrs=dict(strides=[2], pads=[1, 1], group=3), constants=[weights(3, 1, 3)], id="depthwise-stride2-1d"),
    Case("Conv", (2, 3, 11), lambda x, w: F.conv1d(x, w, padding=1), attrs=dict(pads=[1, 1]),
         constants=[weights(4, 3, 3)], id="stride1-1d"),
    Case("Gemm", (3, 5), lambda x, w, c: 0.5 * x @ w.T + 2.0 * c,
         attrs=dict(transB=1, alpha=0.5, beta=2.0), constants=[weights(4, 5), weights(4)], id="transB-alpha-beta"),
    Case("Gemm", (3, 5), lambda x, w: x @ w, constants=[weights(5, 4)], id="plain"),
    Case("MatMul", (3, 5), lambda x, w: x @ w, constants=[weights(5, 4)]),
    Case("Relu", (2, 3, 4, 4), torch.relu),
    Case("MaxPool", (2, 3, 9, 9), lambda x: F.max_pool2d(x, 3, 2, 1),
         attrs=dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), id="overlapping"),
    Case("MaxPool", (2, 2, 8, 8), lambda x: F.max_pool2d(x, 3, 2, ceil_mode=True),
         attrs=dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1), id="ceil-mode"),
    Case("MaxPool", (2, 2, 6, 6), lambda x: F.max_pool2d(x, 2), attrs=dict(kernel_shape=[2, 2], strides=[2, 2]),
         id="plain"),
    Case("AveragePool", (2, 3, 8, 8), lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
         attrs=dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), id="exclude-pad"),
    Case("AveragePool", (2, 3, 8, 8), lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=True),
         attrs=dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
         id="include-pad"),
    Case("AveragePool", (2, 2, 7, 7), lambda x: F.avg_pool2d(x, 2, 2, ceil_mode=True),
         attrs=dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1), id="ceil-mode"),
    Case("GlobalAveragePool", (2, 3, 5, 4), lambda x: x.mean((2, 3), keepdim=True)),
    Case("ReduceMean", (2, 3, 5, 4), lambda x: x.mean((2, 3)), attrs=dict(axes=[2, 3], keepdims=0),
         id="spatial"),
    Case("Flatten", (2, 3, 2, 2), lambda x: x.flatten(1), attrs=dict(axis=1)),
    Case("Reshape", (2, 3, 2, 2), lambda x, s: x.reshape(-1, 6, 2), constants=[np.array([0, 6, 2], np.int64)]),
    Case("Transpose", (2, 4, 5, 3), lambda x: x.permute(0, 3, 1, 2), attrs=dict(perm=[0, 3, 1, 2])),
    Case("BatchNormalization", (2, 3, 4, 4),
         lambda x, g, b, m, v: F.batch_norm(x, m, v, g, b, training=False, eps=1e-3), attrs=dict(epsilon=1e-3),
         constants=[weights(3), weights(3), weights(3), np.abs(weights(3)) + 0.5]),
    Case("Add", (2, 3, 4, 4), lambda x, c: x + c, constants=[weights(1, 3, 1, 1)], id="bias"),
    Case("Add", (2, 3, 4, 4), lambda x: x + x, data_inputs=2, id="residual"),
    Case("Sum", (2, 3, 4, 4), lambda x, c: x + x + c, constants=[weights(3, 1, 1)], data_inputs=2),
    Case("Dropout", (2, 5), lambda x: x),
    Case("Identity", (2, 5), lambda x: x),
    Case("Cast", (2, 5), lambda x: x, attrs=dict(to=TensorProto.FLOAT)),
    Case("Sigmoid", (2, 3, 4, 4), torch.sigmoid),
    Case("Tanh", (2, 3, 4, 4), torch.tanh),
    Case("HardSigmoid", (2, 3, 4, 4), lambda x: torch.clamp(x / 6 + 0.5, 0, 1), attrs=dict(alpha=1 / 6, beta=0.5)),
    Case("HardSwish", (2, 3, 4, 4), F.hardswish),
    Case("LeakyRelu", (2, 3, 4, 4), lambda x: F.leaky_relu(x, 0.1), attrs=dict(alpha=0.1)),
    Case("PRelu", (2, 3, 4, 4), lambda x, s: F.prelu(x, s.reshape(-1)), constants=[weights(3, 1, 1)]),
    Case("Clip", (2, 3, 4, 4), lambda x, lo, hi: F.relu6(x), constants=[np.float32(0), np.float32(6)],
         id="relu6"),
    Case("Clip", (2, 3, 4, 4), lambda x, lo, hi: torch.clamp(x, -0.5, 0.7),
         constants=[np.float32(-0.5), np.float32(0.7)], id="hardtanh"),
    Case("Sub", (2, 3, 4, 4), lambda x, c: x - c, constants=[weights(3, 1, 1)], id="constant"),
    Case("Sub", (2, 3, 4, 4), lambda x: x - x * 1, data_inputs=2, id="data"),
    Case("Mul", (2, 3, 4, 4), lambda x, c: x * c, constants=[weights(1, 3, 1, 1)], id="scale"),
    Case("Mul", (2, 3, 4, 4), lambda x: x * x, data_inputs=2, id="gate"),
    Case("Div", (2, 3, 4, 4), lambda x, c: x / c, constants=[np.float32(6)]),
    Case("Concat", (2, 3, 4, 4), lambda x: torch.cat([x, x], 1), attrs=dict(axis=1), data_inputs=2),
    Case("Split", (2, 5, 4, 4), lambda x, s: torch.split(x, [2, 3], 1)[0], attrs=dict(axis=1),
         constants=[np.array([2, 3], np.int64)], outputs=2),
    Case("Slice", (2, 6, 5, 5), lambda x, *_: x[:, 1:4, :, 2:], constants=[
        np.array([1, 2], np.int64), np.array([4, 100], np.int64), np.array([1, 3], np.int64)]),
    Case("Pad", (2, 3, 4, 4), lambda x, p: F.pad(x, (1, 2, 0, 3)), constants=[np.array([0, 0, 0, 1, 0, 0, 3, 2], np.int64)]),
    Case("Pad", (2, 3, 4, 5), lambda x, p: F.pad(x, (1, 2, 0, 3), mode="replicate"), attrs=dict(mode="edge"),
         constants=[np.array([0, 0, 0, 1, 0, 0, 3, 2], np.int64)], id="edge"),
    Case("Pad", (2, 3, 4, 5), lambda x, p: F.pad(x, (1, 3, 2, 1), mode="reflect"), attrs=dict(mode="reflect"),
         constants=[np.array([0, 0, 2, 1, 0, 0, 1, 3], np.int64)], id="reflect"),
    Case("Pad", (2, 3, 4, 5), lambda x, p: F.pad(x, (1, 2, 0, 3), mode="circular"), attrs=dict(mode="wrap"),
         constants=[np.array([0, 0, 0, 1, 0, 0, 3, 2], np.int64)], opset=19, id="wrap"),
    Case("Pad", (2, 3, 4, 5), lambda x, p, v, a: F.pad(x, (2, 1, 1, 3)), opset=18, id="axes-input",
         constants=[np.array([1, 2, 3, 1], np.int64), np.float32(0), np.array([2, -1], np.int64)]),
    Case("Squeeze", (2, 1, 4), lambda x, a: x.squeeze(1), constants=[np.array([1], np.int64)]),
    Case("Unsqueeze", (2, 4), lambda x, a: x[:, None], constants=[np.array([1], np.int64)]),
    Case("LRN", (2, 7, 3, 3), lambda x: F.local_response_norm(x, 5, 1e-2, 0.75, 2.0),
         attrs=dict(size=5, alpha=1e-2, beta=0.75, bias=2.0)),
    # -- token models: normalisations, attention, gathers (issue 10) --
    Case("LayerNormalization", (2, 5, 8), lambda x, w, c: F.layer_norm(x, (8,), w, c),
         constants=[weights(8), weights(8)], id="last-axis-bias"),
    Case("LayerNormalization", (2, 3, 4, 5), lambda x, w: F.layer_norm(x, (4, 5), w, eps=1e-3),
         attrs=dict(axis=2, epsilon=1e-3), constants=[weights(4, 5)], outputs=3, id="two-axes-no-bias-three-outputs"),
    Case("InstanceNormalization", (2, 3, 4, 5), lambda x, w, c: F.instance_norm(x, weight=w, bias=c, eps=1e-3),
         attrs=dict(epsilon=1e-3), constants=[weights(3), weights(3)]),
    Case("Erf", (2, 3, 4), torch.erf),
    Case("Softmax", (2, 3, 5), lambda x: torch.softmax(x, -1), id="last-axis"),
    Case("Softmax", (2, 3, 5, 2), lambda x: torch.softmax(x, 1), attrs=dict(axis=1), id="axis-1"),
    Case("LogSoftmax", (2, 3, 5), lambda x: torch.log_softmax(x, 1), attrs=dict(axis=1)),
    Case("MatMul", (), lambda a, c: a @ c, operands=[(2, 4, 3), (2, 3, 5)], id="two-data-3d"),
    Case("MatMul", (), lambda a, c: a @ c, operands=[(2, 2, 4, 3), (2, 1, 3, 5)], id="two-data-broadcast"),
    Case("MatMul", (), lambda a, c: a @ c, operands=[(2, 3, 2, 4, 3), (2, 3, 2, 3, 4)],
         id="two-data-5d"),
    Case("MatMul", (2, 3, 4), lambda x, c: c @ x, constants=[weights(5, 3)], order="cx", id="constant-left"),
    Case("Gather", (2, 5, 4), lambda x, i: x[:, 0], constants=[np.array(0, np.int64)], attrs=dict(axis=1),
         id="scalar-cls-token"),
    Case("Gather", (2, 3, 5), lambda x, i: x[:, :, torch.tensor([[1, 4], [0, 2]])],
         constants=[np.array([[1, -1], [0, 2]], np.int64)], attrs=dict(axis=2), id="tensor-negative-last-axis"),
    Case("Gather", (2, 5, 3, 2), lambda x, i: x[:, [3, 3, 0]], constants=[np.array([3, -2, -5], np.int64)],
         attrs=dict(axis=1), id="repeated-middle-axis"),
    Case("Gather", (2, 5, 3, 4), lambda x, i: x[:, :, [2, 0]], constants=[np.array([2, -3], np.int64)],
         attrs=dict(axis=2), id="second-last-axis"),
    Case("GatherElements", (2, 3, 4), lambda x, i: torch.gather(x, 2, torch.from_numpy(i % 4)),
         constants=[np.array(RNG.integers(-4, 4, (2, 3, 6)), np.int64)], attrs=dict(axis=2)),
    Case("Expand", (2, 1, 4), lambda x, s: x.expand(-1, 3, 4), constants=[np.array([1, 3, 4], np.int64)]),
    Case("Expand", (2, 3), lambda x, s: x.expand(4, 2, 3), constants=[np.array([4, 1, 3], np.int64)],
         id="new-leading-axis-moves-the-batch"),
    Case("Tile", (2, 3, 4), lambda x, r: x.repeat(1, 2, 3), constants=[np.array([1, 2, 3], np.int64)]),
    Case("Where", (2, 3, 4), lambda x, c, k: torch.where(torch.from_numpy(c), x, k),
         constants=[RNG.random((3, 4)) > 0.5, weights(1, 4)], order="cxc", id="constant-branch"),
    Case("Where", (), lambda a, e, c: torch.where(torch.from_numpy(c), a, e), operands=[(2, 3, 4), (2, 1, 4)],
         constants=[RNG.random((3, 4)) > 0.5], order="cxx", id="two-data-branches"),
    Case("Pow", (2, 3, 4), lambda x, p: x ** 2, constants=[np.float32(2)], id="square"),
    Case("Pow", (2, 3, 4), lambda x, p: x ** 1.5, constants=[np.float32(1.5)], positive=True, id="fraction"),
    Case("Pow", (2, 3, 4), lambda x, p: x ** 3, constants=[np.array(3, np.int64)], id="integer-exponent"),
    Case("Sqrt", (2, 3, 4), torch.sqrt, positive=True),
    Case("Reciprocal", (2, 3, 4), torch.reciprocal, positive=True),
    Case("Neg", (2, 3, 4), torch.neg),
    Case("Exp", (2, 3, 4), torch.exp),
    Case("Softplus", (2, 3, 4), F.softplus),
    Case("Max", (2, 3, 4), lambda x, c: torch.maximum(x, c), constants=[np.float32(0.1)], id="clamp-min"),
    Case("Min", (2, 3, 4), lambda x, c: torch.minimum(x, c), constants=[weights(4)], id="clamp-max"),
    Case("ReduceMean", (2, 3, 5), lambda x: x.mean(-1, keepdim=True), attrs=dict(axes=[-1]), id="last-axis-keepdims"),
    Case("ReduceSum", (2, 3, 4, 5), lambda x, a: x.sum((1, 3)), constants=[np.array([1, -1], np.int64)],
         attrs=dict(keepdims=0), id="axes-input"),
    Case("ReduceSum", (2, 3, 4), lambda x, a: x.sum(2, keepdim=True), constants=[np.array([2], np.int64)],
         id="keepdims"),
    Case("ReduceMean", (2, 3, 4, 5), lambda x: x.mean((1, 2)), attrs=dict(axes=[-3, 2], keepdims=0),
         id="negative-axes"),
    Case("ReduceL2", (2, 3, 4, 5), lambda x: torch.linalg.vector_norm(x, 2, (2, 3)), attrs=dict(axes=[2, 3], keepdims=0),
         id="opset17-attribute"),
    Case("ReduceL2", (2, 3, 5), lambda x, a: torch.linalg.vector_norm(x, 2, -1, keepdim=True),
         constants=[np.array([-1], np.int64)], opset=18, id="opset18-axes-input"),
    Case("ReduceL1", (2, 3, 5), lambda x: x.abs().sum(1), attrs=dict(axes=[1], keepdims=0)),
    Case("ReduceLogSumExp", (2, 3, 5), lambda x, a: torch.logsumexp(x, (1, 2), keepdim=True),
         constants=[np.array([1, 2], np.int64)], opset=18),
    Case("LpNormalization", (2, 3, 5), lambda x: F.normalize(x, 2, -1), attrs=dict(axis=-1, p=2), id="p2"),
    Case("LpNormalization", (2, 4, 3), lambda x: F.normalize(x, 1, 1), attrs=dict(axis=1, p=1), id="p1"),
    Case("Gelu", (2, 3, 4), F.gelu, opset=20, id="erf"),
    Case("Gelu", (2, 3, 4), lambda x: F.gelu(x, approximate="tanh"), attrs=dict(approximate="tanh"), opset=20,
         id="tanh"),
    Case("Div", (), lambda a, c: a / c, operands=[(2, 3, 4), (2, 3, 1)], positive=True, id="data-divisor"),
    Case("Mul", (), lambda a, c: a * c, operands=[(2, 3, 4), (2, 1, 4)], id="two-data-broadcast"),
    Case("Slice", (2, 6, 7, 5), lambda x, *_: x[:, 0::2, 1::3], constants=[
        np.array([0, 1], np.int64), np.array([100, 100], np.int64), np.array([1, 2], np.int64),
        np.array([2, 3], np.int64)], id="steps-swin-merge"),
    Case("Slice", (2, 7, 5), lambda x, *_: torch.flip(x, [1])[:, 1::2], constants=[
        np.array([-2], np.int64), np.array([-100], np.int64), np.array([1], np.int64), np.array([-2], np.int64)],
         id="negative-step"),
    Case("Slice", (2, 6, 5), lambda x, *_: x[:, 1:5, ::2], constants=[
        np.array([1, 0], np.int64), np.array([5, 5], np.int64), np.array([1, -1], np.int64),
        np.array([1, 2], np.int64)], id="step-and-plain"),
    Case("Einsum", (), lambda q, k: torch.einsum("bhid,bhjd->bhij", q, k), operands=[(2, 3, 4, 5), (2, 3, 6, 5)],
         attrs=dict(equation="bhid,bhjd->bhij"), id="scores"),
    Case("Einsum", (), lambda a, v: torch.einsum("...ij,...jk->...ik", a, v), operands=[(2, 3, 4, 5), (2, 1, 5, 6)],
         attrs=dict(equation="...ij,...jk->...ik"), id="ellipsis-broadcast"),
    Case("Einsum", (), lambda a, c: torch.einsum("bij,bjk->bi", a, c), operands=[(2, 3, 4), (2, 4, 5)],
         attrs=dict(equation="bij,bjk->bi"), id="index-only-in-one-operand"),
    Case("Einsum", (2, 3, 4), lambda x, w: torch.einsum("bij,jk->bik", x, w), constants=[weights(4, 6)],
         attrs=dict(equation="bij, jk -> bik"), id="constant-operand"),
]


def _sizes(case: Case) -> list[int]:
    return [int(np.prod(shape[1:])) for shape in case.operands]


def input_shape(case: Case) -> tuple:
    return (case.operands[0][0], sum(_sizes(case))) if case.operands else case.shape


def split_operands(case: Case, x: torch.Tensor) -> list:
    """The reference's view of the data operands of ``x``."""
    if not case.operands:
        return [x]
    parts = torch.split(x, _sizes(case), dim=1)
    return [part.reshape(-1, *shape[1:]) for part, shape in zip(parts, case.operands)]


def one_node_model(case: Case) -> onnx.ModelProto:
    prelude, initializers = [], [numpy_helper.from_array(c, f"c{i}") for i, c in enumerate(case.constants)]
    data = ["x"] * case.data_inputs
    if case.operands:
        parts = [f"part{i}" for i in range(len(case.operands))]
        initializers.append(numpy_helper.from_array(np.array(_sizes(case), np.int64), "sizes"))
        prelude.append(helper.make_node("Split", ["x", "sizes"], parts, name="split_operands", axis=1))
        data = []
        for i, (part, shape) in enumerate(zip(parts, case.operands)):
            initializers.append(numpy_helper.from_array(np.array([-1, *shape[1:]], np.int64), f"shape{i}"))
            prelude.append(helper.make_node("Reshape", [part, f"shape{i}"], [f"operand{i}"], name=f"operand{i}"))
            data.append(f"operand{i}")
    constants = [f"c{i}" for i in range(len(case.constants))]
    order = case.order or "x" * len(data) + "c" * len(constants)
    names = [data.pop(0) if kind == "x" else constants.pop(0) for kind in order]
    outputs = ["y"] + [f"y{i}" for i in range(1, case.outputs)]
    node = helper.make_node(case.op, names, outputs, name=f"{case.op}_under_test", **case.attrs)
    graph = helper.make_graph([*prelude, node], "case",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *input_shape(case)[1:]])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)],
                             ir_version=helper.find_min_ir_version_for([helper.make_opsetid("", case.opset)]))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.id}" if c.id else c.op for c in CASES])
def test_gradient_matches_autograd(case: Case):
    x = RNG.standard_normal(input_shape(case)).astype(np.float32)
    if case.positive:
        x = np.abs(x) + 0.5
    constants = [torch.tensor(c).double() if c.dtype.kind == "f" else c for c in case.constants]
    x_torch = torch.from_numpy(x).double().requires_grad_(True)
    y = case.reference(*split_operands(case, x_torch), *constants)
    upstream = torch.from_numpy(RNG.standard_normal(tuple(y.shape)).astype(np.float32)).double()
    (expected,) = torch.autograd.grad(y, x_torch, upstream)

    model = gradient_model(one_node_model(case), output="y", source="x")
    got = run(model, {"x": x, "gradient_in": upstream.float().numpy()})
    assert got["y"].shape == tuple(y.shape)
    np.testing.assert_allclose(got["gradient_out"], expected.numpy(), rtol=1e-4, atol=1e-5)


def test_every_registered_op_has_a_gradient_check():
    checked = {case.op for case in CASES}
    missing = sorted(op for op, entry in REGISTRY.items() if entry.gradient is not None and op not in checked)
    assert not missing, f"registered ops without a gradient check: {missing}"


# -- graphs whose batch is not at axis 0 (issue 10: timm's attention, MobileViT's merged batch) ------

def _graph(nodes: list, shape: tuple, constants: dict) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "graph", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape[1:]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _timm_attention():
    """qkv.reshape(B, T, 3, h, d).permute(2, 0, 3, 1, 4); q, k, v = qkv[0..2]; softmax(q kᵀ) v."""
    t, h, d = 5, 2, 3
    nodes = [helper.make_node("Reshape", ["x", "split_heads"], ["qkv"]),
             helper.make_node("Transpose", ["qkv"], ["moved"], perm=[2, 0, 3, 1, 4]),  # [3, N, h, T, d]
             *[helper.make_node("Gather", ["moved", f"i{i}"], [name], axis=0) for i, name in enumerate("qkv")],
             helper.make_node("Transpose", ["k"], ["k_t"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "k_t"], ["scores"]),
             helper.make_node("Softmax", ["scores"], ["attention"], axis=-1),
             helper.make_node("MatMul", ["attention", "v"], ["heads"]),
             helper.make_node("Transpose", ["heads"], ["merged"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["merged", "join_heads"], ["y"])]
    constants = {"split_heads": np.array([-1, t, 3, h, d], np.int64), "join_heads": np.array([-1, t, h * d], np.int64),
                 **{f"i{i}": np.array(i, np.int64) for i in range(3)}}

    def reference(x):
        q, k, v = x.reshape(-1, t, 3, h, d).permute(2, 0, 3, 1, 4)
        return (torch.softmax(q @ k.transpose(-1, -2), -1) @ v).transpose(1, 2).reshape(-1, t, h * d)

    return _graph(nodes, (2, t, 3 * h * d), constants), (2, t, 3 * h * d), reference


def _merged_batch():
    """[N, P·T, C] → [N·P, T, C] (MobileViT's patches as batch), token softmax and mean, back to [N, P, C]."""
    p, t, c = 2, 3, 4
    nodes = [helper.make_node("Reshape", ["x", "merge"], ["patches"]),
             helper.make_node("Softmax", ["patches"], ["weights"], axis=-1),
             helper.make_node("Mul", ["weights", "patches"], ["weighted"]),
             helper.make_node("ReduceMean", ["weighted"], ["pooled"], axes=[1], keepdims=0),  # [N·P, C]
             helper.make_node("Reshape", ["pooled", "split"], ["y"])]
    constants = {"merge": np.array([-1, t, c], np.int64), "split": np.array([-1, p, c], np.int64)}

    def reference(x):
        patches = x.reshape(-1, t, c)
        return (torch.softmax(patches, -1) * patches).mean(1).reshape(-1, p, c)

    return _graph(nodes, (2, p * t, c), constants), (2, p * t, c), reference


def _tokens_first():
    """[N, T, C] → [T, N, C]; drop the first token and repeat the rest along axis 0; back."""
    nodes = [helper.make_node("Transpose", ["x"], ["tokens_first"], perm=[1, 0, 2]),
             helper.make_node("Slice", ["tokens_first", "one", "end", "zero"], ["rest"]),
             helper.make_node("Concat", ["rest", "rest"], ["twice"], axis=0),
             helper.make_node("Pad", ["twice", "pads"], ["padded"]),
             helper.make_node("Transpose", ["padded"], ["y"], perm=[1, 0, 2])]
    constants = {"one": np.array([1], np.int64), "end": np.array([100], np.int64), "zero": np.array([0], np.int64),
                 "pads": np.array([1, 0, 0, 0, 0, 2], np.int64)}

    def reference(x):
        rest = x.transpose(0, 1)[1:]
        return F.pad(torch.cat([rest, rest], 0), (0, 2, 0, 0, 1, 0)).transpose(0, 1)

    return _graph(nodes, (2, 4, 3), constants), (2, 4, 3), reference


@pytest.mark.parametrize("build", [_timm_attention, _merged_batch, _tokens_first],
                         ids=["timm-attention", "merged-batch", "tokens-first"])
def test_gradient_where_the_batch_is_not_axis_0(build):
    model, shape, reference = build()
    x = RNG.standard_normal(shape).astype(np.float32)
    x_torch = torch.from_numpy(x).double().requires_grad_(True)
    y = reference(x_torch)
    upstream = torch.from_numpy(RNG.standard_normal(tuple(y.shape)).astype(np.float32)).double()
    (expected,) = torch.autograd.grad(y, x_torch, upstream)
    got = run(gradient_model(model, output="y", source="x"), {"x": x, "gradient_in": upstream.float().numpy()})
    np.testing.assert_allclose(got["y"], y.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["gradient_out"], expected.numpy(), rtol=1e-4, atol=1e-5)


# -- MaxPool ties: the first maximum of each window gets G (PyTorch's and ONNX Runtime's rule) ------
TIED_POOLS = [  # (input shape, ONNX attributes, the torch call)
    ((2, 3, 9, 9), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), lambda x: F.max_pool2d(x, 3, 2, 1)),
    ((2, 2, 8, 8), dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1), lambda x: F.max_pool2d(x, 3, 2, ceil_mode=True)),
    ((2, 2, 6, 6), dict(kernel_shape=[2, 2], strides=[2, 2]), lambda x: F.max_pool2d(x, 2)),
    ((2, 2, 7, 7), dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]), lambda x: F.max_pool2d(x, 3, 1, 1)),
    ((2, 2, 10, 9), dict(kernel_shape=[2, 3], strides=[2, 1], dilations=[2, 2]),
     lambda x: F.max_pool2d(x, (2, 3), (2, 1), dilation=2)),
    ((2, 3, 11), dict(kernel_shape=[3], strides=[2], pads=[1, 1]), lambda x: F.max_pool1d(x, 3, 2, 1)),
]


@pytest.mark.parametrize("shape, attrs, reference", TIED_POOLS, ids=range(len(TIED_POOLS)))
@pytest.mark.parametrize("values", ["three-levels", "relu-zeros", "constant"])
def test_maxpool_gradient_on_ties_goes_to_the_first_maximum(shape, attrs, reference, values):
    """Inputs where windows hold several equal maxima (a few levels, ReLU's zeros beside padding, one
    constant): G goes to the first maximum in row-major window order and adds up where windows overlap,
    exactly as torch.autograd's max-pool backward (and ONNX Runtime's MaxPool Indices) route it."""
    rng = np.random.default_rng(3)
    x = {"three-levels": rng.integers(-1, 2, shape), "relu-zeros": np.maximum(rng.standard_normal(shape), 0) * (
        rng.random(shape) < 0.3), "constant": np.full(shape, 2.0)}[values].astype(np.float32)
    case = Case("MaxPool", shape, reference, attrs=attrs)
    x_torch = torch.from_numpy(x).double().requires_grad_(True)
    y = reference(x_torch)
    upstream = torch.from_numpy(rng.standard_normal(tuple(y.shape)).astype(np.float32)).double()
    (expected,) = torch.autograd.grad(y, x_torch, upstream)
    got = run(gradient_model(one_node_model(case), output="y", source="x"),
              {"x": x, "gradient_in": upstream.float().numpy()})
    np.testing.assert_allclose(got["gradient_out"], expected.numpy(), rtol=1e-6, atol=1e-6)
