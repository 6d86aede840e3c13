"""The ``agf-onnx`` command line: a thin layer over ``agf_onnx.compile`` and the rule registry."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from . import __version__, passes, text_evaluate
from .budget import BudgetError, parse_memory
from .compiler import compile as compile_model
from .contract import HEATMAP_OUTPUT, TARGET_INPUT
from .coverage import coverage_table
from .errors import CompileError
from .inspect import inspect
from .methods import FLAT_POLICIES, METHODS
from .modelfile import check_model_file, check_writable, save, size_on_disk, uses_external_data  # noqa: F401 - save: tools import it from here
from .modifiers import CONTRASTS, DEFAULT_NOISE, DEFAULT_SEED, DEFAULT_SMOOTH, Modifiers, parse_variant
from .outputs import OUTPUT_FORMATS
from .plots import COLOUR_MAPS, DEFAULT_COLOUR_MAP


def _memory_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-memory", metavar="SIZE", type=_memory_size,
                        help="the most memory the process may hold while the model runs, e.g. 8G or 512M (default: "
                             "half the memory available at start; with --engine ray, each worker's share of it). "
                             "Runs are sized from the model's measured cost per image (docs/memory.md); a budget "
                             "too small for one image is refused with what it needs")


def _memory_size(text: str) -> int:
    try:
        return parse_memory(text)
    except BudgetError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix(f"--max-memory {text}: ")) from error


def _model_options(parser: argparse.ArgumentParser) -> None:
    """Where the image, the class scores and the image size are, for models that don't say."""
    parser.add_argument("--input-shape", metavar="NAME=d0,d1,...", action="append", default=[],
                        help="fix the shape of an input with dynamic height/width, e.g. x=1,3,224,224 "
                             "(repeatable; the batch axis stays dynamic)")
    parser.add_argument("--logits", metavar="NAME",
                        help="tensor holding the class scores (default: the only [N, classes] float output, "
                             "taken before a trailing Softmax/LogSoftmax)")
    parser.add_argument("--image", metavar="NAME", help="the image input (default: the only 4-D input)")


def _method_options(parser: argparse.ArgumentParser) -> None:
    """The replicated methods' settings (compile, evaluate)."""
    parser.add_argument("--steps", type=int, metavar="S", help="integrated-gradients: quadrature steps (50)")
    parser.add_argument("--samples", type=int, metavar="S", help="smoothgrad: noisy copies per image (25)")
    parser.add_argument("--noise", type=float, metavar="F",
                        help="smoothgrad and --smooth: noise std as a share of the image's value range (0.15)")
    parser.add_argument("--seed", type=int, metavar="N",
                        help="smoothgrad and --smooth: seed of the noise stored in the model (0; below 2**31 - 1)")
    parser.add_argument("--residual", choices=["magnitude", "signed"],
                        help="rap: a residual sum Y = X1 + X2 splits Φ by magnitude, Φ|Xi|/(|X1|+|X2|+1e-9) "
                             "(magnitude, default: stable where the branches cancel), or by the authors' signed "
                             "ratio Φ·Xi/Y (signed, for parity with their code)")


def _modifier_options(parser: argparse.ArgumentParser, evaluate: bool = False) -> None:
    """--smooth, --smooth-square, --contrast (compile, inspect; evaluate: the defaults of `+` variants)."""
    if evaluate:
        parser.add_argument("--smooth", type=int, metavar="S",
                            help=f"copies per image of a variant named M+smooth or M+smooth-square "
                                 f"(default {DEFAULT_SMOOTH}; M+smooth=S sets it per variant)")
        return
    parser.add_argument("--smooth", type=int, metavar="S",
                        help="any method: its map averaged over S noisy copies of each image (noise std --noise × "
                             "the image's value range, fixed by --seed; Captum's NoiseTunnel), in the same run; the "
                             "run holds S copies of each image (S·K with --top-k K): memory and time grow with S·N "
                             "(S·K·N), so lower the batch size to bound them")
    parser.add_argument("--smooth-square", action="store_true",
                        help="with --smooth: average the squared maps (NoiseTunnel's smoothgrad_sq)")
    parser.add_argument("--contrast", choices=sorted(CONTRASTS),
                        help="any method but clrp/sglrp: the target's map minus the other classes' map, one extra "
                             "backward seed in the same run, normalised as CLRP (R_t − R_o·ΣR_t/ΣR_o); others: "
                             "y_t/(K−1) on every other class (CLRP), softmax: p_t·p_j (SGLRP)")


def _given_modifiers(args: argparse.Namespace) -> Modifiers:
    smooth = getattr(args, "smooth", None)
    square, contrast = getattr(args, "smooth_square", False), getattr(args, "contrast", None)
    if smooth is not None and smooth < 1:
        raise CompileError(f"--smooth {smooth}: must be at least 1")
    noise, seed = getattr(args, "noise", None), getattr(args, "seed", None)
    return Modifiers(smooth=smooth or 0, noise=DEFAULT_NOISE if noise is None else noise,
                     seed=DEFAULT_SEED if seed is None else seed, square=square, contrast=contrast)


def _given_method_options(args: argparse.Namespace) -> dict:
    return {k: v for k in ("steps", "samples", "noise", "seed", "residual") if (v := getattr(args, k)) is not None}


def _input_shapes(args: argparse.Namespace) -> dict[str, list[int | str]]:
    """``--input-shape NAME=d0,d1,...`` (repeatable) as ``{NAME: dims}``."""
    return dict(passes.parse_input_shape(text) for text in args.input_shape)


def _flat_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--flat-policy", choices=sorted(FLAT_POLICIES), default="authors",
                        help="which convs and token-wise linear layers get AGF's flat rule ΦX = C instead of the full "
                             "rule (default: authors): " + "; ".join(f"{k}: {v}" for k, v in FLAT_POLICIES.items()))


def _image_options(parser: argparse.ArgumentParser) -> None:
    """How image files become the model's input, and where it runs (explain, evaluate)."""
    parser.add_argument("--preset", choices=["imagenet", "symmetric", "unit", "none"], default="imagenet",
                        help="normalisation: imagenet mean/std on [0,1] pixels (default), symmetric [-1,1], unit "
                             "[0,1], none (raw 0-255)")
    parser.add_argument("--mean", metavar="R,G,B", help="per-channel mean on [0,1] pixels (with --std)")
    parser.add_argument("--std", metavar="R,G,B", help="per-channel std on [0,1] pixels (with --mean)")
    parser.add_argument("--size", type=int, metavar="S",
                        help="resize the shorter side to S, then centre-crop to the model's input size "
                             "(default: resize straight to the model's size)")
    parser.add_argument("--crop", action="store_true",
                        help="keep the aspect ratio: resize to cover the model's size, then centre-crop "
                             "(implied by --size)")
    parser.add_argument("--bgr", action="store_true", help="feed channels in BGR order")
    parser.add_argument("--provider", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto (default): CUDA when ONNX Runtime offers it, else CPU")
    parser.add_argument("--allow-tf32", action="store_true",
                        help="on CUDA, let convs/GEMMs round their operands to TF32: faster, but the maps then "
                             "diverge from the model's (default: exact float32, use_tf32=0)")


def _engine_options(parser: argparse.ArgumentParser) -> None:
    """Where the batches run: in this process, or on a Ray cluster (explain, evaluate)."""
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="local (default): in this process; ray: spread the batches over a Ray cluster "
                             "(pip install 'agf-onnx[ray]')")
    parser.add_argument("--ray-address", metavar="ADDR",
                        help="a running Ray cluster (e.g. ray://head:10001, or auto); default: start a local "
                             "instance on this machine (loopback only) and stop it at the end")
    parser.add_argument("--workers", type=int, metavar="K",
                        help="Ray actors, each holding one ONNX Runtime session (default: one per CPU, or per "
                             "--gpus-per-worker GPUs)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G",
                        help="GPUs per Ray actor; > 0 runs the sessions on CUDA (default 0: CPU)")


def _ray_engine(args: argparse.Namespace):
    """The Ray engine the options ask for (not entered yet), or None for the local engine."""
    if args.engine == "local":
        given = [option for option, value in (("--ray-address", args.ray_address), ("--workers", args.workers),
                                              ("--gpus-per-worker", args.gpus_per_worker)) if value]
        if given:
            raise CompileError(f"{', '.join(given)}: only with --engine ray")
        return None
    from .distributed import RayEngine

    return RayEngine(args.ray_address, args.workers, args.gpus_per_worker, args.provider)


def _ssl_options(parser: argparse.ArgumentParser) -> None:
    """A self-supervised model's bank (the paper's Algorithm 2; compile, evaluate)."""
    parser.add_argument("--ssl-bank", metavar="BANK.npy",
                        help="self-supervised model: explain t = argmax head(L_I − L_N), L_N the nearest row of this "
                             "bank (`agf-onnx bank`) to the image's features L_I; adds the outputs 'ssl_target' and "
                             "'ssl_neighbour' (int64 [N]); a non-negative 'target' still overrides t")
    parser.add_argument("--features", metavar="TENSOR",
                        help="with --ssl-bank: the tensor that feeds the head (default: the data input of the op "
                             "that makes the logits)")
    parser.add_argument("--ssl-mode", choices=["diff", "sum", "none"],
                        help="with --ssl-bank: diff (default) head(L_I − L_N), sum head(L_I + L_N), none head(L_I)")


def _given_ssl_options(args: argparse.Namespace) -> dict:
    if args.ssl_bank is None and (args.features is not None or args.ssl_mode is not None):
        raise CompileError("--features and --ssl-mode need --ssl-bank")
    return {"ssl_bank": args.ssl_bank, "features": args.features, "ssl_mode": args.ssl_mode} \
        if args.ssl_bank is not None else {}


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
    _model_options(compile_)
    _flat_options(compile_)
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
    _method_options(compile_)
    _modifier_options(compile_)
    _ssl_options(compile_)
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
    _modifier_options(inspect_)
    _model_options(inspect_)

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
    _image_options(explain)
    explain.add_argument("--batch-size", type=int, default=8, metavar="B",
                         help="images per step (default 8); a session run takes fewer where they would not fit "
                              "--max-memory")
    _memory_option(explain)
    explain.add_argument("--input-shape", metavar="NAME=d0,d1,...", action="append", default=[],
                         help="for compiling an original model with dynamic height/width on the fly")
    explain.add_argument("--output-format", choices=list(OUTPUT_FORMATS), default="files",
                         help="files (default): an overlay PNG and a .npy per image, index.html; npz-shards / "
                              "parquet: the maps in shards of 1024 images (maps-00000.npz / .parquet), for very "
                              "large runs")
    _engine_options(explain)
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
    _image_options(evaluate)
    evaluate.add_argument("--batch-size", type=int, default=16, metavar="B",
                          help="images per step (default 16); a session run takes fewer where they would not "
                               "fit --max-memory")
    _memory_option(evaluate)
    _method_options(evaluate)
    _modifier_options(evaluate, evaluate=True)
    _model_options(evaluate)
    _flat_options(evaluate)
    _ssl_options(evaluate)
    _engine_options(evaluate)
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
    _image_options(bank)
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
    shapes = _input_shapes(args)
    if args.top_k is not None and args.top_k < 1:
        raise CompileError(f"--top-k {args.top_k}: must be at least 1")
    check_model_file(args.model)
    check_writable(args.output)
    began = time.perf_counter()
    modifiers = _given_modifiers(args)
    modifiers.check(METHODS[args.method])  # an option error, not the model's: no file name in front
    try:
        model = compile_model(args.model, method=args.method, input_shapes=shapes, logits=args.logits,
                              image=args.image, flat_policy=args.flat_policy, flat=args.flat, full=args.full,
                              layer=args.layer, options=_given_method_options(args), top_k=args.top_k,
                              check=not args.no_check, modifiers=modifiers, **_given_ssl_options(args))
    except CompileError as error:
        _named(error, args.model)
        raise
    save(model, args.output, external_data=args.external_data or uses_external_data(args.model))
    if not args.quiet:
        before, after = size_on_disk(args.model), size_on_disk(args.output)
        added = sum(1 for n in model.graph.node if n.name.startswith("agf/"))
        print(f"{args.model} → {args.output}: {args.method}" + (f" ({modifiers.describe()})" if modifiers else "") +
              f", {added} explanation nodes, "
              f"{after / 2**20:.1f} MiB ({after / max(before, 1):.2f}× the input, external data counted), "
              f"{time.perf_counter() - began:.1f} s")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    shapes = _input_shapes(args)
    try:
        check_model_file(args.model)
        report = inspect(args.model, method=args.method, input_shapes=shapes, logits=args.logits, image=args.image,
                         modifiers=_given_modifiers(args))
    except CompileError as error:  # unreadable file: the model does not compile either
        print(f"agf-onnx: error: {_named(error, args.model)}", file=sys.stderr)
        return 2
    print(report.to_json() if args.json else report.to_text())
    return 0 if report.compiles else 2


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise CompileError(f"{option} '{text}': expected three numbers such as 0.485,0.456,0.406") from None
    if len(values) != 3:
        raise CompileError(f"{option} '{text}': expected three numbers (R,G,B)")
    return values


def _explain(args: argparse.Namespace) -> int:
    import contextlib
    import pathlib

    from .explain import Explainer, ExplainError, collect_images, compiled_model, label_index, read_labels
    from .outputs import ExplainOutputs
    from .report import progress_bar, warn

    if args.text or args.sentences:
        from .text_explain import command

        return command(args)
    labels = read_labels(args.labels) if args.labels else None
    shapes = _input_shapes(args)
    # everything that can be refused without the model is, before a model is compiled on the fly
    if args.target is not None:
        label_index(args.target, labels)
    if args.top_k is not None and args.top_k < 1:
        raise ExplainError(f"--top-k {args.top_k}: must be at least 1")
    if args.batch_size < 1:
        raise ExplainError(f"--batch-size {args.batch_size}: must be at least 1")
    engine = _ray_engine(args)
    if not args.images:
        raise ExplainError("nothing to explain: give image files or folders, or sentences with --text/--sentences")
    images, folder = collect_images(args.images)
    if not images:
        raise ExplainError(f"no images found in {', '.join(args.images)}")
    check_writable(args.output, folder=True)
    check_model_file(args.model)
    model, compiled_here = compiled_model(args.model, shapes)
    options = {"preset": args.preset, "mean": _floats(args.mean, "--mean"), "std": _floats(args.std, "--std"),
               "size": args.size, "crop": args.crop, "bgr": args.bgr, "allow_tf32": args.allow_tf32,
               "max_memory": args.max_memory}
    # with Ray the sessions live in the workers: the driver's session only checks options, on the CPU
    explainer = Explainer(model, "cpu" if engine else args.provider, labels=labels, batch_size=args.batch_size,
                          **options)
    if compiled_here and not args.quiet:
        print(f"{args.model} has no '{HEATMAP_OUTPUT}' output: compiled it on the fly (save time next run with "
              f"`agf-onnx compile`)")
    if engine is None:  # a budget too small for one image is refused before any output is written
        explainer.check_budget(images[0])
    target = explainer.class_index(args.target) if args.target is not None else None
    if args.top_k is not None and explainer.classes is not None and args.top_k > explainer.classes:
        raise ExplainError(f"--top-k {args.top_k}: must be between 1 and the number of classes ({explainer.classes})")
    out = pathlib.Path(args.output)
    outputs = ExplainOutputs(out, [str(path) for path in images], args.output_format, cmap=args.cmap)
    settings = {"model": str(args.model), "provider": engine.provider if engine else explainer.provider,
                "allow_tf32": args.allow_tf32, "target": args.target, "top_k": args.top_k, "preset": args.preset,
                "max_memory": explainer.max_memory if engine is None else args.max_memory,
                "mean": explainer.mean, "std": explainer.std, "size": args.size, "crop": explainer.crop, "bgr": args.bgr,
                **({"ssl_mode": explainer.ssl_mode} if explainer.ssl_mode else {}),
                "engine": args.engine, "output_format": args.output_format, "cmap": args.cmap}
    if engine is not None:
        settings.update(workers=engine.workers, gpus_per_worker=engine.gpus_per_worker, ray_address=args.ray_address)
    began = time.perf_counter()
    with engine or contextlib.nullcontext():  # a cluster that cannot run the job fails here, before any output
        if not args.quiet:
            print(engine.describe() if engine else f"provider: {explainer.provider}")
        out.mkdir(parents=True, exist_ok=True)
        outputs.open(settings)  # says "complete": false until the last image is written
        if engine is None:
            outcomes = explainer.explain_each(images, target, args.top_k)
        else:
            outcomes = engine.explain(model, explainer.preprocessing, options, images, target, args.top_k,
                                      args.batch_size, labels)
        progress = progress_bar(len(images)) if len(images) > args.batch_size and not args.quiet else None
        try:
            for outcome in outcomes:
                if outputs.add(outcome) and outcome.error is not None:
                    warn(f"agf-onnx: error: {outcome.error}", progress)
                if progress is not None:
                    progress.update(1)
        except BaseException as error:  # Ctrl-C or a failed engine: the folder says what it holds
            reason = "interrupted (Ctrl-C)" if isinstance(error, KeyboardInterrupt) else str(error)
            outputs.abandon(settings, reason)
            raise
        finally:
            if progress is not None:
                progress.close()
    outputs.close(settings, f"agf-onnx explain: {os.path.basename(str(args.model))}", folder or len(images) > 1)
    failed = len(outputs.failed)
    if not args.quiet:
        print(f"explained {outputs.explained} of {len(images)} images in {time.perf_counter() - began:.1f} s "
              f"→ {out}" + (f" ({failed} failed, see results.json)" if failed else ""))
    return 1 if failed else 0


def _evaluate(args: argparse.Namespace) -> int:
    import contextlib
    import pathlib

    from .evaluate import (
        EvaluateError,
        Evaluation,
        check_methods,
        load_dataset,
        readable_samples,
        usable_methods,
        write_outputs,
    )
    from .explain import read_labels
    from .report import progress_bar, warn

    if text_evaluate.is_text_evaluation(args):
        return text_evaluate.command(args, _given_modifiers(args), _given_method_options(args))
    methods = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    variant_defaults = _given_modifiers(args)
    check_methods(methods, variant_defaults)
    if args.limit is not None and args.limit < 1:
        raise EvaluateError(f"--limit {args.limit}: must be at least 1")
    if args.batch_size < 1:
        raise EvaluateError(f"--batch-size {args.batch_size}: must be at least 1")
    labels = read_labels(args.labels) if args.labels else None
    samples = load_dataset(args.data, labels)[:args.limit]
    check_writable(args.output, folder=True)
    check_model_file(args.model)
    shapes = _input_shapes(args)
    ssl_options = _given_ssl_options(args)
    engine = _ray_engine(args)
    compile_options = {"input_shapes": shapes, "logits": args.logits, "image": args.image,
                       "flat_policy": args.flat_policy, "options": _given_method_options(args), **ssl_options}
    # a method that cannot explain this model is known before any work: named ones are refused, "all" skips them
    methods, skipped_methods = usable_methods(args.model, methods, compile_options, variant_defaults,
                                              explicit=args.methods != "all")
    for name, reason in skipped_methods.items():
        warn(f"agf-onnx: skipping {name}: {reason}")
    samples, skipped_images = readable_samples(samples)
    for message in skipped_images:
        warn(f"agf-onnx: warning: {message}")
    if not samples:
        raise EvaluateError(f"{args.data}: no readable image")
    # with Ray the sessions live in the workers: the driver's session only checks the model, on the CPU
    evaluation = Evaluation(args.model, methods, compile_options=compile_options,
                            provider="cpu" if engine else args.provider, batch_size=args.batch_size,
                            preset=args.preset, mean=_floats(args.mean, "--mean"), std=_floats(args.std, "--std"),
                            size=args.size, crop=args.crop, bgr=args.bgr, allow_tf32=args.allow_tf32,
                            max_memory=args.max_memory, modifiers=variant_defaults)
    provider = engine.provider if engine else evaluation.provider
    print(f"{len(samples)} images, {_count(len(methods), 'method')} ({', '.join(methods)}), provider {provider}")
    settings = {"model": str(args.model), "data": str(args.data), "methods": methods, "limit": args.limit,
                "provider": provider, "allow_tf32": args.allow_tf32, "preset": args.preset,
                "mean": evaluation.reference.mean,
                "std": evaluation.reference.std, "size": args.size, "crop": evaluation.reference.crop,
                "bgr": args.bgr, "batch_size": args.batch_size, "method_options": _given_method_options(args),
                "variants": {name: parse_variant(name, variant_defaults)[1].as_dict()
                             for name in methods if "+" in name},
                **({"ssl_bank": args.ssl_bank, "features": evaluation.reference.ssl_features,
                    "ssl_mode": evaluation.reference.ssl_mode} if ssl_options else {}),
                "engine": args.engine, "skipped_methods": skipped_methods, "skipped_images": skipped_images}
    if engine is not None:
        settings.update(workers=engine.workers, gpus_per_worker=engine.gpus_per_worker, ray_address=args.ray_address)
    out = pathlib.Path(args.output)

    def completed(results: dict) -> None:  # each method's results as it completes
        write_outputs(out, results, settings)

    with engine or contextlib.nullcontext():
        if engine is not None:
            print(engine.describe())
        bar = None if args.quiet else progress_bar(len(samples) * len(methods))

        def advance(count: int, method: str) -> None:
            bar.set_description(f"{method} ({methods.index(method) + 1}/{len(methods)})")
            bar.update(count)

        progress = None if bar is None else advance
        try:
            results = evaluation.run(samples, progress, completed) if engine is None else \
                engine.evaluate(evaluation, samples, progress, completed)
        finally:  # an error's message goes on a line of its own, not into the bar's
            if bar is not None:
                bar.close()
    write_outputs(out, results, settings)
    print((out / "results.md").read_text().split("\n\n")[1])
    print(f"{len(samples)} images in {results['seconds']:.0f} s → {out}/results.json, results.md, perturbation.png")
    return 0


def _count(number: int, noun: str) -> str:
    """``1 method``, ``2 methods``."""
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _bank(args: argparse.Namespace) -> int:
    from .bank import bank
    from .explain import ExplainError, collect_images

    images, _ = collect_images(args.images)
    if not images:
        raise ExplainError(f"no images found in {', '.join(args.images)}")
    began = time.perf_counter()
    shapes = _input_shapes(args)
    rows = bank(args.model, images, features=args.features, output=args.output, batch_size=args.batch_size,
                provider=args.provider, input_shapes=shapes, progress=not args.quiet, preset=args.preset,
                mean=_floats(args.mean, "--mean"), std=_floats(args.std, "--std"), size=args.size, crop=args.crop,
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
        return _explain(args)
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "bank":
        return _bank(args)
    if args.command == "web":
        from .web import run

        return run(args)
    print(coverage_table(args.method))
    return 0


if __name__ == "__main__":
    sys.exit(main())
