"""``agf-onnx explain`` for text classifiers: sentences (command line or a file, one per line)
tokenised with a ``tokenizer.json`` (the ``tokenizers`` package), run through a compiled text
model in one session run per batch, written as ``index.html`` (tokens coloured by relevance:
red for the class, blue against, with the class and its probability) and ``results.json``
(tokens, relevance per explained class, top classes).

Everything that can be refused is refused before anything is written: a file that is not UTF-8,
an empty line, a tokenizer whose vocabulary is larger than the model's embedding table, a model
with no token input. Sentences longer than the compiled length T are truncated (the tokenizer's
own truncation, which keeps the closing special token) with a note in both outputs.
"""

from __future__ import annotations

import html
import json
import os
import pathlib
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import contract, modelfile
from .compiler import passes
from .compiler.emit import compile as compile_model
from .contract import HEATMAP_OUTPUT, TARGET_INPUT
from .errors import CompileError
from .runtime.sessions import create_session

TOKENIZER_FILE = "tokenizer.json"


class TextError(CompileError):
    """A bad sentence file, tokenizer or text model: the message names it."""


def read_sentences(texts: Sequence[str], path: str | os.PathLike | None) -> list[str]:
    """The sentences given with ``--text`` and, from ``path``, one per line (UTF-8, none empty)."""
    sentences = [text for text in texts]
    for index, text in enumerate(sentences):
        if not text.strip():
            raise TextError(f"--text #{index + 1}: empty sentence")
    if path is not None:
        try:
            data = pathlib.Path(path).read_bytes()
        except OSError as error:
            raise TextError(f"--sentences {path}: {error.strerror}") from error
        lines = data.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        for number, line in enumerate(lines, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise TextError(f"--sentences {path}: line {number} is not UTF-8 text (byte {error.start + 1})") \
                    from None
            if not text.strip():
                raise TextError(f"--sentences {path}: line {number} is empty (one sentence per line)")
            sentences.append(text.rstrip("\r"))
    if not sentences:
        raise TextError("no sentences: give --text SENTENCE or --sentences FILE")
    return sentences


def load_tokenizer(path: str | os.PathLike):
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` or the folder an exporter wrote it to."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TextError("sentences need the tokenizers package: pip install 'agf-onnx[text]'") from None
    file = pathlib.Path(path)
    if file.is_dir():
        file = file / TOKENIZER_FILE
    if not file.is_file():
        raise TextError(f"--tokenizer {path}: no {TOKENIZER_FILE} there")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as error:  # the tokenizers package raises plain Exceptions with a long message
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TextError(f"--tokenizer {file}: not a tokenizers file ({first})") from None


@dataclass
class SentenceExplanation:
    """One sentence: its tokens, the explained classes with their probability and per-token relevance."""

    text: str
    tokens: list[str]
    classes: list[int]
    probabilities: list[float]
    relevance: list[list[float]]  # per explained class, one value per token
    top: list[tuple[int, float]]  # the best classes and their probabilities
    notes: list[str] = field(default_factory=list)
    special: list[bool] = field(default_factory=list)  # the tokenizer's [CLS], [SEP]… per token


class TextExplainer:
    """A compiled text model (compiled here with AGF when it has no ``heatmap``) and its session."""

    def __init__(self, model: str | os.PathLike | onnx.ModelProto, tokenizer, provider: str = "cpu",
                 length: int | None = None, labels: Sequence[str] | None = None) -> None:
        proto = model if isinstance(model, onnx.ModelProto) else modelfile.load(model)
        self.compiled_here = not any(o.name == HEATMAP_OUTPUT for o in proto.graph.output)
        if self.compiled_here:
            ids = _token_input(proto)
            try:
                proto = compile_model(proto, input_shapes={ids: ["N", length]} if length else None)
            except CompileError as error:
                raise TextError(f"the model could not be compiled for {length} tokens (the longest sentence; a "
                                f"model accepts at most as many as its position table has rows: pass --input-shape "
                                f"{ids}=1,T with a smaller T to truncate): {error}") from error
        meta = {p.key: p.value for p in proto.metadata_props}
        if meta.get(contract.INPUT_KIND) != "tokens":
            raise TextError("the model explains images, not token ids: give it image files, not sentences")
        self.ids, self.mask = meta[contract.TOKEN_IDS], meta.get(contract.ATTENTION_MASK) or None
        self.others = [name for name in meta.get(contract.TOKEN_INPUTS, "").split(",") if name]
        self.scores = meta.get(contract.SCORES) or meta.get(contract.LOGITS)
        vocabulary = int(meta.get(contract.VOCABULARY, 0))
        if vocabulary and tokenizer.get_vocab_size() > vocabulary:
            raise TextError(f"--tokenizer: its vocabulary has {tokenizer.get_vocab_size()} tokens, the model's embedding "
                            f"table {vocabulary} rows: the tokenizer is not the model's")
        self.session = create_session(proto, provider)
        info = next(i for i in self.session.get_inputs() if i.name == self.ids)
        self.length = info.shape[1]
        self.tokenizer, self.labels = tokenizer, labels
        self.outputs = [o.name for o in self.session.get_outputs()]

    def label(self, index: int) -> str:
        return self.labels[index] if self.labels and index < len(self.labels) else str(index)

    def encode(self, sentences: Sequence[str]) -> tuple[dict[str, np.ndarray], list, list[list[str]]]:
        """Feeds for ``sentences`` padded to the model's length T, the encodings, and the notes."""
        tokenizer = self.tokenizer
        pad = next((tokenizer.token_to_id(t) for t in ("[PAD]", "<pad>") if tokenizer.token_to_id(t) is not None), 0)
        tokenizer.no_truncation()
        notes = [[f"truncated from {len(tokenizer.encode(s).ids)} to {self.length} tokens (the model's length)"]
                 if len(tokenizer.encode(s).ids) > self.length else [] for s in sentences]
        tokenizer.enable_truncation(self.length)
        tokenizer.enable_padding(length=self.length, pad_id=pad)
        encodings = tokenizer.encode_batch(list(sentences))
        feeds = {self.ids: np.array([e.ids for e in encodings], np.int64)}
        if self.mask:
            feeds[self.mask] = np.array([e.attention_mask for e in encodings], np.int64)
        for other in self.others:  # token types: the tokenizer's, as the model was trained with
            feeds[other] = np.array([e.type_ids for e in encodings], np.int64)
        return feeds, encodings, notes

    def explain(self, sentences: Sequence[str], target: int | None = None, top_k: int = 1,
                batch_size: int = 8) -> list[SentenceExplanation]:
        results = []
        for start in range(0, len(sentences), batch_size):
            chunk = sentences[start:start + batch_size]
            feeds, encodings, notes = self.encode(chunk)
            scores = None
            maps, classes = [], []
            ranks = [target] if target is not None else list(range(top_k))
            for rank in ranks:
                wanted = np.full(len(chunk), -1 if target is None else target, np.int64)
                if target is None and rank > 0:
                    wanted = np.argsort(-scores, axis=1)[:, rank]
                outputs = dict(zip(self.outputs, self.session.run(self.outputs, {**feeds, TARGET_INPUT: wanted})))
                scores = outputs[self.scores] if scores is None else scores
                maps.append(outputs[HEATMAP_OUTPUT])
                classes.append(np.where(wanted < 0, scores.argmax(1), wanted))
            probabilities = _softmax(scores)
            for i, encoding in enumerate(encodings):
                kept = [j for j, m in enumerate(encoding.attention_mask) if m]
                order = np.argsort(-probabilities[i])[:5]
                results.append(SentenceExplanation(
                    chunk[i], [encoding.tokens[j] for j in kept], [int(c[i]) for c in classes],
                    [float(probabilities[i, c[i]]) for c in classes],
                    [[float(m[i, j]) for j in kept] for m in maps],
                    [(int(c), float(probabilities[i, c])) for c in order], notes[i],
                    [bool(encoding.special_tokens_mask[j]) for j in kept]))
        return results


def _token_input(model: onnx.ModelProto) -> str:
    """The token-id input of an original text model, found as the compiler finds it."""
    from .compiler.graph import GraphView
    from .compiler.planning import find_logits
    from .compiler.text import find_token_input

    graph = GraphView(passes.infer_shapes(passes.canonicalise(onnx.ModelProto.FromString(model.SerializeToString())))[0])
    tokens = find_token_input(graph, find_logits(graph, None))
    if tokens is None:
        raise TextError("the model has no integer [N, T] token input: give it image files, not sentences")
    return tokens.ids


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


def _colour(value: float) -> str:
    """``explain.diverging``'s colour for a relevance in [-1, 1]: white at 0, red for, blue against."""
    from .runtime.explain import diverging

    r, g, b = diverging(np.array([value]))[0]
    return f"#{r:02x}{g:02x}{b:02x}"


def render_html(results: Sequence[SentenceExplanation], labels_of, title: str) -> str:
    """One block per sentence and explained class: the tokens on a background of their relevance,
    divided by the largest |relevance| of the sentence's word tokens (red: evidence for the class;
    blue: against); special tokens ([CLS], [SEP]) beyond that range saturate: [CLS]'s residual
    stream carries the class, and scaled by its relevance every word would be white."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
             ".t{padding:2px 3px;margin:1px;border-radius:3px;display:inline-block}"
             ".note{color:#a60}</style>", f"<h1>{html.escape(title)}</h1>"]
    for result in results:
        parts.append(f"<h2>{html.escape(result.text)}</h2>")
        for note in result.notes:
            parts.append(f"<p class='note'>note: {html.escape(note)}</p>")
        for cls, probability, relevance in zip(result.classes, result.probabilities, result.relevance):
            words = [abs(v) for v, special in zip(relevance, result.special or [False] * len(relevance))
                     if not special]
            peak = max(words or [abs(v) for v in relevance], default=0.0) or 1.0
            spans = "".join(f"<span class='t' style='background:{_colour(v / peak)}' title='{v:.4g}'>"
                            f"{html.escape(token)}</span>" for token, v in zip(result.tokens, relevance))
            parts.append(f"<p><b>{html.escape(labels_of(cls))}</b> (p = {probability:.3f})<br>{spans}</p>")
    return "\n".join(parts) + "\n"


def write_outputs(folder: str | os.PathLike, results: Sequence[SentenceExplanation], labels_of,
                  settings: dict) -> None:
    """``index.html`` and ``results.json``, each written to a temporary file and renamed into place."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"settings": settings, "sentences": [
        {"text": r.text, "tokens": r.tokens, "notes": r.notes,
         "explained": [{"class": c, "label": labels_of(c), "probability": p, "relevance": rel}
                       for c, p, rel in zip(r.classes, r.probabilities, r.relevance)],
         "top_classes": [{"class": c, "label": labels_of(c), "probability": p} for c, p in r.top]}
        for r in results]}
    texts = {"results.json": json.dumps(payload, indent=1, ensure_ascii=False),
             "index.html": render_html(results, labels_of, f"agf-onnx explain: {settings.get('model', '')}")}
    staged = []
    for name, text in texts.items():
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        staged.append((temporary, folder / name))
    for temporary, final in staged:
        os.replace(temporary, final)


def command(args) -> int:
    """``agf-onnx explain MODEL --text … | --sentences FILE --tokenizer PATH -o OUTDIR``."""
    from .modelfile import check_model_file, check_writable
    from .runtime.explain import label_index, read_labels

    if args.images:
        raise TextError("give either image files or sentences (--text/--sentences), not both")
    if args.tokenizer is None:
        raise TextError("--tokenizer PATH (a tokenizer.json, or the folder holding one) is needed for sentences")
    labels = read_labels(args.labels) if args.labels else None
    sentences = read_sentences(args.text or [], args.sentences)
    tokenizer = load_tokenizer(args.tokenizer)
    target = label_index(args.target, labels) if args.target is not None else None
    if args.top_k is not None and args.top_k < 1:
        raise TextError(f"--top-k {args.top_k}: must be at least 1")
    check_writable(args.output, folder=True)
    check_model_file(args.model)
    shapes = dict(passes.parse_input_shape(text) for text in args.input_shape)
    length = next((dims[1] for dims in shapes.values() if len(dims) == 2 and isinstance(dims[1], int)), None)
    if length is None:
        length = max(len(tokenizer.encode(s).ids) for s in sentences)
    explainer = TextExplainer(args.model, tokenizer, "cpu" if args.provider == "auto" else args.provider, length, labels)
    if explainer.compiled_here:
        print(f"{args.model} has no '{HEATMAP_OUTPUT}' output: compiled it with AGF for {length} tokens on the fly")
    results = explainer.explain(sentences, target, args.top_k or 1, args.batch_size)
    for number, result in enumerate(results, 1):
        for note in result.notes:
            print(f"sentence {number}: {note}")
    settings = {"model": str(args.model), "tokenizer": str(args.tokenizer), "length": explainer.length,
                "target": args.target, "top_k": args.top_k}
    write_outputs(args.output, results, explainer.label, settings)
    print(f"explained {len(results)} sentences → {args.output}")
    return 0
