"""``agf-onnx explain`` and the ``Explainer`` API: overlays checked pixel by pixel, outputs
against a direct ONNX Runtime run, the gallery's links, results.json, bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from PIL import Image

import agf_onnx
from agf_onnx.cli import main
from agf_onnx.explain import PRESETS, Explainer, ExplainError, blend, diverging

from . import models, zoo
from .runtime import run

NET = models.seeded(models.ResNetish(), seed=31)
LABELS = [f"class {i}" for i in range(10)]


@pytest.fixture(scope="module")
def compiled_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    onnx.save(agf_onnx.compile(models.export(NET, 32, softmax=True)), folder / "resnet_agf.onnx")
    return folder / "resnet_agf.onnx"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray((zoo.photo("astronaut", (64, 48)) * 255).astype(np.uint8)).save(folder / "astronaut.png")
    Image.fromarray((zoo.photo("chelsea", (40, 40)) * 255).astype(np.uint8)).save(folder / "chelsea.jpg")
    Image.fromarray((zoo.photo("coffee", (50, 60)) * 255).astype(np.uint8)).save(folder / "coffee.png")
    return folder


def test_colour_map_and_blend_are_exact():
    np.testing.assert_array_equal(diverging(np.array([1.0, 0.0, -1.0, 5.0])),
                                  [[204, 0, 0], [255, 255, 255], [0, 51, 204], [204, 0, 0]])
    np.testing.assert_array_equal(diverging(np.array([0.5])), [[230, 128, 128]])  # halfway to red
    photo = np.full((1, 3, 3), 100, np.uint8)
    mixed = blend(photo, np.array([[1.0, 0.0, -0.5]]))
    np.testing.assert_array_equal(mixed[0, 0], np.round(0.3 * 100 + 0.7 * np.array([204, 0, 0])))
    np.testing.assert_array_equal(mixed[0, 1], [100, 100, 100])  # no evidence: the photo itself
    np.testing.assert_array_equal(mixed[0, 2], np.round(0.65 * 100 + 0.35 * diverging(np.array([-0.5]))[0]))


def test_explainer_matches_a_direct_run(compiled_path, photos):
    explainer = Explainer(compiled_path, provider="cpu", labels=LABELS)
    paths = sorted(photos.iterdir())
    explanation = explainer.explain(paths, top_k=3)
    assert explanation.heatmaps.shape == (3, 3, 32, 32) and explanation.targets.shape == (3, 3)
    mean, std = PRESETS["imagenet"]
    direct_input = ((explanation.photos / 255.0 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)
    direct = run(onnx.load(compiled_path), {"x": direct_input})
    np.testing.assert_allclose(explanation.probabilities, direct["y"], rtol=1e-6)
    order = np.argsort(-direct["y"], 1)[:, :3]
    np.testing.assert_array_equal(explanation.targets, order)
    for k in range(3):
        maps = run(onnx.load(compiled_path), {"x": direct_input, "target": order[:, k]})["heatmap"]
        np.testing.assert_allclose(explanation.heatmaps[:, k:k + 1], maps, atol=1e-6)
    picture = explanation.overlay(1)
    assert picture.size == (32 * 4 + 4 * 3, 32)
    np.testing.assert_array_equal(np.asarray(picture)[:, :32], explanation.photos[1])
    np.testing.assert_array_equal(np.asarray(picture)[:, 36:68], blend(explanation.photos[1], explanation.heatmaps[1, 0]))


def test_a_model_compiled_with_top_k_gives_the_maps_in_one_run(compiled_path, photos, tmp_path):
    onnx.save(agf_onnx.compile(models.export(NET, 32, softmax=True), top_k=3), tmp_path / "top3.onnx")
    paths = sorted(photos.iterdir())
    single_class = Explainer(compiled_path, provider="cpu").explain(paths, top_k=2)
    explainer = Explainer(tmp_path / "top3.onnx", provider="cpu")
    assert explainer.compiled_top_k == 3
    explainer.check_budget(paths[0])  # the memory budget's measuring runs, once per model
    calls = []
    session_run = explainer.session.run
    explainer.session.run = lambda *args, **kwargs: calls.append(1) or session_run(*args, **kwargs)
    explanation = explainer.explain(paths, top_k=2)
    assert len(calls) == 1, "one session run for all classes"
    np.testing.assert_array_equal(explanation.targets, single_class.targets)
    np.testing.assert_allclose(explanation.heatmaps, single_class.heatmaps, atol=1e-5)


def test_explainer_takes_arrays_pil_images_and_labels(compiled_path):
    gray = (zoo.photo("camera", (32, 32))[..., 0] * 255).astype(np.uint8)
    rgba = Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 128)]), "RGBA")
    explainer = Explainer(compiled_path, provider="cpu", labels=LABELS)
    explanation = explainer.explain([gray, rgba], target="class 4")
    assert (explanation.targets == 4).all()
    np.testing.assert_allclose(explanation.heatmaps[0], explanation.heatmaps[1], atol=1e-6)  # same pixels
    with pytest.raises(ExplainError, match="unknown label 'dog'"):
        explainer.explain([gray], target="dog")
    with pytest.raises(ExplainError, match="out of range: the model has 10 classes"):
        explainer.explain([gray], target=12)


def hrefs(page: str) -> set[str]:
    return set(re.findall(r'(?:href|src)="([^"]+)"', page))


def test_cli_writes_overlays_heatmaps_results_and_a_gallery(compiled_path, photos, tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    out = tmp_path / "out"
    assert main(["explain", str(compiled_path), str(photos), "-o", str(out), "--labels", str(labels),
                 "--top-k", "2", "--provider", "cpu", "--batch-size", "2"]) == 0
    printed = capsys.readouterr()
    assert "provider: cpu" in printed.out and "explained 3 of 3 images" in printed.out
    assert "image" in printed.err  # the progress bar, on runs of more than one batch
    results = json.loads((out / "results.json").read_text())
    assert len(results["images"]) == 3 and results["settings"]["top_k"] == 2
    for entry in results["images"]:
        assert entry["error"] is None
        assert np.load(out / entry["heatmap"]).shape == (2, 32, 32)
        assert Image.open(out / entry["overlay"]).size == (32 * 3 + 8, 32)
        probabilities = [c["probability"] for c in entry["classes"]]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6
        assert [e["class"] for e in entry["explained"]] == [c["class"] for c in entry["classes"][:2]]
        assert entry["explained"][0]["label"] == LABELS[entry["explained"][0]["class"]]
    links = hrefs((out / "index.html").read_text())
    assert len(links) == 6 and all((out / link).is_file() for link in links)


def test_cli_reports_bad_files_and_keeps_going(compiled_path, photos, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "notes.png").write_text("not an image")
    Image.open(photos / "astronaut.png").convert("L").save(folder / "gray.png")
    Image.open(photos / "astronaut.png").convert("RGBA").save(folder / "rgba.png")
    out = tmp_path / "out"
    assert main(["explain", str(compiled_path), str(folder), "-o", str(out), "--provider", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "notes.png: not a readable image" in captured.err and "1 failed" in captured.out
    results = {pathlib_name(e["image"]): e for e in json.loads((out / "results.json").read_text())["images"]}
    assert "not a readable image" in results["notes.png"]["error"]
    assert results["gray.png"]["notes"] == [f"{folder / 'gray.png'}: L image converted to RGB"]
    assert "RGBA image converted" in results["rgba.png"]["notes"][0]
    links = hrefs((out / "index.html").read_text())
    assert all((out / link).is_file() for link in links) and len(links) == 4


def pathlib_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


@pytest.mark.parametrize("arguments, message", [
    (["--target", "12"], "class 12 is out of range"),
    (["--target", "dog", "--labels", "{labels}"], "unknown label 'dog'"),
    (["--top-k", "0"], "--top-k 0"),
    (["--mean", "1,2"], "expected three numbers"),
    (["--provider", "cuda"], "--provider cuda"),
])
def test_cli_bad_options_fail_clearly(arguments, message, compiled_path, photos, tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS))
    code = main(["explain", str(compiled_path), str(photos / "astronaut.png"), "-o", str(tmp_path / "o"),
                 *(a.format(labels=labels) for a in arguments)])
    assert code != 0 and message in capsys.readouterr().err


def test_cli_compiles_an_original_model_on_the_fly(tmp_path, photos, capsys):
    original = tmp_path / "resnet.onnx"
    onnx.save(models.export(NET, 32), original)
    assert main(["explain", str(original), str(photos / "chelsea.jpg"), "-o", str(tmp_path / "o"),
                 "--provider", "cpu"]) == 0
    assert "compiled it on the fly" in capsys.readouterr().out
    entry = json.loads((tmp_path / "o" / "results.json").read_text())["images"][0]
    assert np.isfinite(np.load(tmp_path / "o" / entry["heatmap"])).all()


def test_size_and_crop_keep_the_aspect_ratio(compiled_path):
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, 20:60] = 255  # a white centre square between black side bands
    explainer = Explainer(compiled_path, provider="cpu", crop=True)
    photo = explainer.prepare([wide])[0]
    assert photo.shape == (32, 32, 3) and (photo[:, 1:-1] > 250).all()  # the centre square fills the crop
    assert (photo > 200).all()  # only its bilinear edge touches the black bands
    stretched = Explainer(compiled_path, provider="cpu").prepare([wide])[0]
    assert stretched[:, 0].max() < 10 and stretched[:, 16].min() > 245  # the bands stay, squeezed
    resized = Explainer(compiled_path, provider="cpu", size=64).prepare([wide])[0]
    assert resized.shape == (32, 32, 3) and (resized > 250).all()
