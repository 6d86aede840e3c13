"""docs/deployed-formats.md's table is what the converters and the compiler give today: each form
of issue 26's first table, made by the real converter (torch.onnx TorchScript and dynamo,
onnxconverter-common, onnxruntime.quantization, ONNX Runtime's optimisers), compiled with agf,
gradcam and lrp (and chefer on the ViT), checked as ``deployed_forms.check`` says."""

from __future__ import annotations

import importlib.util
import pathlib

from . import deployed_forms

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _tool():
    path = ROOT / "tools" / "update_deployed_formats.py"
    spec = importlib.util.spec_from_file_location("update_deployed_formats", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deployed_formats_table_is_generated():
    tool = _tool()
    generated = deployed_forms.table()
    text = tool.PAGE.read_text()
    assert tool.render(text, generated) == text, \
        "docs/deployed-formats.md is stale: run python tools/update_deployed_formats.py"


def test_every_fp16_int8_and_ort_optimised_form_is_explained():
    """The issue's bar for the forms this page documents: every method gives a ✓ (compiles, the
    original outputs bit-identical, a finite map that differs between the top and bottom class)."""
    explained = ("fp16-keep-io", "fp16", "int8-qdq", "int8-dynamic", "int8-qoperator", "ort-extended", "ort-transformer")
    for key in explained:
        form = next(f for f in deployed_forms.FORMS if f.key == key)
        for name in form.nets:
            for method in deployed_forms.methods_for(name):
                assert deployed_forms.outcome(key, name, method) == "✓", (key, name, method)
