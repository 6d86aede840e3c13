"""The built-in text benchmark with ground truth: sequences of random dictionary words whose
label is decided by planted cue words, a word-level ``tokenizer.json``, and a tiny BERT trained on
the CPU to read them (issue 24).

    python tools/make_benchmark.py OUT --text          # OUT/train.csv, OUT/test.csv, OUT/tokenizer.json
    python tools/train_benchmark.py OUT --arch bert    # OUT/bert.onnx
    agf-onnx evaluate OUT/bert.onnx OUT/test.csv --tokenizer OUT/tokenizer.json -o OUT/eval
    python tools/text_benchmark.py table OUT           # every text method and AGF policy: the docs' table
    python tools/text_benchmark.py train OUT --layers 4 -o OUT/bert4.onnx   # another size

**Words.** Debian's ``wamerican`` word list (``apt-get install wamerican``:
``/usr/share/dict/american-english``), its lower-case ASCII words of 3–8 letters. A seeded draw
gives ``CLASSES × CUES`` cue words (``CUES`` per class) and ``--vocabulary`` filler words, disjoint.

**Sequences.** 8–24 words. The label ``k`` is drawn uniformly; 1–3 cue words of class ``k`` are
planted at random places; in half of the sequences that have two or more, one cue word of another
class is planted too (evidence against ``k``: always fewer than ``k``'s, so the label is the class
with the most cues). The rest are filler words. The ground truth of a sequence is the positions of
its label's cue words (the ``cues`` column: 0-based indices of the whitespace-separated words).

**Tokenizer.** ``tokenizers``' WordLevel model over ``[PAD] [UNK] [CLS] [SEP] [MASK]`` + the
words (ids 0–4 for the specials), whitespace pre-tokenizer, ``[CLS] $A [SEP]``: one token per word.

**Model.** ``transformers.BertForSequenceClassification`` (random init, seeded; 2 layers, hidden
64, 4 heads, eager attention), trained with AdamW on ``train.csv``. In training one filler word in
ten is replaced by ``[MASK]`` (never a cue), so that the model reads ``[MASK]`` as "no evidence",
which is what the token-deletion curves replace tokens with. Exported with TorchScript (opset 17),
dynamic batch and sequence axes, inputs ``input_ids``, ``attention_mask``, ``token_type_ids``.
Same arguments, torch version and CPU thread count: same files.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import pathlib
import re
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

WORD_LIST = pathlib.Path("/usr/share/dict/american-english")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CLASSES, CUES = 3, 4
#: Sequence lengths in words, and cue words of the label per sequence (inclusive ranges).
WORDS, LABEL_CUES = (8, 24), (1, 3)
#: Share of the sequences with two or more label cues that also get one cue of another class.
OPPOSING = 0.5
#: Share of filler words replaced by [MASK] in training.
MASKED = 0.1
#: The full benchmark and the CI-sized one.
FULL = {"train": 4000, "test": 400, "vocabulary": 1000}
SMALL = {"train": 300, "test": 60, "vocabulary": 100}


def dictionary_words(path: pathlib.Path = WORD_LIST) -> list[str]:
    """The word list's lower-case ASCII words of 3–8 letters, sorted and unique."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the word list is not installed (apt-get install wamerican)")
    words = {w for w in path.read_text(encoding="utf-8", errors="replace").split() if re.fullmatch(r"[a-z]{3,8}", w)}
    return sorted(words)


def choose_words(seed: int, vocabulary: int, classes: int = CLASSES, cues: int = CUES,
                 path: pathlib.Path = WORD_LIST) -> tuple[list[str], list[list[str]]]:
    """A seeded draw of ``vocabulary`` filler words and ``cues`` cue words per class, all distinct."""
    words = dictionary_words(path)
    rng = np.random.default_rng([seed, 7])
    drawn = [words[i] for i in rng.choice(len(words), vocabulary + classes * cues, replace=False)]
    return drawn[:vocabulary], [drawn[vocabulary + k * cues: vocabulary + (k + 1) * cues] for k in range(classes)]


def make_sequence(rng: np.random.Generator, filler: list[str], cue_words: list[list[str]],
                  opposing: float = OPPOSING) -> tuple[list[str], int, list[int]]:
    """One sequence: its words, its label and the positions of the label's cue words."""
    classes = len(cue_words)
    label = int(rng.integers(classes))
    own = int(rng.integers(LABEL_CUES[0], LABEL_CUES[1] + 1))
    against = 1 if own >= 2 and rng.random() < opposing else 0
    length = int(rng.integers(WORDS[0], WORDS[1] + 1))
    words = [filler[i] for i in rng.integers(len(filler), size=length)]
    places = rng.permutation(length)[:own + against]
    for place in places[:own]:
        words[place] = cue_words[label][rng.integers(len(cue_words[label]))]
    if against:
        other = int((label + rng.integers(1, classes)) % classes)
        words[places[own]] = cue_words[other][rng.integers(len(cue_words[other]))]
    return words, label, sorted(int(p) for p in places[:own])


def tokenizer_json(words: list[str], path: pathlib.Path) -> None:
    """A WordLevel tokenizer over the specials and ``words`` ([CLS] $A [SEP], whitespace-split)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate([*SPECIALS, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer.save(str(path))


def generate(out: pathlib.Path | str, train: int, test: int, vocabulary: int, seed: int = 0,
             opposing: float = OPPOSING, path: pathlib.Path = WORD_LIST) -> dict:
    """``out/train.csv``, ``out/test.csv`` (``text,label,cues``), ``out/tokenizer.json``,
    ``out/classes.txt`` and ``out/words.json`` (the filler and cue words); returns a summary."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    filler, cue_words = choose_words(seed, vocabulary, path=path)
    for split, count in (("train", train), ("test", test)):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        with open(out / f"{split}.csv", "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(["text", "label", "cues"])
            for _ in range(count):
                words, label, cues = make_sequence(rng, filler, cue_words, opposing)
                writer.writerow([" ".join(words), label, " ".join(map(str, cues))])
    tokenizer_json(sorted(filler + [w for ws in cue_words for w in ws]), out / "tokenizer.json")
    (out / "classes.txt").write_text("".join(f"{'/'.join(ws)}\n" for ws in cue_words))
    (out / "words.json").write_text(json.dumps({"filler": filler, "cues": cue_words}, indent=1))
    return {"train": train, "test": test, "vocabulary": vocabulary + len(cue_words) * len(cue_words[0]),
            "seed": seed, "source": str(path)}


# -- training -----------------------------------------------------------------------------------

def read_split(data: pathlib.Path, split: str, tokenizer) -> tuple:
    """Ids ``[N, T]`` (padded to the longest), attention mask, labels ``[N]`` and a cue mask ``[N, T]``."""
    import torch

    with open(data / f"{split}.csv", newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    encodings = [tokenizer.encode(row["text"]) for row in rows]
    length = max(len(e.ids) for e in encodings)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    cues = torch.zeros_like(ids, dtype=torch.bool)
    for n, (row, encoding) in enumerate(zip(rows, encodings)):
        ids[n, :len(encoding.ids)] = torch.tensor(encoding.ids)
        mask[n, :len(encoding.ids)] = 1
        for word in (int(w) for w in row["cues"].split()):
            cues[n, 1 + word] = True  # one token per word, after [CLS]
    labels = torch.tensor([int(row["label"]) for row in rows])
    return ids, mask, labels, cues


def build(vocabulary: int, classes: int, positions: int, hidden: int = 64, layers: int = 2, heads: int = 4,
          seed: int = 0):
    """A randomly initialised, seeded BERT sequence classifier."""
    import torch

    from tests.text_models import import_transformers

    tf = import_transformers()
    torch.manual_seed(seed)
    config = tf.BertConfig(vocab_size=vocabulary, hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=positions,
                           num_labels=classes, attn_implementation="eager")
    return tf.BertForSequenceClassification(config)


def accuracy(model, ids, mask, labels) -> float:
    import torch

    with torch.no_grad():
        logits = torch.cat([model(input_ids=ids[i:i + 256], attention_mask=mask[i:i + 256]).logits
                            for i in range(0, len(ids), 256)])
    return float((logits.argmax(1) == labels).float().mean())


def train(data: pathlib.Path, epochs: int = 8, seed: int = 0, hidden: int = 64, batch: int = 32, lr: float = 1e-3,
          quiet: bool = False, layers: int = 2):
    """The seeded BERT trained on ``data/train.csv``; returns (model, test accuracy)."""
    import torch
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(data / "tokenizer.json"))
    ids, mask, labels, cues = read_split(data, "train", tokenizer)
    classes = int(labels.max()) + 1
    positions = 2 * ids.shape[1]  # room for longer test sequences
    model = build(tokenizer.get_vocab_size(), classes, positions, hidden=hidden, layers=layers, heads=4, seed=seed)
    masked_id = tokenizer.token_to_id("[MASK]")
    filler = (ids >= len(SPECIALS)) & ~cues
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * -(-len(ids) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, lr, total_steps=steps, pct_start=0.2)
    from tools.train_benchmark import run_epochs

    def batch_loss(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        hidden_words = filler[index] & (torch.rand(filler[index].shape, generator=generator) < MASKED)
        inputs = torch.where(hidden_words, masked_id, ids[index])
        return torch.nn.functional.cross_entropy(model(input_ids=inputs, attention_mask=mask[index]).logits,
                                                 labels[index])

    def print_epoch(epoch: int, loss: float, seconds: float) -> None:
        if not quiet:
            print(f"epoch {epoch + 1}/{epochs}: loss {loss:.4f}, train accuracy "
                  f"{accuracy(model, ids[:1000], mask[:1000], labels[:1000]):.1%} ({seconds:.0f} s)", flush=True)

    run_epochs(model, optimiser, schedule, len(ids), batch_loss, print_epoch, epochs, seed, batch)
    test = read_split(data, "test", tokenizer)
    return model.eval(), accuracy(model, test[0], test[1], test[2])


def export(model, path: pathlib.Path | str) -> None:
    """TorchScript export (opset 17), dynamic batch and sequence axes."""
    import onnx
    import torch

    from tests.text_models import Logits

    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = (torch.tensor([[2, 5, 6, 7, 3]]), torch.ones(1, 5, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(model, names).eval(), example, buffer, input_names=names, output_names=["logits"],
                          dynamo=False, opset_version=17,
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names} | {"logits": {0: "batch"}})
    exported = onnx.load_from_string(buffer.getvalue())
    onnx.save(exported, str(path))


def train_main(data: pathlib.Path, output: pathlib.Path | None, epochs: int | None, seed: int, threads: int,
               hidden: int = 64, layers: int = 2) -> None:
    """``train_benchmark.py DATA --arch bert``: train, report, export to ``DATA/bert.onnx``."""
    import onnx
    import torch

    torch.set_num_threads(max(1, threads))
    epochs = EPOCHS if epochs is None else epochs
    began = time.perf_counter()
    model, test_accuracy = train(data, epochs, seed, hidden=hidden, layers=layers)
    output = output or data / "bert.onnx"
    export(model, output)
    training = len((data / "train.csv").read_text(encoding="utf-8").splitlines()) - 1
    exported = onnx.load(str(output))
    onnx.helper.set_model_props(exported, {"agf_onnx.benchmark": f"text: {training} training sequences, {layers} "
                                                                  f"layers of width {hidden}, {epochs} epochs, seed {seed}"})
    onnx.save(exported, str(output))
    print(f"{output}: test accuracy {test_accuracy:.1%}, trained in {time.perf_counter() - began:.0f} s")


#: Training epochs of the benchmark's BERT.
EPOCHS = 8


# -- the docs' table ------------------------------------------------------------------------------

#: Every method that explains a text model, each AGF policy a row of its own; the modifiers on AGF.
TABLE_METHODS = {
    "agf (flat policy authors)": {"method": "agf", "flat_policy": "authors"},
    "agf (flat policy none)": {"method": "agf", "flat_policy": "none"},
    "agf (flat policy pointwise)": {"method": "agf", "flat_policy": "pointwise"},
    "agf+contrast (authors)": {"method": "agf+contrast", "flat_policy": "authors"},
    "agf+contrast (none)": {"method": "agf+contrast", "flat_policy": "none"},
    "agf+smooth=8 (authors)": {"method": "agf+smooth=8", "flat_policy": "authors"},
    "chefer": {"method": "chefer"},
    "lrp": {"method": "lrp"},
    "lrp-ab": {"method": "lrp-ab"},
    "clrp": {"method": "clrp"},
    "sglrp": {"method": "sglrp"},
    "rap": {"method": "rap"},
    "gradient": {"method": "gradient"},
    "gradient-x-input": {"method": "gradient-x-input"},
    "integrated-gradients": {"method": "integrated-gradients"},
    "smoothgrad": {"method": "smoothgrad"},
}


def table_main(data: pathlib.Path, model: pathlib.Path | None, output: pathlib.Path | None, limit: int | None) -> None:
    """Every entry of ``TABLE_METHODS`` on ``data/test.csv``: results.json, results.md, deletion.png."""
    from agf_onnx.text_evaluate import TextEvaluation, load_text_dataset, method_entries, write_outputs
    from agf_onnx.text_explain import load_tokenizer

    model = model or data / "bert.onnx"
    output = output or data / "eval_table"
    samples = load_text_dataset(data / "test.csv")[:limit]
    entries = {name: method_entries([spec["method"]], {k: v for k, v in spec.items() if k != "method"})
               [spec["method"]] for name, spec in TABLE_METHODS.items()}
    evaluation = TextEvaluation(model, load_tokenizer(data / "tokenizer.json"), entries)
    began = time.perf_counter()
    results = evaluation.run(samples, progress=lambda name: print(f"{name} done ({time.perf_counter() - began:.0f} s)",
                                                                  flush=True))
    settings = {"model": str(model), "data": str(data / "test.csv"), "methods": list(entries),
                "replace": evaluation.replacement, "tokenizer": str(data / "tokenizer.json")}
    write_outputs(output, results, settings)
    print((output / "results.md").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make", help="the data (what make_benchmark.py --text runs)")
    make.add_argument("out", type=pathlib.Path)
    make.add_argument("--train", type=int, default=FULL["train"])
    make.add_argument("--test", type=int, default=FULL["test"])
    make.add_argument("--vocabulary", type=int, default=FULL["vocabulary"])
    make.add_argument("--seed", type=int, default=0)
    fit = commands.add_parser("train", help="the BERT (what train_benchmark.py --arch bert runs), with its sizes")
    fit.add_argument("data", type=pathlib.Path)
    fit.add_argument("-o", "--output", type=pathlib.Path, help="default: DATA/bert.onnx")
    fit.add_argument("--epochs", type=int, default=EPOCHS)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--hidden", type=int, default=64)
    fit.add_argument("--layers", type=int, default=2)
    fit.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    table = commands.add_parser("table", help="every text method and AGF policy on DATA/test.csv")
    table.add_argument("data", type=pathlib.Path)
    table.add_argument("--model", type=pathlib.Path, help="default: DATA/bert.onnx")
    table.add_argument("-o", "--output", type=pathlib.Path, help="default: DATA/eval_table")
    table.add_argument("--limit", type=int)
    args = parser.parse_args(argv)
    if args.command == "make":
        summary = generate(args.out, args.train, args.test, args.vocabulary, args.seed)
        print(f"{args.out}: {summary['train']} training and {summary['test']} test sequences over "
              f"{summary['vocabulary']} words from {summary['source']}")
    elif args.command == "train":
        train_main(args.data, args.output, args.epochs, args.seed, args.threads, args.hidden, args.layers)
    else:
        table_main(args.data, args.model, args.output, args.limit)


if __name__ == "__main__":
    main()
