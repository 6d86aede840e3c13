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
from agf_onnx.runtime import plots
from agf_onnx.runtime.explain import PRESETS, Explainer, ExplainError, blend, diverging

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


def test_overlays_are_titled_with_class_and_probability():
    photo = np.zeros((1, 8, 8, 3), np.uint8)
    heatmaps = np.stack([np.linspace(-0.5, 1.0, 64).reshape(8, 8), np.full((8, 8), 0.25)])[None]
    probabilities = np.array([[0.1, 0.6, 0.3]])
    explanation = agf_onnx.Explanation(photo, heatmaps, np.array([[1, 2]]), np.log(probabilities), probabilities,
                                       labels=["cat", "tabby cat", "dog"])
    assert explanation.title(0, 0) == ("tabby cat (1)", "p 60.0% · map -0.50 to +1.00")
    assert explanation.title(0, 1) == ("dog (2)", "p 30.0% · map +0.25 to +0.25")
    unlabelled = agf_onnx.Explanation(photo, heatmaps[:, :1], np.array([[1]]), None, None)
    assert unlabelled.title(0, 0) == ("1", "map -0.50 to +1.00")


@pytest.mark.parametrize("name", list(plots.COLOUR_MAPS))
def test_every_colour_map_runs_from_against_to_for(name):
    ends = plots.colour_map(np.array([-1.0, -7.0, 1.0, 7.0, np.nan]), name)
    points = plots.COLOUR_MAPS[name]
    np.testing.assert_array_equal(ends[:4], [points[0][1], points[0][1], points[-1][1], points[-1][1]])
    np.testing.assert_array_equal(ends[4], plots.colour_map(np.array(0.0), name))  # never NaN in a picture


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
    picture = np.asarray(explanation.overlay(1))
    scale = plots.panel_scale(32, 32)
    assert scale == 6, "a 32×32 model's panels are enlarged to a readable size"
    tile, top = 32 * scale, plots.title_height()
    enlarged = [np.kron(explanation.photos[1], np.ones((scale, scale, 1), np.uint8))] + [
        np.kron(blend(explanation.photos[1], explanation.heatmaps[1, k], cmap=plots.DEFAULT_COLOUR_MAP, grey=True),
                np.ones((scale, scale, 1), np.uint8)) for k in range(3)]
    for index, expected in enumerate(enlarged):  # the photo, then the overlays over the greyed photo
        left = plots.panel_left(index, tile)
        np.testing.assert_array_equal(picture[top:top + tile, left:left + tile], expected)
    bar = picture[top:top + tile, plots.panel_left(4, tile) + 4]
    np.testing.assert_array_equal(bar, plots.colour_map(np.linspace(1.0, -1.0, tile)))  # +1 at the top


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
        assert min(Image.open(out / entry["overlay"]).size) >= plots.MIN_PANEL
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


# -- the rough edges a new user hits (issue 23) --------------------------------------------------

def test_top_k_beyond_the_classes_is_refused_before_the_folder_exists(compiled_path, photos, tmp_path, capsys):
    out = tmp_path / "never"
    code = main(["explain", str(compiled_path), str(photos / "astronaut.png"), "-o", str(out), "--top-k", "100000",
                 "--provider", "cpu"])
    assert code == 1 and not out.exists()
    assert capsys.readouterr().err.strip() == ("agf-onnx: error: --top-k 100000: must be between 1 and the number of "
                                               "classes (10)")


def test_ctrl_c_leaves_a_folder_that_says_it_is_partial(compiled_path, photos, tmp_path, capsys, monkeypatch):
    from agf_onnx.runtime.outputs import ExplainOutputs

    add, added = ExplainOutputs.add, []

    def interrupted_after_two(self, outcome):
        if len(added) == 2:
            raise KeyboardInterrupt
        added.append(outcome.source)
        return add(self, outcome)

    monkeypatch.setattr(ExplainOutputs, "add", interrupted_after_two)
    out = tmp_path / "out"
    code = main(["explain", str(compiled_path), str(photos), "-o", str(out), "--provider", "cpu", "--batch-size", "1"])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is False and results["settings"]["interrupted"] == "interrupted (Ctrl-C)"
    assert [entry["image"] for entry in results["images"]] == added
    assert all((out / entry["overlay"]).is_file() for entry in results["images"])
    assert not (out / "index.html").exists()


def test_results_json_says_incomplete_while_the_run_is_going(compiled_path, photos, tmp_path, monkeypatch):
    from agf_onnx.runtime.outputs import ExplainOutputs

    add, states = ExplainOutputs.add, []

    def watching(self, outcome):  # what a reader of the folder sees during the run
        states.append(json.loads((self.out / "results.json").read_text())["complete"])
        return add(self, outcome)

    monkeypatch.setattr(ExplainOutputs, "add", watching)
    assert main(["explain", str(compiled_path), str(photos), "-o", str(tmp_path / "o"), "--provider", "cpu",
                 "-q"]) == 0
    assert states == [False, False, False]
    assert json.loads((tmp_path / "o" / "results.json").read_text())["complete"] is True


def test_quiet_prints_nothing_and_target_minus_one_is_the_top_class(compiled_path, photos, tmp_path, capsys):
    assert main(["explain", str(compiled_path), str(photos), "-o", str(tmp_path / "top"), "--provider", "cpu",
                 "--target", "-1", "-q", "--batch-size", "1"]) == 0
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err == ""
    assert main(["explain", str(compiled_path), str(photos), "-o", str(tmp_path / "default"), "--provider", "cpu",
                 "-q", "--batch-size", "1"]) == 0
    for top, default in zip(*(json.loads((tmp_path / name / "results.json").read_text())["images"]
                              for name in ("top", "default"))):
        assert top["explained"] == default["explained"] == top["classes"][:1]
        np.testing.assert_array_equal(np.load(tmp_path / "top" / top["heatmap"]),
                                      np.load(tmp_path / "default" / default["heatmap"]))


def test_a_benchmark_folder_is_explained_without_its_masks(compiled_path, tmp_path, capsys):
    from agf_onnx.runtime.explain import collect_images
    from tools import make_benchmark

    make_benchmark.generate(tmp_path / "bench", 3, seed=0, size=32, source="digits")
    found, folder = collect_images([tmp_path / "bench"])
    assert folder and [p.parent.name for p in found] == ["images"] * 3
    beside = tmp_path / "beside"
    beside.mkdir()
    Image.new("RGB", (8, 8)).save(beside / "cat.png")
    Image.new("L", (8, 8)).save(beside / "cat.mask.png")
    assert collect_images([beside])[0] == [beside / "cat.png"]
    assert collect_images([beside / "cat.mask.png"])[0] == [beside / "cat.mask.png"]  # named: taken


@pytest.mark.parametrize("kind", ["png-16", "tiff-16", "tiff-float", "array-uint16", "array-float-range"])
def test_deep_images_are_scaled_by_their_bit_depth_not_clipped_to_white(kind, tmp_path):
    from agf_onnx.runtime.explain import load_image

    ramp = np.linspace(0.0, 1.0, 64).reshape(8, 8)
    expected = np.round(ramp * 255).astype(np.uint8)
    if kind in ("png-16", "tiff-16"):
        path = tmp_path / ("deep.png" if kind == "png-16" else "deep.tif")
        Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(path)
        assert Image.open(path).mode.startswith("I;16")
        source = path
    elif kind == "tiff-float":
        source = tmp_path / "float.tif"
        Image.fromarray(ramp.astype(np.float32)).save(source)
        assert Image.open(source).mode == "F"
    elif kind == "array-uint16":
        source = np.stack([np.round(ramp * 65535).astype(np.uint16)] * 3, -1)
    else:  # float values over an arbitrary range (a radiance map): stretched from min to max
        source = np.stack([ramp * 1000.0 - 200.0] * 3, -1)
    notes = []
    pixels = load_image(source, notes)
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8
    np.testing.assert_allclose(pixels[..., 0].astype(int), expected.astype(int), atol=1)
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_the_default_overlay_shows_evidence_on_a_photo_of_the_same_colour():
    """Red evidence over a red object: the plain red map blended on the colour photo leaves the
    pixel as it was (the map cannot be seen), the default over the greyed photo changes it plainly."""
    red = np.zeros((1, 2, 3), np.uint8)
    red[...] = (204, 0, 0)
    heatmap = np.array([[1.0, 0.0]])  # strongest evidence, none
    plain = blend(red, heatmap)  # bwr on the colour photo, as agf-onnx drew overlays before
    assert np.abs(plain[0, 0].astype(int) - plain[0, 1]).sum() == 0
    readable = blend(red, heatmap, cmap=plots.DEFAULT_COLOUR_MAP, grey=True)
    assert np.abs(readable[0, 0].astype(int) - readable[0, 1]).sum() > 100
