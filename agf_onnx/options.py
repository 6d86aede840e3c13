"""The command line's option groups, shared by the commands (``cli.py`` assembles the parser;
``commands`` reads what they add), and the conversion of parsed options into
the library's types: a ``CompileSpec``, ``Modifiers``, a preprocessing mean/std, a Ray engine.
Each conversion refuses a bad value with an error that names the option."""

from __future__ import annotations

import argparse

from .compiler import passes
from .compiler.methods import FLAT_POLICIES
from .compiler.modifiers import CONTRASTS, DEFAULT_NOISE, DEFAULT_SEED, DEFAULT_SMOOTH, Modifiers
from .compiler.spec import CompileSpec
from .errors import CompileError
from .runtime.budget import BudgetError, parse_memory


def memory_option(parser: argparse.ArgumentParser) -> None:
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


def model_options(parser: argparse.ArgumentParser) -> None:
    """Where the image, the class scores and the image size are, for models that don't say."""
    parser.add_argument("--input-shape", metavar="NAME=d0,d1,...", action="append", default=[],
                        help="fix the shape of an input with dynamic height/width, e.g. x=1,3,224,224 "
                             "(repeatable; the batch axis stays dynamic)")
    parser.add_argument("--logits", metavar="NAME",
                        help="tensor holding the class scores (default: the only [N, classes] float output, "
                             "taken before a trailing Softmax/LogSoftmax)")
    parser.add_argument("--image", metavar="NAME", help="the image input (default: the only 4-D input)")


def method_options(parser: argparse.ArgumentParser) -> None:
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


def modifier_options(parser: argparse.ArgumentParser, evaluate: bool = False) -> None:
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


def given_modifiers(args: argparse.Namespace) -> Modifiers:
    smooth = getattr(args, "smooth", None)
    square, contrast = getattr(args, "smooth_square", False), getattr(args, "contrast", None)
    if smooth is not None and smooth < 1:
        raise CompileError(f"--smooth {smooth}: must be at least 1")
    noise, seed = getattr(args, "noise", None), getattr(args, "seed", None)
    return Modifiers(smooth=smooth or 0, noise=DEFAULT_NOISE if noise is None else noise,
                     seed=DEFAULT_SEED if seed is None else seed, square=square, contrast=contrast)


def given_method_options(args: argparse.Namespace) -> dict:
    return {k: v for k in ("steps", "samples", "noise", "seed", "residual") if (v := getattr(args, k)) is not None}


def input_shapes(args: argparse.Namespace) -> dict[str, list[int | str]]:
    """``--input-shape NAME=d0,d1,...`` (repeatable) as ``{NAME: dims}``."""
    return dict(passes.parse_input_shape(text) for text in args.input_shape)


def flat_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--flat-policy", choices=sorted(FLAT_POLICIES), default="authors",
                        help="which convs and token-wise linear layers get AGF's flat rule ΦX = C instead of the full "
                             "rule (default: authors): " + "; ".join(f"{k}: {v}" for k, v in FLAT_POLICIES.items()))


def image_options(parser: argparse.ArgumentParser) -> None:
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


def engine_options(parser: argparse.ArgumentParser) -> None:
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


def ray_engine(args: argparse.Namespace):
    """The Ray engine the options ask for (not entered yet), or None for the local engine."""
    if args.engine == "local":
        given = [option for option, value in (("--ray-address", args.ray_address), ("--workers", args.workers),
                                              ("--gpus-per-worker", args.gpus_per_worker)) if value]
        if given:
            raise CompileError(f"{', '.join(given)}: only with --engine ray")
        return None
    from .distributed import RayEngine

    return RayEngine(args.ray_address, args.workers, args.gpus_per_worker, args.provider)


def ssl_options(parser: argparse.ArgumentParser) -> None:
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
    return {"ssl_bank": args.ssl_bank, "features": args.features, "ssl_mode": args.ssl_mode}


def compile_spec(args: argparse.Namespace, **fields) -> CompileSpec:
    """The compile options given on the command line (``compile``; ``evaluate``'s common ones),
    with ``fields`` (the method, check, …) set by the command."""
    given = {"input_shapes": input_shapes(args), "logits": args.logits, "image": args.image,
             "flat_policy": args.flat_policy, "options": given_method_options(args), **_given_ssl_options(args)}
    return CompileSpec(**given, **fields)


def floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """``--mean``/``--std`` ``R,G,B`` → three floats."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise CompileError(f"{option} '{text}': expected three numbers such as 0.485,0.456,0.406") from None
    if len(values) != 3:
        raise CompileError(f"{option} '{text}': expected three numbers (R,G,B)")
    return values


def preprocessing(args: argparse.Namespace) -> dict:
    """The image options as ``Explainer`` keyword arguments (explain, evaluate)."""
    return {"preset": args.preset, "mean": floats(args.mean, "--mean"), "std": floats(args.std, "--std"),
            "size": args.size, "crop": args.crop, "bgr": args.bgr, "allow_tf32": args.allow_tf32,
            "max_memory": args.max_memory}
