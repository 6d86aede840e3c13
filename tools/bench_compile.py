"""Compile-time, file-size, node-count and run-time benchmark at 224×224.

``vgg19``, ``resnet50``, ``vgg11`` and ``resnet18`` are the test suite's ``torch.nn`` builds at full
size (torchvision does not import beside the CPU torch used here), BatchNorm kept; ``mobilenetv2``
and ``mnasnet`` are timm's ``mobilenetv2_100`` and ``mnasnet_100`` (depthwise convs); all seeded and
exported with ``torch.onnx``. For each it prints the compile time, the compiled file's size and node
count against the input's, ONNX Runtime's session load time and time per batch for the original and
the compiled model, measured side by side in one run (the two sessions take turns), with the
run-time ratio.

    python tools/bench_compile.py [--models vgg19,resnet50,mobilenetv2] [--method agf] [--batch 1] [--runs 5]

``--deployed`` measures the deployed forms of each model instead (docs/deployed-formats.md): the
float32 export, ONNX Runtime's own optimised file (level EXTENDED), fp16 (``keep_io_types=True``)
and int8 (static QDQ, static QOperator, dynamic), each made by its real converter and compiled;
all sessions take turns in one run, and each form's original and explained time per batch are
printed next to the float32 model's.

    python tools/bench_compile.py --deployed --models resnet18,mobilenetv2 [--method agf]
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
from agf_onnx.modelfile import save  # noqa: E402
from agf_onnx.runtime.sessions import create_session, with_target  # noqa: E402
from tests import models  # noqa: E402

VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
TIMM = {"mobilenetv2": "mobilenetv2_100", "mnasnet": "mnasnet_100"}


def build(name: str):
    if name in ("vgg19", "vgg11"):
        return models.VGGish(widths=VGG19 if name == "vgg19" else VGG11, image=224, classes=1000, hidden=4096)
    if name in ("resnet50", "resnet18"):
        block, layers = (models.Bottleneck, (3, 4, 6, 3)) if name == "resnet50" else (models.BasicBlock, (2, 2, 2, 2))
        return models.ResNetish(block, layers, (64, 128, 256, 512), stem=64, classes=1000, stem_kernel=7)
    raise SystemExit(f"unknown model {name!r} (vgg19, resnet50, vgg11, resnet18, {', '.join(TIMM)})")


def export(name: str) -> onnx.ModelProto:
    if name in TIMM:
        from tests import timm_zoo

        return timm_zoo.export(timm_zoo.Spec(TIMM[name], 224))
    return models.export(models.seeded(build(name), image=224), 224, fold=False)


def timed_runs(sessions: list[ort.InferenceSession], feeds: dict | list[dict], runs: int) -> list[float]:
    """Median seconds per run of each session, the sessions taking turns (a busy moment of the
    machine slows both rather than one). ``feeds``: one for all, or one per session; a compiled
    model is fed ``target = -1`` (it explains the top class)."""
    each = feeds if isinstance(feeds, list) else [feeds] * len(sessions)
    every = [with_target(session, fed) for session, fed in zip(sessions, each)]
    for session, fed in zip(sessions, every):
        session.run(None, fed)  # warm-up
    times = [[] for _ in sessions]
    for _ in range(runs):
        for session, spent, fed in zip(sessions, times, every):
            began = time.perf_counter()
            session.run(None, fed)
            spent.append(time.perf_counter() - began)
    return [statistics.median(spent) for spent in times]


def deployed_forms_of(model: onnx.ModelProto) -> dict[str, onnx.ModelProto]:
    """The deployed forms of a float32 224×224 export, each by its real converter."""
    from tests import deployed_forms as forms

    return {"fp32": model, "ort-extended": forms.ort_optimised(model), "fp16": forms.fp16(model, True),
            "int8-qdq": forms.quantize_static(model, size=224),
            "int8-qoperator": forms.quantize_static(model, operator_format=True, size=224),
            "int8-dynamic": forms.quantize_dynamic(model)}


def bench_deployed(names: list[str], method: str, batch: int, runs: int, provider: str) -> None:
    """Per model: each form's original and explained run, side by side in one run."""
    print("| model | form | compile s | original s/batch | explained s/batch | explained / its original "
          "| explained / explained fp32 |")
    print("|---|---|---|---|---|---|---|")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for name in names:
        x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        sessions, compile_seconds = {}, {}
        for form, model in deployed_forms_of(export(name)).items():
            began = time.perf_counter()
            compiled = agf_onnx.compile(model, method=method)
            compile_seconds[form] = time.perf_counter() - began
            sessions[form] = [create_session(m.SerializeToString(), provider, options=options)
                              for m in (model, compiled)]
        order = [session for pair in sessions.values() for session in pair]
        feeds = [{"x": x}, {"x": x, "target": np.full(batch, -1, np.int64)}] * len(sessions)
        times = iter(timed_runs(order, feeds, runs))
        measured = {form: (next(times), next(times)) for form in sessions}
        explained_fp32 = measured["fp32"][1]
        for form, (original, explained) in measured.items():
            print(f"| {name} | {form} | {compile_seconds[form]:.1f} | {original:.4f} | {explained:.4f} | "
                  f"{explained / original:.1f}× | {explained / explained_fp32:.2f}× |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg19,resnet50,mobilenetv2")
    parser.add_argument("--method", default="agf")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--deployed", action="store_true", help="compare the deployed forms of each model")
    args = parser.parse_args()
    ort.set_default_logger_severity(3)
    providers = ["CUDAExecutionProvider"] if args.provider == "cuda" else ["CPUExecutionProvider"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, onnxruntime {ort.__version__} ({providers[0]}), "
          f"method {args.method}, batch {args.batch}, median of {args.runs} runs")
    if args.deployed:
        bench_deployed(args.models.split(","), args.method, args.batch, args.runs, args.provider)
        return
    print("| model | input MiB | compile s | compiled MiB | size ratio | nodes (original / compiled) "
          "| load s (original / compiled) | original s/batch | compiled s/batch | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            source, target = os.path.join(folder, f"{name}.onnx"), os.path.join(folder, f"{name}_agf.onnx")
            onnx.save(export(name), source)
            began = time.perf_counter()
            compiled_model = agf_onnx.compile(source, method=args.method)
            save(compiled_model, target)
            compile_seconds = time.perf_counter() - began
            before, after = os.path.getsize(source), os.path.getsize(target)
            nodes = len(onnx.load(source, load_external_data=False).graph.node), len(compiled_model.graph.node)
            x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
            loads, sessions = [], []
            for path in (source, target):
                began = time.perf_counter()
                options = ort.SessionOptions()  # idle threads that spin after a run would slow the other session
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                sessions.append(create_session(path, args.provider, options=options))  # CUDA: use_tf32=0
                loads.append(time.perf_counter() - began)
            original, compiled = timed_runs(sessions, {sessions[0].get_inputs()[0].name: x}, args.runs)
            print(f"| {name} | {before / 2**20:.1f} | {compile_seconds:.1f} | {after / 2**20:.1f} | "
                  f"{after / before:.3f} | {nodes[0]} / {nodes[1]} | {loads[0]:.1f} / {loads[1]:.1f} | "
                  f"{original:.3f} | {compiled:.3f} | {compiled / original:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
