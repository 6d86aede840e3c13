"""``agf-onnx evaluate``: the paper's perturbation, segmentation and class-sensitivity benchmarks
for several explanation methods on one classifier and a labelled image set, all in ONNX Runtime.

A data set is a CSV file (``file,label`` and optionally ``labels``, ``mask``; paths relative to
the CSV) or a folder holding ``labels.csv`` or one subfolder per class; without a ``mask`` column,
``<image stem>.mask.png`` beside an image is its mask. Masks are PNG files:
binary (non-zero = the object), or class-coded (``k + 1`` marks class ``k``'s pixels, 255 is
ignored, PASCAL VOC style) when every non-zero value other than 255 is a labelled class plus one.

Per method, the compiled model explains each image's predicted class and its label ``label``;
the metrics are those of ``agf_onnx.runtime.metrics``. Images count as classified correctly when the top
class is one of their labels. A self-supervised model (a ``CompileSpec`` with ``ssl_bank``, the
paper's Algorithm 2) explains its in-graph class ``t`` in place of the predicted class, and its
segmentation is scored on that map; ``results.json`` then reports each image's ``ssl_target`` and
``ssl_neighbour`` per method.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import modelfile
from .bankfile import load_bank
from .compiler import passes
from .compiler.emit import compile as compile_model
from .compiler.emit import compile_canonical
from .compiler.methods import METHODS, parse_variant
from .compiler.modifiers import NONE as NO_MODIFIERS
from .compiler.modifiers import Modifiers
from .compiler.spec import CompileSpec
from .contract import HEATMAP_OUTPUT, SSL_NEIGHBOUR_OUTPUT, SSL_TARGET_OUTPUT
from .errors import CompileError
from .runtime import metrics
from .runtime.explain import IMAGE_SUFFIXES, Explainer, Preprocessing, load_image, session_options
from .runtime.sessions import create_session

#: Mask files beside images in a class-folder data set: ``<image stem>.mask.png``.
MASK_SUFFIX = ".mask.png"

class EvaluateError(CompileError):
    """A bad data set, method or option: the message names the file, row or argument."""


class MethodRefused(EvaluateError):
    """A method asked for by name cannot explain the model (``chefer`` on a CNN): refused before any work."""

    exit_code = 2


@dataclass(frozen=True)
class Sample:
    image: pathlib.Path
    label: int
    labels: frozenset[int]
    mask: pathlib.Path | None = None


# -- data sets --------------------------------------------------------------------------------

def load_dataset(path: str | os.PathLike, class_names: Sequence[str] | None = None) -> list[Sample]:
    """The samples of a CSV file or a folder (``labels.csv`` inside, or one subfolder per class)."""
    path = pathlib.Path(path)
    if path.is_file():
        samples = _read_csv(path, class_names)
    elif not path.is_dir():
        raise EvaluateError(f"{path}: no such file or folder")
    elif (path / "labels.csv").is_file():
        samples = _read_csv(path / "labels.csv", class_names)
    else:
        samples = _read_class_folders(path, class_names)
    # fail before a long run, not in the middle of it
    missing = [str(f) for s in samples for f in (s.image, s.mask) if f is not None and not f.is_file()]
    if missing:
        raise EvaluateError(f"{len(missing)} file(s) of the data set are missing: {', '.join(missing[:5])}"
                            + (", …" if len(missing) > 5 else ""))
    return samples


def _class_index(text: str, class_names: Sequence[str] | None, where: str) -> int:
    text = text.strip()
    if text.lstrip("-").isdigit():
        index = int(text)
    elif class_names and text in class_names:
        index = list(class_names).index(text)
    else:
        raise EvaluateError(f"{where}: '{text}' is neither a class index nor a name in --labels")
    if index < 0 or (class_names and index >= len(class_names)):
        raise EvaluateError(f"{where}: class {index} is out of range")
    return index


def _read_csv(path: pathlib.Path, class_names: Sequence[str] | None) -> list[Sample]:
    with open(path, newline="") as stream:
        reader = csv.DictReader(stream)
        columns = reader.fieldnames or []
        if "file" not in columns or "label" not in columns:
            raise EvaluateError(f"{path}: expected a header with the columns file,label[,labels][,mask], "
                                f"got {','.join(columns) or 'nothing'}")
        samples = []
        for line, row in enumerate(reader, start=2):
            where = f"{path}, line {line}"
            label = _class_index(row["label"] or "", class_names, where)
            labels = {label} | {_class_index(t, class_names, where) for t in (row.get("labels") or "").split()}
            image = path.parent / row["file"]
            mask = path.parent / row["mask"] if row.get("mask") else _mask_beside(image)
            samples.append(Sample(image, label, frozenset(labels), mask))
    if not samples:
        raise EvaluateError(f"{path}: no rows")
    return samples


def _read_class_folders(path: pathlib.Path, class_names: Sequence[str] | None) -> list[Sample]:
    folders = sorted(p for p in path.iterdir() if p.is_dir())
    if not folders:
        raise EvaluateError(f"{path}: expected labels.csv or one subfolder of images per class")
    names = [f.name for f in folders]
    if all(n.isdigit() for n in names):
        indices = [int(n) for n in names]
    elif class_names and all(n in class_names for n in names):
        indices = [list(class_names).index(n) for n in names]
    else:  # torchvision's ImageFolder convention
        indices = list(range(len(folders)))
    samples = []
    for folder, index in zip(folders, indices):
        for image in sorted(folder.rglob("*")):
            if image.suffix.lower() not in IMAGE_SUFFIXES or image.name.endswith(MASK_SUFFIX):
                continue
            samples.append(Sample(image, index, frozenset({index}), _mask_beside(image)))
    if not samples:
        raise EvaluateError(f"{path}: no images in its class subfolders")
    return samples


def _mask_beside(image: pathlib.Path) -> pathlib.Path | None:
    mask = image.with_name(image.stem + MASK_SUFFIX)
    return mask if mask.is_file() else None


def object_masks(mask: np.ndarray, sample: Sample) -> dict[int, np.ndarray] | np.ndarray:
    """Per labelled class, its pixels (class-coded mask), or one boolean object mask (binary mask)."""
    values = set(np.unique(mask).tolist()) - {0, 255}
    if values and values <= {k + 1 for k in sample.labels}:
        return {k: mask == k + 1 for k in sample.labels}
    return mask > 0


# -- the run ----------------------------------------------------------------------------------

def check_methods(methods: Sequence[str], defaults: Modifiers = NO_MODIFIERS) -> None:
    """Every name is a method or a variant ``method+modifier+…`` (``methods.parse_variant``)."""
    unknown = [m for m in methods if m.split("+")[0].strip() not in METHODS]
    if unknown or not methods:
        raise EvaluateError(f"--methods: unknown method {', '.join(unknown) or '(none given)'} "
                            f"(available: {', '.join(METHODS)}, each with +smooth[=S], +smooth-square[=S], "
                            f"+contrast[=others|softmax])")
    for name in methods:
        try:
            parse_variant(name, defaults)
        except CompileError as error:
            raise EvaluateError(f"--methods: {error}") from None


def inapplicable_methods(model: str | os.PathLike, methods: Sequence[str], spec: CompileSpec | None = None,
                         modifiers: Modifiers = NO_MODIFIERS) -> dict[str, CompileError]:
    """The methods that cannot explain ``model``, each with the error that says why.

    Each method is compiled once, without the ONNX checker, on a copy of the model canonicalised
    once, and the result dropped: what a method needs (attention for ``chefer``, a spatial layer
    for ``gradcam``) is known from the compiled graph only. An error of the model itself (a file
    that is no model) is raised, not attributed to a method.
    """
    spec = spec or CompileSpec()
    canonical = passes.canonicalise(modelfile.load(model), spec.input_shapes)
    refused = {}
    for name in methods:
        base, variant = parse_variant(name, modifiers)
        attempt = onnx.ModelProto()
        attempt.CopyFrom(canonical)  # compiling extends the model in place
        try:
            compile_canonical(attempt, spec.replace(method=base, modifiers=variant, check=False))
        except CompileError as error:
            refused[name] = error
    return refused


def usable_methods(model: str | os.PathLike, methods: Sequence[str], spec: CompileSpec | None = None,
                   modifiers: Modifiers = NO_MODIFIERS, explicit: bool = True) -> tuple[list[str], dict[str, str]]:
    """The methods to run and those skipped, each with the first line of why (``inapplicable_methods``).

    Methods named by the user (``explicit``) must all apply: one that cannot is refused at once
    (``MethodRefused``, exit 2); from the default set ("all") such methods are skipped. When no
    method applies, the first one's own error is raised (unsupported ops: exit 2 with the list).
    """
    refused = inapplicable_methods(model, methods, spec, modifiers)
    if len(refused) == len(methods):
        raise next(iter(refused.values()))
    reasons = {name: str(error).splitlines()[0] for name, error in refused.items()}
    if explicit and refused:
        raise MethodRefused("; ".join(f"--methods {name}: {reason}" for name, reason in reasons.items()))
    return [m for m in methods if m not in refused], reasons


def readable_samples(samples: Sequence[Sample]) -> tuple[list[Sample], list[str]]:
    """The samples whose image (and mask) can be read, and one message per sample that cannot (it is
    skipped, as ``explain`` skips an unreadable image; every metric then counts the others only)."""
    kept, skipped = [], []
    for sample in samples:
        try:
            load_image(sample.image, [])
            if sample.mask is not None:
                _read_mask(sample.mask)
        except CompileError as error:
            skipped.append(f"{error} (skipped)")
        else:
            kept.append(sample)
    return kept, skipped


@dataclass
class ImageScores:
    """One image's scores under one method: what ``Tally.add`` sums up, wherever it was computed."""

    index: int  # the image's place in the data set
    correct: bool  # the model's top class, unperturbed, is one of the image's labels
    perturbation: dict  # (mode, which) → [F] booleans: still classified correctly after each share removed
    segmentation: tuple[int, int, float] | None  # correct pixels, pixels, average precision
    shares: tuple[float, ...]  # own, other object mass of the label's map, then of the second class's map
    seconds: float  # this image's share of the time spent in the compiled model's runs
    #: a self-supervised model's class t, its bank neighbour, whether t is a label, whether t is the top class
    ssl: tuple[int, int, bool, bool] | None = None


@dataclass
class Tally:
    """Running sums for one method, keyed by image so that the order images arrive in (Ray's
    workers finish in any order) does not change a single bit of the summary."""

    perturbation: dict = field(default_factory=lambda: {(mode, which): np.zeros(len(metrics.FRACTIONS), np.int64)
                                                        for mode in ("negative", "positive")
                                                        for which in ("predicted", "target")})
    correct: int = 0
    correct_pixels: int = 0
    pixels: int = 0
    precisions: dict = field(default_factory=dict)
    shares: dict = field(default_factory=dict)
    seconds: float = 0.0
    ssl: dict = field(default_factory=dict)

    def add(self, scores: ImageScores) -> None:
        for key, hits in scores.perturbation.items():
            self.perturbation[key] += hits
        self.correct += int(scores.correct)
        if scores.segmentation is not None:
            correct, total, precision = scores.segmentation
            self.correct_pixels += correct
            self.pixels += total
            self.precisions[scores.index] = precision
        if scores.shares:
            self.shares[scores.index] = scores.shares
        if scores.ssl is not None:
            self.ssl[scores.index] = scores.ssl
        self.seconds += scores.seconds

    def summary(self, count: int, ssl_mode: str | None = None) -> dict:
        """The method's entry of ``results.json``; ``count`` images."""
        entry = {"images": count, "explain_seconds": round(self.seconds, 2), "perturbation": {}}
        for (mode, which), hits in self.perturbation.items():
            curve = 100.0 * hits / max(count, 1)
            entry["perturbation"].setdefault(mode, {})[which] = {
                "accuracy": [round(float(a), 2) for a in curve], "auc": round(metrics.area_under_curve(curve), 2)}
        if self.pixels:
            precisions = [self.precisions[k] for k in sorted(self.precisions)]
            entry["segmentation"] = {"images": len(precisions),
                                     "pixel_accuracy": round(100.0 * self.correct_pixels / self.pixels, 2),
                                     "mAP": round(100.0 * float(np.mean(precisions)), 2)}
        if self.ssl:
            entry["ssl"] = self._ssl_summary(ssl_mode)
        if self.shares:
            shares = np.array([self.shares[k] for k in sorted(self.shares)])  # [images, 4]
            own, other = shares[:, 0::2].reshape(-1), shares[:, 1::2].reshape(-1)
            entry["sensitivity"] = {"maps": len(own), "own": round(100.0 * float(np.mean(own)), 2),
                                    "other": round(100.0 * float(np.mean(other)), 2)}
        return entry

    def _ssl_summary(self, mode: str | None) -> dict:
        """How the self-supervised class t relates to the labels and the top class, and t and L_N per image."""
        rows = [self.ssl[k] for k in sorted(self.ssl)]
        targets, neighbours = [row[0] for row in rows], [row[1] for row in rows]
        return {"mode": mode,
                "target_is_label": round(100.0 * sum(row[2] for row in rows) / len(rows), 2),
                "target_is_prediction": round(100.0 * sum(row[3] for row in rows) / len(rows), 2),
                "neighbours_used": len(set(neighbours) - {-1}),
                "ssl_target": targets, "ssl_neighbour": neighbours}


def summary(tallies: dict[str, Tally], count: int, seconds: float, ssl_mode: str | None = None,
            complete: bool = True) -> dict:
    """``results.json``'s numbers from each method's tally (the first method's counts the clean accuracy);
    ``complete`` false: the methods done so far of a run still going (or stopped)."""
    first = next(iter(tallies.values()))
    return {"complete": complete, "images": count, "clean_accuracy": round(100.0 * first.correct / max(count, 1), 2),
            "fractions": list(metrics.FRACTIONS), "seconds": round(seconds, 1),
            "methods": {method: tally.summary(count, ssl_mode) for method, tally in tallies.items()}}


def prepare_samples(preprocessing: Preprocessing,
                    samples: Sequence[Sample]) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Photos ``[N, H, W, 3]`` and fitted masks of samples; an unreadable image raises ``ExplainError``."""
    photos, masks = [], []
    for sample in samples:
        photos.append(preprocessing.fit(load_image(sample.image, [])))
        masks.append(None if sample.mask is None else preprocessing.fit(_read_mask(sample.mask), nearest=True))
    return np.stack(photos), masks


def classifier_session(model, provider: str, allow_tf32: bool = False, threads: int | None = None):
    """An ONNX Runtime session of the original classifier (``ModelProto`` or bytes; the perturbed
    images are classified by it)."""
    return create_session(model, provider, allow_tf32=allow_tf32, options=session_options(threads))


def chunked_outputs(explainer: Explainer, photos: np.ndarray, targets: np.ndarray,
                    per_run: int) -> dict[str, np.ndarray]:
    """The compiled model's outputs for ``photos`` and ``targets``, ``per_run`` images per session
    run (memory bound)."""
    targets = np.broadcast_to(np.asarray(targets), (len(photos),))
    runs = [explainer.run(explainer.to_tensor(photos[start:start + per_run]), targets[start:start + per_run])
            for start in range(0, len(photos), per_run)]
    return {name: np.concatenate([run[name] for run in runs]) for name in runs[0]}


class MethodScorer:
    """The per-image work of evaluate for one method: its maps for the predicted and the labelled
    class, the perturbed images classified, segmentation and class sensitivity. The local engine
    and each Ray worker run this same code on the same batches."""

    def __init__(self, explainer: Explainer, classifier, batch_size: int, per_run: int | None = None) -> None:
        self.explainer, self.classifier, self.batch_size = explainer, classifier, batch_size
        #: images per call of ``Explainer.run``, which splits them further to fit its memory budget
        self.per_run = per_run or batch_size

    def classify(self, photos: np.ndarray) -> np.ndarray:
        """Top-1 classes of prepared photos ``[M, H, W, 3]``, in batches."""
        explainer, tops = self.explainer, []
        for start in range(0, len(photos), self.batch_size * 8):
            batch = explainer.to_tensor(photos[start:start + self.batch_size * 8])
            scores = self.classifier.run([explainer.scores_output], {explainer.image_input: batch})[0]
            tops.append(scores.reshape(len(batch), -1).argmax(1))
        return np.concatenate(tops)

    def _outputs(self, photos: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
        return chunked_outputs(self.explainer, photos, targets, self.per_run)

    def _heatmaps(self, photos: np.ndarray, targets: np.ndarray) -> np.ndarray:
        return self._outputs(photos, targets)[HEATMAP_OUTPUT][:, 0]

    def score(self, start: int, chunk: Sequence[Sample], photos: np.ndarray, masks: list) -> list[ImageScores]:
        """One batch, images ``start, start + 1, …``: each image's scores."""
        explainer, began = self.explainer, time.perf_counter()
        labels = [set(sample.labels) for sample in chunk]
        predicted = self.classify(photos)
        target = np.array([s.label for s in chunk])
        ssl: list = [None] * len(chunk)
        if explainer.ssl_mode is not None:  # Algorithm 2: the graph explains its own t, not the top class
            outputs = self._outputs(photos, np.array([-1]))
            explained = outputs[SSL_TARGET_OUTPUT].astype(np.int64)
            maps = {"predicted": outputs[HEATMAP_OUTPUT][:, 0]}
            ssl = [(int(t), int(neighbour), int(t) in labels[n], int(t) == int(predicted[n]))
                   for n, (t, neighbour) in enumerate(zip(explained, outputs[SSL_NEIGHBOUR_OUTPUT]))]
        else:
            explained = predicted
            maps = {"predicted": self._heatmaps(photos, predicted)}
        # where the label is the explained class the two maps, and so their curves, are the same
        differs = np.flatnonzero(target != explained)
        maps["target"] = maps["predicted"].copy()
        if len(differs):
            maps["target"][differs] = self._heatmaps(photos[differs], target[differs])
        seconds = time.perf_counter() - began
        perturbation = self._perturbation(photos, maps, labels, differs)
        # a self-supervised model's explanation is the map of its own t: that one is segmented
        segmentation, shares, extra = self._segmentation_and_sensitivity(
            chunk, photos, masks, maps["predicted" if explainer.ssl_mode is not None else "target"])
        seconds += extra
        return [ImageScores(start + n, int(predicted[n]) in labels[n],
                            {key: hits[:, n] for key, hits in perturbation.items()}, segmentation[n], shares[n],
                            seconds / len(chunk), ssl[n])
                for n in range(len(chunk))]

    def _perturbation(self, photos: np.ndarray, maps: dict, labels: list[set[int]],
                      differs: np.ndarray) -> dict:
        """(mode, which) → ``[F, N]`` hits."""
        perturbation = {}
        for mode in ("negative", "positive"):
            hits = metrics.perturbation_hits(photos, maps["predicted"], labels, self.classify,
                                             highest_first=mode == "positive")
            perturbation[mode, "predicted"] = hits.copy()
            if len(differs):
                hits[:, differs] = metrics.perturbation_hits(photos[differs], maps["target"][differs],
                                                             [labels[n] for n in differs], self.classify,
                                                             highest_first=mode == "positive")
            perturbation[mode, "target"] = hits
        return perturbation

    def _segmentation_and_sensitivity(self, chunk: Sequence[Sample], photos: np.ndarray, masks: list,
                                      maps: np.ndarray) -> tuple[list, list, float]:
        """The labelled class's map against its object; for two class-coded objects, each class's map
        against both (the second class is explained here). Per image: the segmentation scores (or
        None), the mass shares (own, other for each map, or empty); and the seconds spent explaining."""
        segmentation, shares, pairs = [None] * len(chunk), [()] * len(chunk), []
        for n, (sample, mask) in enumerate(zip(chunk, masks)):
            if mask is None:
                continue
            objects = object_masks(mask, sample)
            truth = objects.get(sample.label) if isinstance(objects, dict) else objects
            if truth is not None and truth.any():
                segmentation[n] = metrics.segmentation(maps[n], truth)
            if isinstance(objects, dict):
                present = [k for k in sorted(sample.labels, key=lambda k: (k != sample.label, k)) if objects[k].any()]
                if len(present) >= 2:
                    pairs.append((n, objects, present[0], present[1]))
        if not pairs:
            return segmentation, shares, 0.0
        began = time.perf_counter()
        others = self._heatmaps(photos[[pair[0] for pair in pairs]], np.array([pair[3] for pair in pairs]))
        seconds = time.perf_counter() - began
        for (n, objects, first, second), other_map in zip(pairs, others):
            shares[n] = tuple(share for heatmap, own, other in ((maps[n], first, second), (other_map, second, first))
                              for share in metrics.mass_shares(heatmap, [objects[own], objects[other]]))
        return segmentation, shares, seconds


class Evaluation:
    """Runs the benchmarks for ``methods`` on one classifier.

    Args:
        model: the original ONNX classifier (each method is compiled from it).
        methods: method names (see ``agf-onnx compile --method``).
        spec: the compile options common to every method (``CompileSpec``: ``input_shapes``,
            ``logits``, ``image``, ``flat_policy``, the method options, and ``ssl_bank``, ``features``,
            ``ssl_mode`` for a self-supervised model); each method replaces its method and modifiers.
        explainer_options: preprocessing, ``allow_tf32`` and ``max_memory``, as for ``agf_onnx.Explainer``
            (the classifier's own session gets the same provider and ``allow_tf32``). Each method's
            runs are split to fit ``max_memory`` from its own measured cost (``agf_onnx.runtime.budget``).
        modifiers: what a variant's bare ``+smooth`` means (its ``smooth`` copies when set, the noise, the
            seed) and the contrast of a bare ``+contrast``; methods may be variants such as
            ``agf+smooth=8+contrast=softmax`` (``methods.parse_variant``), listed by that full name.
    """

    def __init__(self, model: str | os.PathLike, methods: Sequence[str], *, spec: CompileSpec | None = None,
                 provider: str = "auto", batch_size: int = 16, modifiers: Modifiers = NO_MODIFIERS,
                 **explainer_options) -> None:
        check_methods(methods, modifiers)
        self.modifier_defaults = modifiers
        self.model, self.methods, self.batch_size = str(model), list(methods), batch_size
        self.spec, self.explainer_options = spec or CompileSpec(), dict(explainer_options)
        if self.spec.ssl_bank is not None:  # read once, not once per method
            self.spec = self.spec.replace(ssl_bank=load_bank(self.spec.ssl_bank))
        self.provider_choice = provider
        #: the first method's explainer: the preprocessing, the layout and the scores' name for all
        self.reference = self.explainer(methods[0])
        if self.reference.scores_output is None:
            raise EvaluateError(f"{model}: the class scores are not a graph output, so perturbed images cannot be "
                                "classified")
        self.provider = self.reference.provider
        self.classifier = classifier_session(self.original(), self.provider,
                                             allow_tf32=self.explainer_options.get("allow_tf32", False))

    def original(self):
        """The original classifier (an ``onnx.ModelProto``)."""
        return modelfile.load(self.model)

    def compiled(self, method: str):
        """The model compiled with ``method`` (an ``onnx.ModelProto``), a method or a variant
        ``method+modifier…`` (``methods.parse_variant``)."""
        base, modifiers = parse_variant(method, self.modifier_defaults)
        return compile_model(self.model, self.spec.replace(method=base, modifiers=modifiers))

    def explainer(self, method: str) -> Explainer:
        """A session of the model compiled with ``method``."""
        compiled = self.compiled(method)
        # memory bound by design: runs of several chunk sizes must not each keep an arena block
        return Explainer(compiled, self.provider_choice, batch_size=self.batch_size, memory_pattern=False,
                         **self.explainer_options)

    def classify(self, photos: np.ndarray) -> np.ndarray:
        """Top-1 classes of prepared photos ``[M, H, W, 3]``, in batches."""
        return MethodScorer(self.reference, self.classifier, self.batch_size).classify(photos)

    @staticmethod
    def _heatmaps(explainer: Explainer, photos: np.ndarray, targets: np.ndarray, per_run: int) -> np.ndarray:
        """The maps of ``photos`` for ``targets``, ``per_run`` images per session run (memory bound)."""
        return chunked_outputs(explainer, photos, targets, per_run)[HEATMAP_OUTPUT][:, 0]

    def check_labels(self, samples: Sequence[Sample]) -> None:
        """Refuse, before a long run, a label the model has no class for."""
        classes = self.reference.classes
        bad = next((s for s in samples if classes is not None and max(s.labels) >= classes), None)
        if bad is not None:
            raise EvaluateError(f"{bad.image}: class {max(bad.labels)} is out of range: the model has {classes} "
                                f"classes (0–{classes - 1})")

    def run(self, samples: Sequence[Sample], progress: Callable[[int, str], None] | None = None,
            completed: Callable[[dict], None] | None = None) -> dict:
        """The metrics per method over ``samples`` (a dict ready for ``results.json``). One method at a
        time, so that only one compiled model is in memory; ``progress(images, method)`` after each batch,
        ``completed(results so far)`` after each method (a later failure leaves the finished ones)."""
        self.check_labels(samples)
        tallies = {method: Tally() for method in self.methods}
        began = time.perf_counter()
        preprocessing = self.reference.preprocessing
        for index, method in enumerate(self.methods):
            explainer = self.reference if index == 0 else self.explainer(method)
            scorer = MethodScorer(explainer, self.classifier, self.batch_size)
            for start in range(0, len(samples), self.batch_size):
                chunk = samples[start:start + self.batch_size]
                photos, masks = prepare_samples(preprocessing, chunk)
                for scores in scorer.score(start, chunk, photos, masks):
                    tallies[method].add(scores)
                if progress is not None:
                    progress(len(chunk), method)
            del explainer, scorer
            if completed is not None and index + 1 < len(self.methods):
                done = {name: tallies[name] for name in self.methods[:index + 1]}
                completed(summary(done, len(samples), time.perf_counter() - began, self.reference.ssl_mode,
                                  complete=False))
        return summary(tallies, len(samples), time.perf_counter() - began, self.reference.ssl_mode)


def _read_mask(path: pathlib.Path) -> np.ndarray:
    """A mask's values ``[H, W]`` uint8: palette indices for a palette PNG (PASCAL VOC), grey levels otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            return np.asarray(opened if opened.mode in ("L", "P") else opened.convert("L"), dtype=np.uint8)
    except FileNotFoundError as error:
        raise EvaluateError(f"{path}: no such mask file") from error
    except (UnidentifiedImageError, OSError) as error:
        raise EvaluateError(f"{path}: not a readable mask ({error})") from error


# -- outputs ----------------------------------------------------------------------------------

_COLUMNS = [("negative AUC, predicted ↑", ("perturbation", "negative", "predicted", "auc")),
            ("negative AUC, target ↑", ("perturbation", "negative", "target", "auc")),
            ("positive AUC, predicted ↓", ("perturbation", "positive", "predicted", "auc")),
            ("positive AUC, target ↓", ("perturbation", "positive", "target", "auc")),
            ("pixel accuracy ↑", ("segmentation", "pixel_accuracy")),
            ("mAP ↑", ("segmentation", "mAP")),
            ("own-object mass ↑", ("sensitivity", "own")),
            ("other-object mass ↓", ("sensitivity", "other"))]


def markdown_table(results: dict, all_columns: Sequence[tuple[str, tuple[str, ...]]] = _COLUMNS) -> str:
    """One row per method: the perturbation AUCs (paper, Table 2), segmentation (Table 3) and class
    sensitivity, all in percent; the best value of each column in bold (``↓`` in a title: the
    lowest). ``all_columns``: (title, the keys into a method's entry) of the columns shown where
    some method has a value (``evaluate`` for text passes its own)."""
    methods = results["methods"]
    columns = [(title, keys) for title, keys in all_columns if any(dig(m, keys) is not None for m in methods.values())]
    best = {}
    for title, keys in columns:
        values = [v for v in (dig(m, keys) for m in methods.values()) if v is not None]
        best[title] = (min if "↓" in title else max)(values) if values else None
    lines = ["| method | " + " | ".join(t for t, _ in columns) + " | explain s |",
             "|---|" + "---:|" * (len(columns) + 1)]
    for name, entry in methods.items():
        cells = []
        for title, keys in columns:
            value = dig(entry, keys)
            text = "–" if value is None else f"{value:.1f}"
            cells.append(f"**{text}**" if value is not None and value == best[title] and len(methods) > 1 else text)
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {entry['explain_seconds']:.1f} |")
    return "\n".join(lines)


def dig(entry: dict, keys: Sequence[str]):
    """``entry[k0][k1]…``, ``None`` where a key is missing or ``None``."""
    for key in keys:
        if not isinstance(entry, dict) or key not in entry:
            return None
        entry = entry[key]
    return entry


def write_outputs(out: pathlib.Path, results: dict, settings: dict) -> list[pathlib.Path]:
    """``results.json``, ``results.md`` and ``perturbation.png`` in ``out``."""
    from .runtime.plots import perturbation_plot

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md", out / "perturbation.png"]
    written[0].write_text(json.dumps({"settings": settings, **results}, indent=2, ensure_ascii=False))
    done = f"{len(results['methods'])} of {len(settings['methods'])}" if not results.get("complete", True) else None
    title = (f"{os.path.basename(settings['model'])}: {results['images']} images, top-1 accuracy "
             f"{results['clean_accuracy']:.1f} % before perturbation" + (f" (partial: {done} methods)" if done else ""))
    written[1].write_text(f"# {title}\n\n{markdown_table(results)}\n\n"
                          "Perturbation AUC: area under top-1 accuracy (%) against the share of pixels removed "
                          "(10 %…90 %); negative removes the least relevant pixels first, positive the most "
                          "relevant. Segmentation and class sensitivity (share of positive map mass inside the "
                          "explained object vs. the other labelled object) in %.\n"
                          + (f"\nSelf-supervised model (--ssl-mode {settings['ssl_mode']}): 'predicted' is the class t "
                             "the graph chose from the bank (the paper's Algorithm 2), and segmentation scores t's "
                             "map.\n" if settings.get("ssl_mode") else ""))
    perturbation_plot(results, title).save(written[2])
    return written
