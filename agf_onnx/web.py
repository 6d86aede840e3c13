"""``agf-onnx web MODEL -o SITE/``: a static page that explains images in the browser with onnxruntime-web.

The site holds the compiled model (compiled on the fly from an original classifier, as ``explain`` does),
the page (``index.html``, ``agf.js``: pick, drop or photograph an image; the prediction; the chosen class's
map over the image with a colour bar; a class picker and the top classes), ``agf.json`` (the preprocessing
of ``explain`` with the same presets and ``--input-shape``, so that the page's maps are the CLI's) and
onnxruntime-web's files, copied from a local ``npm install onnxruntime-web`` (nothing is fetched from a
CDN, nothing runs on a server). ``--serve`` serves the site on 127.0.0.1 with the cross-origin isolation
headers (COOP/COEP) that multi-threaded WASM needs.

The page's contract for tests and embedding pages: ``index.html?image=URL&class=K`` explains that image
(class K; default the top class), ``window.agf.ready`` resolves once the model is loaded (and that image
explained), ``window.agf.result`` is the last explanation ``{heatmap: Float32Array, shape: [H, W], target,
probabilities, backend}``.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence

import onnx

from . import contract
from .errors import CompileError
from .runtime.explain import PRESETS, Explainer, compiled_model, read_labels

#: the page, shipped as package data
ASSETS = pathlib.Path(__file__).resolve().parent / "web"
#: onnxruntime-web's files the page loads: the WebGPU bundle (with its WASM fallback) and the plain WASM one
ORT_FILES = ("ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm",
             "ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
#: where `agf-onnx web` looks for onnxruntime-web without --ort-web: an `npm install onnxruntime-web` here
DEFAULT_ORT_WEB = pathlib.Path("node_modules") / "onnxruntime-web"
MODEL_FILE, CONFIG_FILE = "model.onnx", "agf.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``web`` subcommand's arguments (its preprocessing options are ``explain``'s)."""
    parser.add_argument("model", metavar="MODEL", help="a compiled model, an original classifier (compiled with "
                                                        "AGF here), or with --serve alone a site folder to serve")
    parser.add_argument("-o", "--output", metavar="SITE", help="the folder to create (must not exist)")
    parser.add_argument("--serve", action="store_true", help="serve the site on 127.0.0.1 (COOP/COEP headers)")
    parser.add_argument("--port", type=int, default=8000, help="with --serve (default 8000; 0: any free port)")
    parser.add_argument("--ort-web", metavar="DIR", default=str(DEFAULT_ORT_WEB),
                        help="the onnxruntime-web npm package (default: ./node_modules/onnxruntime-web, made by "
                             "`npm install onnxruntime-web`)")
    parser.add_argument("--labels", metavar="FILE", help="class names, one per line")
    parser.add_argument("--top-k", type=int, default=5, metavar="K", help="classes listed with their probability")
    parser.add_argument("--preset", choices=[*PRESETS, "none"], default="imagenet", help="as for explain")
    parser.add_argument("--mean", metavar="R,G,B", help="as for explain (with --std)")
    parser.add_argument("--std", metavar="R,G,B", help="as for explain (with --mean)")
    parser.add_argument("--size", type=int, metavar="S", help="as for explain: shorter side to S, centre-crop")
    parser.add_argument("--crop", action="store_true", help="as for explain: keep the aspect ratio, centre-crop")
    parser.add_argument("--bgr", action="store_true", help="as for explain: BGR channel order")
    parser.add_argument("--input-shape", metavar="NAME=d0,d1,...", action="append", default=[],
                        help="as for explain: for compiling an original model with dynamic height/width")


def run(args: argparse.Namespace) -> int:
    """``agf-onnx web``: build the site (unless MODEL is a site and --serve), then serve it if asked."""
    from .compiler import passes

    if args.serve and args.output is None and (pathlib.Path(args.model) / CONFIG_FILE).is_file():
        return serve(args.model, args.port)
    if args.output is None:
        raise CompileError("-o SITE is required (the folder to create)")
    floats = {name: _floats(getattr(args, name), f"--{name}") for name in ("mean", "std")}
    site = build_site(args.model, args.output, ort_web=args.ort_web, labels=args.labels, top_k=args.top_k,
                      preset=args.preset, size=args.size, crop=args.crop, bgr=args.bgr,
                      input_shapes=dict(passes.parse_input_shape(text) for text in args.input_shape), **floats)
    print(f"wrote {site}: open it with `agf-onnx web {site} --serve` (a page needs a server, not file://)")
    return serve(site, args.port) if args.serve else 0


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise CompileError(f"{flag} {text}: expected three numbers R,G,B")
    return values


def build_site(model: str | os.PathLike, output: str | os.PathLike, *, ort_web: str | os.PathLike = DEFAULT_ORT_WEB,
               labels: str | os.PathLike | None = None, top_k: int = 5, preset: str = "imagenet",
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None, size: int | None = None,
               crop: bool = False, bgr: bool = False, input_shapes: dict | None = None) -> pathlib.Path:
    """Write the site to ``output`` (a new folder), all at once: it appears complete or not at all."""
    if not os.path.isfile(model) or not os.path.getsize(model):
        raise CompileError(f"{model}: no such model file" if not os.path.exists(model) else
                           f"{model}: not an ONNX model file")
    out = pathlib.Path(output).absolute()
    if os.path.lexists(out):
        raise CompileError(f"-o {out}: already exists; give a new folder for the site")
    parent = next(p for p in out.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CompileError(f"-o {out}: cannot write there: {parent} is not a folder we may write to")
    ort_dist = _ort_dist(pathlib.Path(ort_web))
    if top_k < 1:
        raise CompileError(f"--top-k {top_k}: must be at least 1")
    names = read_labels(labels) if labels else None
    proto, _ = compiled_model(model, input_shapes)
    explainer = Explainer(proto, "cpu", preset=preset, mean=mean, std=std, size=size, crop=crop, bgr=bgr,
                          labels=names, batch_size=1)
    if names is not None and explainer.classes is not None and len(names) != explainer.classes:
        raise CompileError(f"--labels {labels}: {len(names)} labels for a model of {explainer.classes} classes")
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        _write(staging, proto, explainer, ort_dist, top_k)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _ort_dist(ort_web: pathlib.Path) -> pathlib.Path:
    """onnxruntime-web's ``dist`` folder (given the package or its dist), with every file the page loads."""
    dist = ort_web / "dist" if (ort_web / "dist").is_dir() else ort_web
    missing = [name for name in ORT_FILES if not (dist / name).is_file()]
    if missing:
        raise CompileError(f"--ort-web {ort_web}: no onnxruntime-web there ({missing[0]} missing): run "
                           f"`npm install onnxruntime-web` in this folder, or pass --ort-web node_modules/onnxruntime-web")
    return dist


def _write(site: pathlib.Path, proto: onnx.ModelProto, explainer: Explainer, ort_dist: pathlib.Path,
           top_k: int) -> None:
    meta = contract.metadata(proto)
    onnx.save(proto, str(site / MODEL_FILE))
    prep = explainer.preprocessing
    config = {"model": MODEL_FILE, "image_input": explainer.image_input, "scores": explainer.scores_output,
              "heatmap": "heatmap", "target": "target", "method": meta.get(contract.METHOD, "agf"),
              "classes": explainer.classes, "labels": explainer.labels, "top_k": top_k,
              # explain's Preprocessing, field for field (agf.js applies it as Preprocessing.fit/to_tensor do)
              "height": prep.height, "width": prep.width, "size": prep.size, "crop": prep.crop, "bgr": prep.bgr,
              "mean": list(prep.mean) if prep.mean is not None else None,
              "std": list(prep.std) if prep.std is not None else None,
              "integer_input": prep.integer_input, "channels_last": prep.channels_last}
    (site / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    for asset in ("index.html", "agf.js"):
        shutil.copyfile(ASSETS / asset, site / asset)
    (site / "ort").mkdir()
    for name in ORT_FILES:
        shutil.copyfile(ort_dist / name, site / "ort" / name)
    os.chmod(site, 0o755)  # mkdtemp makes it private


class _IsolatedHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with cross-origin isolation (SharedArrayBuffer: multi-threaded WASM) and the types
    browsers insist on for modules and WebAssembly."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".js": "text/javascript", ".wasm": "application/wasm", ".onnx": "application/octet-stream"}

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # quiet: one line per file is noise here
        pass


def make_server(site: str | os.PathLike, port: int = 0) -> http.server.ThreadingHTTPServer:
    """A server of ``site`` on 127.0.0.1 (``port`` 0: any free one; ``server.server_port`` says which)."""
    if not (pathlib.Path(site) / CONFIG_FILE).is_file():
        raise CompileError(f"{site}: not a site made by `agf-onnx web` (no {CONFIG_FILE})")
    handler = functools.partial(_IsolatedHandler, directory=str(site))
    try:
        return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as error:
        raise CompileError(f"--port {port}: cannot serve there: {error.strerror}") from error


def serve(site: str | os.PathLike, port: int = 8000) -> int:
    server = make_server(site, port)
    print(f"serving {site} at http://127.0.0.1:{server.server_port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
