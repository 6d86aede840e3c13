"""What ``agf-onnx explain`` (on image files) and ``agf-onnx evaluate`` do once ``cli.py`` has
parsed their options: everything that can be refused without the model first, then the batches
run here or on a Ray cluster (``distributed``), each result written as it arrives (explain:
``runtime.outputs``; evaluate: each method's results as it completes), with a progress bar.
``text_explain.py`` explains sentences."""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import time

from .compiler.methods import METHODS, parse_variant
from .contract import HEATMAP_OUTPUT
from .evaluate import (
    EvaluateError,
    Evaluation,
    check_methods,
    load_dataset,
    readable_samples,
    usable_methods,
    write_outputs,
)
from .modelfile import check_model_file, check_writable
from .options import compile_spec, given_method_options, given_modifiers, input_shapes, preprocessing, ray_engine
from .runtime.explain import Explainer, ExplainError, collect_images, compiled_model, label_index, read_labels
from .runtime.outputs import ExplainOutputs
from .runtime.report import progress_bar, warn


def explain(args: argparse.Namespace) -> int:
    """``agf-onnx explain`` on image files: 0 when every image was explained, 1 when some failed."""
    labels = read_labels(args.labels) if args.labels else None
    shapes = input_shapes(args)
    # everything that can be refused without the model is, before a model is compiled on the fly
    if args.target is not None:
        label_index(args.target, labels)
    if args.top_k is not None and args.top_k < 1:
        raise ExplainError(f"--top-k {args.top_k}: must be at least 1")
    if args.batch_size < 1:
        raise ExplainError(f"--batch-size {args.batch_size}: must be at least 1")
    engine = ray_engine(args)
    if not args.images:
        raise ExplainError("nothing to explain: give image files or folders, or sentences with --text/--sentences")
    images, folder = collect_images(args.images)
    if not images:
        raise ExplainError(f"no images found in {', '.join(args.images)}")
    check_writable(args.output, folder=True)
    check_model_file(args.model)
    model, compiled_here = compiled_model(args.model, shapes)
    options = preprocessing(args)
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


def evaluate(args: argparse.Namespace) -> int:
    """``agf-onnx evaluate``: each method compiled and scored, its results written as it completes;
    prints the table."""
    methods = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    variant_defaults = given_modifiers(args)
    check_methods(methods, variant_defaults)
    if args.limit is not None and args.limit < 1:
        raise EvaluateError(f"--limit {args.limit}: must be at least 1")
    if args.batch_size < 1:
        raise EvaluateError(f"--batch-size {args.batch_size}: must be at least 1")
    labels = read_labels(args.labels) if args.labels else None
    samples = load_dataset(args.data, labels)[:args.limit]
    check_writable(args.output, folder=True)
    check_model_file(args.model)
    spec = compile_spec(args, check=True)
    engine = ray_engine(args)
    # a method that cannot explain this model is known before any work: named ones are refused, "all" skips them
    methods, skipped_methods = usable_methods(args.model, methods, spec, variant_defaults,
                                              explicit=args.methods != "all")
    for name, reason in skipped_methods.items():
        warn(f"agf-onnx: skipping {name}: {reason}")
    samples, skipped_images = readable_samples(samples)
    for message in skipped_images:
        warn(f"agf-onnx: warning: {message}")
    if not samples:
        raise EvaluateError(f"{args.data}: no readable image")
    # with Ray the sessions live in the workers: the driver's session only checks the model, on the CPU
    evaluation = Evaluation(args.model, methods, spec=spec, provider="cpu" if engine else args.provider,
                            batch_size=args.batch_size, modifiers=variant_defaults, **preprocessing(args))
    provider = engine.provider if engine else evaluation.provider
    print(f"{len(samples)} images, {len(methods)} method{'s' if len(methods) != 1 else ''} ({', '.join(methods)}), provider {provider}")
    settings = {"model": str(args.model), "data": str(args.data), "methods": methods, "limit": args.limit,
                "provider": provider, "allow_tf32": args.allow_tf32, "preset": args.preset,
                "mean": evaluation.reference.mean,
                "std": evaluation.reference.std, "size": args.size, "crop": evaluation.reference.crop,
                "bgr": args.bgr, "batch_size": args.batch_size, "method_options": given_method_options(args),
                "variants": {name: parse_variant(name, variant_defaults)[1].as_dict()
                             for name in methods if "+" in name},
                **({"ssl_bank": args.ssl_bank, "features": evaluation.reference.ssl_features,
                    "ssl_mode": evaluation.reference.ssl_mode} if args.ssl_bank is not None else {}),
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
