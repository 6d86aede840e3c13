"""The Ray engine of ``agf-onnx explain`` and ``agf-onnx evaluate`` (``--engine ray``): the local
engine's per-batch work, spread over a Ray cluster with Ray Data.

One pass for ``explain``, one per method for ``evaluate`` (as the local engine, so that one
compiled model at a time is in memory)::

    Dataset: one row per batch ──map_batches──▶ the batch's images ──map_batches──▶ outcomes ──iter_batches──▶ driver
    of B consecutive inputs     (tasks: load,    loaded and fitted   (actor pool: K      (per image)    (first outcome per
    (files; CSV rows, folders)   fit)                                 ONNX Runtime                       index kept; files
                                                                      sessions)                          written, or scores
                                                                                                         reduced)

- **Same batches, same bits.** A row is a whole batch of ``B`` consecutive inputs, exactly the
  local engine's batches: ONNX Runtime's result for an image depends on its batch neighbours at
  round-off level (a float32 GEMM over a different batch), so the same batches give the same
  heatmaps, and ``evaluate`` the same numbers, bit for bit, whatever worker ran them.
- **Shared code.** Preprocessing runs ``Preprocessing.prepare`` (explain) or
  ``evaluate.prepare_samples``; a worker runs ``Explainer.explain_prepared`` or
  ``MethodScorer.score``; the driver writes with ``outputs.ExplainOutputs`` or sums with
  ``evaluate.Tally`` — the functions the local engine runs.
- **Workers.** Each actor holds one ONNX Runtime session of the model compiled once on the
  driver (its bytes travel through Ray's object store): one single-threaded CPU session per actor,
  or a CUDA session (``use_tf32=0``) on ``G`` GPUs. On CPU workers Ray Data fuses the preprocessing
  into the actors (the images never leave the process); with GPUs it runs as separate CPU tasks.
- **Faults.** Ray Data restarts an actor that dies (``max_restarts=-1``) and reruns the batch it
  held (``max_task_retries=-1``, its defaults, kept). Outcomes are keyed by the input's index and
  the driver keeps the first one per index, so a rerun batch is neither lost nor counted twice; a
  run that ends with an index missing is an error. An unreadable image is an outcome like any
  other (``explain``: listed in ``results.json``; ``evaluate``: the local engine's error). Ctrl-C
  (or any error) leaves through ``RayEngine.__exit__``, which shuts down the Ray instance it
  started, or disconnects from the cluster (ending the job's tasks and actors).

**Scaling model.** Throughput ≈ ``K × r``: ``K`` workers, ``r`` images/s of one worker (one
session on one CPU core or on its GPUs), as long as the preprocessing and the driver keep up.
Measured on the project's 2-core CPU machine (CPU time): loading and fitting a 451×300 photo to
224² takes 2.4 ms (JPEG) to 5.7 ms (PNG) per image and core; the driver writes an overlay PNG
and a ``.npy`` in 16 ms per image (224², one class), so the ``files`` format caps a run at about
60 images/s, while ``npz-shards`` costs 0.7 ms per image. ``tools/bench_ray.py`` measures ``r``
and ``K × r``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx

from .errors import CompileError
from .evaluate import (
    Evaluation,
    MethodScorer,
    Sample,
    Tally,
    classifier_session,
    prepare_samples,
    summary,
)
from .runtime import budget
from .runtime.explain import Explainer, ExplainError, ImageExplanation, Preprocessing, model_bytes

#: Rows per block of the input data set: blocks are Ray Data's unit of work per task.
_MAX_BATCHES_PER_BLOCK = 16


class RayEngine:
    """A Ray instance for one run: connects to ``address``, or starts a local instance on this
    machine's loopback interface (``num_cpus`` from ``workers``); shuts it down at the end.

    Args:
        address: a running cluster (``ray://host:10001``, ``host:6379`` or ``auto``); None: a local instance.
        workers: actors, each holding one session (default: one per CPU, or per ``gpus_per_worker`` GPUs).
        gpus_per_worker: GPUs per actor; > 0 runs the sessions on CUDA (fractions share a GPU).
        provider: the ``--provider`` given: must agree with ``gpus_per_worker``.
    """

    #: The actor classes of explain and evaluate (set below their definitions): a test substitutes a
    #: subclass, such as a worker that dies mid-run, without a hook in this module.
    explain_worker: type
    evaluate_worker: type

    def __init__(self, address: str | None = None, workers: int | None = None, gpus_per_worker: float = 0.0,
                 provider: str = "auto") -> None:
        if workers is not None and workers < 1:
            raise ExplainError(f"--workers {workers}: must be at least 1")
        if gpus_per_worker < 0:
            raise ExplainError(f"--gpus-per-worker {gpus_per_worker}: must not be negative")
        if provider == "cuda" and not gpus_per_worker:
            raise ExplainError("--provider cuda with --engine ray: give the workers GPUs with --gpus-per-worker G")
        if provider == "cpu" and gpus_per_worker:
            raise ExplainError(f"--provider cpu contradicts --gpus-per-worker {gpus_per_worker}")
        self.address, self.workers, self.gpus_per_worker = address, workers, gpus_per_worker
        self.provider = "cuda" if gpus_per_worker else "cpu"
        self.owned = False

    # -- the Ray instance ---------------------------------------------------------------------
    def __enter__(self) -> RayEngine:
        try:
            import ray
        except ImportError:
            raise ExplainError("--engine ray needs Ray: pip install 'agf-onnx[ray]'") from None
        import ray.data  # noqa: F401  (sets up Ray Data's loggers, quietened below)

        self.ray = ray
        logging.getLogger("ray").setLevel(logging.ERROR)
        for handler in logging.getLogger("ray.data").handlers:  # its console, not its log file
            if "File" not in type(handler).__name__:
                handler.setLevel(logging.ERROR)
        if not ray.is_initialized():
            if self.address is None:
                cpus = self.workers or os.cpu_count() or 1
                if self.gpus_per_worker:  # GPU actors take one CPU each; preprocessing tasks need the rest
                    cpus = max(cpus + 1, os.cpu_count() or 1)
                with _loopback_only():
                    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                             logging_level=logging.ERROR)
            else:
                try:
                    ray.init(address=self.address, log_to_driver=False, logging_level=logging.ERROR)
                except (ConnectionError, ValueError, RuntimeError) as error:
                    raise ExplainError(f"--ray-address {self.address}: cannot connect ({error})") from None
            self.owned = True
        try:
            self._configure()
        except BaseException:  # __exit__ does not run when __enter__ fails: stop what was started here
            self.__exit__(None, None, None)
            raise
        return self

    def _configure(self) -> None:
        """Ray Data's settings for this driver; the default and the check of ``workers``."""
        context = self.ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver's own bar counts images across the cluster
        context.print_on_execution_start = False
        resources = self.ray.cluster_resources()
        if self.workers is None:
            self.workers = max(1, int(resources.get("GPU", 0) // self.gpus_per_worker) if self.gpus_per_worker
                               else int(resources.get("CPU", 1)))
        if resources.get("CPU", 0) < self.workers:  # each actor takes a CPU: Ray would wait for ever
            raise ExplainError(f"--workers {self.workers}: the Ray cluster has {resources.get('CPU', 0):g} CPUs")
        if self.gpus_per_worker and resources.get("GPU", 0) < self.workers * self.gpus_per_worker:
            raise ExplainError(f"--workers {self.workers} × --gpus-per-worker {self.gpus_per_worker} needs "
                               f"{self.workers * self.gpus_per_worker:g} GPUs; the cluster has "
                               f"{resources.get('GPU', 0):g}")

    def __exit__(self, *exc_info: Any) -> None:
        if self.owned:
            self.ray.shutdown()
            self.owned = False

    def describe(self) -> str:
        where = self.address or "a local Ray instance"
        return (f"engine: ray ({where}), {self.workers} worker(s), provider {self.provider}"
                + (f", {self.gpus_per_worker:g} GPU(s) each" if self.gpus_per_worker else ""))

    # -- explain ------------------------------------------------------------------------------
    def explain(self, model: str | os.PathLike | onnx.ModelProto, preprocessing: Preprocessing, options: dict,
                images: Sequence[str | os.PathLike], target: int | None = None, top_k: int | None = None,
                batch_size: int = 8, labels: Sequence[str] | None = None) -> Iterator[ImageExplanation]:
        """Each image's explanation or error, as ``Explainer.explain_each`` yields them but in the
        order the workers finish; each image exactly once. ``model``: compiled; ``options``: the
        ``Explainer`` keyword arguments for the workers' sessions (preprocessing)."""
        data = self._batches([str(image) for image in images], batch_size)
        data = data.map_batches(_prepare_explain, fn_kwargs={"preprocessing": preprocessing}, **self._task_options())
        data = data.map_batches(self.explain_worker, fn_constructor_kwargs={
            "model": model_bytes(model), "options": {**_worker_budget(options, self.workers), "batch_size": batch_size},
            "provider": self.provider, "target": target, "top_k": top_k},
            **self._actor_options())
        seen = np.zeros(len(images), bool)
        for blob in self._stream(data, "outcomes"):
            for outcome in pickle.loads(blob):
                if seen[outcome.index]:
                    continue
                seen[outcome.index] = True
                if outcome.explanation is not None:
                    outcome.explanation.labels = labels
                yield outcome
        _check_complete(seen)

    # -- evaluate -----------------------------------------------------------------------------
    def evaluate(self, evaluation: Evaluation, samples: Sequence[Sample],
                 progress: Callable[[int, str], None] | None = None,
                 completed: Callable[[dict], None] | None = None) -> dict:
        """``Evaluation.run`` on the cluster: the same batches scored by the same code in the
        workers, reduced on the driver by image index; the same dictionary, and the same
        ``completed(results so far)`` after each method but the last."""
        evaluation.check_labels(samples)
        began = time.perf_counter()
        preprocessing = evaluation.reference.preprocessing
        original = evaluation.original().SerializeToString()
        tallies = {method: Tally() for method in evaluation.methods}
        for method in evaluation.methods:
            data = self._batches(list(samples), evaluation.batch_size)
            data = data.map_batches(_prepare_evaluate, fn_kwargs={"preprocessing": preprocessing},
                                    **self._task_options())
            compiled = evaluation.compiled(method)
            data = data.map_batches(self.evaluate_worker, fn_constructor_kwargs={
                "model": compiled.SerializeToString(), "classifier": original,
                "options": _worker_budget(evaluation.explainer_options, self.workers), "provider": self.provider,
                "batch_size": evaluation.batch_size, "per_run": evaluation.batch_size},
                **self._actor_options())
            seen = np.zeros(len(samples), bool)
            for blob in self._stream(data, "scores"):
                scores = pickle.loads(blob)
                if isinstance(scores, CompileError):  # an unreadable image or mask: as the local engine
                    raise scores
                fresh = [s for s in scores if not seen[s.index]]
                for s in fresh:
                    seen[s.index] = True
                    tallies[method].add(s)
                if progress is not None and fresh:
                    progress(len(fresh), method)
            _check_complete(seen)
            if completed is not None and method != evaluation.methods[-1]:
                done = {name: tallies[name] for name in evaluation.methods[:evaluation.methods.index(method) + 1]}
                completed(summary(done, len(samples), time.perf_counter() - began, evaluation.reference.ssl_mode,
                                  complete=False))
        return summary(tallies, len(samples), time.perf_counter() - began, evaluation.reference.ssl_mode)

    # -- the pipeline's parts -------------------------------------------------------------------
    def _batches(self, items: list, batch_size: int):
        """A data set with one row per batch of ``batch_size`` consecutive items: ``start``, ``items``."""
        rows = [{"start": start, "items": pickle.dumps(items[start:start + batch_size])}
                for start in range(0, len(items), batch_size)]
        # enough blocks to keep every worker busy, few enough rows per block that results stream
        blocks = min(len(rows), max(4 * self.workers, -(-len(rows) // _MAX_BATCHES_PER_BLOCK)))
        return self.ray.data.from_items(rows, override_num_blocks=blocks)

    def _stream(self, data, column: str) -> Iterator[bytes]:
        """The column's values as the workers deliver them; a worker's error (a GPU-less node
        asked for CUDA, a bug) ends the run with its message, not Ray's traceback."""
        try:
            for batch in data.iter_batches(batch_size=None, batch_format="numpy"):
                yield from batch[column]
        except self.ray.exceptions.RayError as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, CompileError):
                raise cause from None
            raised = re.findall(r"^agf_onnx\.[\w.]+Error: (.+)$", str(error), re.MULTILINE)
            lines = [line for line in str(error).splitlines() if line.strip()]
            raise ExplainError(raised[-1] if raised else f"the Ray job failed: {lines[-1] if lines else error!r}") \
                from None

    @staticmethod
    def _task_options() -> dict:
        return {"batch_size": 1, "num_cpus": 1}

    def _actor_options(self) -> dict:
        # the same num_cpus as the preprocessing tasks: Ray Data fuses the two stages on CPU workers
        options = {"batch_size": 1, "num_cpus": 1, "compute": self.ray.data.ActorPoolStrategy(size=self.workers)}
        if self.gpus_per_worker:
            options["num_gpus"] = self.gpus_per_worker
        return options


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Ray binds a local instance to the address other machines reach this one at (its default, for
    clusters) unless told that this is no cluster: then to 127.0.0.1."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when the instance starts
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the same, for the processes it starts
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved[0]
        if saved[1] is None:
            del os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved[1]


def _check_complete(seen: np.ndarray) -> None:
    missing = np.flatnonzero(~seen)
    if len(missing):
        raise ExplainError(f"the Ray engine returned no result for {len(missing)} image(s), e.g. index "
                           f"{int(missing[0])}")


def _objects(values: list) -> np.ndarray:
    column = np.empty(len(values), object)
    for n, value in enumerate(values):
        column[n] = value
    return column


def _worker_budget(options: dict, workers: int) -> dict:
    """The ``Explainer`` options of a worker: ``max_memory`` as given (each worker's own bound), else
    left to the worker, which takes its share (one of ``workers``) of the default."""
    return options if options.get("max_memory") is not None else {**options, "max_memory": None,
                                                                  "memory_share": 1 / max(1, workers)}


def _explainer(model: bytes, provider: str, options: dict) -> Explainer:
    """A worker's single-threaded explainer of ``model``, within its memory share (``_worker_budget``)."""
    options = dict(options)
    share = options.pop("memory_share", None)
    if share is not None:
        options["max_memory"] = budget.default_budget(share)
    return Explainer(onnx.load_from_string(model), provider, threads=1, **options)


def _prepare_explain(batch: dict[str, np.ndarray], preprocessing: Preprocessing) -> dict[str, np.ndarray]:
    """Preprocessing task: each row's images loaded and fitted (``PreparedImage``, errors kept)."""
    prepared = []
    for start, items in zip(batch["start"], batch["items"]):
        images = pickle.loads(items)
        prepared.append(pickle.dumps([preprocessing.prepare(int(start) + n, image) for n, image in enumerate(images)],
                                     protocol=5))
    return {"start": batch["start"], "prepared": _objects(prepared)}


class _ExplainWorker:
    """Actor: one session of the compiled model; ``Explainer.explain_prepared`` per row."""

    def __init__(self, model: bytes, options: dict, provider: str, target: int | None, top_k: int | None) -> None:
        self.explainer = _explainer(model, provider, options)
        self.target, self.top_k = target, top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outcomes = []
        for prepared in batch["prepared"]:
            results = self.explainer.explain_prepared(pickle.loads(prepared), self.target, self.top_k)
            outcomes.append(pickle.dumps(results, protocol=5))
        return {"start": batch["start"], "outcomes": _objects(outcomes)}


def _prepare_evaluate(batch: dict[str, np.ndarray], preprocessing: Preprocessing) -> dict[str, np.ndarray]:
    """Preprocessing task: each row's photos and fitted masks, or the error reading them."""
    prepared = []
    for items in batch["items"]:
        try:
            value: Any = prepare_samples(preprocessing, pickle.loads(items))
        except CompileError as error:
            value = error
        prepared.append(pickle.dumps(value, protocol=5))
    return {"start": batch["start"], "items": batch["items"], "prepared": _objects(prepared)}


class _EvaluateWorker:
    """Actor: one method's session and the classifier's; ``MethodScorer.score`` per row."""

    def __init__(self, model: bytes, classifier: bytes, options: dict, provider: str, batch_size: int,
                 per_run: int) -> None:
        explainer = _explainer(model, provider, {**options, "batch_size": batch_size})
        session = classifier_session(classifier, provider, allow_tf32=options.get("allow_tf32", False), threads=1)
        self.scorer = MethodScorer(explainer, session, batch_size, per_run)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        scores = []
        for start, items, prepared in zip(batch["start"], batch["items"], batch["prepared"]):
            value = pickle.loads(prepared)
            if isinstance(value, CompileError):
                scores.append(prepared)
            else:
                photos, masks = value
                scores.append(pickle.dumps(self.scorer.score(int(start), pickle.loads(items), photos, masks),
                                           protocol=5))
        return {"start": batch["start"], "scores": _objects(scores)}


RayEngine.explain_worker, RayEngine.evaluate_worker = _ExplainWorker, _EvaluateWorker
