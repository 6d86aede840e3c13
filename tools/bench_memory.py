"""Peak memory of ``agf-onnx compile`` and ``agf-onnx explain`` on full-size models, beside their bounds.

Each measurement is a fresh process (the CLI itself, ``python -m agf_onnx …``); its peak resident set
is the kernel's high-water mark (``ru_maxrss`` from ``wait4``), so nothing is sampled or missed.

* **compile**: timm's ResNet-152, ConvNeXt-B, ViT-B/16, Swin-B, ViT-L/16 and ViT-H/14 (random
  weights, TorchScript, 224², a dynamic batch; over 2 GB with external data, as torch writes it),
  each compiled with AGF and saved. Printed beside ``2 × weights + 1 GiB``, the bound the compiler
  keeps (``docs/memory.md``).
* **explain** (``--explain``): a compiled model run on a batch of images under the default
  ``--max-memory`` budget for AGF, Integrated Gradients with 50 steps, ``--smooth 8`` and
  ``--top-k 5``, with ``--batch-size 50`` asked for: the run splits the batch to fit the budget.

    python tools/bench_memory.py [--models resnet152,swin_base_patch4_window7_224] [--cache DIR]
    python tools/bench_memory.py --models none --explain vgg11
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

GIB = 2**30
MODELS = {"resnet152": "ResNet-152", "convnext_base": "ConvNeXt-B", "vit_base_patch16_224": "ViT-B/16",
          "swin_base_patch4_window7_224": "Swin-B", "vit_large_patch16_224": "ViT-L/16",
          "vit_huge_patch14_224": "ViT-H/14", "vit_giant_patch14_224": "ViT-g/14"}


def export(name: str, folder: str) -> str:
    """The timm model ``name`` (seeded random weights, ``tests.timm_zoo.build``) exported at 224² with
    TorchScript into ``folder/name/model.onnx`` (torch writes external data past 2 GB), once."""
    path = os.path.join(folder, name, "model.onnx")
    if not os.path.exists(path):
        run_child(["--export", name, path])
    return path


def _export_here(name: str, path: str) -> None:
    import warnings

    import torch

    from tests import timm_zoo

    model = timm_zoo.build(timm_zoo.Spec(name, 224))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + ".partial"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), partial, dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17)
    os.replace(partial, path)


def weight_bytes(path: str) -> int:
    """The bytes of a model's initializers, external data counted, read in a child process: a parent
    that once held a model would pass its resident size on to the children it measures (Linux
    counts a child's peak from its parent's memory at the fork)."""
    result = subprocess.run([sys.executable, __file__, "--weights", path, "-"], capture_output=True, text=True,
                            check=True)
    return int(result.stdout)


def _weight_bytes_here(path: str) -> int:
    model = onnx.load(path, load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            total += int(entries["length"]) if "length" in entries else \
                os.path.getsize(os.path.join(os.path.dirname(path), entries["location"]))
        else:
            total += tensor.ByteSize()
    return total


def run_child(arguments: list[str], module: bool = False) -> tuple[int, float]:
    """Run ``python tools/bench_memory.py ARGUMENTS`` (or ``python -m agf_onnx ARGUMENTS``); return its
    peak RSS in bytes (Linux reports ``ru_maxrss`` in KiB) and its wall seconds. Fails loudly."""
    command = [sys.executable, "-m", "agf_onnx", *arguments] if module else [sys.executable, __file__, *arguments]
    began = time.perf_counter()
    process = subprocess.Popen(command, cwd=os.path.join(os.path.dirname(__file__), ".."))
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)}: exit {process.returncode}")
    return usage.ru_maxrss * 1024, time.perf_counter() - began


def bench_compile(names: list[str], cache: str) -> None:
    print(f"{'model':10s} {'params':>7s} {'weights':>8s} {'compile s':>9s} {'peak RSS':>9s} {'peak/w':>6s} "
          f"{'bound 2w+1G':>11s}  within")
    for name in names:
        source = export(name, cache)
        weights = weight_bytes(source)
        out = os.path.join(cache, name, "compiled", "model_agf.onnx")
        peak, seconds = run_child(["compile", source, "-o", out, "-q"], module=True)
        bound = 2 * weights + GIB
        print(f"{MODELS.get(name, name):10s} {weights / 4e6:6.0f}M {weights / GIB:7.2f}G {seconds:9.1f} "
              f"{peak / GIB:8.2f}G {peak / weights:5.1f}× {bound / GIB:10.2f}G  {'yes' if peak <= bound else 'NO'}",
              flush=True)


#: The explain variants measured, with the images each runs (asked for in one batch of 50): enough
#: that one unsized run of them all would pass the default budget.
VARIANTS = (("agf", [], 8), ("integrated-gradients 50", ["--method", "integrated-gradients", "--steps", "50"], 2),
            ("agf --smooth 8", ["--smooth", "8"], 6), ("agf --top-k 5", ["--top-k", "5"], 6))


def bench_explain(name: str, cache: str, scale: float) -> None:
    """Peak RSS of ``explain --batch-size 50`` for each variant, beside the budget the run chose."""
    import json

    folder = os.path.join(cache, f"explain-{name}")
    os.makedirs(folder, exist_ok=True)
    source = os.path.join(folder, "model.onnx")
    if not os.path.exists(source):
        run_child(["--export-vgg", name, source])
    print(f"explain {name} (224², 1000 classes, {weight_bytes(source) / GIB:.2f} GiB of weights), --batch-size 50, "
          f"the default --max-memory (half the memory available at load)")
    print(f"{'variant':26s} {'images':>6s} {'compile peak':>12s} {'explain peak':>12s} {'budget':>8s} "
          f"{'explain s':>9s}  within")
    for label, flags, count in VARIANTS:
        images = _images(folder, max(1, round(count * scale)))
        compiled = os.path.join(folder, label.replace(" ", "_").replace("-", "") + ".onnx")
        compile_peak, _ = run_child(["compile", source, "-o", compiled, "-q", *flags], module=True)
        out = tempfile.mkdtemp(prefix="agf-bench-explain-")
        peak, seconds = run_child(["explain", compiled, images, "-o", out, "--batch-size", "50",
                                   "--provider", "cpu"], module=True)
        with open(os.path.join(out, "results.json")) as file:
            budget = json.load(file)["settings"]["max_memory"]
        print(f"{label:26s} {len(os.listdir(images)):6d} {compile_peak / GIB:11.2f}G {peak / GIB:11.2f}G "
              f"{budget / GIB:7.2f}G {seconds:9.1f}  {'yes' if peak <= budget else 'NO'}", flush=True)


def _images(folder: str, count: int) -> str:
    """A folder of ``count`` random 224² RGB images (seeded)."""
    from PIL import Image

    images = os.path.join(folder, f"images-{count}")
    if not os.path.isdir(images):
        os.makedirs(images)
        rng = np.random.default_rng(0)
        for index in range(count):
            Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(
                os.path.join(images, f"{index:03d}.png"))
    return images


def _export_vgg(name: str, path: str) -> None:
    """A torchvision-sized VGG (the test suite's ``VGGish`` at full width, 224², 1000 classes)."""
    from tests import models
    from tools.bench_compile import VGG11, VGG19

    widths = {"vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
              "vgg11": VGG11, "vgg19": VGG19}[name]
    net = models.seeded(models.VGGish(widths=widths, image=224, classes=1000, hidden=4096), image=224)
    onnx.save(models.export(net, 224, fold=False), path)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] in ("--export", "--export-vgg"):
        (_export_here if sys.argv[1] == "--export" else _export_vgg)(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) == 4 and sys.argv[1] == "--weights":
        print(_weight_bytes_here(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(list(MODELS)[:6]),
                        help="timm names, comma-separated ('none': no compile table)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "agf-bench-memory"),
                        help="where exports and compiled models are kept between runs")
    parser.add_argument("--explain", metavar="VGG", help="also measure explain on this VGG (vgg11, vgg16, vgg19)")
    parser.add_argument("--scale", type=float, default=1.0, help="images per explain variant, times this")
    args = parser.parse_args()
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, {_total_memory() / GIB:.1f} GiB; "
          f"python {platform.python_version()}, onnx {onnx.__version__}")
    if args.models != "none":
        bench_compile([m for m in args.models.split(",") if m], args.cache)
    if args.explain:
        bench_explain(args.explain, args.cache, args.scale)


def _total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


if __name__ == "__main__":
    main()
