"""``agf-onnx explain`` for text (issue 24): sentences from the command line or a file, a WordPiece
``tokenizer.json`` built with ``tokenizers``, an HTML page and results.json; bad input refused in
one line with nothing written."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import agf_onnx
from agf_onnx.cli import main

from . import text_models as txt
from .test_text import exported


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    compiled = agf_onnx.compile(exported("bert", "torchscript"), input_shapes={"input_ids": [1, txt.LENGTH]})
    onnx.save(compiled, folder / "bert_agf.onnx")
    onnx.save(exported("bert", "torchscript"), folder / "bert.onnx")
    txt.tokenizer_json(folder / "tokenizer.json")
    (folder / "sentences.txt").write_text("the movie was great\nBad plot , boring acting\n", encoding="utf-8")
    return folder


def test_a_sentence_file_gives_html_and_results(files, tmp_path, capsys):
    out = tmp_path / "out"
    long = " ".join(["good"] * 30)
    code = main(["explain", str(files / "bert_agf.onnx"), "--sentences", str(files / "sentences.txt"),
                 "--text", long, "--tokenizer", str(files), "--top-k", "2", "-o", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    third, first, second = results["sentences"]  # --text first, then the file's lines
    assert first["text"] == "the movie was great" and third["text"] == long
    assert first["tokens"] == ["[CLS]", "the", "movie", "was", "great", "[SEP]"]
    assert second["tokens"][1:3] == ["bad", "plot"]  # the tokenizer's normaliser lower-cases
    for sentence in results["sentences"]:
        assert len(sentence["explained"]) == 2
        for explained in sentence["explained"]:
            relevance = np.array(explained["relevance"])
            assert len(relevance) == len(sentence["tokens"]) and np.isfinite(relevance).all()
            assert 0 < explained["probability"] <= 1
        assert sentence["explained"][0]["class"] == sentence["top_classes"][0]["class"]
        assert sentence["explained"][0]["relevance"] != sentence["explained"][1]["relevance"]
    assert len(third["tokens"]) == txt.LENGTH and third["tokens"][-1] == "[SEP]"
    assert "truncated from 32 to 12 tokens" in third["notes"][0]
    page = (out / "index.html").read_text()
    assert page.count("<span class='t'") == sum(2 * len(s["tokens"]) for s in results["sentences"])
    assert "truncated from 32" in page and "p = " in page
    # the map of the compiled model for the same ids: what the page shows
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(str(files / "tokenizer.json")).encode("the movie was great").ids
    feeds = {"input_ids": np.array([ids + [0] * 6]), "attention_mask": np.array([[1] * 6 + [0] * 6]),
             "token_type_ids": np.zeros((1, 12), np.int64), "target": np.array([-1])}
    from .runtime import run
    heatmap = run(onnx.load(files / "bert_agf.onnx"), feeds)["heatmap"]
    np.testing.assert_allclose(first["explained"][0]["relevance"], heatmap[0, :6], rtol=1e-5, atol=1e-6)


def test_an_original_model_is_compiled_on_the_fly(files, tmp_path, capsys):
    code = main(["explain", str(files / "bert.onnx"), "--text", "a good film", "--tokenizer",
                 str(files / "tokenizer.json"), "-o", str(tmp_path / "out")])
    assert code == 0 and "compiled it with AGF for 5 tokens" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "results.json").read_text())["sentences"][0]["tokens"][1:4] == \
        ["a", "good", "film"]


def _refused(capsys, argv, message, out):
    assert main(argv) != 0
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1, error
    assert not out.exists()


def test_bad_text_input_is_refused_in_one_line(files, tmp_path, capsys):
    out = tmp_path / "out"
    model, tokenizer = str(files / "bert_agf.onnx"), str(files / "tokenizer.json")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("a café film\n".encode("latin-1"))
    _refused(capsys, ["explain", model, "--sentences", str(bad), "--tokenizer", tokenizer, "-o", str(out)],
             "line 1 is not UTF-8 text", out)
    empty = tmp_path / "empty.txt"
    empty.write_text("a film\n\nthe plot\n")
    _refused(capsys, ["explain", model, "--sentences", str(empty), "--tokenizer", tokenizer, "-o", str(out)],
             "line 2 is empty", out)
    from tokenizers import Tokenizer, models
    large = Tokenizer(models.WordLevel({f"w{i}": i for i in range(txt.VOCAB + 10)}, unk_token="w0"))
    large.save(str(tmp_path / "large.json"))
    _refused(capsys, ["explain", model, "--text", "w1 w2", "--tokenizer", str(tmp_path / "large.json"), "-o", str(out)],
             f"its vocabulary has {txt.VOCAB + 10} tokens, the model's embedding table {txt.VOCAB} rows", out)
    _refused(capsys, ["explain", model, "--text", "a film", "-o", str(out)], "--tokenizer PATH", out)
    too_long = " ".join(["good"] * (txt.POSITIONS + 5))  # an original model, compiled for more tokens than it has positions
    _refused(capsys, ["explain", str(files / "bert.onnx"), "--text", too_long, "--tokenizer", tokenizer, "-o", str(out)],
             f"could not be compiled for {txt.POSITIONS + 7} tokens", out)
    _refused(capsys, ["explain", model, "--text", "a film", "--tokenizer", str(tmp_path), "-o", str(out)],
             "no tokenizer.json there", out)
