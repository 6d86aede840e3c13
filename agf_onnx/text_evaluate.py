"""``agf-onnx evaluate`` for text classifiers: token-deletion curves and token localisation, per
method, all in ONNX Runtime (issue 24).

A text data set is a UTF-8 CSV file (a ``.tsv`` file: tab-separated) with the header
``text,label[,cues]``: one sequence per row, its class (an index, or a name of ``--labels``) and,
optionally, its ground truth: the space-separated 0-based positions of the whitespace-separated
words of ``text`` that carry the label's evidence (``tools/text_benchmark.py`` writes them). A
token is ground truth when it lies inside such a word (the tokenizer's character offsets), so
sub-word tokenizers work too.

Per method, the model compiled with it explains each sequence's labelled class, and

- **deletion**: the word tokens (attention mask 1, not a special token: [CLS], [SEP] and padding
  are never removed) are replaced by ``[MASK]`` (``--replace mask``, the default) or ``[PAD]``
  (``--replace pad``) in the order of the map, the most relevant first or the least relevant
  first (ties: in reading order), a share 0, 10 %, …, 100 % of each sequence's words at a time
  (``round(share × words)`` tokens); the attention mask and the positions stay as they are. The
  original model classifies each copy; the curve is the mean probability of the label (%), its
  score the area under it over the share removed (trapezoids, 0–100). Most relevant first: lower
  is better; least relevant first: higher is better.
- **localisation** (rows with ``cues``): the average precision of the map over the word tokens as
  a score for the ground-truth tokens (``metrics.average_precision``), the mean over the sequences
  that have both cue and other word tokens; chance is the mean share of cue tokens.

Sequences are padded to one length T, the longest sequence's tokens (``--input-shape
input_ids=N,T`` sets it; longer sequences are then truncated by the tokenizer, and counted).
"""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from . import contract, evaluate, modelfile
from .compiler import compile as compile_model
from .compiler.methods import METHODS, parse_variant
from .compiler.modifiers import NONE
from .compiler.passes import canonicalise, parse_input_shape
from .compiler.spec import CompileSpec
from .contract import HEATMAP_OUTPUT, TARGET_INPUT
from .errors import CompileError
from .evaluate import check_methods, usable_methods
from .modelfile import check_model_file, check_writable
from .runtime import metrics
from .runtime.explain import read_labels
from .runtime.plots import PALETTE
from .runtime.report import warn
from .runtime.sessions import create_session
from .text_explain import TextError, TextExplainer, _token_input, load_tokenizer

#: Shares of each sequence's word tokens removed, from none to all.
FRACTIONS = tuple(round(0.1 * k, 1) for k in range(11))
#: ``--replace``: the token a removed token becomes (the first of the spellings the tokenizer knows).
REPLACEMENTS = {"mask": ("[MASK]", "<mask>"), "pad": ("[PAD]", "<pad>")}
DEFAULT_REPLACE = "mask"
ORDERS = ("most_first", "least_first")


class TextEvaluateError(TextError):
    """A bad text data set, tokenizer or text model for ``evaluate``: the message names it."""


@dataclass(frozen=True)
class TextSample:
    text: str
    label: int
    cues: tuple[int, ...] | None = None  # ground-truth word positions (whitespace-separated words)


# -- data sets ------------------------------------------------------------------------------------

def _delimiter(path: pathlib.Path) -> str:
    return "\t" if path.suffix.lower() == ".tsv" else ","


def is_text_data(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file whose header has a ``text`` column (a text data set)."""
    path = pathlib.Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as stream:
            first = stream.readline().decode("utf-8-sig").strip()
    except (OSError, UnicodeDecodeError):
        return False
    return "text" in [c.strip() for c in first.split(_delimiter(path))]


def _label(text: str, class_names: Sequence[str] | None, where: str) -> int:
    text = text.strip()
    if text.isdigit():
        return int(text)
    if class_names and text in class_names:
        return list(class_names).index(text)
    raise TextEvaluateError(f"{where}: label '{text}' is neither a class index nor a name in --labels"
                            + ("" if class_names else " (no --labels given)"))


def load_text_dataset(path: str | os.PathLike, class_names: Sequence[str] | None = None) -> list[TextSample]:
    """The rows of a text data set (module docstring); every bad row is refused with its line."""
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TextEvaluateError(f"{path}: {error.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise TextEvaluateError(f"{path}: line {line} is not UTF-8 text (byte {error.start + 1})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=_delimiter(path))
    columns = [c.strip() for c in reader.fieldnames or []]
    if "text" not in columns or "label" not in columns:
        raise TextEvaluateError(f"{path}: expected a header with the columns text,label[,cues], got "
                                f"{','.join(columns) or 'nothing'}")
    reader.fieldnames = columns
    samples = []
    for row in reader:
        where = f"{path}, line {reader.line_num}"
        sentence = (row.get("text") or "").strip()
        if not sentence:
            raise TextEvaluateError(f"{where}: empty text (one sequence per row)")
        if not (row.get("label") or "").strip():
            raise TextEvaluateError(f"{where}: no label")
        label = _label(row["label"], class_names, where)
        cues = None
        if "cues" in columns and row.get("cues") is not None:
            words = len(sentence.split())
            try:
                cues = tuple(sorted({int(p) for p in row["cues"].split()}))
            except ValueError:
                raise TextEvaluateError(f"{where}: cues '{row['cues']}' are not word positions (whole numbers "
                                        f"separated by spaces)") from None
            if any(p < 0 or p >= words for p in cues):
                raise TextEvaluateError(f"{where}: cue position out of range: the text has {words} words "
                                        f"(positions 0–{words - 1})")
        samples.append(TextSample(sentence, label, cues))
    if not samples:
        raise TextEvaluateError(f"{path}: no rows")
    return samples


# -- methods --------------------------------------------------------------------------------------

def method_entries(names: Sequence[str], compile_options: dict | None = None, modifiers=None) -> dict[str, dict]:
    """Name → ``agf_onnx.compile`` keywords: the method and modifiers of a name or variant
    (``agf+contrast``, ``methods.parse_variant``) and the shared ``compile_options``."""

    entries = {}
    for name in names:
        method, variant = parse_variant(name, modifiers or NONE)
        entries[name] = {**(compile_options or {}), "method": method, "modifiers": variant}
    return entries


# -- the metrics ----------------------------------------------------------------------------------

def removed(relevance: np.ndarray, words: np.ndarray, fraction: float, most_first: bool) -> np.ndarray:
    """Boolean ``[T]``: the ``round(fraction × words)`` word tokens removed at ``fraction``, the most
    (or least) relevant first, ties in reading order; special tokens and padding never."""
    positions = np.flatnonzero(words)
    scores = relevance[positions].astype(np.float64)
    order = positions[np.argsort(-scores if most_first else scores, kind="stable")]
    out = np.zeros(len(relevance), bool)
    out[order[:int(round(fraction * len(positions)))]] = True
    return out


def deleted_ids(ids: np.ndarray, relevance: np.ndarray, words: np.ndarray, replacement: int,
                most_first: bool, fractions: Sequence[float] = FRACTIONS) -> np.ndarray:
    """``[F, N, T]``: the ids with each share of the word tokens replaced by ``replacement``."""
    out = np.repeat(ids[None], len(fractions), axis=0)
    for f, fraction in enumerate(fractions):
        for n in range(len(ids)):
            out[f, n, removed(relevance[n], words[n], fraction, most_first)] = replacement
    return out


def token_cues(text: str, offsets: Sequence[tuple[int, int]], special: Sequence[int],
               cues: Sequence[int]) -> np.ndarray:
    """Per token: does it lie inside one of the ``cues`` words (positions among ``text.split()``)?"""
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    chosen = [spans[p] for p in cues]
    return np.array([not s and end > start and any(a <= start < b for a, b in chosen)
                     for (start, end), s in zip(offsets, special)], bool)


def localisation(relevance: np.ndarray, words: np.ndarray, cues: np.ndarray) -> tuple[list[float], list[float]]:
    """Per sequence with cue and other word tokens: the AP of its map over its word tokens for its
    cue tokens, and chance (its share of cue tokens)."""
    precisions, chance = [], []
    for scores, word, cue in zip(relevance, words, cues):
        truth = cue[word]
        if truth.any() and not truth.all():
            precisions.append(metrics.average_precision(scores[word], truth))
            chance.append(float(truth.mean()))
    return precisions, chance


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


# -- the run --------------------------------------------------------------------------------------

class TextEvaluation:
    """Deletion curves and localisation for ``methods`` (name → compile keywords, ``method_entries``)
    on one text classifier, run in ONNX Runtime.

    Args:
        model: the original ONNX text classifier (each method is compiled from it).
        tokenizer: a ``tokenizers.Tokenizer`` (``text_explain.load_tokenizer``).
        length: the sequence length T to compile for (default: the longest sequence's tokens).
        replace: ``mask`` or ``pad``: what a removed token becomes.
    """

    def __init__(self, model: str | os.PathLike, tokenizer, methods: dict[str, dict], *, length: int | None = None,
                 replace: str = DEFAULT_REPLACE, provider: str = "cpu", batch_size: int = 32) -> None:

        if replace not in REPLACEMENTS:
            raise TextEvaluateError(f"--replace {replace}: expected one of {', '.join(REPLACEMENTS)}")
        spelling = next((t for t in REPLACEMENTS[replace] if tokenizer.token_to_id(t) is not None), None)
        if spelling is None:
            other = next(k for k in REPLACEMENTS if k != replace)
            raise TextEvaluateError(f"--replace {replace}: the tokenizer has no {' or '.join(REPLACEMENTS[replace])} "
                                    f"token (try --replace {other})")
        self.replacement, self.replacement_id = spelling, tokenizer.token_to_id(spelling)
        self.model, self.tokenizer, self.methods = str(model), tokenizer, dict(methods)
        self.length, self.provider, self.batch_size = length, provider, batch_size
        self.softmax = True  # the scores are logits (set from the first compiled model's metadata)
        proto = modelfile.load(model)
        if any(o.name == contract.HEATMAP_OUTPUT for o in proto.graph.output):
            raise TextEvaluateError(f"{model}: already compiled (it has a '{contract.HEATMAP_OUTPUT}' output); "
                                    "evaluate compiles each method from the original model")
        try:
            self.ids = _token_input(proto)
        except TextError:
            raise TextEvaluateError(f"{model}: not a text model (no integer [N, T] input indexes an embedding "
                                    "table), but the data set is text: give it images, or a text classifier") from None
        self.classifier = create_session(proto, provider)
        self.inputs = [i.name for i in self.classifier.get_inputs()]
        widths = [o.type.tensor_type.shape.dim[1].dim_value for o in proto.graph.output
                  if len(o.type.tensor_type.shape.dim) == 2]
        #: the class count, where one [N, C] output with a fixed C says it (else checked on the first run)
        self.classes = widths[0] if len(widths) == 1 and widths[0] > 0 else None

    def check_labels(self, samples: Sequence[TextSample]) -> None:
        """Refuse, before any work, a label the model has no class for."""
        bad = next((n for n, s in enumerate(samples) if self.classes is not None and s.label >= self.classes), None)
        if bad is not None:
            raise TextEvaluateError(f"sequence {bad + 1}: class {samples[bad].label} is out of range: the model has "
                                    f"{self.classes} classes (0–{self.classes - 1})")

    def compiled(self, name: str, length: int):
        """The model compiled with method ``name`` for sequences of ``length`` tokens."""

        options = dict(self.methods[name])
        options["input_shapes"] = {**(options.get("input_shapes") or {}), self.ids: ["N", length]}
        try:
            return compile_model(self.model, **options)
        except CompileError as error:
            if error.exit_code != 1:  # unsupported ops: their own exit status and list
                raise
            raise TextEvaluateError(f"{name}: the model could not be compiled for {length} tokens: {error}") from error

    def explainer(self, name: str, length: int):
        """A ``TextExplainer`` of the model compiled with ``name``; the first one says whether the class
        scores output is logits (softmax taken here) or already probabilities (a Softmax ends the model)."""

        proto = self.compiled(name, length)
        meta = {p.key: p.value for p in proto.metadata_props}
        if not meta.get(contract.SCORES):
            raise TextEvaluateError(f"{self.model}: the class scores are not a graph output, so perturbed sequences "
                                    "cannot be classified")
        self.softmax = meta[contract.SCORES] == meta.get(contract.LOGITS)
        return TextExplainer(proto, self.tokenizer, self.provider)

    def longest(self, samples: Sequence[TextSample]) -> int:
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        return max(len(e.ids) for e in self.tokenizer.encode_batch([s.text for s in samples]))

    def encode(self, explainer, samples: Sequence[TextSample]) -> tuple[dict, np.ndarray, np.ndarray | None, int]:
        """Feeds ``[N, T]``, the removable word tokens ``[N, T]``, the cue tokens (None without
        ground truth) and how many sequences were truncated."""
        feeds, encodings, notes = explainer.encode([s.text for s in samples])
        mask = feeds[explainer.mask] if explainer.mask else np.ones_like(feeds[explainer.ids])
        special = np.array([e.special_tokens_mask for e in encodings], bool)
        words = (mask != 0) & ~special
        cues = None
        if any(s.cues is not None for s in samples):
            cues = np.stack([token_cues(s.text, e.offsets, e.special_tokens_mask, s.cues or ())
                             for s, e in zip(samples, encodings)]) & words
        return feeds, words, cues, sum(1 for n in notes if n)

    def probabilities(self, explainer, feeds: dict) -> np.ndarray:
        """The original model's class probabilities for ``feeds`` (softmax of the logits), in batches."""
        name = explainer.scores
        given = {k: v for k, v in feeds.items() if k in self.inputs}
        count = len(next(iter(given.values())))
        chunks = []
        for start in range(0, count, self.batch_size):
            scores = self.classifier.run([name], {k: v[start:start + self.batch_size] for k, v in given.items()})[0]
            chunks.append(_softmax(scores) if self.softmax else scores)
        return np.concatenate(chunks)

    def heatmaps(self, explainer, feeds: dict, targets: np.ndarray) -> np.ndarray:

        maps = []
        for start in range(0, len(targets), self.batch_size):
            chunk = {k: v[start:start + self.batch_size] for k, v in feeds.items()}
            maps.append(explainer.session.run([HEATMAP_OUTPUT],
                                              {**chunk, TARGET_INPUT: targets[start:start + self.batch_size]})[0])
        return np.concatenate(maps)

    def run(self, samples: Sequence[TextSample], progress: Callable[[str], None] | None = None) -> dict:
        """The metrics per method over ``samples`` (a dict ready for ``results.json``)."""
        began = time.perf_counter()
        length = self.length or self.longest(samples)
        labels = np.array([s.label for s in samples], np.int64)
        results: dict = {}
        for index, name in enumerate(self.methods):
            explainer = self.explainer(name, length)
            if index == 0:
                feeds, words, cues, truncated = self.encode(explainer, samples)
                clean = self.probabilities(explainer, feeds)
                if labels.max() >= clean.shape[1]:
                    bad = int(np.argmax(labels >= clean.shape[1]))
                    raise TextEvaluateError(f"sequence {bad + 1}: class {labels[bad]} is out of range: the model has "
                                            f"{clean.shape[1]} classes (0–{clean.shape[1] - 1})")
                chance = localisation(np.zeros(words.shape), words, cues)[1] if cues is not None else []
                results = {"complete": True, "sequences": len(samples), "length": int(explainer.length),
                           "truncated": truncated, "replacement": self.replacement,
                           "clean_accuracy": round(100.0 * float(np.mean(clean.argmax(1) == labels)), 2),
                           "clean_probability": round(100.0 * float(np.mean(clean[np.arange(len(labels)), labels])), 2),
                           "fractions": list(FRACTIONS),
                           **({"chance_ap": round(100.0 * float(np.mean(chance)), 2)} if chance else {}),
                           "methods": {}}
            started = time.perf_counter()
            relevance = self.heatmaps(explainer, feeds, labels)
            entry: dict = {"explain_seconds": round(time.perf_counter() - started, 2), "deletion": {}}
            for order in ORDERS:
                ids = deleted_ids(feeds[explainer.ids], relevance, words, self.replacement_id, order == "most_first")
                count = len(FRACTIONS) * len(samples)
                perturbed = {k: ids.reshape(count, -1) if k == explainer.ids else np.tile(v, (len(FRACTIONS), 1))
                             for k, v in feeds.items()}
                probability = self.probabilities(explainer, perturbed)[np.arange(count), np.tile(labels, len(FRACTIONS))]
                curve = 100.0 * probability.reshape(len(FRACTIONS), len(samples)).mean(1)
                entry["deletion"][order] = {"probability": [round(float(p), 3) for p in curve],
                                            "auc": round(metrics.area_under_curve(curve, FRACTIONS), 3)}
            if cues is not None:
                precisions, _ = localisation(relevance, words, cues)
                entry["localisation"] = {"sequences": len(precisions),
                                         "ap": round(100.0 * float(np.mean(precisions)), 2) if precisions else None}
            results["methods"][name] = entry
            if progress is not None:
                progress(name)
        results["seconds"] = round(time.perf_counter() - began, 1)
        return results


# -- outputs --------------------------------------------------------------------------------------

_COLUMNS = [("deletion AUC, most relevant first ↓", ("deletion", "most_first", "auc")),
            ("deletion AUC, least relevant first ↑", ("deletion", "least_first", "auc")),
            ("localisation AP ↑", ("localisation", "ap"))]


def markdown_table(results: dict) -> str:
    """One row per method: the two deletion AUCs (probability of the label, %) and the localisation
    AP (%); the best of each column in bold."""
    return evaluate.markdown_table(results, _COLUMNS)


def deletion_plot(results: dict, title: str, panel: tuple[int, int] = (420, 300)):
    """Two panels (most / least relevant first): the label's mean probability against the share of
    word tokens replaced, one line per method; a legend with each curve's AUC."""
    from PIL import Image, ImageDraw, ImageFont


    font = ImageFont.load_default()
    width, height = panel
    legend = 320
    canvas = Image.new("RGB", (2 * width + legend, max(height + 30, 72 + 18 * len(results["methods"]))), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((10, 8), title, fill="black", font=font)
    xs = results["fractions"]
    for index, order in enumerate(ORDERS):
        left, top = index * width, 30
        plot = (left + 48, top + 26, left + width - 14, top + height - 36)
        better = "lower" if order == "most_first" else "higher"
        draw.text((plot[0], top + 6), f"{order.replace('_', ' ')} ({better} AUC is better)", fill="black", font=font)
        draw.rectangle(plot, outline="#444444")
        for tick in range(0, 101, 20):
            y = plot[3] - (plot[3] - plot[1]) * tick / 100
            draw.line((plot[0], y, plot[2], y), fill="#e5e5e5")
            draw.text((plot[0] - 26, y - 6), f"{tick}", fill="#444444", font=font)
            x = plot[0] + (plot[2] - plot[0]) * tick / 100
            draw.line((x, plot[3], x, plot[3] + 3), fill="#444444")
            draw.text((x - 6, plot[3] + 6), f"{tick}", fill="#444444", font=font)
        draw.text((plot[0] + (plot[2] - plot[0]) // 2 - 90, plot[3] + 20), f"% of word tokens replaced by {results['replacement']}",
                  fill="#444444", font=font)
        for colour, entry in zip(PALETTE * 3, results["methods"].values()):
            points = [(plot[0] + (plot[2] - plot[0]) * x, plot[3] - (plot[3] - plot[1]) * y / 100)
                      for x, y in zip(xs, entry["deletion"][order]["probability"])]
            draw.line(points, fill=colour, width=2)
    left = 2 * width + 10
    draw.text((left, 40), "method: AUC most / least first, AP", fill="black", font=font)
    for row, ((name, entry), colour) in enumerate(zip(results["methods"].items(), PALETTE * 3)):
        y = 62 + row * 18
        draw.line((left, y + 6, left + 22, y + 6), fill=colour, width=3)
        ap = evaluate.dig(entry, ("localisation", "ap"))
        draw.text((left + 28, y), f"{name}: {entry['deletion']['most_first']['auc']:.1f} / "
                                  f"{entry['deletion']['least_first']['auc']:.1f}" + (f", {ap:.1f}" if ap is not None else ""),
                  fill="black", font=font)
    return canvas


def write_outputs(out: str | os.PathLike, results: dict, settings: dict) -> list[pathlib.Path]:
    """``results.json``, ``results.md`` and ``deletion.png`` in ``out``, each written to a temporary
    file and renamed into place once all three are made."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = (f"{os.path.basename(settings['model'])}: {results['sequences']} sequences, accuracy "
             f"{results['clean_accuracy']:.1f} % before deletion")
    notes = (f"Deletion AUC: area under the label's mean probability (%) against the share of word tokens "
             f"replaced by {results['replacement']} (0–100 %), the most relevant first (lower is better) or the least "
             f"relevant first (higher is better); special tokens and padding are never replaced."
             + (f" Localisation AP: average precision (%) of the map over the word tokens for the ground-truth cue "
                f"tokens, mean over {_first_localised(results)} sequences; chance (the mean share of cue tokens): "
                f"{results['chance_ap']:.1f} %." if "chance_ap" in results else "")
             + (f" {results['truncated']} sequences were truncated to {results['length']} tokens."
                if results.get("truncated") else ""))
    image = io.BytesIO()
    deletion_plot(results, title).save(image, format="PNG")
    contents = {"results.json": json.dumps({"settings": settings, **results}, indent=2, ensure_ascii=False).encode(),
                "results.md": f"# {title}\n\n{markdown_table(results)}\n\n{notes}\n".encode(),
                "deletion.png": image.getvalue()}
    staged = []
    for name, data in contents.items():
        handle, temporary = tempfile.mkstemp(dir=out, prefix=f".{name}.")
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        staged.append((temporary, out / name))
    for temporary, final in staged:
        os.replace(temporary, final)
    return [final for _, final in staged]


def _first_localised(results: dict) -> int:
    return next((e["localisation"]["sequences"] for e in results["methods"].values() if "localisation" in e), 0)


# -- the command line -----------------------------------------------------------------------------

def add_options(parser) -> None:
    """``evaluate``'s text options (the other options it shares with images)."""
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="a text data set (a CSV/TSV with the columns text,label[,cues]): the tokenizer.json, or "
                             "the folder holding one")
    parser.add_argument("--replace", choices=sorted(REPLACEMENTS), default=DEFAULT_REPLACE,
                        help="a text data set: what a deleted token becomes, [MASK] (mask, the default) or [PAD] (pad)")


def is_text_evaluation(args) -> bool:
    """A text data set, or a tokenizer given: ``evaluate`` runs here."""
    return args.tokenizer is not None or is_text_data(args.data)


def command(args, modifiers, method_options: dict) -> int:
    """``agf-onnx evaluate MODEL DATA.csv --tokenizer PATH -o OUTDIR`` for a text classifier;
    ``modifiers`` and ``method_options``: what the command line gave for the variants and methods."""

    if args.tokenizer is None:
        raise TextEvaluateError(f"{args.data} is a text data set: --tokenizer PATH (a tokenizer.json, or the folder "
                                "holding one) is needed")
    if not is_text_data(args.data):
        raise TextEvaluateError(f"--tokenizer is for a text data set, and {args.data} is not one (expected a CSV/TSV "
                                "file with a header text,label[,cues])")
    if getattr(args, "engine", "local") != "local":
        raise TextEvaluateError(f"--engine {args.engine}: a text data set is evaluated in this process only")
    names = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    check_methods(names, modifiers)
    for option, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise TextEvaluateError(f"{option} {value}: must be at least 1")
    labels = read_labels(args.labels) if args.labels else None
    samples = load_text_dataset(args.data, labels)[:args.limit]
    tokenizer = load_tokenizer(args.tokenizer)
    check_writable(args.output, folder=True)
    check_model_file(args.model)
    shapes = dict(parse_input_shape(text) for text in args.input_shape)
    length = next((dims[1] for dims in shapes.values() if len(dims) == 2 and isinstance(dims[1], int)), None)
    provider = "cpu" if args.provider == "auto" else args.provider
    compile_options = {"logits": args.logits, "flat_policy": args.flat_policy, "options": method_options}
    evaluation = TextEvaluation(args.model, tokenizer, {}, length=length, replace=args.replace, provider=provider,
                                batch_size=args.batch_size)
    evaluation.check_labels(samples)
    length = length or evaluation.longest(samples)
    try:  # the model's own limit (its position table's rows), said before any method is tried
        canonicalise(modelfile.load(args.model), {evaluation.ids: [1, length]})
    except CompileError as error:
        if error.exit_code != 1:
            raise
        raise TextEvaluateError(f"the model could not be compiled for {length} tokens (the longest sequence; a model "
                                f"accepts at most as many as its position table has rows: pass --input-shape "
                                f"{evaluation.ids}=1,T with a smaller T to truncate): {str(error).splitlines()[0]}") \
            from error
    # a method that cannot explain this model is known before any work: named ones are refused, "all" skips them
    spec = CompileSpec(**compile_options, input_shapes={evaluation.ids: [1, length]})
    methods, skipped = usable_methods(args.model, names, spec, modifiers, explicit=args.methods != "all")
    for name, reason in skipped.items():
        warn(f"agf-onnx: skipping {name}: {reason}")
    evaluation.methods = method_entries(methods, compile_options, modifiers)
    evaluation.length = length
    print(f"{len(samples)} sequences of {length} tokens, {len(methods)} methods ({', '.join(methods)}), "
          f"deleted tokens → {evaluation.replacement}")
    began = time.perf_counter()
    quiet = getattr(args, "quiet", False)
    results = evaluation.run(samples, None if quiet else
                             lambda name: print(f"{name} done ({time.perf_counter() - began:.0f} s)", flush=True))
    settings = {"model": str(args.model), "data": str(args.data), "tokenizer": str(args.tokenizer),
                "methods": methods, "limit": args.limit, "provider": provider, "replace": args.replace,
                "flat_policy": args.flat_policy, "method_options": method_options,
                "batch_size": args.batch_size, "skipped_methods": skipped}
    write_outputs(args.output, results, settings)
    print(markdown_table(results))
    print(f"{len(samples)} sequences in {results['seconds']:.0f} s → {args.output}/results.json, results.md, deletion.png")
    return 0
