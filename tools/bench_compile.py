"""Compile-time, file-size and run-time benchmark on VGG-19 and ResNet-50 sized graphs (224×224).

The networks are the test suite's ``torch.nn`` builds at full size (torchvision does not import
beside the CPU torch used here), seeded, exported with ``torch.onnx``. For each it prints the
compile time, the compiled file's size against the input's, ONNX Runtime's session load time and
time per batch for the original and the compiled model, measured side by side in one run, with
the run-time ratio.

    python tools/bench_compile.py [--models vgg19,resnet50] [--batch 1] [--runs 3] [--provider cpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import agf_onnx  # noqa: E402
from agf_onnx.cli import save  # noqa: E402
from agf_onnx.sessions import create_session  # noqa: E402
from tests import models  # noqa: E402

VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def build(name: str):
    if name == "vgg19":
        return models.VGGish(widths=VGG19, image=224, classes=1000, hidden=4096)
    if name == "resnet50":
        return models.ResNetish(models.Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), stem=64, classes=1000,
                                stem_kernel=7)
    raise SystemExit(f"unknown model {name!r} (vgg19, resnet50)")


def timed_runs(session: ort.InferenceSession, feeds: dict, runs: int) -> float:
    session.run(None, feeds)  # warm-up
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg19,resnet50")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    ort.set_default_logger_severity(3)
    providers = ["CUDAExecutionProvider"] if args.provider == "cuda" else ["CPUExecutionProvider"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, onnxruntime {ort.__version__} ({providers[0]}), "
          f"batch {args.batch}, median of {args.runs} runs")
    print("| model | input MiB | compile s | compiled MiB | size ratio | load s (original / compiled) "
          "| original s/batch | compiled s/batch | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            net = models.seeded(build(name), image=224)
            source, target = os.path.join(folder, f"{name}.onnx"), os.path.join(folder, f"{name}_agf.onnx")
            onnx.save(models.export(net, 224, fold=False), source)
            began = time.perf_counter()
            save(agf_onnx.compile(source), target)
            compile_seconds = time.perf_counter() - began
            before, after = os.path.getsize(source), os.path.getsize(target)
            x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
            loads, times = [], []
            for path in (source, target):
                began = time.perf_counter()
                session = create_session(path, args.provider)  # on CUDA: use_tf32=0, as agf_onnx runs it
                loads.append(time.perf_counter() - began)
                times.append(timed_runs(session, {"x": x}, args.runs))
            original, compiled = times
            print(f"| {name} | {before / 2**20:.1f} | {compile_seconds:.1f} | {after / 2**20:.1f} | "
                  f"{after / before:.3f} | {loads[0]:.1f} / {loads[1]:.1f} | {original:.3f} | {compiled:.3f} | "
                  f"{compiled / original:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
