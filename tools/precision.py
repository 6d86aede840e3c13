"""Which explanation methods survive TF32? Tensor-core rounding emulated on the CPU.

On CUDA, ONNX Runtime (``use_tf32=1``, its default) and PyTorch (cuDNN convolutions) compute
float32 convolutions and GEMMs in TF32: each operand is rounded to a 10-bit mantissa (11
significant bits, round to nearest even), the products are accumulated in float32. This tool
applies the same rounding to every ``Conv``/``ConvTranspose``/``Gemm``/``MatMul`` operand of a
compiled graph — the forward ops and the backward ones (the VJPs are ConvTranspose/Conv/Gemm
nodes of the same graph), data and weights — runs it with the CPU provider, and reports each
method's heatmap correlation (Pearson r, the minimum over the samples) with the unrounded map.

**Rounding with float ops** (ONNX has no bit cast): Veltkamp's splitting ``c = x·(2¹³ + 1)``,
``hi = c − (c − x)`` is x rounded to 24 − 13 = 11 significant bits, to nearest with ties to
even, for every normal float32 that does not overflow in ``x·8193``. Values of magnitude ≥ 2¹⁰⁰
are split after an exact scaling by 2⁻⁶⁴ (and scaled back); subnormals (< 2⁻¹²⁶), whose TF32
grid is fixed at 2⁻¹³⁶, are rounded with the magic-number sum ``(x + 1.5·2⁻¹¹³) − 1.5·2⁻¹¹³``;
infinities and NaN pass through. The result is bit-exact but for the sign of a zero (−0 comes
out as +0: ONNX Runtime's CPU ``Where`` does not keep it; −0 = +0 in every later product).
``tests/test_precision.py`` checks the graph, run by ONNX Runtime, against NumPy bit
manipulation on every class of value, ties included.

**Reference.** The heatmaps are compared with the same compiled graph in float32 on the CPU
provider, not with a float64 version of it: ONNX Runtime's CPU provider has no float64 Conv or
ConvTranspose kernels. float32 is a sound stand-in for float64 here: where an independent
float64 implementation exists (``torch.autograd`` for the gradient and gradient × input,
``tests/oracle.py`` for AGF) the table also gives its r against the float32 map and against the
rounded one — the float32 maps are at r ≥ 0.9998 of float64, the rounded ones far below.

    python tools/precision.py [--models bench-vgg,bench-resnet,resnet50] [--samples 2] [--out DIR]

Networks: seeded ``tests/models.py`` builds (untrained; BatchNorm calibrated as ``models.seeded``
does): the built-in benchmark's VGG- and ResNet-style architectures at 64² and a ResNet-50 at
224² (``vgg19`` is available too; an ONNX file path is accepted as a model name), fed standard
normal images. Integrated Gradients and SmoothGrad run with 16 steps / 8 samples (as
``tools/bench_gpu.py``, so that the H100's real TF32 and this emulation are comparable).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import onnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from agf_onnx.compiler.builder import GraphBuilder  # noqa: E402

TF32_MANTISSA_BITS = 10
#: the operands rounded: inputs 0 and 1 (data and weights) of these ops; bias is added in float32
ROUNDED_OPS = {"Conv": (0, 1), "ConvTranspose": (0, 1), "Gemm": (0, 1), "MatMul": (0, 1)}
METHOD_OPTIONS = {"integrated-gradients": {"steps": 16}, "smoothgrad": {"samples": 8}}


def round_mantissa(x: np.ndarray, bits: int = TF32_MANTISSA_BITS) -> np.ndarray:
    """float32 → the nearest float32 with a ``bits``-bit mantissa (ties to even), by bit manipulation."""
    dropped = 23 - bits
    raw = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    half = (1 << (dropped - 1)) - 1
    rounded = (raw + half + ((raw >> dropped) & 1)) & ~np.uint64((1 << dropped) - 1)
    result = (rounded & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
    return np.where(np.isfinite(x), result, x).astype(np.float32)  # inf and NaN as they are


def emit_rounding(b: GraphBuilder, x: str, bits: int = TF32_MANTISSA_BITS) -> str:
    """Nodes that round float32 tensor ``x`` to a ``bits``-bit mantissa, ties to even (see the module doc)."""
    splitter = b.const(2.0 ** (23 - bits) + 1.0)

    def split(value: str) -> str:  # Veltkamp: hi = c − (c − x), c = x·(2^s + 1)
        scaled = b.Mul(value, splitter)
        return b.Sub(scaled, b.Sub(scaled, value))

    magnitude = b.Abs(x)
    large = b.Greater(magnitude, b.const(2.0 ** 100))  # x·8193 could overflow: split x·2⁻⁶⁴ instead
    shrunk = b.Mul(split(b.Mul(x, b.const(2.0 ** -64))), b.const(2.0 ** 64))
    # 1.5·2⁻¹¹³ for 10 bits: its ulp, 2⁻¹³⁶ = 2⁻¹⁴⁹·2¹³, is a 10-bit mantissa's subnormal step
    grid = b.const(1.5 * 2.0 ** (-103 - bits))
    tiny = b.Less(magnitude, b.const(2.0 ** -126))
    subnormal = b.Sub(b.Add(x, grid), grid)
    rounded = b.Where(large, shrunk, b.Where(tiny, subnormal, split(x)))
    return b.Where(b.Less(magnitude, b.const(np.inf)), rounded, x)  # ±inf and NaN pass through


def emulate_tf32(model: onnx.ModelProto, bits: int = TF32_MANTISSA_BITS,
                 part: str = "all") -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` whose conv/GEMM operands are rounded to ``bits`` mantissa bits; the number
    of tensors rounded (each once, however many ops read it). ``part``: ``"all"``, or only the
    ``"forward"`` (the original model's nodes) or the ``"explanation"`` graph's (named ``agf/…``)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    taken = {name for node in graph.node for name in [*node.input, *node.output, node.name]}
    taken |= {t.name for t in graph.initializer} | {i.name for i in graph.input}
    b = GraphBuilder(taken)
    rounded: dict[str, str] = {}
    nodes = []
    for node in graph.node:
        explanation = node.name.startswith("agf/")
        chosen = part == "all" or (part == "explanation") == explanation
        for index in ROUNDED_OPS.get(node.op_type, ()) if chosen else ():
            if index < len(node.input) and node.input[index]:
                name = node.input[index]
                if name not in rounded:
                    start = len(b.nodes)
                    with b.scope("tf32"):
                        rounded[name] = emit_rounding(b, name, bits)
                    nodes += b.nodes[start:]
                node.input[index] = rounded[name]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(b.initializers)
    return model, len(rounded)


def pearson(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Pearson r of each sample's map ``[N, ...]``."""
    values = []
    for x, y in zip(a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)):
        x, y = x - x.mean(), y - y.mean()
        scale = np.sqrt((x * x).sum() * (y * y).sum())
        values.append(float((x * y).sum() / scale) if scale > 0 else float(np.array_equal(x, y)))
    return values


# -- the experiment --------------------------------------------------------------------------------
def build(name: str):
    """A seeded ``torch.nn`` network and its input size."""
    from tests import models

    vgg19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
    networks = {  # the built-in benchmark's architectures (tools/train_benchmark.py), untrained
        "bench-vgg": (lambda: models.VGGish(widths=(16, 16, "M", 32, 32, "M", 64, 64, "M", 128, "M"), image=64,
                                            classes=10, hidden=256), 64),
        "bench-resnet": (lambda: models.ResNetish(models.BasicBlock, (1, 1, 1), (16, 32, 64), stem=16, classes=10), 64),
        "resnet50": (lambda: models.ResNetish(models.Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), stem=64,
                                              classes=1000, stem_kernel=7), 224),
        "vgg19": (lambda: models.VGGish(widths=vgg19, image=224, classes=1000, hidden=4096), 224),
    }
    if name not in networks:
        raise SystemExit(f"unknown model {name!r} ({', '.join(networks)}, or an .onnx path)")
    make, size = networks[name]
    return models.seeded(make(), image=size), size


def float64_maps(net, images: np.ndarray) -> dict[str, np.ndarray]:
    """Independent float64 maps of the top class: gradient, gradient × input (autograd), AGF (the oracle)."""
    import torch

    from tests import oracle

    net = net.double().eval()
    x = torch.from_numpy(images).double().requires_grad_(True)
    logits = net(x)
    (gradient,) = torch.autograd.grad(logits.gather(1, logits.argmax(1)[:, None]).sum(), x)
    maps = {"gradient": gradient.abs().sum(1, keepdim=True).numpy(),
            "gradient-x-input": (x * gradient).sum(1, keepdim=True).detach().numpy(),
            "agf": oracle.explain(net, x.detach(), None).numpy()}
    net.float()
    return maps


def measure(name: str, methods: list[str], samples: int) -> dict:
    """r of the TF32-emulated map (and of the float32 one) per method on one model."""
    import onnxruntime as ort

    import agf_onnx
    from agf_onnx.runtime.sessions import create_session
    from tests import models

    ort.set_default_logger_severity(3)
    net = None
    if name.endswith(".onnx"):
        source = onnx.load(name)
        image_input = next(i for i in source.graph.input if len(i.type.tensor_type.shape.dim) == 4)
        size = image_input.type.tensor_type.shape.dim[2].dim_value
        input_name = image_input.name
    else:
        net, size = build(name)
        source, input_name = models.export(net, size, fold=False), "x"
    images = np.random.default_rng(0).standard_normal((samples, 3, size, size)).astype(np.float32)
    references = float64_maps(net, images) if net is not None else {}
    rows = {}
    for method in methods:
        began = time.perf_counter()
        try:
            compiled = agf_onnx.compile(source, method=method, options=METHOD_OPTIONS.get(method), check=False)
        except agf_onnx.CompileError as error:  # e.g. an attention method on a CNN
            rows[method] = {"not_applicable": str(error).splitlines()[0][:200]}
            print(f"{name}/{method}: not applicable: {rows[method]['not_applicable']}", flush=True)
            continue
        emulated, count = emulate_tf32(compiled)
        feeds = {input_name: images, "target": np.full(len(images), -1, np.int64)}  # top classes
        exact = create_session(compiled, "cpu").run(["heatmap"], feeds)[0]
        rounded = create_session(emulated, "cpu").run(["heatmap"], feeds)[0]
        row = {"rounded_tensors": count, "tf32_vs_fp32": pearson(rounded, exact),
               "finite": bool(np.isfinite(exact).all() and np.isfinite(rounded).all())}
        if method in references:
            row["fp32_vs_float64"] = pearson(exact, references[method])
            row["tf32_vs_float64"] = pearson(rounded, references[method])
        row["seconds"] = round(time.perf_counter() - began, 1)
        rows[method] = row
        print(f"{name}/{method}: {json.dumps(row)}", flush=True)
    return {"size": size, "samples": samples, "methods": rows}


def _r(values) -> str:
    if values is None:
        return "–"
    low = min(values)
    return f"{low:.5f}" if low < 0.99999 else f"{low:.7f}"


def markdown(results: dict) -> str:
    names = list(results)
    header = "| method | " + " | ".join(f"{n} r TF32 vs fp32" for n in names) + " | " + \
             " | ".join(f"{n} r fp32 / TF32 vs float64" for n in names) + " |"
    lines = [header, "|---|" + "---|" * (2 * len(names))]
    methods = list(next(iter(results.values()))["methods"])
    for method in methods:
        if all("not_applicable" in results[n]["methods"].get(method, {}) for n in names):
            continue  # e.g. an attention method and only CNNs
        cells = [_r(results[n]["methods"].get(method, {}).get("tf32_vs_fp32")) for n in names]
        cells += [" / ".join(_r(results[n]["methods"].get(method, {}).get(k)) for k in
                             ("fp32_vs_float64", "tf32_vs_float64"))
                  if "fp32_vs_float64" in results[n]["methods"].get(method, {}) else "–" for n in names]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from agf_onnx.compiler.methods import METHODS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bench-vgg,bench-resnet,resnet50")
    parser.add_argument("--methods", default="all")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--out", help="folder for precision.json and precision.md")
    args = parser.parse_args()
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    results = {}
    for name in args.models.split(","):
        results[name] = measure(name, methods, args.samples)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "precision.json"), "w") as file:
                json.dump(results, file, indent=1)
            with open(os.path.join(args.out, "precision.md"), "w") as file:
                file.write(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
