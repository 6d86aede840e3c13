"""A fuzzer for the compiler: random small CNN graphs built from the supported ops and attributes
(strides, asymmetric and SAME pads, dilations, groups and depthwise convs, ceil-mode pools, residual
Adds, channel Concats, flatten/reshape heads, in-graph preprocessing, float and uint8 images, NCHW and NHWC inputs).

Each graph is written twice from one random specification: as ONNX nodes (``onnx.helper``, so every
attribute can be set) and as a float64 PyTorch function. For every graph: ONNX Runtime's forward pass
equals PyTorch's (the generator is right); the emitted gradient graph (``gradient_model``) equals
``torch.autograd``; every method compiles, keeps the original outputs bit for bit and gives finite
heatmaps (attention rollout, for transformers only, refuses them by name). Hypothesis shrinks a
failing graph to a minimal one.

CI runs ``FUZZ_EXAMPLES`` graphs from a fixed seed; ``AGF_FUZZ_EXAMPLES=200`` runs more,
``AGF_FUZZ_SEED=N`` (or ``random``) another sequence, and ``AGF_FUZZ_SHRINK=1`` lets Hypothesis
shrink a failure to a minimal graph (minutes: every try compiles twelve models). The seed is
printed with each run; a failure prints its ``Spec``, which ``build`` turns back into the model.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import agf_onnx
from agf_onnx.compiler.emit import gradient_model
from agf_onnx.compiler.methods import METHODS, Kind

from .runtime import run

FUZZ_EXAMPLES = int(os.environ.get("AGF_FUZZ_EXAMPLES", "6"))
_seed_text = os.environ.get("AGF_FUZZ_SEED", "0")
FUZZ_SEED = random.randrange(2**32) if _seed_text == "random" else int(_seed_text)
FUZZ_PHASES = [Phase.explicit, Phase.generate] + ([Phase.shrink] if os.environ.get("AGF_FUZZ_SHRINK") else [])
print(f"test_fuzz: AGF_FUZZ_SEED={FUZZ_SEED} AGF_FUZZ_EXAMPLES={FUZZ_EXAMPLES}")


# -- specifications -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Conv:
    channels: int
    kernel: int
    stride: int
    dilation: int
    groups: str            # "one", "two" or "depthwise"
    padding: tuple | str   # (top, left, bottom, right) or an auto_pad value
    bias: bool


@dataclass(frozen=True)
class Pool:
    kind: str              # "max" or "average"
    kernel: int
    stride: int
    padding: tuple         # (top, left, bottom, right)
    ceil: bool
    count_include_pad: bool


@dataclass(frozen=True)
class Activation:
    kind: str              # Relu, LeakyRelu, Sigmoid, HardSwish, Clip


@dataclass(frozen=True)
class Norm:
    pass


@dataclass(frozen=True)
class Residual:            # x + BN(conv3×3(x)), then ReLU
    pass


@dataclass(frozen=True)
class Branches:            # concat(conv1×1(x), conv3×3(x)) on channels
    first: int
    second: int


@dataclass(frozen=True)
class Spec:
    size: int
    layout: str            # "NCHW" or "NHWC"
    preprocessing: str     # "none"; "normalise": (x − mean) / std in the graph; "uint8": a uint8 image cast,
                           # scaled by 1/255 and normalised in the graph
    layers: tuple
    head: str              # "gap-gemm", "flatten-gemm", "reshape-matmul"
    classes: int


def _pads(largest: int):
    """``(top, left, bottom, right)``, asymmetric where ``top ≠ bottom``, with ``left + right = top + bottom`` so
    that feature maps stay square (the heights and widths the generator tracks are one number)."""
    return st.tuples(st.integers(0, largest), st.integers(0, largest), st.booleans()).map(
        lambda t: (t[0], t[1], t[1], t[0]) if t[2] else (t[0], t[0], t[1], t[1]))


def _conv(draw, channels: int) -> Conv:
    kernel = draw(st.sampled_from([1, 2, 3]))
    stride = draw(st.sampled_from([1, 1, 2]))
    dilation = draw(st.sampled_from([1, 1, 2])) if kernel > 1 else 1
    groups = draw(st.sampled_from(["one", "one", "two", "depthwise"]))
    out = draw(st.sampled_from([4, 6, 8]))
    if groups == "depthwise":
        out = channels
    elif groups == "two" and channels % 2:
        groups = "one"
    padding = draw(st.one_of(st.sampled_from(["SAME_UPPER", "SAME_LOWER", "VALID"]), _pads(kernel - 1)))
    if isinstance(padding, str) and padding.startswith("SAME"):
        dilation = 1  # ONNX Runtime's Conv refuses dilations with auto_pad SAME
    return Conv(out, kernel, stride, dilation, groups, padding, draw(st.booleans()))


def _pool(draw) -> Pool:
    kind = draw(st.sampled_from(["max", "average"]))
    kernel = draw(st.sampled_from([2, 3]))
    stride = draw(st.sampled_from([1, 2]))
    ceil = draw(st.booleans())
    if ceil:  # ceil mode: symmetric pads, where ONNX and PyTorch agree on the last window
        pad = draw(st.integers(0, kernel // 2))
        padding = (pad,) * 4
    else:
        padding = draw(_pads(kernel - 1))
    count_include_pad = draw(st.booleans()) if kind == "average" else False
    if kind == "average" and ceil:
        padding, count_include_pad = (0,) * 4, False  # the overhang's divisor differs between the two
    return Pool(kind, kernel, stride, padding, ceil, count_include_pad)


def _spatial(size: int, kernel: int, stride: int, dilation: int, padding, ceil: bool = False) -> int:
    if isinstance(padding, str):
        return math.ceil(size / stride) if padding.startswith("SAME") else \
            (size - dilation * (kernel - 1) - 1) // stride + 1
    extent = size + padding[0] + padding[2] - dilation * (kernel - 1) - 1
    return (math.ceil(extent / stride) if ceil else extent // stride) + 1


def _drops_last_window(size: int, pool: Pool) -> bool:
    """Whether a ceil-mode pool's last window starts in the end padding: PyTorch and ONNX Runtime's kernel
    drop it, ONNX's shape inference at opset 17 keeps it, so such a model does not even load in ONNX Runtime."""
    count = _spatial(size, pool.kernel, pool.stride, 1, pool.padding, pool.ceil)
    return pool.ceil and (count - 1) * pool.stride >= size + pool.padding[0]


@st.composite
def specs(draw) -> Spec:
    size = draw(st.integers(9, 16))
    preprocessing = draw(st.sampled_from(["none", "normalise", "uint8"]))
    channels, current = 3, size
    layers = []
    for _ in range(draw(st.integers(1, 5))):
        choice = draw(st.sampled_from(["conv", "conv", "pool", "activation", "norm", "residual", "branches"]))
        if choice == "conv":
            layer = _conv(draw, channels)
            after = _spatial(current, layer.kernel, layer.stride, layer.dilation, layer.padding)
            if after < 2:
                continue
            channels, current = layer.channels, after
        elif choice == "pool":
            layer = _pool(draw)
            after = _spatial(current, layer.kernel, layer.stride, 1, layer.padding, layer.ceil)
            if after < 2 or max(layer.padding) * 2 > layer.kernel or _drops_last_window(current, layer):
                continue  # ONNX wants pads below half the kernel
            if layer.kind == "max" and preprocessing == "uint8" and not any(
                    isinstance(earlier, (Conv, Residual, Branches)) for earlier in layers):
                continue  # integer pixels tie in a window, and float32 and float64 break ties differently
            current = after
        elif choice == "activation":
            layer = Activation(draw(st.sampled_from(["Relu", "LeakyRelu", "Sigmoid", "HardSwish", "Clip"])))
        elif choice == "norm":
            layer = Norm()
        elif choice == "residual":
            layer = Residual()
        else:
            layer = Branches(draw(st.sampled_from([2, 4])), draw(st.sampled_from([2, 4])))
            channels = layer.first + layer.second
        layers.append(layer)
    if not any(isinstance(layer, (Conv, Residual, Branches)) for layer in layers):
        layers.insert(0, Conv(4, 3, 1, 1, "one", (1, 1, 1, 1), True))  # every method needs a Conv
    head = draw(st.sampled_from(["gap-gemm", "flatten-gemm", "reshape-matmul"]))
    return Spec(size, draw(st.sampled_from(["NCHW", "NHWC"])), preprocessing, tuple(layers), head,
                draw(st.integers(2, 6)))


# -- one specification, two programs --------------------------------------------------------------

@dataclass
class Dual:
    """Builds the ONNX graph and the PyTorch function of a Spec side by side."""

    rng: np.random.Generator
    nodes: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    count: int = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def node(self, op: str, inputs: list, **attributes) -> str:
        output = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def weight(self, array: np.ndarray) -> tuple[str, torch.Tensor]:
        name = self.name("w")
        array = array.astype(np.float32)
        self.weights.append(numpy_helper.from_array(array, name))
        return name, torch.from_numpy(array).double()


def _same_pads(size: int, kernel: int, stride: int, dilation: int, lower: bool) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    small = total // 2
    return (total - small, small) if lower else (small, total - small)


def _build_conv(d: Dual, x: str, fx, layer: Conv, channels: int, size: int):
    groups = {"one": 1, "two": 2, "depthwise": channels}[layer.groups]
    w_name, w = d.weight(d.rng.standard_normal((layer.channels, channels // groups, layer.kernel, layer.kernel))
                         * (2.0 / (channels // groups * layer.kernel**2)) ** 0.5)
    inputs = [x, w_name]
    bias = None
    if layer.bias:
        b_name, bias = d.weight(d.rng.standard_normal(layer.channels) * 0.1)
        inputs.append(b_name)
    attributes = dict(kernel_shape=[layer.kernel] * 2, strides=[layer.stride] * 2, dilations=[layer.dilation] * 2,
                      group=groups)
    if isinstance(layer.padding, str):
        attributes["auto_pad"] = layer.padding
        if layer.padding == "VALID":
            top = left = bottom = right = 0
        else:
            top, bottom = _same_pads(size, layer.kernel, layer.stride, layer.dilation, layer.padding == "SAME_LOWER")
            left, right = top, bottom
    else:
        top, left, bottom, right = layer.padding
        attributes["pads"] = [top, left, bottom, right]
    y = d.node("Conv", inputs, **attributes)

    def forward(t, fx=fx):
        return F.conv2d(F.pad(fx(t), (left, right, top, bottom)), w, bias, layer.stride, 0, layer.dilation, groups)

    return y, forward


def _build_pool(d: Dual, x: str, fx, layer: Pool):
    top, left, bottom, right = layer.padding
    attributes = dict(kernel_shape=[layer.kernel] * 2, strides=[layer.stride] * 2, pads=[top, left, bottom, right],
                      ceil_mode=int(layer.ceil))
    if layer.kind == "max":
        y = d.node("MaxPool", [x], **attributes)

        def forward(t, fx=fx):
            if layer.ceil:
                return F.max_pool2d(fx(t), layer.kernel, layer.stride, top, ceil_mode=True)
            return F.max_pool2d(F.pad(fx(t), (left, right, top, bottom), value=-math.inf), layer.kernel, layer.stride)
    else:
        y = d.node("AveragePool", [x], count_include_pad=int(layer.count_include_pad), **attributes)

        def forward(t, fx=fx):
            if layer.count_include_pad or not any(layer.padding):
                return F.avg_pool2d(F.pad(fx(t), (left, right, top, bottom)), layer.kernel, layer.stride,
                                    ceil_mode=layer.ceil)
            ones = F.pad(torch.ones_like(fx(t)[:1, :1]), (left, right, top, bottom))  # divisor: real pixels
            summed = F.avg_pool2d(F.pad(fx(t), (left, right, top, bottom)), layer.kernel, layer.stride)
            return summed / F.avg_pool2d(ones, layer.kernel, layer.stride)
    return y, forward


ACTIVATIONS = {
    "Relu": (dict(), torch.relu),
    "LeakyRelu": (dict(alpha=0.1), lambda t: F.leaky_relu(t, 0.1)),
    "Sigmoid": (dict(), torch.sigmoid),
    "HardSwish": (dict(), F.hardswish),
}


def _build_norm(d: Dual, x: str, fx, channels: int):
    scale, shift = 1 + 0.1 * d.rng.standard_normal(channels), 0.1 * d.rng.standard_normal(channels)
    mean, variance = 0.1 * d.rng.standard_normal(channels), 0.5 + d.rng.random(channels)
    names, tensors = zip(*(d.weight(v) for v in (scale, shift, mean, variance)))
    y = d.node("BatchNormalization", [x, *names], epsilon=1e-5)

    def forward(t, fx=fx):
        s, b, m, v = (u.reshape(1, -1, 1, 1) for u in tensors)
        return (fx(t) - m) / torch.sqrt(v + 1e-5) * s + b

    return y, forward


def build(spec: Spec) -> tuple[onnx.ModelProto, callable]:
    """The ONNX model (input ``image``, output ``logits``) and its float64 PyTorch function."""
    d = Dual(np.random.default_rng(hash(spec) % 2**32))
    size, channels = spec.size, 3
    x, fx = "image", (lambda t: t)
    if spec.preprocessing == "uint8":  # the Cast carries the gradient as float (the integers' own values)
        scale_name, scale = d.weight(np.array(1 / 255))
        x = d.node("Mul", [d.node("Cast", [x], to=TensorProto.FLOAT), scale_name])
        fx = (lambda t, f=fx: f(t) * scale)
    if spec.layout == "NHWC":
        x = d.node("Transpose", [x], perm=[0, 3, 1, 2])
        fx = (lambda t, f=fx: f(t).permute(0, 3, 1, 2))
    if spec.preprocessing != "none":
        # half-way between two 8-bit levels: no uint8 pixel lands on a kink (0) of what follows, where float32
        # and float64 could pick different sides
        mean_name, mean = d.weight((np.array([102.5, 127.5, 153.5]) / 255).reshape(1, 3, 1, 1))
        std_name, std = d.weight(np.array([0.2, 0.25, 0.3]).reshape(1, 3, 1, 1))
        x = d.node("Div", [d.node("Sub", [x, mean_name]), std_name])
        fx = (lambda t, f=fx: (f(t) - mean) / std)
    for layer in spec.layers:
        if isinstance(layer, Conv):
            x, fx = _build_conv(d, x, fx, layer, channels, size)
            size = _spatial(size, layer.kernel, layer.stride, layer.dilation, layer.padding)
            channels = layer.channels
        elif isinstance(layer, Pool):
            x, fx = _build_pool(d, x, fx, layer)
            size = _spatial(size, layer.kernel, layer.stride, 1, layer.padding, layer.ceil)
        elif isinstance(layer, Activation) and layer.kind == "Clip":
            low, high = d.weight(np.array(0.0)), d.weight(np.array(6.0))
            x = d.node("Clip", [x, low[0], high[0]])
            fx = (lambda t, f=fx: torch.clamp(f(t), 0.0, 6.0))
        elif isinstance(layer, Activation):
            attributes, function = ACTIVATIONS[layer.kind]
            x = d.node(layer.kind, [x], **attributes)
            fx = (lambda t, f=fx, g=function: g(f(t)))
        elif isinstance(layer, Norm):
            x, fx = _build_norm(d, x, fx, channels)
        elif isinstance(layer, Residual):
            branch, fb = _build_conv(d, x, fx, Conv(channels, 3, 1, 1, "one", (1, 1, 1, 1), False), channels, size)
            branch, fb = _build_norm(d, branch, fb, channels)
            x = d.node("Relu", [d.node("Add", [branch, x])])
            fx = (lambda t, f=fx, g=fb: torch.relu(g(t) + f(t)))
        else:
            first, f1 = _build_conv(d, x, fx, Conv(layer.first, 1, 1, 1, "one", (0, 0, 0, 0), True), channels, size)
            second, f2 = _build_conv(d, x, fx, Conv(layer.second, 3, 1, 1, "one", (1, 1, 1, 1), True), channels, size)
            x = d.node("Concat", [first, second], axis=1)
            fx = (lambda t, g1=f1, g2=f2: torch.cat([g1(t), g2(t)], 1))
            channels = layer.first + layer.second
    if spec.head == "gap-gemm":
        x = d.node("Flatten", [d.node("GlobalAveragePool", [x])])
        fx = (lambda t, f=fx: f(t).mean((2, 3)))
        features = channels
    else:
        features = channels * size * size
        if spec.head == "flatten-gemm":
            x = d.node("Flatten", [x])
        else:
            shape = d.name("shape")
            d.weights.append(numpy_helper.from_array(np.array([0, -1], np.int64), shape))
            x = d.node("Reshape", [x, shape])
        fx = (lambda t, f=fx: f(t).flatten(1))
    w_name, w = d.weight(d.rng.standard_normal((features, spec.classes)) * features**-0.5)
    b_name, b = d.weight(d.rng.standard_normal(spec.classes) * 0.1)
    if spec.head == "reshape-matmul":
        x = d.node("Add", [d.node("MatMul", [x, w_name]), b_name])
    else:
        x = d.node("Gemm", [x, w_name, b_name])
    d.nodes.append(helper.make_node("Identity", [x], ["logits"], name="logits"))
    fx_final = (lambda t, f=fx: f(t) @ w + b)
    shape = ["N", 3, spec.size, spec.size] if spec.layout == "NCHW" else ["N", spec.size, spec.size, 3]
    image_type = TensorProto.UINT8 if spec.preprocessing == "uint8" else TensorProto.FLOAT
    graph = helper.make_graph(d.nodes, "fuzz", [helper.make_tensor_value_info("image", image_type, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", spec.classes])],
                              d.weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, fx_final


# -- the property ---------------------------------------------------------------------------------

def _images(spec: Spec) -> np.ndarray:
    shape = (2, 3, spec.size, spec.size) if spec.layout == "NCHW" else (2, spec.size, spec.size, 3)
    rng = np.random.default_rng(spec.size)
    if spec.preprocessing == "uint8":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.random(shape).astype(np.float32)


@seed(FUZZ_SEED)
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, phases=FUZZ_PHASES, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=specs())
def test_random_graphs_compile_keep_their_outputs_and_match_autograd(spec):
    model, forward = build(spec)
    images = _images(spec)
    torch_input = torch.from_numpy(images).double().requires_grad_(True)
    expected = forward(torch_input)
    original = run(model, {"image": images}, optimize=False)["logits"]
    np.testing.assert_allclose(original, expected.detach().numpy(), rtol=1e-4, atol=1e-4,
                               err_msg="the generator's two programs disagree")

    # the gradient stream: ∂⟨logits, g⟩/∂image against torch.autograd in float64
    cotangent = np.random.default_rng(1).standard_normal(original.shape).astype(np.float32)
    (reference,) = torch.autograd.grad(expected, torch_input, torch.from_numpy(cotangent).double())
    # gradient_model types its result like its source, a graph input: a uint8 model's gradient is read
    # on its twin with a float image input (the same graph, the Cast then float → float)
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    twin.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT
    emitted = run(gradient_model(twin, output="logits", source="image"),
                  {"image": images.astype(np.float32), "gradient_in": cotangent}, optimize=False)["gradient_out"]
    scale = max(float(reference.abs().max()), 1e-3)
    np.testing.assert_allclose(emitted, reference.numpy(), rtol=1e-3, atol=1e-4 * scale)

    # every method compiles, keeps the original outputs bit for bit and gives finite maps
    for method, definition in METHODS.items():
        if definition.kind == Kind.ATTENTION:  # attention rollout: a CNN has no attention, and says so
            with pytest.raises(agf_onnx.CompileError, match="no attention"):
                agf_onnx.compile(model, method=method)
            continue
        compiled = agf_onnx.compile(model, method=method, options={"steps": 3, "samples": 3})
        outputs = run(compiled, {"image": images, "target": np.array([0, spec.classes - 1])}, optimize=False)
        np.testing.assert_array_equal(outputs["logits"], original, err_msg=method)
        heatmap = outputs["heatmap"]
        assert heatmap.shape == (2, 1, spec.size, spec.size), method
        assert np.isfinite(heatmap).all(), method


def _features(spec: Spec) -> set[str]:
    seen = {spec.layout, spec.head, spec.preprocessing}
    for layer in spec.layers:
        seen.add(type(layer).__name__)
        if isinstance(layer, Conv):
            seen |= {layer.groups, f"dilation{layer.dilation}", f"stride{layer.stride}",
                     layer.padding if isinstance(layer.padding, str) else
                     "asymmetric" if layer.padding[:2] != layer.padding[2:] else "symmetric"}
        if isinstance(layer, Pool):
            seen.add(f"{layer.kind}-ceil{int(layer.ceil)}")
    return seen


def test_the_generator_reaches_every_feature_it_is_for():
    """Generation alone (no compiling): 300 graphs reach every attribute family listed above."""
    seen: set[str] = set()

    @seed(FUZZ_SEED)
    @settings(max_examples=300, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(spec=specs())
    def collect(spec):
        seen.update(_features(spec))

    collect()
    wanted = {"NCHW", "NHWC", "gap-gemm", "flatten-gemm", "reshape-matmul", "none", "normalise", "uint8", "Conv", "Pool",
              "Activation", "Norm", "Residual", "Branches", "one", "two", "depthwise", "SAME_UPPER", "SAME_LOWER",
              "VALID", "asymmetric", "dilation2", "stride2", "max-ceil1", "max-ceil0", "average-ceil0"}
    assert wanted <= seen, wanted - seen
