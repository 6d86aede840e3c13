"""Compile time against node count, from ~50 to ~20,000 nodes: is the compiler linear?

Models (seeded random weights, TorchScript, a dynamic batch): timm's test zoo at its small input
sizes (``tests/timm_zoo.SPECS``: ConvNeXt, ViT, DeiT, Swin, Mixer, PoolFormer, MobileViT, LeViT,
EfficientFormer, BiT, NF-ResNet) and two deep synthetic stacks at 16² made of ``torch.nn``: residual
conv blocks (Conv → ReLU → Conv, + skip) and ViT-Tiny-like transformer blocks (timm's
``vit_tiny_patch16_224`` at 32², patch 8, with ``depth`` blocks), at depths that span the range.
Each model is compiled with AGF in a fresh process (``agf_onnx.compile`` then ``modelfile.save``:
what ``agf-onnx compile`` does; median of ``--runs``); the log-log slope of seconds against the
compiled model's input node count is printed (1: linear), and a log-log plot is written.

    python tools/bench_compile_scaling.py [--plot docs/compile_scaling.png] [--runs 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

CONV_DEPTHS = (4, 16, 64, 256)
VIT_DEPTHS = (1, 4, 16, 64, 128, 256)


def export_conv_stack(depth: int, path: str) -> None:
    """``depth`` residual blocks of two 3×3 convs (8 channels, 16²), then pooling and a linear head."""
    import torch
    from torch import nn

    from tests import models

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return x + 0.5 * self.conv2(torch.relu(self.conv1(x)))

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.blocks = nn.Sequential(*(Block() for _ in range(depth)))
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            return self.head(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))

    net = models.seeded(Stack(), image=16, calibrate=False)
    import onnx

    onnx.save(models.export(net, 16), path)


def export_vit_stack(depth: int, path: str) -> None:
    from tests import timm_zoo

    spec = timm_zoo.Spec("vit_tiny_patch16_224", 32, (("img_size", 32), ("patch_size", 8), ("depth", depth),
                                                     ("num_classes", 10)), token_model=True)
    import shutil

    shutil.copy(timm_zoo.export_path(spec), path)


def export_zoo(name: str, path: str) -> None:
    import shutil

    from tests import timm_zoo

    shutil.copy(timm_zoo.export_path(timm_zoo.SPECS[name]), path)


def compile_once(path: str) -> dict:
    """Seconds to compile and save ``path`` here, and the node counts before and after."""
    import onnx

    import agf_onnx
    from agf_onnx import modelfile

    began = time.perf_counter()
    compiled = agf_onnx.compile(path)
    with tempfile.TemporaryDirectory() as folder:
        modelfile.save(compiled, os.path.join(folder, "out.onnx"))
    seconds = time.perf_counter() - began
    nodes = len(modelfile.read(path, weights=False).graph.node)
    return {"seconds": seconds, "nodes": nodes, "compiled_nodes": len(compiled.graph.node),
            "onnx": onnx.__version__}


def child(arguments: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(arguments)}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def models(quick: bool) -> list[tuple[str, str, str]]:
    """(label, kind, argument) of every model measured."""
    from tests import timm_zoo

    conv, vit = (CONV_DEPTHS[:3], VIT_DEPTHS[:3]) if quick else (CONV_DEPTHS, VIT_DEPTHS)
    return ([(f"conv stack ×{d}", "conv", str(d)) for d in conv] + [(f"ViT stack ×{d}", "vit", str(d)) for d in vit]
            + [(name, "zoo", name) for name in (list(timm_zoo.SPECS)[:4] if quick else timm_zoo.SPECS)])


def slope(nodes: list[int], seconds: list[float]) -> float:
    """The least-squares slope of log(seconds) against log(nodes)."""
    return float(np.polyfit(np.log(nodes), np.log(seconds), 1)[0])


def plot(rows: list[dict], fitted: float, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for kind, marker in (("conv", "o"), ("vit", "s"), ("zoo", "^")):
        chosen = [r for r in rows if r["kind"] == kind]
        axes.loglog([r["nodes"] for r in chosen], [r["seconds"] for r in chosen], marker, label={
            "conv": "residual conv stacks", "vit": "ViT-Tiny stacks", "zoo": "timm zoo (small inputs)"}[kind])
    nodes = np.array(sorted(r["nodes"] for r in rows), float)
    seconds = np.array([r["seconds"] for r in rows])
    scale = np.exp(np.mean(np.log(seconds) - fitted * np.log([r["nodes"] for r in rows])))
    axes.loglog(nodes, scale * nodes ** fitted, "k--", linewidth=1, label=f"fit: slope {fitted:.2f}")
    axes.set_xlabel("nodes of the input model")
    axes.set_ylabel("compile + save, seconds")
    axes.set_title(title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "--child":
        kind, argument, path = sys.argv[2:5]
        if not os.path.exists(path):
            {"conv": lambda: export_conv_stack(int(argument), path), "vit": lambda: export_vit_stack(int(argument), path),
             "zoo": lambda: export_zoo(argument, path)}[kind]()
        print(json.dumps(compile_once(path)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", default=None, help="write the log-log plot here (PNG)")
    parser.add_argument("--runs", type=int, default=1, help="compiles per model (the median is kept)")
    parser.add_argument("--quick", action="store_true", help="a few small models only")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "agf-bench-scaling"))
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    os.environ.setdefault("AGF_TIMM_CACHE", os.path.join(args.cache, "timm"))
    machine = f"{platform.node()}, {os.cpu_count()} CPUs, python {platform.python_version()}"
    print(f"machine: {machine}")
    print(f"{'model':28s} {'nodes':>7s} {'compiled':>8s} {'seconds':>8s} {'ms/node':>8s}")
    rows = []
    for label, kind, argument in models(args.quick):
        path = os.path.join(args.cache, f"{kind}-{argument}.onnx")
        results = [child(["--child", kind, argument, path]) for _ in range(args.runs)]
        row = {"model": label, "kind": kind, "nodes": results[0]["nodes"],
               "compiled_nodes": results[0]["compiled_nodes"],
               "seconds": statistics.median(r["seconds"] for r in results)}
        rows.append(row)
        print(f"{label:28s} {row['nodes']:7d} {row['compiled_nodes']:8d} {row['seconds']:8.2f} "
              f"{1000 * row['seconds'] / row['nodes']:8.2f}", flush=True)
    fitted = slope([r["nodes"] for r in rows], [r["seconds"] for r in rows])
    print(f"log-log slope of compile seconds against nodes: {fitted:.2f} (1 = linear) over {len(rows)} models, "
          f"{min(r['nodes'] for r in rows)}–{max(r['nodes'] for r in rows)} nodes")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"machine": machine, "slope": fitted, "rows": rows}, file, indent=1)
    if args.plot:
        plot(rows, fitted, args.plot, f"agf-onnx compile, AGF ({machine}; tools/bench_compile_scaling.py)")
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
