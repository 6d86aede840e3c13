"""Where a compiled model spends its time: ONNX Runtime's profiler, summed per op type and per node.

    python tools/profile_ops.py model_agf.onnx [--runs 3] [--top 20] [--batch 1] [--provider cpu]
    python tools/profile_ops.py --build resnet50 [--method agf]   # bench_compile's models, compiled here

Prints the milliseconds per run of each op type (with its node count and share) and of the
``--top`` slowest nodes. The profiler adds overhead per node; use ``bench_compile.py`` for times
to compare.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from agf_onnx.runtime.sessions import create_session, with_target  # noqa: E402


def profile(path: str, runs: int, top: int, batch: int, provider: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(folder, "profile")
        session = create_session(path, provider, options=options)
        image = session.get_inputs()[0]
        shape = [d if isinstance(d, int) else batch for d in image.shape]
        feeds = with_target(session, {image.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)})
        for _ in range(runs + 1):
            session.run(None, feeds)
        events = json.load(open(session.end_profiling()))
    # the first run allocates: count the nodes of the later ones only
    started = sorted(e["ts"] for e in events if e.get("name") == "model_run")[1]
    events = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= started]
    per_type, count, per_node = collections.Counter(), collections.Counter(), collections.Counter()
    for event in events:
        per_type[event["args"]["op_name"]] += event["dur"]
        count[event["args"]["op_name"]] += 1
        per_node[(event["args"]["op_name"], event["name"][:-len("_kernel_time")])] += event["dur"]
    total = sum(per_type.values())
    print(f"{path}: {total / runs / 1000:.1f} ms of kernels per run ({runs} runs, batch {batch}, {provider})")
    print("| op | ms/run | share | nodes |\n|---|---|---|---|")
    for op, micros in per_type.most_common():
        print(f"| {op} | {micros / runs / 1000:.2f} | {100 * micros / total:.1f} % | {count[op] // runs} |")
    if top:
        print(f"\nslowest {top} nodes (ms/run):")
        for (op, name), micros in per_node.most_common(top):
            print(f"  {micros / runs / 1000:7.2f}  {op:16s} {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a compiled (or any) .onnx file")
    parser.add_argument("--build", help="compile one of bench_compile.py's models instead (vgg19, resnet50, …)")
    parser.add_argument("--method", default="agf")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    if (args.model is None) == (args.build is None):
        parser.error("give a model file or --build NAME")
    ort.set_default_logger_severity(3)
    if args.model:
        profile(args.model, args.runs, args.top, args.batch, args.provider)
        return
    import onnx
    from bench_compile import export

    import agf_onnx
    from agf_onnx.modelfile import save

    with tempfile.TemporaryDirectory() as folder:
        source, target = os.path.join(folder, "model.onnx"), os.path.join(folder, "model_agf.onnx")
        onnx.save(export(args.build), source)
        save(agf_onnx.compile(source, method=args.method), target)
        profile(target, args.runs, args.top, args.batch, args.provider)


if __name__ == "__main__":
    main()
