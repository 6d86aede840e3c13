"""The typed compile spec (issue 21): one record of every compile option, validated once when it
is made — before any model is read —, the same compile whether given as a spec or as keywords,
and recorded in the compiled model's metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest

import agf_onnx
from agf_onnx import CompileError, CompileSpec
from agf_onnx.compiler.modifiers import Modifiers

from . import models

PROTO = models.export(models.seeded(models.VGGish(), seed=5))
MISSING = "/nonexistent/model.onnx"  # a bad option is refused before the file is looked at


@pytest.mark.parametrize("fields, fragment", [
    ({"method": "nope"}, "unknown method 'nope'"),
    ({"top_k": 0}, "--top-k 0: must be at least 1"),
    ({"top_k": True}, "--top-k True"),
    ({"flat_policy": "some"}, "--flat-policy some"),
    ({"options": {"stepz": 3}}, "unknown method option 'stepz'"),
    ({"options": {"steps": "many"}}, "--steps 'many': expected int"),
    ({"options": {"residual": "signed"}}, "only RAP has a choice of residual-sum rule"),
    ({"features": "f"}, "--features and --ssl-mode need --ssl-bank"),
    ({"ssl_bank": np.zeros((2, 3), np.float32), "ssl_mode": "max"}, "--ssl-mode max"),
    ({"method": "clrp", "modifiers": Modifiers(contrast="others")}, "contrastive already"),
    ({"method": "smoothgrad", "modifiers": Modifiers(smooth=4)}, "averages over noisy copies already"),
    ({"modifiers": Modifiers(smooth=2, noise=-1.0)}, "--noise -1.0"),
])
def test_a_bad_option_is_refused_by_name_before_the_model_is_read(fields, fragment):
    with pytest.raises(CompileError, match=None) as spec_error:
        CompileSpec(**fields)
    assert fragment in str(spec_error.value)
    with pytest.raises(CompileError) as compile_error:  # the same error through compile, not "no such file"
        agf_onnx.compile(MISSING, **fields)
    assert str(compile_error.value) == str(spec_error.value)


def test_a_spec_and_its_keywords_compile_the_same_bytes():
    fields = {"method": "agf", "top_k": 2, "modifiers": Modifiers(contrast="softmax"), "flat": ["/features/features.3/Conv"]}
    by_spec = agf_onnx.compile(PROTO, CompileSpec(**fields))
    by_keywords = agf_onnx.compile(PROTO, **fields)
    assert by_spec.SerializeToString(deterministic=True) == by_keywords.SerializeToString(deterministic=True)


def test_the_compiled_model_records_its_spec():
    spec = CompileSpec(method="integrated-gradients", options={"steps": 4}, top_k=3,
                       modifiers=Modifiers(contrast="others"), input_shapes={"x": [1, 3, 32, 32]})
    compiled = agf_onnx.compile(PROTO, spec)
    record = json.loads(agf_onnx.contract.metadata(compiled)[agf_onnx.contract.SPEC])
    assert record["method"] == "integrated-gradients" and record["options"] == {"steps": 4}
    assert record["top_k"] == 3 and record["modifiers"] == {"contrast": "others"}
    assert record["input_shapes"] == {"x": [1, 3, 32, 32]} and record["flat_policy"] == "authors"
    assert set(record) == {field for field in CompileSpec.__dataclass_fields__}
    # what the record says compiles the same model again
    again = CompileSpec(**{**record, "modifiers": Modifiers(**record["modifiers"])})
    assert again == spec


def test_a_bank_is_recorded_by_its_shape():
    spec = CompileSpec(ssl_bank=np.zeros((4, 8), np.float32))
    assert json.loads(spec.record())["ssl_bank"] == [4, 8]


def test_spec_and_keywords_together_are_a_caller_error():
    with pytest.raises(TypeError, match="either a CompileSpec or keyword options"):
        agf_onnx.compile(PROTO, CompileSpec(), method="lrp")
    with pytest.raises(TypeError, match="unknown compile option"):
        agf_onnx.compile(PROTO, methd="lrp")


def test_replace_validates_again():
    spec = CompileSpec(method="rap", options={"residual": "signed"})
    with pytest.raises(CompileError, match="only RAP"):
        spec.replace(method="agf")
