"""Explain images with a compiled model: preprocessing, batched ONNX Runtime runs, top-K
classes, overlays (``Explainer``, ``Explanation``). The ``agf-onnx explain`` command is a thin
layer over this module."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from .. import contract, modelfile
from ..contract import (
    CLASSES_OUTPUT,
    HEATMAP_OUTPUT,
    HEATMAPS_OUTPUT,
    SSL_NEIGHBOUR_OUTPUT,
    SSL_TARGET_OUTPUT,
    TARGET_INPUT,
)
from ..errors import CompileError
from . import budget
from .plots import DEFAULT_COLOUR_MAP, MIN_PANEL, blend, colour_map, overlay_figure  # noqa: F401 (blend: API)
from .sessions import create_session, session_provider

#: Preprocessing presets: pixels/255, then (x − mean)/std per RGB channel.
PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "symmetric": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # [-1, 1], as Paddle classifiers and MTCNN
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # [0, 1]
}
#: What compiles an original classifier on the fly (``Explainer(compile_original=True)``,
#: ``compiled_model``): ``agf_onnx.compile``, handed over by ``agf_onnx/__init__.py`` through
#: ``use_compiler``. The run-time half never imports the compiler (docs/architecture.md).
_compile_on_the_fly: Callable[..., onnx.ModelProto] | None = None
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


class ExplainError(CompileError):
    """A bad image, class or label: the message names it."""


def diverging(heatmap: np.ndarray) -> np.ndarray:
    """Signed map → RGB uint8: white at 0, red (204, 0, 0) at +1 (evidence for the class), blue
    (0, 51, 204) at −1 (against); values beyond ±1 saturate (the colour map ``bwr``)."""
    return colour_map(heatmap, "bwr")


@dataclass
class Explanation:
    """Heatmaps ``[N, K, H, W]`` for the classes ``targets`` ``[N, K]`` of N images."""

    photos: np.ndarray  # [N, H, W, 3] uint8, the images as the model saw them (after resize/crop)
    heatmaps: np.ndarray
    targets: np.ndarray
    scores: np.ndarray | None  # [N, classes] the model's class scores
    probabilities: np.ndarray | None
    labels: Sequence[str] | None = None
    sources: list[str] = field(default_factory=list)
    #: a self-supervised model's (``--ssl-bank``) class t per image and its bank neighbour ([N]; −1: none)
    ssl_targets: np.ndarray | None = None
    ssl_neighbours: np.ndarray | None = None

    def label(self, index: int) -> str:
        return self.labels[index] if self.labels and index < len(self.labels) else str(index)

    def overlay(self, i: int, k: int | None = None, cmap: str = DEFAULT_COLOUR_MAP, min_panel: int = MIN_PANEL):
        """A PIL image (``plots.overlay_figure``): the photo, then one overlay per explained class (or
        only rank ``k``), each titled with the class name, its probability and the map's range, and a
        colour bar; panels smaller than ``min_panel`` pixels are enlarged."""
        ranks = range(self.heatmaps.shape[1]) if k is None else [k]
        return overlay_figure(self.photos[i], [self.heatmaps[i, rank] for rank in ranks],
                              [self.title(i, rank) for rank in ranks], cmap, min_panel)

    def title(self, i: int, rank: int) -> tuple[str, str]:
        """The two title lines of image ``i``'s overlay for its ``rank``-th explained class: the class
        (name and index), then its probability and the map's range."""
        index = int(self.targets[i, rank])
        heatmap = self.heatmaps[i, rank]
        name = self.label(index) if index >= 0 else "top class"
        first = name if name == str(index) or index < 0 else f"{name} ({index})"
        probability = (f"p {self.probabilities[i, index]:.1%} · " if self.probabilities is not None and index >= 0
                       else "")
        return first, f"{probability}map {float(heatmap.min()):+.2f} to {float(heatmap.max()):+.2f}"


def label_index(target: int | str, labels: Sequence[str] | None) -> int:
    """The class index ``target`` names: an integer, or a label of ``labels`` (not range-checked)."""
    if isinstance(target, str) and not target.lstrip("-").isdigit():
        try:
            float(target)
        except ValueError:
            pass
        else:
            raise ExplainError(f"class '{target}': a class index is a whole number")
        if not labels or target not in labels:
            close = [label for label in (labels or []) if target.lower() in label.lower()][:5]
            raise ExplainError(f"unknown label '{target}'" + (f" (did you mean: {', '.join(close)})" if close
                                                              else "" if labels else "; pass --labels FILE"))
        return list(labels).index(target)
    return int(target)


#: The fields of an ``Explanation`` with one entry per image (first axis).
_PER_IMAGE = ("photos", "heatmaps", "targets", "scores", "probabilities", "ssl_targets", "ssl_neighbours")


def load_image(source: Any, notes: list[str]) -> np.ndarray:
    """An RGB uint8 array ``[H, W, 3]`` from a path, a PIL image or an array."""
    from PIL import Image, UnidentifiedImageError

    name = str(source) if isinstance(source, (str, os.PathLike)) else "image"
    if isinstance(source, (str, os.PathLike)):
        try:
            with Image.open(source) as opened:
                opened.load()
                source = opened.copy()
        except FileNotFoundError as error:
            raise ExplainError(f"{name}: no such file") from error
        except (UnidentifiedImageError, OSError) as error:
            raise ExplainError(f"{name}: not a readable image ({error})") from error
    if hasattr(source, "mode"):  # a PIL image
        if source.mode.startswith(("I", "F")):  # 16/32-bit integer or float pixels: PIL's convert clips them
            notes.append(f"{name}: {source.mode} image scaled to 8 bits and converted to RGB")
            return _as_rgb8(np.asarray(source), name, notes)
        if source.mode not in ("RGB",):
            notes.append(f"{name}: {source.mode} image converted to RGB")
            source = source.convert("RGB")
        return np.asarray(source, dtype=np.uint8)
    return _as_rgb8(np.asarray(source), name, notes)


def _as_rgb8(array: np.ndarray, name: str, notes: list[str]) -> np.ndarray:
    """An image array (``[H, W]``, ``[H, W, 3|4]``; any integer or float type) as RGB uint8 ``[H, W, 3]``."""
    if array.ndim == 2:
        notes.append(f"{name}: grayscale image converted to RGB")
        array = np.stack([array] * 3, -1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ExplainError(f"{name}: expected an image array [H, W, 3], got shape {list(array.shape)}")
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        raise ExplainError(f"{name}: the image array holds NaN or infinite values")
    if array.shape[-1] == 4:
        notes.append(f"{name}: alpha channel dropped")
        array = array[..., :3]
    if array.dtype != np.uint8:
        array = np.clip(to_eight_bits(array), 0, 255).round().astype(np.uint8)
    return array


def to_eight_bits(array: np.ndarray) -> np.ndarray:
    """Pixel values on the 0–255 scale, as float64. Integers are scaled by their bit depth: that of
    the type (uint16: 65535 ↦ 255), or for wider types (PIL's 32-bit ``I`` mode) the smallest of 8
    and 16 bits that holds the values. Floats in [0, 1] are scaled by 255, floats in [0, 255] kept,
    any other range stretched from its minimum to its maximum (an image, not a measurement)."""
    values = array.astype(np.float64)
    if array.dtype == bool:
        return values * 255.0
    if array.dtype.kind in "ui":
        bits = 8 * array.dtype.itemsize
        if bits > 16:
            top = int(array.max(initial=0))
            bits = 8 if top <= 255 else 16 if top <= 65535 else bits - (array.dtype.kind == "i")
        elif array.dtype.kind == "i":
            bits -= 1
        return values * (255.0 / (2**bits - 1))
    low, high = values.min(initial=0.0), values.max(initial=0.0)
    if low >= 0.0 and high <= 1.0:
        return values * 255.0
    if low >= 0.0 and high <= 255.0:
        return values
    return (values - low) * (255.0 / (high - low))


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input: fitted to the model's size (``fit``), then channel
    order, normalisation and layout (``to_tensor``). Plain data, so that it travels to other
    processes (the Ray engine's preprocessing tasks) without a session."""

    height: int
    width: int
    size: int | None = None  # resize the shorter side to this, then centre-crop
    crop: bool = False
    bgr: bool = False
    mean: Sequence[float] | None = None  # on pixels scaled to [0, 1]; None: raw 0–255 values
    std: Sequence[float] | None = None
    integer_input: bool = False
    channels_last: bool = False

    def fit(self, image: np.ndarray, nearest: bool = False) -> np.ndarray:
        """An image (or, ``nearest``, a label mask) resized/cropped to the model's size, as ``--size``/``--crop`` say."""
        from PIL import Image

        picture = Image.fromarray(image)
        resample = Image.NEAREST if nearest else Image.BILINEAR
        if self.crop:
            scale = (self.size / min(picture.size) if self.size else
                     max(self.width / picture.width, self.height / picture.height))
            picture = picture.resize((max(self.width, round(picture.width * scale)),
                                      max(self.height, round(picture.height * scale))), resample)
            left, top = (picture.width - self.width) // 2, (picture.height - self.height) // 2
            picture = picture.crop((left, top, left + self.width, top + self.height))
        else:
            picture = picture.resize((self.width, self.height), resample)
        return np.asarray(picture, dtype=np.uint8)

    def to_tensor(self, photos: np.ndarray) -> np.ndarray:
        """Prepared photos ``[N, H, W, 3]`` uint8 → the model's input (channel order, normalisation, layout)."""
        pixels = photos[..., ::-1] if self.bgr else photos
        if self.integer_input:
            batch = pixels.astype(np.uint8)
        elif self.mean is None:
            batch = pixels.astype(np.float32)
        else:
            batch = ((pixels / 255.0 - np.asarray(self.mean)) / np.asarray(self.std)).astype(np.float32)
        return np.ascontiguousarray(batch if self.channels_last else batch.transpose(0, 3, 1, 2))

    def prepare(self, index: int, image: Any) -> PreparedImage:
        """One image loaded and fitted, or the error that stopped it (never raised: one bad file
        must not stop a run over many)."""
        source = str(image) if isinstance(image, (str, os.PathLike)) else f"image {index}"
        notes: list[str] = []
        try:
            return PreparedImage(index, source, self.fit(load_image(image, notes)), notes)
        except ExplainError as error:
            return PreparedImage(index, source, None, notes, str(error))


@dataclass
class PreparedImage:
    """An image fitted to the model (``photo`` ``[H, W, 3]`` uint8), or why it could not be."""

    index: int  # its place among the images of the run
    source: str
    photo: np.ndarray | None
    notes: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class ImageExplanation:
    """One image's outcome (``Explainer.explain_each``): its explanation (N = 1), or its error."""

    index: int
    source: str
    explanation: Explanation | None
    notes: list[str] = field(default_factory=list)
    error: str | None = None


class Explainer:
    """Runs a compiled model (or compiles an original one on the fly) on images.

    Args:
        model: path of a compiled model (``agf-onnx compile``) or of an original classifier.
        provider: ``"auto"`` (CUDA when ONNX Runtime offers it, else CPU), ``"cuda"`` or ``"cpu"``.
        preset: ``"imagenet"``, ``"symmetric"``, ``"unit"`` or ``"none"`` (raw 0–255 values).
        mean: override the preset's per-channel mean (pixels scaled to [0, 1]).
        std: override the preset's per-channel standard deviation (pixels scaled to [0, 1]).
        size: resize the shorter side to this, then centre-crop to the model's size.
        crop: keep the aspect ratio: resize to cover the model's size, then centre-crop (implied
            by ``size``); default: resize straight to the model's size.
        bgr: feed channels in BGR order.
        input_shapes: for compiling a model with dynamic height/width on the fly.
        compile_original: compile a model without a ``heatmap`` output on the fly (False: run it as
            it is, for its other outputs, as ``agf_onnx.bank`` does).
        batch_size: images per session run.
        allow_tf32: on CUDA, let convs/GEMMs round their operands to TF32 (faster; the maps then
            diverge from the model's: see ``agf_onnx.runtime.sessions``). Default: exact float32.
        cuda_graph: for low-latency serving on CUDA: capture the run as a CUDA graph and replay it
            (``enable_cuda_graph=1``) with inputs and outputs bound to fixed GPU buffers. Every run
            then has exactly ``batch_size`` samples (smaller batches are padded, the padding's maps
            dropped) and the model must have static shapes apart from the batch. CUDA only: a
            ``ProviderError`` elsewhere.
        threads: ONNX Runtime's intra-op threads (default: its own choice, one per core); the Ray
            engine runs one single-threaded session per CPU it is given.
        memory_pattern: ONNX Runtime's memory pattern (faster repeated runs of one shape). Off by
            default: it keeps an arena block per batch size and allocates a second one on a shape's
            second run (``session_options``), so a run's cost would no longer be what
            ``max_memory``'s sizing measured (IG-50 on a VGG grew 3× past the prediction with it).
        max_memory: the most memory (bytes, or a size such as ``"8G"``) the process may hold while
            a run is in flight; default: ``budget.default_budget()``, half the memory available when
            the model is loaded. A run of more images than fit is split (``budget``: measured once
            per model, at the first run); a budget that cannot hold one image raises ``BudgetError``
            saying how much one needs. On CUDA, device memory is ONNX Runtime's: runs take
            ``batch_size`` images.
    """

    def __init__(self, model: str | os.PathLike | onnx.ModelProto, provider: str = "auto", *,
                 preset: str = "imagenet", mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 size: int | None = None, crop: bool = False, bgr: bool = False,
                 labels: Sequence[str] | None = None,
                 input_shapes: dict | None = None, batch_size: int = 8, compile_original: bool = True,
                 allow_tf32: bool = False, cuda_graph: bool = False, threads: int | None = None,
                 memory_pattern: bool = False, max_memory: int | str | None = None) -> None:
        if preset not in (*PRESETS, "none"):
            raise ExplainError(f"unknown preset '{preset}' (available: {', '.join([*PRESETS, 'none'])})")
        limit = None if max_memory is None else budget.parse_memory(max_memory)
        model, self.compiled_on_the_fly = compiled_model(model, input_shapes, compile_original)
        # a compiled model file is read by ONNX Runtime itself, external data included: the model here
        # holds no weights, and no serialised copy of them is made
        proto = model if isinstance(model, onnx.ModelProto) else _read_model(model, weights=False)
        meta = contract.metadata(proto)
        if cuda_graph and batch_size < 1:
            raise ExplainError(f"cuda_graph=True: batch_size {batch_size} must be at least 1 (the graph's fixed batch)")
        self.session = create_session(model if isinstance(model, onnx.ModelProto) else os.fspath(model), provider,
                                      allow_tf32=allow_tf32, cuda_graph=cuda_graph,
                                      options=session_options(threads, memory_pattern))
        self.provider = session_provider(self.session)
        self.allow_tf32, self.cuda_graph = allow_tf32, cuda_graph
        self.image_input = meta.get(contract.IMAGE) or self.session.get_inputs()[0].name
        info = next(i for i in self.session.get_inputs() if i.name == self.image_input)
        self.channels_last = meta.get(contract.LAYOUT) == "NHWC"
        dims = info.shape[1:3] if self.channels_last else info.shape[2:4]
        if not all(isinstance(d, int) for d in dims):
            raise ExplainError(f"the model's image input '{self.image_input}' has no static size {info.shape}")
        self.height, self.width = dims
        self.integer_input = info.type not in ("tensor(float)", "tensor(float16)")
        self.float16_input = info.type == "tensor(float16)"  # an fp16 file (docs/deployed-formats.md)
        self.scores_output = meta.get(contract.SCORES) or None
        self.outputs = [o.name for o in self.session.get_outputs()]
        scores_info = next((o for o in self.session.get_outputs() if o.name == self.scores_output), None)
        self.classes = int(np.prod(scores_info.shape[1:])) if scores_info is not None and all(
            isinstance(d, int) for d in scores_info.shape[1:]) else None
        # a model compiled with --top-k K already returns the K best classes' maps in its one run
        maps_info = next((o for o in self.session.get_outputs() if o.name == HEATMAPS_OUTPUT), None)
        self.compiled_top_k = maps_info.shape[1] if maps_info is not None and CLASSES_OUTPUT in self.outputs and \
            isinstance(maps_info.shape[1], int) else 0
        #: a self-supervised model explains t = argmax head(L_I − L_N), not the top class, by default
        self.ssl_mode = meta.get(contract.SSL_MODE) if SSL_TARGET_OUTPUT in self.outputs else None
        self.ssl_features = meta.get(contract.SSL_FEATURES) if self.ssl_mode else None
        self.mean, self.std = (mean, std) if mean is not None and std is not None else PRESETS.get(preset, (None, None))
        if (mean is None) != (std is None):
            raise ExplainError("--mean and --std go together")
        self.size, self.crop, self.bgr, self.labels, self.batch_size = size, crop or bool(size), bgr, labels, batch_size
        self._graph_run = _CudaGraphRun(self.session, batch_size) if cuda_graph else None
        #: the process's memory bound while a run is in flight (bytes) and the measured cost of a run
        self.max_memory = limit if limit is not None else budget.default_budget()
        self.run_cost: budget.RunCost | None = None

    # -- preprocessing ------------------------------------------------------------------------
    @property
    def preprocessing(self) -> Preprocessing:
        """This explainer's preprocessing as plain data (for other processes)."""
        return Preprocessing(self.height, self.width, self.size, self.crop, self.bgr, self.mean, self.std,
                             self.integer_input, self.channels_last)

    def fit(self, image: np.ndarray, nearest: bool = False) -> np.ndarray:
        """An image (or, ``nearest``, a label mask) resized/cropped to the model's size, as ``--size``/``--crop`` say."""
        return self.preprocessing.fit(image, nearest)

    def to_tensor(self, photos: np.ndarray) -> np.ndarray:
        """Prepared photos ``[N, H, W, 3]`` uint8 → the model's input (channel order, normalisation, layout)."""
        return self.preprocessing.to_tensor(photos)

    def prepare(self, images: Sequence[Any], notes: list[str] | None = None) -> np.ndarray:
        """Load, convert to RGB and fit images to the model's size → ``[N, H, W, 3]`` uint8."""
        notes = [] if notes is None else notes
        return np.stack([self.fit(load_image(image, notes)) for image in images])

    # -- running ------------------------------------------------------------------------------
    def run(self, batch: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the model on a model input ``batch`` and classes ``target`` ([N] or [1]):
        one session run, or several of ``images_per_run`` images each, concatenated."""
        target = np.asarray(target).astype(np.int64)
        step = self.images_per_run(batch, target)
        if step >= len(batch):
            return self._run_once(batch, target)
        runs = [self._run_once(batch[start:start + step], target if len(target) == 1 else target[start:start + step])
                for start in range(0, len(batch), step)]
        return {name: np.concatenate([run[name] for run in runs]) for name in self.outputs}

    def images_per_run(self, batch: np.ndarray, target: np.ndarray) -> int:
        """How many images of ``batch`` one session run may take within ``max_memory``, measuring the
        model's cost first if not yet done (``budget.measure``: a run of the batch's first image,
        then of it twice). CUDA runs and CUDA graphs take the whole batch."""
        if self._graph_run is not None or self.provider != "cpu" or not len(batch):
            return len(batch)
        if self.run_cost is None:
            first, first_target = batch[:1], target[:1]
            self.run_cost = budget.measure(
                lambda count: self._run_once(np.repeat(first, count, axis=0), first_target), self.max_memory)
        budget.check_fits(self.run_cost, self.max_memory)
        return max(1, self.run_cost.images_within(self.max_memory, len(batch)))

    def check_budget(self, image: Any) -> None:
        """Measure the model's cost per run now, on ``image`` (left to the run to report if it cannot be
        read), and refuse a ``max_memory`` that cannot hold one image (``budget.BudgetError``)."""
        try:
            batch = self.to_tensor(self.prepare([image]))
        except CompileError:
            return
        self.images_per_run(batch, np.array([-1], np.int64))

    def _run_once(self, batch: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {self.image_input: batch.astype(np.float16) if self.float16_input else batch, TARGET_INPUT: target}
        if self._graph_run is not None:
            return self._graph_run.run(feeds)
        values = self.session.run(self.outputs, feeds)
        return dict(zip(self.outputs, values))

    def class_index(self, target: int | str) -> int:
        """A class index from an index or a label name, checked against the number of classes; a
        negative index stays negative: the compiled model reads it as each sample's top class."""
        index = self._index(target)
        if index < 0:
            return -1
        if self.classes is not None and not 0 <= index < self.classes:
            raise ExplainError(f"class {target} is out of range: the model has {self.classes} classes "
                               f"(0–{self.classes - 1})")
        return index

    def _index(self, target: int | str) -> int:
        return label_index(target, self.labels)

    def explain_photos(self, photos: np.ndarray, target: int | str | None = None,
                       top_k: int | None = None) -> Explanation:
        """Explain prepared photos (``prepare``): the predicted class, ``target``, or the ``top_k`` best."""
        if target is not None and self.class_index(target) < 0:  # −1: the top class, as the compiled model reads it
            target = None
        if target is not None and top_k:
            raise ExplainError("give a target or top-k, not both")
        if top_k is not None and not 1 <= top_k <= (self.classes or top_k):
            raise ExplainError(f"top-k {top_k}: must be between 1 and the number of classes ({self.classes})")
        batch = self.to_tensor(photos)
        first = self.run(batch, np.array([-1] if target is None else [self.class_index(target)]))
        scores = first.get(self.scores_output) if self.scores_output else None
        if scores is not None:
            scores = scores.reshape(len(batch), -1)
        ssl_targets, ssl_neighbours = first.get(SSL_TARGET_OUTPUT), first.get(SSL_NEIGHBOUR_OUTPUT)
        if self.ssl_mode is not None and top_k and top_k > max(1, self.compiled_top_k):
            raise ExplainError(f"top-k {top_k}: a self-supervised model ranks the classes of head(L_I − L_N) in its "
                               f"graph only; compile it with --top-k {top_k}")
        if not top_k or top_k == 1:
            if ssl_targets is not None and target is None:
                chosen = ssl_targets.astype(np.int64)[:, None]
            elif scores is None:
                chosen = np.full((len(batch), 1), -1 if target is None else self.class_index(target))
            elif target is None:
                chosen = scores.argmax(1)[:, None]
            else:
                chosen = np.full((len(batch), 1), self.class_index(target))
            heatmaps = first[HEATMAP_OUTPUT]
        elif top_k <= self.compiled_top_k:
            chosen = first[CLASSES_OUTPUT][:, :top_k].astype(np.int64)
            heatmaps = first[HEATMAPS_OUTPUT][:, :top_k]
        else:
            if scores is None:
                raise ExplainError("top-k needs the model's class scores, which this model does not output")
            chosen = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
            # the first run already explained each sample's top class (argmax picks the first maximum,
            # as the stable sort does)
            heatmaps = np.concatenate([first[HEATMAP_OUTPUT]] + [self.run(batch, chosen[:, k])[HEATMAP_OUTPUT]
                                                                 for k in range(1, top_k)], 1)
        probabilities = None if scores is None else _as_probabilities(scores)
        return Explanation(photos, heatmaps, chosen, scores, probabilities, self.labels, ssl_targets=ssl_targets,
                           ssl_neighbours=ssl_neighbours)

    def explain_prepared(self, prepared: Sequence[PreparedImage], target: int | str | None = None,
                         top_k: int | None = None) -> list[ImageExplanation]:
        """Explain one batch of prepared images in one run (or one per class); the images that
        failed to load keep their error."""
        good = [item for item in prepared if item.error is None]
        explanation = self.explain_photos(np.stack([item.photo for item in good]), target, top_k) if good else None
        outcomes, position = [], 0
        for item in prepared:
            if item.error is not None:
                outcomes.append(ImageExplanation(item.index, item.source, None, item.notes, item.error))
                continue
            single = Explanation(**{name: None if getattr(explanation, name) is None else
                                    getattr(explanation, name)[position:position + 1] for name in _PER_IMAGE},
                                 labels=self.labels, sources=[item.source])
            outcomes.append(ImageExplanation(item.index, item.source, single, item.notes))
            position += 1
        return outcomes

    def explain_each(self, images: Sequence[Any], target: int | str | None = None,
                     top_k: int | None = None) -> Iterator[ImageExplanation]:
        """Explain images in batches of ``batch_size``, yielding each image's explanation or error in
        order: a bad file is reported, not raised. The local and the Ray engine both run this."""
        preprocessing = self.preprocessing
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            prepared = [preprocessing.prepare(start + n, image) for n, image in enumerate(chunk)]
            yield from self.explain_prepared(prepared, target, top_k)

    def explain(self, images: Sequence[Any] | Any, target: int | str | None = None,
                top_k: int | None = None) -> Explanation:
        """Explain images (paths, PIL images or arrays ``[H, W, 3]``), in batches; a bad image raises."""
        if isinstance(images, (str, os.PathLike, np.ndarray)) or hasattr(images, "mode"):
            images = [images]
        parts = []
        for outcome in self.explain_each(list(images), target, top_k):
            if outcome.error is not None:
                raise ExplainError(outcome.error)
            parts.append(outcome.explanation)
        explanation = Explanation(**{name: np.concatenate([getattr(p, name) for p in parts])
                                     if getattr(parts[0], name) is not None else None for name in _PER_IMAGE},
                                  labels=self.labels)
        explanation.sources = [outcome.sources[0] for outcome in parts]
        return explanation


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
                "tensor(int8)": np.int8}


class _CudaGraphRun:
    """Runs a CUDA-graph session on fixed GPU buffers: every input and output bound once, at
    ``batch`` samples, so that the captured graph's addresses and shapes never change."""

    def __init__(self, session, batch: int) -> None:
        import onnxruntime as ort

        self.session, self.batch = session, batch
        self.binding = session.io_binding()
        self.inputs: dict[str, tuple] = {}
        self.outputs = [info.name for info in session.get_outputs()]
        # ``target`` is an input; older compiled models list it as an overridable initializer instead
        for info in [*session.get_inputs(), *session.get_overridable_initializers(), *session.get_outputs()]:
            # the batch axis (symbolic in an exported model) becomes the fixed batch; nothing else may vary
            shape = [batch if axis == 0 and not isinstance(d, int) else d for axis, d in enumerate(info.shape)]
            if not all(isinstance(d, int) and d >= 0 for d in shape) or info.type not in _NUMPY_TYPES:
                raise ExplainError(f"cuda_graph=True needs static shapes apart from the batch axis: '{info.name}' "
                                   f"is {info.type} {info.shape}")
            dtype = _NUMPY_TYPES[info.type]
            value = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", 0)
            if info.name in self.outputs:
                self.binding.bind_ortvalue_output(info.name, value)
            else:
                self.binding.bind_ortvalue_input(info.name, value)
                self.inputs[info.name] = (value, shape, dtype)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output for ``feeds`` of up to ``batch`` samples (padded with the last sample)."""
        count = max(len(array) for array in feeds.values())
        if count > min(shape[0] for _, shape, _ in self.inputs.values()):
            raise ExplainError(f"cuda_graph=True: a batch of {count} exceeds the graph's fixed batch "
                               f"{min(shape[0] for _, shape, _ in self.inputs.values())}")
        if set(feeds) != set(self.inputs):
            raise ExplainError(f"cuda_graph=True: the model's inputs are {sorted(self.inputs)}, fed {sorted(feeds)}")
        for name, array in feeds.items():
            value, shape, dtype = self.inputs[name]
            array = np.broadcast_to(array, (count, *array.shape[1:])) if len(array) == 1 else array
            padded = np.concatenate([array, np.repeat(array[-1:], shape[0] - count, 0)]) if shape[0] > count else array
            value.update_inplace(np.ascontiguousarray(padded, dtype=dtype))
        self.session.run_with_iobinding(self.binding)
        return {name: value[:count] for name, value in zip(self.outputs, self.binding.copy_outputs_to_cpu())}


def _as_probabilities(scores: np.ndarray) -> np.ndarray:
    """The scores if they already are probabilities (a trailing Softmax), else their softmax."""
    if (scores >= 0).all() and np.allclose(scores.sum(1), 1.0, atol=1e-3):
        return scores
    shifted = np.exp(scores - scores.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


def use_compiler(compile_function: Callable[..., onnx.ModelProto]) -> None:
    """Let run time compile an original classifier on the fly with ``compile_function``
    (``agf_onnx.compile``; called once, when the package is imported)."""
    global _compile_on_the_fly
    _compile_on_the_fly = compile_function


def compiled_model(model: str | os.PathLike | onnx.ModelProto, input_shapes: dict | None = None,
                   compile_original: bool = True) -> tuple[str | os.PathLike | onnx.ModelProto, bool]:
    """The model with its explanation graph: as it is when it has a ``heatmap`` output (or when
    not ``compile_original``): the ``ModelProto`` or the path, whose weights are not read here;
    else compiled with AGF now (a ``ModelProto``); and whether it was compiled here."""
    proto = model if isinstance(model, onnx.ModelProto) else _read_model(model, weights=False)
    if not compile_original or any(o.name == HEATMAP_OUTPUT for o in proto.graph.output):
        return model, False
    if _compile_on_the_fly is None:
        raise CompileError(f"the model has no '{HEATMAP_OUTPUT}' output and no compiler is at hand: compile it "
                           "first (agf-onnx compile)")
    return _compile_on_the_fly(model, input_shapes=input_shapes), True


def _read_model(path: str | os.PathLike, weights: bool = True) -> onnx.ModelProto:
    """The model file at ``path``; ``weights=False``: without its initializers (graph, metadata)."""
    if weights:
        return modelfile.load(path)
    try:
        return modelfile.read(path, weights=False)
    except Exception as error:  # protobuf raises several unrelated types on bad files
        raise CompileError(f"{path}: not a readable ONNX model ({error})") from error


def model_bytes(model: str | os.PathLike | onnx.ModelProto) -> bytes:
    """The model serialised (for other processes), its weights read from the file if a path."""
    return (model if isinstance(model, onnx.ModelProto) else modelfile.load(model)).SerializeToString()


def session_options(threads: int | None = None, memory_pattern: bool = True):
    """ONNX Runtime session options: ``threads`` intra-op threads (None: its default, one per core);
    ``memory_pattern=False`` turns off ONNX Runtime's memory pattern, which plans one arena block per
    input shape and keeps it — a session that runs batches of several sizes (evaluate's chunks)
    would hold a block for each (Integrated Gradients on ResNet-50 at 224²: 6.4 GB with it, 4.0
    GB without)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.enable_mem_pattern = memory_pattern
    return options


def read_labels(path: str | os.PathLike) -> list[str]:
    """One label per line (blank lines kept as empty labels would shift indices: refused)."""
    try:
        lines = pathlib.Path(path).read_text().splitlines()
    except OSError as error:
        raise ExplainError(f"--labels {path}: {error.strerror}") from error
    labels = [line.strip() for line in lines]
    while labels and not labels[-1]:
        labels.pop()
    if not labels or any(not label for label in labels):
        raise ExplainError(f"--labels {path}: expected one non-empty label per line")
    return labels


def collect_images(paths: Sequence[str | os.PathLike]) -> tuple[list[pathlib.Path], bool]:
    """Image files from files and folders (recursively, sorted); whether a folder was given.

    In a folder, the masks of an evaluate data set are not images to explain: ``<stem>.mask.png``
    files, and the files a ``labels.csv`` lists in its ``mask`` column (``tools/make_benchmark.py``
    keeps them in ``masks/``). A file named on the command line is always taken.
    """
    found, folder = [], False
    for path in map(pathlib.Path, paths):
        if path.is_dir():
            folder = True
            masks = _listed_masks(path)
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                            and not p.name.endswith(".mask.png") and p.resolve() not in masks)
        else:
            found.append(path)
    return found, folder


def _listed_masks(folder: pathlib.Path) -> set[pathlib.Path]:
    """The mask files the ``labels.csv`` files under ``folder`` name (resolved paths)."""
    import csv

    masks = set()
    for table in folder.rglob("labels.csv"):
        try:
            with open(table, newline="") as stream:
                masks |= {(table.parent / row["mask"]).resolve() for row in csv.DictReader(stream) if row.get("mask")}
        except (OSError, UnicodeDecodeError, csv.Error):
            continue  # not an evaluate data set: its files are what they are
    return masks
