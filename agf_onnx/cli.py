"""The ``agf-onnx`` command line: the parser, and each command's options handed to the library
(``options.py`` turns them into its types; ``commands``, ``text_explain``, ``bank`` and ``web``
do the work of their commands)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from . import __version__, commands, text_evaluate, text_explain
from .compiler import compile as compile_model
from .compiler.coverage import coverage_table
from .compiler.inspect import inspect
from .compiler.methods import METHODS
from .contract import HEATMAP_OUTPUT, TARGET_INPUT
from .errors import CompileError
from .modelfile import check_model_file, check_writable, save, size_on_disk, uses_external_data
from .options import (
    compile_spec,
    engine_options,
    flat_options,
    floats,
    given_method_options,
    given_modifiers,
    image_options,
    input_shapes,
    memory_option,
    method_options,
    model_options,
    modifier_options,
    ssl_options,
)
from .runtime.outputs import OUTPUT_FORMATS
from .runtime.plots import COLOUR_MAPS, DEFAULT_COLOUR_MAP


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agf-onnx",
        description="Compile ONNX image classifiers into models that also output a per-pixel explanation "
                    "(Attribution Guided Factorization), runnable in ONNX Runtime on CPU or CUDA.")
    parser.add_argument("--version", action="version", version=f"agf-onnx {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    compile_ = commands.add_parser(
        "compile", help="write MODEL plus its explanation graph to OUT",
        description=f"Compile MODEL into OUT: same inputs plus '{TARGET_INPUT}' (int64 [N] or [1]; -1 = each "
                    f"sample's top class), same outputs plus '{HEATMAP_OUTPUT}' (float32 "
                    "[N, 1, H, W]: positive = evidence for the class, negative = against). Exit codes: 0 done, "
                    "1 the model cannot be compiled (the message says why), 2 unsupported ops (all listed).")
    compile_.add_argument("model", metavar="MODEL", help="the ONNX classifier (external data is read beside it)")
    compile_.add_argument("-o", "--output", metavar="OUT", required=True, help="where to write the compiled model")
    compile_.add_argument("--method", choices=sorted(METHODS), default="agf", help="explanation method (default: agf)")
    model_options(compile_)
    flat_options(compile_)
    compile_.add_argument("--flat", metavar="NODE", action="append", default=[],
                          help="force this Conv or token-wise MatMul node to the flat rule (repeatable)")
    compile_.add_argument("--full", metavar="NODE", action="append", default=[],
                          help="force this Conv or token-wise MatMul node to the full AGF rule (repeatable)")
    compile_.add_argument("--layer", metavar="NODE",
                          help="the node whose output a layer method (gradcam) explains (default: the last Conv "
                               "with a spatial output or the last transformer block's output, whichever is later)")
    compile_.add_argument("--top-k", type=int, metavar="K",
                          help="also output 'heatmaps' [N, K, H, W] for the K best classes and their indices "
                               "'classes' [N, K], in the same run")
    method_options(compile_)
    modifier_options(compile_)
    ssl_options(compile_)
    compile_.add_argument("--external-data", action="store_true",
                          help="store the weights in OUT.data beside OUT (automatic above 2 GiB or when "
                               "MODEL has external data)")
    compile_.add_argument("--no-check", action="store_true",
                          help="skip onnx.checker's full check of the result (faster on huge models)")
    compile_.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")

    inspect_ = commands.add_parser(
        "inspect", help="show the rule each op of MODEL gets and whether it compiles",
        description="List the op types on the path from the image to the logits with their node counts, the "
                    "gradient and relevance rule each gets, unsupported ops with their node names, and the share "
                    "of nodes covered. Exit 0 when MODEL compiles, 2 otherwise.")
    inspect_.add_argument("model", metavar="MODEL")
    inspect_.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect_.add_argument("--method", choices=sorted(METHODS), default="agf")
    modifier_options(inspect_)
    model_options(inspect_)

    explain = commands.add_parser(
        "explain", help="heatmaps, overlays and a gallery for image files",
        description="Explain every image (files, or folders searched recursively) with MODEL (a compiled model, "
                    "or an original classifier compiled on the fly). Writes per image an overlay PNG (the image, "
                    "then one overlay per explained class titled with its name and probability, and a colour "
                    "bar) and the raw heatmaps (.npy), plus "
                    "results.json and, for several images, index.html. Exit 0 when every image was explained, 1 "
                    "when some failed (listed in results.json), 2 when nothing could run.")
    explain.add_argument("model", metavar="MODEL")
    explain.add_argument("images", metavar="IMAGES_OR_FOLDERS", nargs="*")
    explain.add_argument("-o", "--output", metavar="OUTDIR", required=True)
    which = explain.add_mutually_exclusive_group()
    which.add_argument("--target", metavar="CLASS", help="class index or label name (default: the predicted class)")
    which.add_argument("--top-k", metavar="K", type=int, help="one heatmap per class among the K best")
    explain.add_argument("--labels", metavar="FILE", help="class names, one per line")
    explain.add_argument("--text", metavar="SENTENCE", action="append",
                         help="a text model: explain this sentence (repeatable; with --tokenizer), writes index.html "
                              "and results.json (docs/text.md)")
    explain.add_argument("--sentences", metavar="FILE", help="a text model: sentences, one per line (UTF-8)")
    explain.add_argument("--tokenizer", metavar="PATH", help="a tokenizer.json, or the folder an exporter wrote it to")
    image_options(explain)
    explain.add_argument("--batch-size", type=int, default=8, metavar="B",
                         help="images per step (default 8); a session run takes fewer where they would not fit "
                              "--max-memory")
    memory_option(explain)
    explain.add_argument("--input-shape", metavar="NAME=d0,d1,...", action="append", default=[],
                         help="for compiling an original model with dynamic height/width on the fly")
    explain.add_argument("--output-format", choices=list(OUTPUT_FORMATS), default="files",
                         help="files (default): an overlay PNG and a .npy per image, index.html; npz-shards / "
                              "parquet: the maps in shards of 1024 images (maps-00000.npz / .parquet), for very "
                              "large runs")
    engine_options(explain)
    explain.add_argument("--cmap", choices=list(COLOUR_MAPS), default=DEFAULT_COLOUR_MAP,
                         help=f"colour map of the overlays (default {DEFAULT_COLOUR_MAP}: warm = evidence for the "
                              "class, blue = against, over the greyed photo; bwr: the plain red/blue map)")
    explain.add_argument("-q", "--quiet", action="store_true",
                         help="print only errors (no provider line, progress bar or summary)")

    evaluate = commands.add_parser(
        "evaluate", help="the paper's perturbation, segmentation and class-sensitivity benchmarks",
        description="Compile MODEL (an original classifier) with each method and score the explanations on "
                    "DATA: negative and positive perturbation (AUC of top-1 accuracy as 10%…90% of the pixels "
                    "are removed by rank, explaining the predicted and the labelled class), segmentation against "
                    "masks (pixel accuracy, mAP) and class sensitivity on images with two labelled objects. DATA: "
                    "a CSV (file,label[,labels][,mask]), a folder with labels.csv, or a folder of class "
                    "subfolders (masks as <image>.mask.png beside the images). Writes results.json, results.md "
                    "(a Markdown table) and perturbation.png to OUTDIR. Exit 0 on success, 1 on bad data or a bad "
                    "option (the message names the file and line), 2 when MODEL cannot be compiled for a method "
                    "(unsupported ops).")
    evaluate.add_argument("model", metavar="MODEL")
    evaluate.add_argument("data", metavar="DATA")
    evaluate.add_argument("-o", "--output", metavar="OUTDIR", required=True)
    evaluate.add_argument("--methods", default="all", metavar="M1,M2,...",
                          help=f"methods to compare (default: all of {', '.join(METHODS)}); each may carry "
                               "modifiers: agf+smooth, agf+contrast, agf+smooth=8+contrast=softmax, "
                               "gradcam+smooth-square (see compile --smooth/--contrast); the results list each by "
                               "its full name")
    evaluate.add_argument("--limit", type=int, metavar="N", help="only the first N images")
    evaluate.add_argument("--labels", metavar="FILE", help="class names, one per line (for names in DATA)")
    image_options(evaluate)
    evaluate.add_argument("--batch-size", type=int, default=16, metavar="B",
                          help="images per step (default 16); a session run takes fewer where they would not "
                               "fit --max-memory")
    memory_option(evaluate)
    method_options(evaluate)
    modifier_options(evaluate, evaluate=True)
    model_options(evaluate)
    flat_options(evaluate)
    ssl_options(evaluate)
    engine_options(evaluate)
    evaluate.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    text_evaluate.add_options(evaluate)

    bank = commands.add_parser(
        "bank", help="the feature vectors of reference images, for a self-supervised model (--ssl-bank)",
        description="Run MODEL (the original network) on reference images and write the features tensor of each, "
                    "flattened, to BANK.npy (float32 [images, features]): the bank `agf-onnx compile --ssl-bank` "
                    "searches for the nearest neighbour of an image's features (the paper's Algorithm 2).")
    bank.add_argument("model", metavar="MODEL")
    bank.add_argument("images", metavar="IMAGES_OR_FOLDERS", nargs="+")
    bank.add_argument("-o", "--output", metavar="BANK.npy", required=True)
    bank.add_argument("--features", metavar="TENSOR",
                      help="the tensor that feeds the head (default: the data input of the op that makes the logits)")
    image_options(bank)
    bank.add_argument("--batch-size", type=int, default=16, metavar="B")
    bank.add_argument("--input-shape", metavar="NAME=d0,d1,...", action="append", default=[],
                      help="fix the shape of an input with dynamic height/width")
    bank.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    from . import web  # the page's options live with the page

    web.add_arguments(commands.add_parser("web", help="a static page that explains images in the browser",
                                          description=web.__doc__.split("\n\n")[0]))
    rules = commands.add_parser("rules", help="list the supported ops and the rule each gets",
                                description="Print the coverage table generated from the rule registry.")
    rules.add_argument("--method", choices=sorted(METHODS), default="agf")
    return parser


def _named(error: CompileError, path: str) -> CompileError:
    """The error with the model file named in front, unless its message names it already."""
    if str(path) not in str(error):
        error.args = (f"{path}: {error}", *error.args[1:])
    return error


def _compile(args: argparse.Namespace) -> int:
    spec = compile_spec(args, method=args.method, flat=args.flat, full=args.full, layer=args.layer, top_k=args.top_k,
                        check=not args.no_check, modifiers=given_modifiers(args))  # option errors: no file name
    check_model_file(args.model)
    check_writable(args.output)
    began = time.perf_counter()
    try:
        model = compile_model(args.model, spec)
    except CompileError as error:
        _named(error, args.model)
        raise
    save(model, args.output, external_data=args.external_data or uses_external_data(args.model))
    if not args.quiet:
        before, after = size_on_disk(args.model), size_on_disk(args.output)
        added = sum(1 for n in model.graph.node if n.name.startswith("agf/"))
        print(f"{args.model} → {args.output}: {args.method}" +
              (f" ({spec.modifiers.describe()})" if spec.modifiers else "") + f", {added} explanation nodes, "
              f"{after / 2**20:.1f} MiB ({after / max(before, 1):.2f}× the input, external data counted), "
              f"{time.perf_counter() - began:.1f} s")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    shapes = input_shapes(args)
    try:
        check_model_file(args.model)
        report = inspect(args.model, method=args.method, input_shapes=shapes, logits=args.logits, image=args.image,
                         modifiers=given_modifiers(args))
    except CompileError as error:  # unreadable file: the model does not compile either
        print(f"agf-onnx: error: {_named(error, args.model)}", file=sys.stderr)
        return 2
    print(report.to_json() if args.json else report.to_text())
    return 0 if report.compiles else 2


def _bank(args: argparse.Namespace) -> int:
    from .bank import bank
    from .runtime.explain import ExplainError, collect_images

    images, _ = collect_images(args.images)
    if not images:
        raise ExplainError(f"no images found in {', '.join(args.images)}")
    began = time.perf_counter()
    shapes = input_shapes(args)
    rows = bank(args.model, images, features=args.features, output=args.output, batch_size=args.batch_size,
                provider=args.provider, input_shapes=shapes, progress=not args.quiet, preset=args.preset,
                mean=floats(args.mean, "--mean"), std=floats(args.std, "--std"), size=args.size, crop=args.crop,
                bgr=args.bgr)
    print(f"{len(rows)} images → {args.output}: float32 {list(rows.shape)}, {time.perf_counter() - began:.1f} s")
    return 0


#: Exit status after the reader of our output went away (``agf-onnx rules | head``), as a process
#: ended by SIGPIPE reports it.
BROKEN_PIPE_EXIT = 128 + 13


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = _run(args)
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # the reader has gone: say nothing, and keep Python from complaining when it flushes at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE_EXIT
    except CompileError as error:
        print(f"agf-onnx: error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:  # a file we write or read went away or is not ours to write
        where = f"{error.filename}: " if error.filename else ""
        print(f"agf-onnx: error: {where}{error.strerror or error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the engines have stopped their work on the way out (Ray: shut down)
        print("agf-onnx: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "compile":
        return _compile(args)
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "explain":
        return text_explain.command(args) if args.text or args.sentences else commands.explain(args)
    if args.command == "evaluate":
        if text_evaluate.is_text_evaluation(args):
            return text_evaluate.command(args, given_modifiers(args), given_method_options(args))
        return commands.evaluate(args)
    if args.command == "bank":
        return _bank(args)
    if args.command == "web":
        from .web import run

        return run(args)
    print(coverage_table(args.method))
    return 0


if __name__ == "__main__":
    sys.exit(main())
