"""Throughput of ``explain``'s local engine against the Ray engine, on this machine.

    python tools/bench_ray.py [--images 512] [--batch-size 16] [--workers 1,2] [--size 64] [--method agf]

Builds the built-in benchmark's VGG-style network (``tools/train_benchmark.py``'s architecture,
seeded, untrained: the time does not depend on the weights), compiles it, generates ``--images``
benchmark canvases (scikit-learn's digits), then explains them all with

- the local engine: one ONNX Runtime session using every core, and one using a single thread
  (what one Ray worker runs);
- the Ray engine with K workers on a local Ray instance with K CPUs, for each K of ``--workers``.

Each run consumes every image's maps in the driver without writing files (the writing is the
same for both engines). Every configuration runs on one batch per worker, then on all the images:
the first gives its fixed cost per run (for Ray: the actors' start, each importing ONNX Runtime and loading
the model), the difference its steady rate. Prints both, the Ray start-up, and the scaling
model's ``r`` (one single-threaded session's images/s) for planning: a run of N images on K
workers takes about fixed cost + N / (K × r).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

import agf_onnx  # noqa: E402
from agf_onnx.runtime.explain import Explainer  # noqa: E402
from tests.models import export  # noqa: E402
from tools import make_benchmark, train_benchmark  # noqa: E402


def _seconds(outcomes) -> float:
    """Seconds to consume every outcome (each must be an explanation)."""
    began = time.perf_counter()
    for outcome in outcomes:
        assert outcome.error is None, outcome.error
    return time.perf_counter() - began


def _fit(name: str, run, images: list, small: int) -> float:
    """Run on ``small`` images (a batch per worker), then on all: the first is the fixed cost of a
    run, the difference gives the steady rate; prints both. Returns the steady images/s."""
    short, full = run(images[:small]), run(images)
    rate = (len(images) - small) / max(full - short, 1e-9)
    print(f"{name:34s} {len(images) / full:6.1f} images/s overall ({full:5.1f} s), steady {rate:6.1f} images/s, "
          f"fixed {short - small / rate:4.1f} s per run")
    return rate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts for the Ray engine")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--method", default="agf")
    args = parser.parse_args(argv)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="bench-ray-"))
    make_benchmark.generate(folder / "data", args.images, seed=0, size=args.size, source="digits")
    images = sorted((folder / "data" / "images").glob("*.png"))
    torch.manual_seed(0)
    network = train_benchmark.ARCHITECTURES["vgg"](args.size, 10).eval()
    model = agf_onnx.compile(export(network, args.size), method=args.method)
    options = {"preset": "symmetric"}
    print(f"{len(images)} images {args.size}², {args.method} on the benchmark's VGG-style network, batch "
          f"{args.batch_size}, {os.cpu_count()} CPUs, ONNX Runtime CPU")
    rates = {}
    for name, threads in (("local, one session, all cores", None), ("local, one session, 1 thread", 1)):
        explainer = Explainer(model, "cpu", batch_size=args.batch_size, threads=threads, **options)
        rates[name] = _fit(name, lambda chosen, explainer=explainer: _seconds(explainer.explain_each(chosen)), images,
                           args.batch_size)
    from agf_onnx.distributed import RayEngine

    for workers in (int(k) for k in args.workers.split(",")):
        began = time.perf_counter()
        with RayEngine(workers=workers) as engine:
            print(f"ray: a local instance with {workers} CPU(s) started in {time.perf_counter() - began:.1f} s")
            explainer = Explainer(model, "cpu", batch_size=args.batch_size, **options)

            def run(chosen, engine=engine, preprocessing=explainer.preprocessing):
                return _seconds(engine.explain(model, preprocessing, options, chosen, batch_size=args.batch_size))

            rates[workers] = _fit(f"ray, {workers} worker(s)", run, images, args.batch_size * workers)
    single = rates["local, one session, 1 thread"]
    print(f"scaling model: r = {single:.1f} images/s per single-threaded worker; measured K × r: " +
          ", ".join(f"K={k}: {rates[k]:.1f} of {k * single:.1f}" for k in rates if isinstance(k, int)))


if __name__ == "__main__":
    main()
