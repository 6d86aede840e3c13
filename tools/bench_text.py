"""Speed and memory of explained text classifiers: a BERT-base-sized sequence classifier (12 layers,
hidden 768, 12 heads, intermediate 3072, vocabulary 30522, 2 classes, random seeded weights from
``transformers.BertConfig``, no hub), exported with TorchScript (opset 17) at T tokens, compiled
with each method, and run in ONNX Runtime beside the original.

For each method and batch size it prints the compile time, the original's and the compiled
model's median time per batch (the two sessions take turns, so a busy moment slows both), their
ratio, and each session's peak memory: the resident set's high-water mark of a fresh process that
loads the model and runs it (CPU, ``VmHWM``), measured in a subprocess per model and batch.

    python tools/bench_text.py [--methods agf,chefer,lrp] [--batches 1,8] [--tokens 128] [--runs 5]
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
import onnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import agf_onnx  # noqa: E402
from agf_onnx.modelfile import save  # noqa: E402
from agf_onnx.runtime.sessions import create_session  # noqa: E402


def export(tokens: int, folder: str) -> str:
    import torch
    import transformers as tf

    from tests.text_models import Logits

    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(num_labels=2)).eval()  # BERT-base's sizes
    names = ["input_ids", "attention_mask", "token_type_ids"]
    args = (torch.randint(1000, 30000, (1, tokens)), torch.ones(1, tokens, dtype=torch.long),
            torch.zeros(1, tokens, dtype=torch.long))
    path = os.path.join(folder, "bert_base.onnx")
    torch.onnx.export(Logits(model, names).eval(), args, path, input_names=names, output_names=["logits"],
                      dynamo=False, opset_version=17, dynamic_axes={n: {0: "batch"} for n in [*names, "logits"]})
    return path


def feeds(batch: int, tokens: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    mask = np.ones((batch, tokens), np.int64)
    mask[:, tokens * 3 // 4:] = 0  # a quarter of padding
    return {"input_ids": rng.integers(1000, 30000, (batch, tokens)), "attention_mask": mask,
            "token_type_ids": np.zeros((batch, tokens), np.int64)}


def timed(paths: list[str], batch: int, tokens: int, runs: int) -> list[float]:
    """Median seconds per run of each model, the sessions taking turns."""
    sessions = [create_session(onnx.load(path), "cpu") for path in paths]
    inputs = feeds(batch, tokens)
    runs_of = []
    for session in sessions:
        names = {i.name for i in session.get_inputs()}
        given = {k: v for k, v in inputs.items() if k in names}
        if "target" in names:
            given["target"] = np.full(batch, -1, np.int64)
        runs_of.append(given)
    times: list[list[float]] = [[] for _ in sessions]
    for session, given in zip(sessions, runs_of):  # warm-up
        session.run(None, given)
    for _ in range(runs):
        for i, (session, given) in enumerate(zip(sessions, runs_of)):
            began = time.perf_counter()
            session.run(None, given)
            times[i].append(time.perf_counter() - began)
    return [statistics.median(t) for t in times]


def peak_memory(path: str, batch: int, tokens: int) -> float:
    """MiB: the resident high-water mark (``VmHWM``: ``ru_maxrss`` would carry the parent's over
    ``exec``) of a fresh process that loads ``path`` and runs it twice."""
    code = ("import sys, numpy as np, onnx; sys.path.insert(0, %r); "
            "from tools.bench_text import feeds; from agf_onnx.runtime.sessions import create_session; "
            "s = create_session(onnx.load(%r), 'cpu'); n = {i.name for i in s.get_inputs()}; "
            "f = {k: v for k, v in feeds(%d, %d).items() if k in n}; "
            "f.update({'target': np.full(%d, -1, np.int64)} if 'target' in n else {}); s.run(None, f); s.run(None, f); "
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"
            % (os.path.join(os.path.dirname(__file__), ".."), path, batch, tokens, batch))
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(output.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="agf,chefer,lrp")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"onnxruntime CPU; T = {args.tokens}")
    with tempfile.TemporaryDirectory() as folder:
        original = export(args.tokens, folder)
        for method in args.methods.split(","):
            began = time.perf_counter()
            compiled = agf_onnx.compile(original, method=method, input_shapes={"input_ids": [1, args.tokens]})
            seconds = time.perf_counter() - began
            path = os.path.join(folder, f"bert_base_{method}.onnx")
            save(compiled, path, external_data=True)
            for batch in batches:
                forward, explained = timed([original, path], batch, args.tokens, args.runs)
                row = {"method": method, "batch": batch, "compile_s": round(seconds, 1),
                       "forward_ms": round(forward * 1e3, 1), "explained_ms": round(explained * 1e3, 1),
                       "ratio": round(explained / forward, 2),
                       "forward_peak_mib": round(peak_memory(original, batch, args.tokens)),
                       "explained_peak_mib": round(peak_memory(path, batch, args.tokens))}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(rows, stream, indent=1)


if __name__ == "__main__":
    main()
