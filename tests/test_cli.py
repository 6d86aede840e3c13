"""The ``agf-onnx`` command: writes a working model, or fails with a clear message, a non-zero
exit code and no output file."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import agf_onnx
from agf_onnx.cli import main

from . import models
from .runtime import run
from .test_inputs import WithUnsupported, dynamic_size_export

NET = models.seeded(models.ResNetish(), seed=21)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "resnet.onnx"
    onnx.save(models.export(NET, fold=False), path)
    return path


def test_compile_writes_a_model_that_runs(model_path, tmp_path, capsys):
    out = tmp_path / "out" / "resnet_agf.onnx"
    assert main(["compile", str(model_path), "-o", str(out)]) == 0
    assert "explanation nodes" in capsys.readouterr().out
    x = torch.randn(2, 3, 32, 32).numpy()
    outputs = run(onnx.load(out), {"x": x, "target": np.array([1, 2])})
    assert outputs["heatmap"].shape == (2, 1, 32, 32) and np.isfinite(outputs["heatmap"]).all()


def test_console_script_help_documents_every_option():
    result = subprocess.run([sys.executable, "-m", "agf_onnx", "compile", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for option in ("--input-shape", "--logits", "--image", "--flat-policy", "--flat", "--full", "--method",
                   "--external-data", "--no-check", "target", "heatmap"):
        assert option in result.stdout


def test_flat_and_full_overrides_change_the_map(model_path, tmp_path):
    conv = next(n.name for n in onnx.load(model_path).graph.node if n.op_type == "Conv"
                and list(onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "kernel_shape")
                == [[3, 3]] and n.input[0] != "x")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).numpy()
    maps = []
    for extra in ([], ["--flat", conv]):
        out = tmp_path / f"m{len(maps)}.onnx"
        assert main(["compile", str(model_path), "-o", str(out), "-q", *extra]) == 0
        maps.append(run(onnx.load(out), {"x": x})["heatmap"])
    assert np.abs(maps[0] - maps[1]).max() > 1e-3


@pytest.mark.parametrize("arguments, message, code", [
    (["missing.onnx"], "no such model file", 1),
    (["{model}", "--input-shape", "x"], "expected NAME=d0,d1", 1),
    (["{model}", "--input-shape", "y=1,3,32,32"], "has no input 'y'", 1),
    (["{model}", "--flat", "nope"], "--flat: no Conv node named nope", 1),
    (["{model}", "--logits", "nope"], "no tensor 'nope'", 1),
    (["{model}", "--image", "nope"], "no input 'nope'", 1),
    (["{not_onnx}"], "not a readable ONNX model", 1),
    (["{unsupported}"], "Sin (2)", 2),
    (["{dynamic}"], "--input-shape", 1),
])
def test_bad_input_fails_clearly_without_output(arguments, message, code, model_path, tmp_path, capsys):
    paths = {"model": model_path, "not_onnx": tmp_path / "notes.onnx", "unsupported": tmp_path / "sin.onnx",
             "dynamic": tmp_path / "dynamic.onnx"}
    paths["not_onnx"].write_text("not a model")
    onnx.save(models.export(WithUnsupported()), paths["unsupported"])
    onnx.save(dynamic_size_export(), paths["dynamic"])
    out = tmp_path / "out.onnx"
    assert main(["compile", *(a.format(**paths) for a in arguments), "-o", str(out)]) == code
    err = capsys.readouterr().err
    assert err.startswith("agf-onnx: error:") and message in err
    assert not out.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".agf-onnx-")]


def test_external_data_in_gives_external_data_out(tmp_path):
    source = tmp_path / "in.onnx"
    onnx.save(models.export(NET), source, save_as_external_data=True, location="in.onnx.data", size_threshold=0)
    out = tmp_path / "out.onnx"
    assert main(["compile", str(source), "-o", str(out), "-q"]) == 0
    assert (tmp_path / "out.onnx.data").exists()
    outputs = run(onnx.load(out), {"x": torch.randn(1, 3, 32, 32).numpy()})
    assert np.isfinite(outputs["heatmap"]).all()


def test_rules_prints_the_coverage_table(capsys):
    assert main(["rules"]) == 0
    table = capsys.readouterr().out
    assert "| Conv | `conv.py` |" in table and "`zB`" in table and "Softmax" in table


class _Wide(torch.nn.Module):
    """A 224×224 classifier with 300 classes, its input named as the README's example names it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)
        self.fc = torch.nn.Linear(8, 300)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_the_readmes_onnx_runtime_example_runs_and_loads_cuda_only_where_it_can(tmp_path):
    """The getting-started page's Python example, verbatim but for the file name, in a fresh process: on a machine
    where the GPU wheel cannot load CUDA (CI) it prints no 'Failed to load' error and runs on the CPU."""
    import re

    torch.manual_seed(0)
    original = tmp_path / "model.onnx"
    torch.onnx.export(_Wide().eval(), (torch.randn(1, 3, 224, 224),), str(original), input_names=["input"],
                      output_names=["scores"], dynamic_axes={"input": {0: "N"}, "scores": {0: "N"}}, dynamo=False)
    onnx.save(agf_onnx.compile(str(original)), tmp_path / "model_agf.onnx")
    page = (pathlib.Path(__file__).parents[1] / "docs" / "getting-started.md").read_text()
    example = re.search(r"```python\n(import numpy as np\nimport onnxruntime as ort\n.*?)```", page, re.S).group(1)
    assert "get_providers()" in example and "set_default_logger_severity(4)" in example
    done = subprocess.run([sys.executable, "-c", example + "\nprint(heatmap.shape)\n"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Failed to load" not in done.stderr and "libcublas" not in done.stderr
    providers, shape = done.stdout.splitlines()[:2]
    assert providers in ("['CPUExecutionProvider']", "['CUDAExecutionProvider', 'CPUExecutionProvider']")
    assert shape == "(2, 1, 224, 224)"
