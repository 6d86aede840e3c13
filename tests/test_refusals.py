"""One refusal for one file (issue 26): the ops without rules are listed once, before any
method-specific work, so every ``--method`` gives the same message and exit 2; "fixed batch" is
said only where a fixed batch is the cause; "which output holds the class scores" only where no
float [N, classes] output exists. Files made by the real exporters (TorchScript, ONNX Runtime)."""

from __future__ import annotations

import io
import os
import warnings

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agf_onnx.cli import main

from . import models

METHODS = ["agf", "gradcam", "lrp", "lrp-ab", "rap", "smoothgrad", "integrated-gradients", "fullgrad", "chefer"]


class SpatialTransformer(nn.Module):
    """A conv net behind a spatial transformer (``F.grid_sample``: GridSample, which has no rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.localise = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(4, 6))
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.localise(x).view(-1, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return self.head(self.features(F.grid_sample(x, grid, align_corners=False)))


class BatchInFeatures(nn.Module):
    """``x.reshape(-1)`` flattens the whole batch into the features of a Linear layer: exported at
    batch 1, the file cannot take another batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).reshape(-1))[None]


def _torchscript(net: nn.Module, path, dynamic: bool = True, opset: int = 17) -> None:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.randn(1, 3, 32, 32),), buffer, dynamo=False, input_names=["x"],
                          output_names=["y"], opset_version=opset,
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}} if dynamic else None)
    path.write_bytes(buffer.getvalue())


def _compile_error(path, method: str, tmp_path, capsys) -> tuple[int, str]:
    out = tmp_path / f"{method}.onnx"
    code = main(["compile", str(path), "-o", str(out), "--method", method])
    err = capsys.readouterr().err
    assert not out.exists() and "Traceback" not in err
    return code, err


def test_every_method_gives_the_same_unsupported_op_refusal(tmp_path, capsys):
    path = tmp_path / "stn.onnx"
    _torchscript(SpatialTransformer(), path, opset=20)  # AffineGrid: opset 20
    answers = {method: _compile_error(path, method, tmp_path, capsys) for method in METHODS}
    first = answers["agf"]
    assert first[0] == 2
    assert "GridSample (1): /GridSample" in first[1] and "AffineGrid (1)" in first[1] and "stn.onnx" in first[1]
    for method, answer in answers.items():
        assert answer == first, f"--method {method} answers differently"


def test_a_fixed_batch_is_named_only_where_it_is_the_cause(tmp_path, capsys):
    fixed = tmp_path / "fixed.onnx"
    _torchscript(BatchInFeatures(), fixed, dynamic=False)
    code, err = _compile_error(fixed, "agf", tmp_path, capsys)
    assert code == 1 and "fixed batch of 1" in err and "MatMul node" in err and "fixed.onnx" in err
    # the same refusal of GridSample for the file exported at batch 1: its batch is not the cause
    stn = tmp_path / "stn_fixed.onnx"
    _torchscript(SpatialTransformer(), stn, dynamic=False, opset=20)
    code, err = _compile_error(stn, "agf", tmp_path, capsys)
    assert code == 2 and "GridSample" in err and "fixed batch" not in err


def test_the_class_scores_are_found_behind_ops_shape_inference_does_not_know(tmp_path, capsys):
    """ONNX Runtime's own optimised file (com.microsoft FusedConv: no ONNX shape inference): the
    logits output is still a float [N, 10] output, so the class scores are never the question."""
    source, optimised = tmp_path / "cnn.onnx", tmp_path / "cnn_ort.onnx"
    onnx.save(models.export(models.seeded(models.ResNetish())), source)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = os.fspath(optimised)
    ort.InferenceSession(os.fspath(source), options, providers=["CPUExecutionProvider"])
    assert any(n.domain == "com.microsoft" for n in onnx.load(optimised).graph.node)
    for method in ("agf", "gradcam", "lrp"):
        out = tmp_path / f"{method}.onnx"
        code = main(["compile", str(optimised), "-o", str(out), "--method", method, "-q"])
        err = capsys.readouterr().err
        assert "class scores" not in err and "Traceback" not in err
        assert code == 0 or (code == 2 and "com.microsoft" in err)


@pytest.mark.parametrize("outputs, fragment", [(1, "no [N, classes] float output"), (2, "several [N, classes]")])
def test_the_class_scores_question_is_asked_only_without_one_answer(outputs, fragment, tmp_path, capsys):
    class Maps(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(4, 10)

        def forward(self, x):
            maps = self.conv(x)
            if outputs == 1:
                return maps  # a segmentation-like [N, 4, H, W] output: no class scores
            return self.head(maps.mean((2, 3))), self.head(maps.amax((2, 3)))

    path = tmp_path / "maps.onnx"
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Maps().eval(), (torch.randn(1, 3, 8, 8),), buffer, dynamo=False, input_names=["x"],
                          opset_version=17, dynamic_axes={"x": {0: "N"}})
    path.write_bytes(buffer.getvalue())
    code, err = _compile_error(path, "agf", tmp_path, capsys)
    assert code == 1 and "class scores" in err and fragment in err
