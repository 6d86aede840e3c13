"""Self-supervised explanations (the paper's Algorithm 2, ``agf_onnx.compiler.ssl``): the in-graph nearest
neighbour and class t against NumPy brute force and the PyTorch head, the heatmaps against a
normal compile told the same class, the file size, the bank, and every refusal."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

import agf_onnx
from agf_onnx import CompileError
from agf_onnx.cli import main
from agf_onnx.compiler import ssl
from agf_onnx.compiler.methods import METHODS, Kind
from agf_onnx.runtime import metrics

from . import models
from .runtime import run

VGG = models.seeded(models.VGGish(), seed=11)
RESNET = models.seeded(models.ResNetish(), seed=12)
#: the tensor names torch.onnx gives the VGGish: the classifier's input and the last Gemm's input
VGG_FLAT, VGG_LAST = "/Flatten_output_0", "/classifier/classifier.4/Relu_output_0"
RESNET_MAP = "/layers/layers.1/layers.1.0/Relu_1_output_0"  # the last block's output, read by the pooling


@pytest.fixture(scope="module")
def vgg() -> onnx.ModelProto:
    return models.export(VGG)


@pytest.fixture(scope="module")
def resnet() -> onnx.ModelProto:
    return models.export(RESNET, fold=False)


def images(count: int, seed: int = 0) -> np.ndarray:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).numpy()


# -- PyTorch references: features(J) and head(·) of the same networks -------------------------

def vgg_features(x: np.ndarray, tensor: str) -> np.ndarray:
    with torch.no_grad():
        flat = torch.flatten(VGG.features(torch.from_numpy(x)), 1)
        return (flat if tensor == VGG_FLAT else VGG.classifier[:5](flat)).numpy()


def vgg_head(features: np.ndarray, tensor: str) -> np.ndarray:
    with torch.no_grad():
        head = VGG.classifier if tensor == VGG_FLAT else VGG.classifier[5:]
        return head(torch.from_numpy(features.astype(np.float32))).numpy()


def resnet_features(x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        net = RESNET
        return net.layers(net.maxpool(torch.relu(net.bn1(net.conv1(torch.from_numpy(x)))))).numpy()


def resnet_head(features: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return RESNET.fc(torch.flatten(RESNET.avgpool(torch.from_numpy(features.astype(np.float32))), 1)).numpy()


def brute_force(features: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """The nearest bank row per image by explicit float64 L2 distances, first on ties (np.argmin)."""
    flat = features.reshape(len(features), -1).astype(np.float64)
    return ((flat[:, None, :] - bank.astype(np.float64)[None]) ** 2).sum(-1).argmin(1)


def far_apart_bank(rng: np.random.Generator, rows: int, width: int, scale: float) -> np.ndarray:
    return (rng.standard_normal((rows, width)) * scale).astype(np.float32)


def decided(scores: np.ndarray, margin: float = 1e-4) -> np.ndarray:
    """Samples whose best class wins by more than float32 round-off (the argmax is well defined)."""
    top = np.sort(scores, axis=1)
    return top[:, -1] - top[:, -2] > margin


# -- nearest neighbour and t --------------------------------------------------------------------

@pytest.mark.parametrize("tensor", [VGG_LAST, VGG_FLAT])
@pytest.mark.parametrize("mode", ["diff", "sum"])
def test_neighbour_and_target_match_brute_force(vgg, tensor, mode):
    x = images(12, seed=1)
    features = vgg_features(x, tensor)
    rng = np.random.default_rng(2)
    # bank rows near some of the images' own features and random ones: varied nearest rows
    bank = np.concatenate([features[::3] + 0.05 * rng.standard_normal(features[::3].shape).astype(np.float32),
                           far_apart_bank(rng, 9, features.shape[1], float(features.std()))])
    compiled = agf_onnx.compile(vgg, ssl_bank=bank, features=tensor, ssl_mode=mode)
    outputs = run(compiled, {"x": x})
    nearest = brute_force(features, bank)
    np.testing.assert_array_equal(outputs["ssl_neighbour"], nearest)
    assert len(set(nearest.tolist())) > 3  # the check is not decided by one row
    shifted = features - bank[nearest] if mode == "diff" else features + bank[nearest]
    v = vgg_head(shifted, tensor)
    ok = decided(v)
    assert ok.sum() >= 10
    np.testing.assert_array_equal(outputs["ssl_target"][ok], v.argmax(1)[ok])
    assert outputs["ssl_target"].dtype == np.int64 and outputs["ssl_neighbour"].dtype == np.int64


def test_four_dimensional_features_through_a_pooling_head(resnet):
    """Features [N, C, h, w] (the last block of a ResNet): the bank holds them flattened, the
    cloned head (GlobalAveragePool, Flatten, Gemm) reads L_I − L_N reshaped back."""
    x = images(8, seed=3)
    features = resnet_features(x)
    rng = np.random.default_rng(4)
    bank = np.concatenate([features.reshape(8, -1)[::2] * 0.9, far_apart_bank(rng, 5, features[0].size, 1.0)])
    outputs = run(agf_onnx.compile(resnet, ssl_bank=bank, features=RESNET_MAP), {"x": x})
    nearest = brute_force(features, bank)
    np.testing.assert_array_equal(outputs["ssl_neighbour"], nearest)
    v = resnet_head(features - bank[nearest].reshape(features.shape))
    ok = decided(v)
    np.testing.assert_array_equal(outputs["ssl_target"][ok], v.argmax(1)[ok])


def test_ties_take_the_first_row_and_the_first_class(vgg):
    """Duplicated bank rows: the first of them, as np.argmin; two classes with the same weights
    and the largest bias: the first of them, as np.argmax."""
    net = models.seeded(models.VGGish(), seed=11)
    last = net.classifier[-1]
    with torch.no_grad():
        last.weight[7] = last.weight[3]
        last.bias[3] = last.bias[7] = 50.0  # classes 3 and 7 tie for the top everywhere
    model = models.export(net)
    x = images(10, seed=5)
    with torch.no_grad():
        features = net.classifier[:5](torch.flatten(net.features(torch.from_numpy(x)), 1)).numpy()
    rng = np.random.default_rng(6)
    rows = far_apart_bank(rng, 4, features.shape[1], float(features.std()))
    bank = rows[[0, 1, 1, 2, 0, 3, 2, 3, 3]]  # every row duplicated, first copies at 0, 1, 3, 5
    outputs = run(agf_onnx.compile(model, ssl_bank=bank), {"x": x})
    nearest = brute_force(features, bank)
    assert set(nearest.tolist()) <= {0, 1, 3, 5}
    np.testing.assert_array_equal(outputs["ssl_neighbour"], nearest)
    with torch.no_grad():
        v = last(torch.from_numpy(features - bank[nearest])).numpy()
    assert (v[:, 3] == v[:, 7]).all() and (v.argmax(1) == 3).all()
    np.testing.assert_array_equal(outputs["ssl_target"], np.full(10, 3))


def test_bank_of_one_row(vgg):
    x = images(6, seed=7)
    features = vgg_features(x, VGG_LAST)
    bank = features[2:3] * 1.5
    outputs = run(agf_onnx.compile(vgg, ssl_bank=bank), {"x": x})
    np.testing.assert_array_equal(outputs["ssl_neighbour"], np.zeros(6, np.int64))
    v = vgg_head(features - bank[0], VGG_LAST)
    ok = decided(v)
    np.testing.assert_array_equal(outputs["ssl_target"][ok], v.argmax(1)[ok])


def nearest_other(features: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """The nearest bank row per image that is not the image itself (float64 distance exactly 0 up to
    float32 rounding of the same features), −1 where there is none: the paper's neighbour."""
    flat = features.reshape(len(features), -1).astype(np.float64)
    distances = ((flat[:, None, :] - bank.astype(np.float64)[None]) ** 2).sum(-1)
    itself = distances <= 1e-9 * ((flat ** 2).sum(1)[:, None] + (bank.astype(np.float64) ** 2).sum(1)[None])
    nearest = np.where(itself, np.inf, distances).argmin(1)
    return np.where(itself.all(1), -1, nearest)


def test_images_in_the_bank_find_another_image_not_themselves(vgg):
    """Eight images whose own features are bank rows (shuffled, among others) and four that are not:
    each finds the nearest other row; before the fix each of the eight found itself, so v = head(0)
    and t was the same class for all of them."""
    x = images(12, seed=8)
    features = vgg_features(x, VGG_LAST)
    rng = np.random.default_rng(9)
    others = features[8:] + 0.3 * float(features.std()) * rng.standard_normal(features[8:].shape).astype(np.float32)
    bank = np.concatenate([features[:8], others, far_apart_bank(rng, 3, features.shape[1], float(features.std()))])
    order = rng.permutation(len(bank))
    bank = bank[order]
    outputs = run(agf_onnx.compile(vgg, ssl_bank=bank), {"x": x, "target": np.full(12, -1, np.int64)})
    own_row = np.argsort(order)[:8]  # where each of the first eight images' features went
    assert (outputs["ssl_neighbour"][:8] != own_row).all(), "an image in the bank is not its own neighbour"
    expected = nearest_other(features, bank)
    assert (expected >= 0).all()
    np.testing.assert_array_equal(outputs["ssl_neighbour"], expected)
    v = vgg_head(features - bank[expected], VGG_LAST)
    ok = decided(v)
    assert ok.sum() >= 10
    np.testing.assert_array_equal(outputs["ssl_target"][ok], v.argmax(1)[ok])
    assert len(set(outputs["ssl_target"][:8].tolist())) > 1, "no longer one class for every image in the bank"


def test_the_same_image_in_another_batch_is_still_itself(vgg):
    """The bank written by ``agf-onnx bank`` (batches of 16) against the images explained one at a
    time: features that differ by float rounding only are still the image itself."""
    x = images(5, seed=13)
    compiled = agf_onnx.compile(vgg, ssl_bank=vgg_features(x, VGG_LAST))
    for n in range(5):
        single = run(compiled, {"x": x[n:n + 1], "target": np.array([-1])})
        assert single["ssl_neighbour"][0] != n
    rows = vgg_features(x, VGG_LAST)
    np.testing.assert_array_equal(run(compiled, {"x": x, "target": np.full(5, -1)})["ssl_neighbour"],
                                  nearest_other(rows, rows))


def test_a_bank_of_only_the_image_itself_has_no_neighbour(vgg):
    """Every row is the image: no other image to compare with, so n = −1 and v = head(L_I)."""
    x = images(1, seed=14)
    features = vgg_features(x, VGG_LAST)
    outputs = run(agf_onnx.compile(vgg, ssl_bank=np.concatenate([features, features])),
                  {"x": x, "target": np.array([-1])})
    assert outputs["ssl_neighbour"].tolist() == [-1]
    assert outputs["ssl_target"].tolist() == vgg_head(features, VGG_LAST).argmax(1).tolist()


def test_none_mode_explains_the_top_class_and_stores_no_bank(vgg):
    x = images(5, seed=10)
    bank = vgg_features(images(20, seed=11), VGG_LAST)
    plain = agf_onnx.compile(vgg)
    compiled = agf_onnx.compile(vgg, ssl_bank=bank, ssl_mode="none")
    outputs = run(compiled, {"x": x})
    np.testing.assert_array_equal(outputs["ssl_neighbour"], np.full(5, -1))
    np.testing.assert_array_equal(outputs["ssl_target"], outputs["y"].argmax(1))
    np.testing.assert_array_equal(outputs["heatmap"], run(plain, {"x": x})["heatmap"])
    assert compiled.ByteSize() - plain.ByteSize() < 2048
    assert {p.key: p.value for p in compiled.metadata_props}["agf_onnx.ssl_mode"] == "none"


# -- the explanation is the method's for class t --------------------------------------------------

@pytest.mark.parametrize("mode", ["diff", "sum"])
def test_heatmaps_equal_a_normal_compile_told_ssl_target(vgg, mode):
    x = images(6, seed=12)
    bank = vgg_features(images(30, seed=13), VGG_LAST)
    compiled = agf_onnx.compile(vgg, ssl_bank=bank, ssl_mode=mode)
    outputs = run(compiled, {"x": x})
    if mode == "diff":
        assert (outputs["ssl_target"] != outputs["y"].argmax(1)).any()  # t is not just the top class here
    plain = run(agf_onnx.compile(vgg), {"x": x, "target": outputs["ssl_target"]})
    np.testing.assert_allclose(outputs["heatmap"], plain["heatmap"], rtol=0, atol=1e-6)
    # an explicit target still overrides t
    chosen = np.array([4, 0, 9, 2, 2, 7])
    overridden = run(compiled, {"x": x, "target": chosen})
    np.testing.assert_array_equal(overridden["ssl_target"], outputs["ssl_target"])
    np.testing.assert_allclose(overridden["heatmap"], run(agf_onnx.compile(vgg), {"x": x, "target": chosen})["heatmap"],
                               rtol=0, atol=1e-6)
    assert {p.key: p.value for p in compiled.metadata_props}["agf_onnx.ssl_mode"] == mode


def test_top_k_explains_the_k_best_classes_of_v(resnet):
    x = images(4, seed=14)
    features = resnet_features(x)
    bank = resnet_features(images(12, seed=15)).reshape(12, -1)
    outputs = run(agf_onnx.compile(resnet, ssl_bank=bank, features=RESNET_MAP, top_k=3), {"x": x})
    nearest = brute_force(features, bank)
    v = resnet_head(features - bank[nearest].reshape(features.shape))
    assert (np.diff(np.sort(v, 1)[:, -4:], axis=1) > 1e-4).all()  # the top 3 are well separated
    np.testing.assert_array_equal(outputs["classes"], np.argsort(-v, 1)[:, :3])
    np.testing.assert_array_equal(outputs["ssl_target"], outputs["classes"][:, 0])
    plain = agf_onnx.compile(resnet)
    for k in range(3):
        np.testing.assert_allclose(outputs["heatmaps"][:, k], run(plain, {"x": x, "target": outputs["classes"][:, k]})
                                   ["heatmap"][:, 0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(outputs["heatmap"][:, 0], outputs["heatmaps"][:, 0], rtol=0, atol=1e-5)


class TinyViT(nn.Module):
    """One pre-norm attention block over 4×4 patches with a class token: the transformer case."""

    def __init__(self, dim: int = 16, heads: int = 2, classes: int = 5):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm, self.head, self.heads = nn.LayerNorm(dim), nn.Linear(dim, classes), heads

    def features(self, x):
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x).flatten(2).transpose(1, 2)], 1)
        tokens = tokens + self.pos
        n, count, dim = tokens.shape
        qkv = self.qkv(self.norm1(tokens)).reshape(n, count, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * (dim // self.heads) ** -0.5).softmax(-1)
        tokens = tokens + self.proj((attention @ v).transpose(1, 2).reshape(n, count, dim))
        tokens = tokens + self.mlp(self.norm2(tokens))
        return self.norm(tokens)[:, 0]

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("method", ["agf", "chefer"])
def test_a_transformer_explains_ssl_target(method):
    torch.manual_seed(23)
    net = TinyViT().eval()
    model = models.export(net)
    x = images(4, seed=24)
    with torch.no_grad():
        features = net.features(torch.from_numpy(x)).numpy()
        bank = net.features(torch.from_numpy(images(8, seed=25))).numpy()
    outputs = run(agf_onnx.compile(model, method=method, ssl_bank=bank), {"x": x})
    nearest = brute_force(features, bank)
    np.testing.assert_array_equal(outputs["ssl_neighbour"], nearest)
    with torch.no_grad():
        v = net.head(torch.from_numpy(features - bank[nearest])).numpy()
    ok = decided(v)
    np.testing.assert_array_equal(outputs["ssl_target"][ok], v.argmax(1)[ok])
    plain = run(agf_onnx.compile(model, method=method), {"x": x, "target": outputs["ssl_target"]})
    np.testing.assert_allclose(outputs["heatmap"], plain["heatmap"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", sorted(name for name, m in METHODS.items() if m.kind is not Kind.ATTENTION))
def test_every_method_explains_ssl_target(vgg, method):
    """Every CNN method (the transformer one, chefer, in the test above)."""
    x = images(3, seed=16)
    bank = vgg_features(images(10, seed=17), VGG_LAST)
    options = {"steps": 4} if method == "integrated-gradients" else {"samples": 3} if method == "smoothgrad" else {}
    outputs = run(agf_onnx.compile(vgg, method=method, ssl_bank=bank, options=options), {"x": x})
    nearest = brute_force(vgg_features(x, VGG_LAST), bank)
    np.testing.assert_array_equal(outputs["ssl_neighbour"], nearest)
    plain = run(agf_onnx.compile(vgg, method=method, options=options), {"x": x, "target": outputs["ssl_target"]})
    assert np.isfinite(outputs["heatmap"]).all()
    np.testing.assert_allclose(outputs["heatmap"], plain["heatmap"], rtol=0, atol=1e-5)


def test_the_file_grows_by_the_bank_only(vgg):
    bank = np.random.default_rng(18).standard_normal((300, 64)).astype(np.float32)
    growth = agf_onnx.compile(vgg, ssl_bank=bank).ByteSize() - agf_onnx.compile(vgg).ByteSize()
    # the bank, its squared norms (4 bytes a row) and a few dozen small nodes (the head is one Gemm)
    assert bank.nbytes <= growth <= bank.nbytes + 4 * len(bank) + 4096


# -- the bank -------------------------------------------------------------------------------------

def test_bank_is_the_features_of_the_prepared_images(vgg, tmp_path):
    rng = np.random.default_rng(19)
    photos = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(5)]
    out = tmp_path / "bank.npy"
    bank = agf_onnx.bank(vgg, photos, output=out, batch_size=2, preset="unit")
    prepared = np.stack([np.asarray(Image.fromarray(p).resize((32, 32), Image.BILINEAR)) for p in photos])
    x = (prepared / 255.0).astype(np.float32).transpose(0, 3, 1, 2)
    assert bank.dtype == np.float32 and bank.shape == (5, 64)
    np.testing.assert_allclose(bank, vgg_features(x, VGG_LAST), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.load(out), bank)
    flat = agf_onnx.bank(vgg, photos, features=VGG_FLAT, preset="unit")
    np.testing.assert_allclose(flat, vgg_features(x, VGG_FLAT), rtol=1e-5, atol=1e-5)


def test_cli_bank_compile_explain(vgg, tmp_path, capsys):
    model, folder = tmp_path / "vgg.onnx", tmp_path / "images"
    onnx.save(vgg, model)
    folder.mkdir()
    rng = np.random.default_rng(20)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    assert main(["bank", str(model), str(folder), "-o", str(tmp_path / "bank.npy"), "--preset", "unit", "-q"]) == 0
    assert "float32 [4, 64]" in capsys.readouterr().out
    compiled = tmp_path / "vgg_ssl.onnx"
    assert main(["compile", str(model), "-o", str(compiled), "--ssl-bank", str(tmp_path / "bank.npy"),
                 "--features", VGG_LAST, "--ssl-mode", "sum", "-q"]) == 0
    assert main(["explain", str(compiled), str(folder), "-o", str(tmp_path / "out"), "--preset", "unit"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["settings"]["ssl_mode"] == "sum"
    x = np.stack([np.asarray(Image.open(folder / f"{i}.png")) for i in range(4)]).astype(np.float32) / 255.0
    outputs = run(onnx.load(compiled), {"x": x.transpose(0, 3, 1, 2), "target": np.full(4, -1)})
    bank = np.load(tmp_path / "bank.npy")
    others = nearest_other(bank, bank)  # the bank holds these very images: each finds another one
    for i, entry in enumerate(results["images"]):
        assert entry["ssl_target"] == outputs["ssl_target"][i] and entry["ssl_neighbour"] == outputs["ssl_neighbour"][i]
        assert entry["explained"][0]["class"] == outputs["ssl_target"][i]
        assert entry["ssl_neighbour"] == others[i] != i


def test_evaluate_reports_ssl_target(vgg, tmp_path):
    model, folder = tmp_path / "vgg.onnx", tmp_path / "data"
    onnx.save(vgg, model)
    folder.mkdir()
    rng = np.random.default_rng(21)
    rows = ["file,label,mask"]
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 8 + i:20 + i] = 255
        Image.fromarray(mask).save(folder / f"{i}.mask.png")
        rows.append(f"{i}.png,{i % 4},{i}.mask.png")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    bank = agf_onnx.bank(vgg, sorted(folder.glob("[0-9].png")), output=tmp_path / "bank.npy", preset="unit")
    assert main(["evaluate", str(model), str(folder), "-o", str(tmp_path / "eval"), "--methods", "agf,gradient",
                 "--preset", "unit", "--ssl-bank", str(tmp_path / "bank.npy"), "-q"]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    x = np.stack([np.asarray(Image.open(folder / f"{i}.png")) for i in range(4)]).astype(np.float32) / 255.0
    outputs = run(agf_onnx.compile(vgg, ssl_bank=bank), {"x": x.transpose(0, 3, 1, 2), "target": np.full(4, -1)})
    others = nearest_other(bank, bank)  # the bank holds these very images: each finds another one
    assert (others != np.arange(4)).all()
    for method in ("agf", "gradient"):
        entry = results["methods"][method]["ssl"]
        assert entry["mode"] == "diff" and entry["ssl_target"] == outputs["ssl_target"].tolist()
        assert entry["ssl_neighbour"] == others.tolist()
    assert results["settings"]["ssl_mode"] == "diff" and results["settings"]["features"] == VGG_LAST
    assert "'predicted' is the class t" in (tmp_path / "eval" / "results.md").read_text()
    # segmentation scores t's map (the explanation Algorithm 2 gives), not the label's
    scores = [metrics.segmentation(outputs["heatmap"][n, 0], np.asarray(Image.open(folder / f"{n}.mask.png")) > 0)
              for n in range(4)]
    segmentation = results["methods"]["agf"]["segmentation"]
    correct, total = sum(c for c, _, _ in scores), sum(t for _, t, _ in scores)
    assert segmentation["pixel_accuracy"] == round(100.0 * correct / total, 2)
    assert segmentation["mAP"] == round(100.0 * float(np.mean([ap for _, _, ap in scores])), 2)


# -- refusals -------------------------------------------------------------------------------------

class WithSideOutput(nn.Module):
    """The VGGish plus a second output computed from the image, off the path to the logits, and a
    reshape that folds half of each image's features into the batch axis ([2N, D/2]) on the path."""

    def __init__(self):
        super().__init__()
        self.net = VGG

    def forward(self, x):
        flat = torch.flatten(self.net.features(x), 1)
        merged = flat.reshape(-1, flat.shape[1] // 2) * 1.0  # two rows per image
        return self.net.classifier(merged.reshape(-1, flat.shape[1])), torch.tanh(x)


@pytest.fixture(scope="module")
def side_model() -> onnx.ModelProto:
    import io
    import warnings

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(WithSideOutput().eval(), (torch.randn(2, 3, 32, 32),), buffer, dynamo=False,
                          input_names=["x"], output_names=["y", "side"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"},
                                                                                      "side": {0: "N"}},
                          opset_version=17)
    return onnx.load_from_string(buffer.getvalue())


def _tensor(model: onnx.ModelProto, op_type: str) -> str:
    """The output of the first ``op_type`` node of the model as ``compile`` sees it."""
    canonical, _ = ssl.features_model(model, logits="y")
    return next(n.output[0] for n in canonical.graph.node if n.op_type == op_type)


@pytest.mark.parametrize("bank, message", [
    (np.zeros((4, 63), np.float32), "the bank's rows have 63 values but the features tensor"),
    (np.zeros((0, 64), np.float32), "the bank is empty"),
    (np.zeros((4, 64), np.int64), "holds int64 values; expected floats"),
    (np.zeros(64, np.float32), "expected a 2-D bank"),
    (np.full((2, 64), np.nan, np.float32), "NaN or Inf"),
])
def test_bad_banks_are_refused(vgg, bank, message):
    with pytest.raises(CompileError, match=message) as caught:
        agf_onnx.compile(vgg, ssl_bank=bank)
    assert "--ssl-bank" in str(caught.value)


def test_features_off_the_path_are_refused(side_model):
    side = _tensor(side_model, "Tanh")
    with pytest.raises(CompileError, match=f"--features '{side}' is not on the path from the image 'x' to the logits"):
        agf_onnx.compile(side_model, logits="y", ssl_bank=np.zeros((2, 3 * 32 * 32), np.float32), features=side)
    with pytest.raises(CompileError, match="--features 'nothing': the model has no such tensor"):
        agf_onnx.compile(side_model, logits="y", ssl_bank=np.zeros((2, 64), np.float32), features="nothing")


def test_batch_dependent_features_are_refused(side_model):
    merged = _tensor(side_model, "Mul")
    with pytest.raises(CompileError, match=f"--features '{merged}' has shape \\['N\\*2', 256\\]: the features need "
                                           "the batch axis"):
        agf_onnx.compile(side_model, logits="y", ssl_bank=np.zeros((2, 256), np.float32), features=merged)
    with pytest.raises(CompileError, match="has shape"):
        ssl.features_model(side_model, merged, logits="y")


def test_features_the_head_bypasses_are_refused(resnet):
    """Inside a residual block the skip branch reaches the logits around the features tensor."""
    canonical, _ = ssl.features_model(resnet)
    inner = next(n.output[0] for n in canonical.graph.node if n.name.endswith("layers.1.0/conv1/Conv"))
    with pytest.raises(CompileError, match="which does not come from"):
        agf_onnx.compile(resnet, ssl_bank=np.zeros((2, 16 * 4 * 4), np.float32), features=inner)


def test_ssl_arguments_need_a_bank(vgg):
    with pytest.raises(CompileError, match="--features and --ssl-mode need --ssl-bank"):
        agf_onnx.compile(vgg, ssl_mode="sum")
    with pytest.raises(CompileError, match="--ssl-mode median: expected one of diff, sum, none"):
        agf_onnx.compile(vgg, ssl_bank=np.zeros((2, 64), np.float32), ssl_mode="median")


def test_cli_errors_name_the_argument_and_write_nothing(vgg, tmp_path, capsys):
    model = tmp_path / "vgg.onnx"
    onnx.save(vgg, model)
    np.save(tmp_path / "narrow.npy", np.zeros((3, 10), np.float32))
    (tmp_path / "text.npy").write_text("not numpy")
    np.savetxt(tmp_path / "bank.csv", np.zeros((3, 64)), delimiter=",")
    cases = [(["--ssl-bank", str(tmp_path / "narrow.npy")], "has 64 per image"),
             (["--ssl-bank", str(tmp_path / "missing.npy")], "missing.npy: no such file"),
             (["--ssl-bank", str(tmp_path / "text.npy")], "not a NumPy .npy file"),
             (["--ssl-bank", str(tmp_path / "bank.csv")], "bank.csv: not a NumPy .npy file (`agf-onnx bank` writes one)"),
             (["--ssl-mode", "sum"], "--features and --ssl-mode need --ssl-bank")]
    for extra, message in cases:
        out = tmp_path / "out.onnx"
        assert main(["compile", str(model), "-o", str(out), *extra]) == 1
        error = capsys.readouterr().err
        assert error.startswith("agf-onnx: error:") and message in error and "Traceback" not in error
        assert "pickle" not in error and error.count("\n") == 1  # one line, none of NumPy's allow_pickle text
        assert not out.exists()
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    assert main(["bank", str(model), str(image), "-o", str(tmp_path / "b.npy"), "--features", "nothing"]) == 1
    assert "--features 'nothing': the model has no such tensor" in capsys.readouterr().err
    assert not (tmp_path / "b.npy").exists()


def test_explainer_reads_t_and_refuses_top_k_it_cannot_rank(vgg):
    x = np.random.default_rng(22).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    bank = agf_onnx.bank(vgg, list(x[::-1]), preset="unit")
    explainer = agf_onnx.Explainer(agf_onnx.compile(vgg, ssl_bank=bank), "cpu", preset="unit")
    explanation = explainer.explain(list(x))
    outputs = run(agf_onnx.compile(vgg, ssl_bank=bank), {"x": explainer.to_tensor(x), "target": np.full(3, -1)})
    np.testing.assert_array_equal(explanation.targets[:, 0], outputs["ssl_target"])
    # the bank holds them in reverse: each image's row (2, 1, 0) is itself, never its neighbour
    np.testing.assert_array_equal(explanation.ssl_neighbours, nearest_other(bank[::-1], bank))
    assert (explanation.ssl_neighbours != [2, 1, 0]).all()
    np.testing.assert_allclose(explanation.heatmaps, outputs["heatmap"], rtol=0, atol=1e-6)
    with pytest.raises(agf_onnx.CompileError, match="compile it with --top-k 2"):
        explainer.explain(list(x), top_k=2)
