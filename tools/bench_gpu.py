"""GPU check of compiled models: placement, precision (fp32 / TF32 / CPU / float64) and speed.

One prepared script for a CUDA machine (a fresh machine costs minutes to start, so everything
runs in one go, in priority order, under a time budget, writing its results after every step).
On seeded VGG-19 and ResNet-50 built from plain ``torch.nn`` (``tests/models.py``, BatchNorm
calibrated as ``models.seeded`` does, exported with ``torch.onnx``), 224², for the original
model and every method of ``agf_onnx.compiler.methods.METHODS``:

- **placement**: the fp32 session is made with ``session.disable_cpu_ep_fallback=1``, so it loads
  only if every node runs on the CUDA provider;
- **heatmaps**: Pearson r per sample (the minimum over the samples is reported) of the CUDA map
  with ``use_tf32=0`` and with TF32 against the CPU provider's map, TF32 against CUDA fp32 (the
  TF32 effect alone, whatever the method's noise), and against a float64 reference where one exists (``torch.autograd`` in
  float64 for the gradient and gradient × input, ``tests/oracle.py`` in float64 for AGF);
- **time per batch** of 1 and 16: inputs and outputs bound to the GPU (IO binding), every run
  synchronised, median of the timed runs after warm-up runs, fp32 and TF32, and fp32 with
  ``enable_cuda_graph=1`` (a CUDA-graph session per batch size).

Integrated Gradients and SmoothGrad run with 16 steps / 8 samples (a batch of 16 would be 800 /
400 images inside the graph at their defaults) and are timed at batch 1 only.

    PYTHONPATH=<onnxruntime-gpu bundle>:. python tools/bench_gpu.py --out DIR [--budget 400]
    python tools/bench_gpu.py --cpu-only --out DIR      # a dry run on tiny models, CPU provider

Writes ``DIR/bench_gpu.json`` and ``DIR/bench_gpu.md``.
"""
# ruff: noqa: B023 - every lambda below is a thunk that Bench.step calls at once, inside its loop

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from precision import METHOD_OPTIONS, pearson  # noqa: E402 - the same per-sample r and method settings

REPLICATING = set(METHOD_OPTIONS)  # methods that replicate the batch inside the graph: batch 1 only
VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def build(name: str, size: int, tiny: bool):
    """A seeded full-size (or, ``tiny``, a small) VGG-19 / ResNet-50 from ``tests/models.py``."""
    from tests import models

    if name == "vgg19":
        net = models.VGGish() if tiny else models.VGGish(widths=VGG19, image=size, classes=1000, hidden=4096)
    else:
        net = models.ResNetish(models.Bottleneck, (1, 1), (8, 16), stem=8) if tiny else \
            models.ResNetish(models.Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), stem=64, classes=1000,
                             stem_kernel=7)
    return models.seeded(net, image=size)


def export(net, size: int):
    from tests import models

    try:
        return models.export(net, size, fold=False)
    except Exception:  # noqa: BLE001 - a newer torch without the TorchScript exporter: the dynamo one
        return models.export(net, size, dynamo=True)


class Bound:
    """A session with its inputs and outputs bound once to buffers on ``device`` (fixed batch)."""

    def __init__(self, session, feeds: dict[str, np.ndarray], device: str) -> None:
        import onnxruntime as ort

        self.session, self.binding = session, session.io_binding()
        self.feeds = feeds
        batch = len(next(iter(feeds.values())))
        for name, array in feeds.items():
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, device, 0))
        self.values = []  # keeps the output buffers alive as long as the binding
        for info in session.get_outputs():
            shape = [batch if axis == 0 and not isinstance(d, int) else d for axis, d in enumerate(info.shape)]
            value = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32 if "float" in info.type else
                                                              np.int64, device, 0)
            self.binding.bind_ortvalue_output(info.name, value)
            self.values.append(value)
        self.names = [info.name for info in session.get_outputs()]

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()

    def outputs(self) -> dict[str, np.ndarray]:
        """One run's outputs, copied to the host."""
        self.run()
        return dict(zip(self.names, self.binding.copy_outputs_to_cpu()))

    def milliseconds(self, warmup: int, runs: int) -> float:
        """Median ms per synchronised run after ``warmup`` runs (a CUDA graph is captured in them)."""
        for _ in range(warmup):
            self.run()
        times = []
        for _ in range(runs):
            began = time.perf_counter()
            self.run()
            times.append((time.perf_counter() - began) * 1e3)
        return statistics.median(times)


class Bench:
    def __init__(self, args) -> None:
        import onnxruntime as ort

        self.args, self.ort = args, ort
        self.gpu = not args.cpu_only
        self.provider, self.device = ("cuda", "cuda") if self.gpu else ("cpu", "cpu")
        self.began = time.perf_counter()
        self.results: dict = {"machine": {}, "models": {}, "skipped": [], "errors": []}

    # -- bookkeeping ------------------------------------------------------------------------------
    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.began)

    def step(self, what: str, work, reserve: float = 0.0):
        """``work()`` unless the budget is spent (kept as skipped); an exception is kept, not raised."""
        if self.left() < reserve:
            self.results["skipped"].append(what)
            print(f"skipped (time): {what}", flush=True)
            return None
        began = time.perf_counter()
        try:
            value = work()
        except Exception as error:  # noqa: BLE001 - one failed step must not lose the others' results
            self.results["errors"].append(f"{what}: {type(error).__name__}: {str(error)[:400]}")
            print(f"error: {what}: {error}", flush=True)
            traceback.print_exc()
            return None
        print(f"{what}: {time.perf_counter() - began:.1f} s", flush=True)
        return value

    def save(self) -> None:
        os.makedirs(self.args.out, exist_ok=True)
        with open(os.path.join(self.args.out, "bench_gpu.json"), "w") as file:
            json.dump(self.results, file, indent=1)
        with open(os.path.join(self.args.out, "bench_gpu.md"), "w") as file:
            file.write(markdown(self.results))

    # -- sessions ---------------------------------------------------------------------------------
    def session(self, model: bytes, *, tf32: bool = False, graph: bool = False, placement: bool = False):
        from agf_onnx.runtime.sessions import create_session

        options = self.ort.SessionOptions()
        options.log_severity_level = 3
        return create_session(model, self.provider, allow_tf32=tf32, cuda_graph=graph, cpu_fallback=not placement,
                              options=options)

    def cpu_session(self, model: bytes):
        from agf_onnx.runtime.sessions import create_session

        return create_session(model, "cpu")

    def feeds(self, images: np.ndarray, compiled: bool) -> dict[str, np.ndarray]:
        feeds = {"x": np.ascontiguousarray(images)}
        if compiled:
            feeds["target"] = np.full(len(images), -1, np.int64)  # each sample's top class
        return feeds

    def timings(self, model: bytes, images: np.ndarray, compiled: bool, batches: list[int], entry: dict,
                key: str, session=None) -> None:
        """ms per batch under ``entry["ms"][key]``; ``key`` cuda_graph makes a CUDA-graph session per batch."""
        for batch in batches:
            current = session or self.session(model, tf32=key == "tf32", graph=key == "cuda_graph")
            bound = Bound(current, self.feeds(images[:batch], compiled), self.device)
            warmup, runs = (3, self.args.runs) if batch == 1 else (2, max(3, self.args.runs // 2))
            entry.setdefault("ms", {}).setdefault(key, {})[str(batch)] = round(bound.milliseconds(warmup, runs), 2)
            del bound, current
            gc.collect()

    # -- one model --------------------------------------------------------------------------------
    def prepare(self, name: str) -> dict:
        tiny = self.args.cpu_only
        size = 32 if tiny else self.args.size
        net = build(name, size, tiny)
        source = export(net, size)
        images = np.random.default_rng(0).standard_normal((16, 3, size, size)).astype(np.float32)
        state = {"net": net, "size": size, "source": source, "serialized": source.SerializeToString(),
                 "images": images, "compiled": {}}
        self.results["models"][name] = {"size": size, "nodes": len(source.graph.node), "forward": {}, "methods": {}}
        return state

    def references(self, name: str, state: dict) -> None:
        """float64 maps on the first ``samples`` images: gradient, gradient × input, AGF."""
        import torch

        from tests import oracle

        device = "cuda" if self.gpu and torch.cuda.is_available() else "cpu"
        net = state["net"].to(device=device, dtype=torch.float64).eval()
        x = torch.from_numpy(state["images"][:self.args.samples]).to(device=device, dtype=torch.float64)
        x.requires_grad_(True)
        logits = net(x)
        top = logits.argmax(1)
        (gradient,) = torch.autograd.grad(logits.gather(1, top[:, None]).sum(), x)
        state["float64"] = {
            "gradient": gradient.abs().sum(1, keepdim=True).cpu().numpy(),
            "gradient-x-input": (x * gradient).sum(1, keepdim=True).detach().cpu().numpy(),
        }
        with torch.device(device):  # the oracle makes some tensors (torch.eye) on the default device
            state["float64"]["agf"] = oracle.explain(net, x.detach(), None).cpu().numpy()
        self.results["models"][name]["float64_top_class"] = top.cpu().tolist()
        state["net"] = net.to("cpu", torch.float32)
        del net, x, logits, gradient
        if device == "cuda":
            torch.cuda.empty_cache()

    def forward(self, name: str, state: dict) -> None:
        entry = self.results["models"][name]["forward"]
        serialized, images = state["serialized"], state["images"]
        session = self.session(serialized)
        scores = session.run(None, {"x": images[:self.args.samples]})[0]
        self.results["models"][name]["fp32_top_class"] = scores.argmax(1).tolist()
        self.timings(serialized, images, False, [1, 16], entry, "fp32", session)
        if self.gpu:
            self.timings(serialized, images, False, [1, 16], entry, "tf32", self.session(serialized, tf32=True))

    def compile(self, name: str, state: dict, method: str) -> None:
        import agf_onnx

        began = time.perf_counter()
        try:
            proto = agf_onnx.compile(state["source"], method=method, options=METHOD_OPTIONS.get(method), check=False)
        except agf_onnx.CompileError as refusal:  # a method that does not apply (Chefer on a CNN): not an error
            self.results["skipped"].append(f"{name}/{method}: {refusal}")
            print(f"skipped: {name}/{method}: {refusal}", flush=True)
            return
        entry = self.results["models"][name]["methods"].setdefault(method, {})
        entry["compile_s"] = round(time.perf_counter() - began, 2)
        entry["nodes"] = len(proto.graph.node)
        state["compiled"][method] = proto.SerializeToString()

    def method(self, name: str, state: dict, method: str) -> None:
        """Placement, heatmaps against CPU / float64, fp32 and TF32 times of one compiled method."""
        entry = self.results["models"][name]["methods"][method]
        model, images, samples = state["compiled"][method], state["images"], self.args.samples
        feeds = self.feeds(images[:samples], True)
        fp32 = None
        if self.gpu:
            try:
                fp32 = self.session(model, placement=True)
                entry["placement"] = "all nodes on CUDA (session.disable_cpu_ep_fallback=1 loads)"
            except Exception as error:  # noqa: BLE001 - the finding itself
                entry["placement"] = f"FAILED: {str(error)[:300]}"
        else:
            entry["placement"] = "n/a (CPU dry run)"
        fp32 = fp32 or self.session(model)
        tf32 = self.session(model, tf32=True) if self.gpu else None
        maps = {"fp32": Bound(fp32, feeds, self.device).outputs()["heatmap"]}
        if tf32 is not None:
            maps["tf32"] = Bound(tf32, feeds, self.device).outputs()["heatmap"]
        maps["cpu"] = self.cpu_session(model).run(["heatmap"], feeds)[0]
        r = {"finite": bool(all(np.isfinite(m).all() for m in maps.values()))}
        for which in ("fp32", "tf32"):
            if which in maps:
                r[f"{which}_vs_cpu"] = pearson(maps[which], maps["cpu"])
        if "tf32" in maps:
            r["tf32_vs_fp32"] = pearson(maps["tf32"], maps["fp32"])
        reference = state.get("float64", {}).get(method)
        if reference is not None:
            for which in maps:
                r[f"{which}_vs_float64"] = pearson(maps[which], reference)
        entry["r"] = r
        batches = [1] if method in REPLICATING else [1, 16]
        self.timings(model, images, True, batches, entry, "fp32", fp32)
        if tf32 is not None:
            self.timings(model, images, True, batches, entry, "tf32", tf32)

    def placement(self, name: str, state: dict, method: str) -> None:
        """Only whether the fp32 session loads with no CPU fallback."""
        entry = self.results["models"][name]["methods"][method]
        try:
            self.session(state["compiled"][method], placement=True)
            entry["placement"] = "all nodes on CUDA (session.disable_cpu_ep_fallback=1 loads)"
        except Exception as error:  # noqa: BLE001 - the finding itself
            entry["placement"] = f"FAILED: {str(error)[:300]}"

    def graphs(self, name: str, state: dict, method: str | None) -> None:
        """fp32 times with ``enable_cuda_graph=1`` (the original model when ``method`` is None)."""
        results = self.results["models"][name]
        entry = results["forward"] if method is None else results["methods"][method]
        model = state["serialized"] if method is None else state["compiled"][method]
        batches = [1] if method in REPLICATING else [1, 16]
        self.timings(model, state["images"], method is not None, batches, entry, "cuda_graph")

    def explainer_graph(self, name: str, state: dict) -> None:
        """``Explainer(cuda_graph=True)``: AGF maps of a padded batch equal the plain session's."""
        import onnx

        from agf_onnx import Explainer

        model = state["compiled"]["agf"]
        graphed = Explainer(onnx.load_from_string(model), self.provider, cuda_graph=True, batch_size=2)
        plain = self.session(model)
        report = {}
        for count in (2, 1):
            x = state["images"][:count]
            expected = plain.run(["heatmap"], self.feeds(x, True))[0]
            got = graphed.run(x, np.array([-1]))["heatmap"]
            report[f"batch {count}"] = {"max_abs_difference": float(np.abs(got - expected).max()),
                                        "r": min(pearson(got, expected))}
        self.results["models"][name]["explainer_cuda_graph"] = report

    def profile(self, name: str, state: dict, method: str = "agf", batch: int = 16) -> None:
        """ONNX Runtime's profiler on one method: node time per op type (top 12). On CUDA a node's time is
        its host-side time: the kernels run asynchronously, so at batch 16 it is a rough guide only."""
        from agf_onnx.runtime.sessions import create_session

        options = self.ort.SessionOptions()
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(self.args.out, f"profile_{name}_{method}")
        session = create_session(state["compiled"][method], self.provider, options=options)
        bound = Bound(session, self.feeds(state["images"][:batch], True), self.device)
        for _ in range(3):
            bound.run()
        path = session.end_profiling()
        with open(path) as file:
            events = json.load(file)
        os.remove(path)  # large; the summary is what is kept
        totals: dict[str, float] = {}
        for event in events:
            if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
                op = event.get("args", {}).get("op_name", "?")
                totals[op] = totals.get(op, 0.0) + event.get("dur", 0) / 3e3  # µs over 3 runs → ms per run
        whole = sum(totals.values()) or 1.0
        top = sorted(totals.items(), key=lambda item: -item[1])[:12]
        self.results["models"][name].setdefault("profile", {})[f"{method}, batch {batch}"] = {
            "node_ms_per_run": round(whole, 2),
            "by_op_type": {op: f"{ms:.2f} ms ({100 * ms / whole:.0f} %)" for op, ms in top}}

    # -- the whole run ----------------------------------------------------------------------------
    def run(self) -> None:
        import onnx
        import onnxruntime as ort
        import torch

        import agf_onnx
        from agf_onnx.compiler.methods import METHODS

        methods = list(METHODS) if self.args.methods == "all" else self.args.methods.split(",")
        machine = self.results["machine"]
        machine.update(python=platform.python_version(), cpus=os.cpu_count(), onnxruntime=ort.__version__,
                       onnx=onnx.__version__, torch=torch.__version__, agf_onnx=agf_onnx.__file__,
                       providers=ort.get_available_providers(), cpu_only=self.args.cpu_only,
                       gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                       method_options=METHOD_OPTIONS, samples=self.args.samples, runs=self.args.runs)
        print(json.dumps(machine), flush=True)
        graph_methods = methods if self.args.graph_methods == "all" else \
            [m for m in self.args.graph_methods.split(",") if m]
        placement_methods = [] if not self.args.placement_methods else \
            list(METHODS) if self.args.placement_methods == "all" else self.args.placement_methods.split(",")
        for name in self.args.models.split(","):
            state = self.step(f"{name}: build, calibrate, export", lambda: self.prepare(name))
            if state is None:
                continue
            self.step(f"{name}: float64 references", lambda: self.references(name, state))
            self.step(f"{name}: forward", lambda: self.forward(name, state), reserve=20)

            def compiled(method: str) -> bool:
                if method not in state["compiled"]:
                    self.step(f"{name}/{method}: compile", lambda: self.compile(name, state, method), reserve=30)
                return method in state["compiled"]

            for method in methods:  # the full check (placement, maps, times) first, for these
                if compiled(method):
                    self.step(f"{name}/{method}: placement, heatmaps, times", lambda: self.method(name, state, method),
                              reserve=20)
                    self.save()
            if self.gpu:
                for method in [m for m in placement_methods if m not in methods]:
                    if compiled(method):
                        self.step(f"{name}/{method}: placement", lambda: self.placement(name, state, method),
                                  reserve=15)
                self.step(f"{name}: forward with CUDA graphs", lambda: self.graphs(name, state, None), reserve=20)
                if compiled("agf"):
                    self.step(f"{name}: Explainer(cuda_graph=True)", lambda: self.explainer_graph(name, state),
                              reserve=20)
                    for batch in self.args.profile_batches:
                        self.step(f"{name}: profile agf batch {batch}", lambda: self.profile(name, state, "agf", batch),
                                  reserve=30)
                for method in graph_methods:
                    if compiled(method):
                        self.step(f"{name}/{method}: CUDA graphs", lambda: self.graphs(name, state, method), reserve=20)
                        self.save()
                for method in self.args.later_methods.split(",") if self.args.later_methods else []:
                    if compiled(method):
                        self.step(f"{name}/{method}: placement, heatmaps, times",
                                  lambda: self.method(name, state, method), reserve=25)
                        self.save()
            else:
                self.results["skipped"].append(f"{name}: CUDA graphs (CPU dry run)")
                if compiled("agf"):
                    self.step(f"{name}: profile agf batch 1", lambda: self.profile(name, state, "agf", 1))
            state = None  # the model's sessions and buffers go before the next model's
            gc.collect()
        self.results["seconds"] = round(time.perf_counter() - self.began, 1)
        self.save()


def _r(values) -> str:
    return "–" if values is None else f"{min(values):.5f}" if min(values) < 0.99999 else f"{min(values):.7f}"


def _ms(entry: dict, key: str) -> str:
    times = entry.get("ms", {}).get(key, {})
    return " / ".join(f"{times[b]:.1f}" if b in times else "–" for b in ("1", "16"))


def markdown(results: dict) -> str:
    """The tables: per model, one row per method (and the forward pass)."""
    machine = results["machine"]
    lines = [f"GPU: {machine.get('gpu')}; onnxruntime {machine.get('onnxruntime')}, torch {machine.get('torch')}, "
             f"{machine.get('cpus')} CPUs; heatmap r: minimum over {machine.get('samples')} samples (top class); "
             f"ms per batch 1 / 16: IO binding, synchronised, median of {machine.get('runs')} (batch 1) runs; "
             f"method options {machine.get('method_options')}", ""]
    for name, model in results["models"].items():
        lines += [f"### {name}, {model['size']}², {model['nodes']} nodes", "",
                  "| method | nodes | placement (no CPU fallback) | r fp32 vs CPU | r TF32 vs CPU | r TF32 vs fp32 "
                  "| r fp32 vs float64 | r TF32 vs float64 | r CPU vs float64 | ms fp32 | ms TF32 "
                  "| ms fp32 + CUDA graph |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        forward = model["forward"]
        lines.append(f"| forward | {model['nodes']} | | | | | | | | {_ms(forward, 'fp32')} | {_ms(forward, 'tf32')} | "
                     f"{_ms(forward, 'cuda_graph')} |")
        for method, entry in model["methods"].items():
            r = entry.get("r", {})
            placement = entry.get("placement", "–")
            placement = "ok" if placement.startswith("all nodes") else placement
            lines.append(f"| {method} | {entry.get('nodes', '–')} | {placement} | {_r(r.get('fp32_vs_cpu'))} | "
                         f"{_r(r.get('tf32_vs_cpu'))} | {_r(r.get('tf32_vs_fp32'))} | "
                         f"{_r(r.get('fp32_vs_float64'))} | {_r(r.get('tf32_vs_float64'))} | "
                         f"{_r(r.get('cpu_vs_float64'))} | {_ms(entry, 'fp32')} | "
                         f"{_ms(entry, 'tf32')} | {_ms(entry, 'cuda_graph')} |")
        for what, profile in model.get("profile", {}).items():
            lines += ["", f"Profile ({what}): {profile['node_ms_per_run']} ms of node time per run; "
                      + ", ".join(f"{op} {share}" for op, share in profile["by_op_type"].items())]
        if "explainer_cuda_graph" in model:
            lines += ["", f"Explainer(cuda_graph=True) against the plain CUDA session: {model['explainer_cuda_graph']}"]
        lines.append("")
    if results["skipped"]:
        lines += ["Skipped: " + "; ".join(results["skipped"]), ""]
    if results["errors"]:
        lines += ["Errors:", *[f"- {e}" for e in results["errors"]], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for bench_gpu.json and bench_gpu.md")
    parser.add_argument("--models", default="resnet50,vgg19")
    parser.add_argument("--methods", default="all", help="comma-separated, or all")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=2, help="images whose heatmaps are compared")
    parser.add_argument("--runs", type=int, default=10, help="timed runs at batch 1 (half at batch 16)")
    parser.add_argument("--budget", type=float, default=400, help="seconds; later steps are skipped after it")
    parser.add_argument("--graph-methods", default="all", help="methods timed with CUDA graphs (comma-separated)")
    parser.add_argument("--placement-methods", default="", help="methods whose placement alone is checked, or all")
    parser.add_argument("--later-methods", default="", help="full checks after the CUDA graphs, if time is left")
    parser.add_argument("--profile-batches", type=lambda t: [int(b) for b in t.split(",") if b], default=[1, 16])
    parser.add_argument("--cpu-only", action="store_true", help="dry run on tiny models with the CPU provider")
    args = parser.parse_args()
    import onnxruntime as ort
    import torch  # first: its CUDA and cuDNN libraries are the ones ONNX Runtime's CUDA provider loads

    ort.set_default_logger_severity(3)
    if not args.cpu_only and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    del torch
    Bench(args).run()


if __name__ == "__main__":
    main()
