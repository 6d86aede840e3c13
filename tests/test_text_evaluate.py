"""``agf-onnx evaluate`` for text (issue 24) on the built-in text benchmark at CI size: 300
training sequences of dictionary words (``tools/text_benchmark.py``, Debian's ``wamerican``) whose
label is decided by planted cue words, a tiny BERT (hidden 32) trained on them for seconds, seeded.

- On a model that learned the cues: deleting AGF's most relevant tokens first drops the label's
  probability far faster than deleting its least relevant first; AGF and gradient × input put the
  cue tokens first far above chance (the share of cue tokens).
- The deletion curves, their AUCs and the localisation AP against a computation of their own
  (ONNX Runtime sessions of the compiled and the original model, a loop over the tokens, and
  scikit-learn's ``average_precision_score``), with ``--replace pad``.
- Bad input refused in one line, nothing written.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import onnx
import pytest
import torch

import agf_onnx
from agf_onnx.cli import main
from tools import text_benchmark

from .runtime import run

#: The CI size: sequences, filler words, epochs and width of the tiny BERT.
TRAIN, TEST, VOCABULARY, EPOCHS, HIDDEN = 300, 60, 100, 10, 32


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text_bench")
    text_benchmark.generate(folder, TRAIN, TEST, VOCABULARY, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights on every machine: the order of float sums depends on the threads
    try:
        model, accuracy = text_benchmark.train(folder, epochs=EPOCHS, hidden=HIDDEN, batch=16, quiet=True)
    finally:
        torch.set_num_threads(threads)
    assert accuracy >= 0.9, f"the tiny BERT did not learn the cues (test accuracy {accuracy:.1%})"
    text_benchmark.export(model, folder / "bert.onnx")
    return folder


@functools.lru_cache(maxsize=None)
def _evaluated(folder: str, methods: str, *extra: str) -> dict:
    out = f"{folder}/eval_{methods.replace(',', '_')}{'_'.join(extra)}"
    code = main(["evaluate", f"{folder}/bert.onnx", f"{folder}/test.csv", "--tokenizer", f"{folder}/tokenizer.json",
                 "--methods", methods, "-o", out, "-q", *extra])
    assert code == 0
    return json.loads(open(f"{out}/results.json").read())


def test_a_model_that_learned_the_cues_has_faithful_maps(bench):
    results = _evaluated(str(bench), "agf,gradient-x-input")
    assert results["sequences"] == TEST and results["clean_accuracy"] >= 90 and results["replacement"] == "[MASK]"
    chance = results["chance_ap"]
    assert 5 < chance < 40  # 1–3 cues among 8–24 words
    agf, gxi = results["methods"]["agf"], results["methods"]["gradient-x-input"]
    most, least = agf["deletion"]["most_first"], agf["deletion"]["least_first"]
    # the cues decide the label: without the 10–30 % AGF ranks first, the label's probability falls
    assert most["auc"] + 30 < least["auc"]
    assert most["probability"][0] == least["probability"][0] > 60  # nothing removed yet
    assert most["probability"][-1] == least["probability"][-1]  # everything removed: the same input
    assert most["probability"][3] < 50 < least["probability"][3]
    assert agf["localisation"]["sequences"] == TEST
    assert agf["localisation"]["ap"] > chance + 40 and gxi["localisation"]["ap"] > chance + 20
    page = (bench / "eval_agf_gradient-x-input" / "results.md").read_text()
    assert "| `agf` |" in page and f"chance (the mean share of cue tokens): {chance:.1f} %" in page
    from PIL import Image
    with Image.open(bench / "eval_agf_gradient-x-input" / "deletion.png") as figure:
        assert figure.size[0] > 800


def test_curves_and_ap_match_a_computation_of_their_own(bench):
    from sklearn.metrics import average_precision_score
    from tokenizers import Tokenizer

    results = _evaluated(str(bench), "lrp", "--replace", "pad", "--limit", "20")
    assert results["replacement"] == "[PAD]"
    tokenizer = Tokenizer.from_file(str(bench / "tokenizer.json"))
    rows = (bench / "test.csv").read_text().splitlines()[1:21]
    texts = [row.split(",")[0] for row in rows]
    labels = np.array([int(row.split(",")[1]) for row in rows])
    cues = [[int(p) for p in row.split(",")[2].split()] for row in rows]
    length = results["length"]
    ids = np.zeros((len(rows), length), np.int64)  # [PAD] = 0
    for n, text in enumerate(texts):
        ids[n, :len(text.split()) + 2] = tokenizer.encode(text).ids
    mask = (ids != 0).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    original = onnx.load(bench / "bert.onnx")
    compiled = agf_onnx.compile(original, method="lrp", input_shapes={"input_ids": [1, length]})
    relevance = run(compiled, {**feeds, "target": labels})["heatmap"]

    def probability(changed: np.ndarray) -> np.ndarray:
        logits = run(original, {**feeds, "input_ids": changed})["logits"].astype(np.float64)
        soft = np.exp(logits - logits.max(1, keepdims=True))
        return (soft / soft.sum(1, keepdims=True))[np.arange(len(rows)), labels]

    fractions = np.linspace(0, 1, 11)
    for order, sign in (("most_first", -1), ("least_first", 1)):
        curve = []
        for fraction in fractions:
            changed = ids.copy()
            for n, text in enumerate(texts):
                words = np.arange(1, len(text.split()) + 1)  # one token per word, after [CLS]
                ranked = words[np.argsort(sign * relevance[n, words], kind="stable")]
                changed[n, ranked[:int(round(fraction * len(words)))]] = 0
            curve.append(100 * probability(changed).mean())
        expected = results["methods"]["lrp"]["deletion"][order]
        np.testing.assert_allclose(expected["probability"], curve, atol=2e-3)
        assert expected["auc"] == pytest.approx(np.trapezoid(curve, fractions), abs=2e-3)
    precisions = []
    for n, text in enumerate(texts):
        words = np.arange(1, len(text.split()) + 1)
        truth = np.isin(words - 1, cues[n])
        if truth.any() and not truth.all():
            precisions.append(average_precision_score(truth, relevance[n, words]))
    localisation = results["methods"]["lrp"]["localisation"]
    assert localisation["sequences"] == len(precisions)
    assert localisation["ap"] == pytest.approx(100 * np.mean(precisions), abs=0.01)


def _refused(capsys, argv, message, out, code=1):
    assert main(argv) == code
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1, error
    assert not out.exists()


def test_bad_text_input_is_refused_in_one_line(bench, tmp_path, capsys):
    out = tmp_path / "out"
    model, tokenizer = str(bench / "bert.onnx"), str(bench / "tokenizer.json")

    def data(name: str, content: bytes | str) -> str:
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    good = data("good.csv", "text,label,cues\nbump pose,1,0\n")
    evaluate = ["evaluate", model]
    _refused(capsys, [*evaluate, good, "-o", str(out)], "--tokenizer PATH", out)
    images = data("images.csv", "file,label\na.png,0\n")
    _refused(capsys, [*evaluate, images, "--tokenizer", tokenizer, "-o", str(out)], "is not one (expected a CSV/TSV", out)
    _refused(capsys, [*evaluate, data("empty.csv", "text,label\nbump,1\n ,0\n"), "--tokenizer", tokenizer, "-o",
                      str(out)], "line 3: empty text", out)
    _refused(capsys, [*evaluate, data("name.csv", "text,label\nbump,positive\n"), "--tokenizer", tokenizer, "-o",
                      str(out)], "label 'positive' is neither a class index nor a name in --labels", out)
    _refused(capsys, [*evaluate, data("range.csv", "text,label\nbump,7\n"), "--tokenizer", tokenizer, "-o", str(out)],
             "class 7 is out of range: the model has 3 classes", out)
    _refused(capsys, [*evaluate, data("latin1.csv", "text,label\nbump,1\ncafé,0\n".encode("latin-1")), "--tokenizer",
                      tokenizer, "-o", str(out)], "line 3 is not UTF-8 text", out)
    _refused(capsys, [*evaluate, data("cues.csv", "text,label,cues\nbump pose,1,2\n"), "--tokenizer", tokenizer, "-o",
                      str(out)], "cue position out of range: the text has 2 words", out)
    _refused(capsys, [*evaluate, data("long.csv", "text,label\n" + "bump " * 80 + ",1\n"), "--tokenizer", tokenizer,
                      "-o", str(out)], "could not be compiled for 82 tokens", out)
    _refused(capsys, [*evaluate, good, "--tokenizer", str(tmp_path), "-o", str(out)], "no tokenizer.json there", out)
    _refused(capsys, [*evaluate, good, "--tokenizer", tokenizer, "--methods", "agf,fullgrad", "-o", str(out)],
             "--methods fullgrad: --method fullgrad: needs an image", out, code=2)
    from tokenizers import Tokenizer, models
    no_mask = Tokenizer(models.WordLevel({t: i for i, t in enumerate(["[PAD]", "[UNK]", "bump", "pose"])},
                                         unk_token="[UNK]"))
    no_mask.save(str(tmp_path / "no_mask.json"))
    _refused(capsys, [*evaluate, good, "--tokenizer", str(tmp_path / "no_mask.json"), "-o", str(out)],
             "the tokenizer has no [MASK] or <mask> token (try --replace pad)", out)
    compiled = tmp_path / "bert_agf.onnx"
    onnx.save(agf_onnx.compile(model, input_shapes={"input_ids": [1, 8]}), compiled)
    _refused(capsys, ["evaluate", str(compiled), good, "--tokenizer", tokenizer, "-o", str(out)], "already compiled",
             out)
    from .models import VGGish, export
    image_model = tmp_path / "cnn.onnx"
    onnx.save(export(VGGish(widths=(4, "M"), image=8, classes=3, hidden=8).eval(), 8), image_model)
    _refused(capsys, ["evaluate", str(image_model), good, "--tokenizer", tokenizer, "-o", str(out)],
             "not a text model", out)


def test_the_default_text_policy_localises_best(bench):
    """docs/text.md chose AGF's default flat policy for text (``authors``) by the benchmark: on the CI-sized
    one, too, it ranks the cues first far better than the full rule everywhere (``none``)."""
    default = _evaluated(str(bench), "agf")["methods"]["agf"]
    full = _evaluated(str(bench), "agf", "--flat-policy", "none")["methods"]["agf"]
    assert default["localisation"]["ap"] > full["localisation"]["ap"] + 20
    assert default["deletion"]["most_first"]["auc"] + 10 < full["deletion"]["most_first"]["auc"]
