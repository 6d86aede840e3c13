"""Run compiled models in ONNX Runtime on the CPU (what CI has): Python, and onnxruntime-node / onnxruntime-web
(WASM) under Node through tests/js."""

from __future__ import annotations

import json
import pathlib
import subprocess
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

from agf_onnx.contract import TARGET_INPUT

ort.set_default_logger_severity(3)


def session(model: onnx.ModelProto, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimize:  # no fusions: ONNX Runtime fuses Conv+BN only where the conv has one reader
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict, outputs=None, optimize: bool = True) -> dict:
    """Run ``model`` on ``feeds`` (numpy arrays); returns {output name: array}. A compiled model not fed
    ``target`` explains each sample's top class (``target = -1`` per sample)."""
    sess = session(model, optimize)
    names = outputs or [o.name for o in sess.get_outputs()]
    feeds = {k: np.asarray(v) for k, v in feeds.items()}
    if TARGET_INPUT in {i.name for i in sess.get_inputs()} and TARGET_INPUT not in feeds:
        feeds[TARGET_INPUT] = np.full(len(next(iter(feeds.values()))), -1, np.int64)
    return dict(zip(names, sess.run(names, feeds)))


#: the npm project whose onnxruntime-node and onnxruntime-web the JS tests run (node_modules/ is not committed)
JS_ROOT = pathlib.Path(__file__).resolve().parent / "js"
JS_RUNTIMES = ("node", "wasm")  # onnxruntime-node; onnxruntime-web's WASM backend, under Node


def js_install() -> pathlib.Path:
    """``npm install --ignore-scripts`` into tests/js on first use (onnxruntime-node's npm package carries
    its CPU binary; the install script would only fetch the CUDA one). Returns the node_modules folder."""
    modules = JS_ROOT / "node_modules"
    if not all((modules / package / "package.json").exists() for package in ("onnxruntime-node", "onnxruntime-web")):
        subprocess.run(["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
                       cwd=JS_ROOT, check=True)
    return modules


def run_js(model: onnx.ModelProto, feeds: dict, runtime: str, outputs=None, threads: int = 1,
           runs: int = 1, feed_target: bool = True) -> tuple[dict, dict]:
    """Run ``model`` in a JS runtime (``JS_RUNTIMES``) on the same feeds as ``run`` (``target = -1`` per
    sample when not fed, unless ``feed_target`` is False). Returns ({output name: array}, its result.json)."""
    return run_js_many([(model, feeds, outputs)], runtime, threads, runs, feed_target)[0]


def run_js_many(jobs: list[tuple[onnx.ModelProto, dict, list | None]], runtime: str, threads: int = 1, runs: int = 1,
                feed_target: bool = True) -> list[tuple[dict, dict]]:
    """``run_js`` of several (model, feeds, outputs) in one process of tests/js/explain.mjs (one runtime
    start-up: onnxruntime-web's WASM takes about a second to start)."""
    js_install()
    with tempfile.TemporaryDirectory() as folder:
        work, specs = pathlib.Path(folder), []
        for job, (model, feeds, outputs) in enumerate(jobs):
            feeds = {k: np.asarray(v) for k, v in feeds.items()}
            if feed_target and TARGET_INPUT in {i.name for i in model.graph.input} and TARGET_INPUT not in feeds:
                feeds[TARGET_INPUT] = np.full(len(next(iter(feeds.values()))), -1, np.int64)
            onnx.save(model, str(work / f"model{job}.onnx"))
            inputs = {}
            for index, (name, value) in enumerate(feeds.items()):
                np.ascontiguousarray(value).tofile(work / f"input{job}_{index}.bin")
                inputs[name] = {"file": str(work / f"input{job}_{index}.bin"), "dtype": value.dtype.name,
                                "shape": list(value.shape)}
            specs.append({"model": str(work / f"model{job}.onnx"), "inputs": inputs, "outputs": outputs,
                          "out": str(work / f"out{job}"), "threads": threads, "runs": runs})
        (work / "jobs.json").write_text(json.dumps(specs))
        done = subprocess.run(["node", str(JS_ROOT / "explain.mjs"), runtime, str(work / "jobs.json")], cwd=JS_ROOT,
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{runtime}: {done.stderr.strip()}")
        answers = []
        for spec in specs:
            out = pathlib.Path(spec["out"])
            result = json.loads((out / "result.json").read_text())
            answers.append(({name: np.fromfile(out / f"{name}.bin", _JS_DTYPES[info["dtype"]]).reshape(info["shape"])
                             for name, info in result["outputs"].items()}, result))
    return answers


_JS_DTYPES = {"float32": np.float32, "int64": np.int64, "int32": np.int32, "uint8": np.uint8, "int8": np.int8}
