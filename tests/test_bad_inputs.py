"""The bad-input matrix: every way a model file, an option, an image or an output path can be wrong
gets one clear ``agf-onnx: error:`` line naming the file, node or argument, the documented exit code,
no traceback and no output file (issue 14). The CLI runs in-process through ``agf_onnx.cli.main``, and
as a subprocess where a traceback or a closed pipe could only show there."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import agf_onnx
from agf_onnx import cli, modelfile
from agf_onnx.cli import BROKEN_PIPE_EXIT, main
from agf_onnx.runtime.explain import Explainer, ExplainError

from . import models
from .runtime import run
from .test_inputs import WithUnsupported, dynamic_size_export

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: opset → the IR version a file of that opset carries (ONNX's release table)
IR_FOR_OPSET = {7: 3, 8: 3, 9: 4, 10: 5, 11: 6, 12: 7, 13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}


def small_classifier(opset: int = 17, dtype: int = TensorProto.FLOAT, second_image: bool = False) -> onnx.ModelProto:
    """Conv → Relu → GlobalAveragePool → Flatten → MatMul on an 8×8 image, written at ``opset``:
    ops whose signature is the same from opset 7 to 21, so one graph serves every opset."""
    rng = np.random.default_rng(0)
    as_type = helper.tensor_dtype_to_np_dtype(dtype)
    weights = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(as_type), "w"),
               numpy_helper.from_array(rng.standard_normal((4, 5)).astype(as_type), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="pool"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "fc"], ["y"], name="fc")]
    inputs = [helper.make_tensor_value_info("x", dtype, ["N", 3, 8, 8])]
    if second_image:
        inputs.append(helper.make_tensor_value_info("x2", dtype, ["N", 3, 8, 8]))
        nodes[0].input[0] = "sum"
        nodes.insert(0, helper.make_node("Add", ["x", "x2"], ["sum"], name="add"))
    graph = helper.make_graph(nodes, "small", inputs, [helper.make_tensor_value_info("y", dtype, ["N", 5])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_FOR_OPSET[opset]
    return model


def quantised_classifier() -> onnx.ModelProto:
    """The same classifier as an int8 QLinearConv model (the form ONNX Runtime's quantiser writes)."""
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.uint8), "z")
    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.uint8), "wq")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="quantise"),
             helper.make_node("QLinearConv", ["xq", "s", "z", "wq", "s", "z", "s", "z"], ["cq"], name="qconv",
                              pads=[1, 1, 1, 1]),
             helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["c"], name="dequantise"),
             helper.make_node("GlobalAveragePool", ["c"], ["g"], name="pool"),
             helper.make_node("Flatten", ["g"], ["y"], name="flatten")]
    graph = helper.make_graph(nodes, "quantised",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [scale, zero, weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def qdq_classifier() -> onnx.ModelProto:
    """The small classifier in QDQ form (int8 weights behind DequantizeLinear, the image quantised and
    dequantised), as ONNX Runtime's static quantiser writes it."""
    model = small_classifier(13)
    graph = model.graph
    weight = next(t for t in graph.initializer if t.name == "w")
    graph.initializer.remove(weight)
    quantised = np.clip(np.round(numpy_helper.to_array(weight) / 0.02), -127, 127).astype(np.int8)
    graph.initializer.extend([numpy_helper.from_array(quantised, "w_q"),
                              numpy_helper.from_array(np.array(0.02, np.float32), "w_scale"),
                              numpy_helper.from_array(np.array(0, np.int8), "zero"),
                              numpy_helper.from_array(np.array(0.05, np.float32), "x_scale")])
    graph.node[0].input[0] = "x_dq"
    added = [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "zero"], ["w"], name="dequantise_w"),
             helper.make_node("QuantizeLinear", ["x", "x_scale", "zero"], ["x_q"], name="quantise_x"),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "zero"], ["x_dq"], name="dequantise_x")]
    for node in reversed(added):
        graph.node.insert(0, node)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every bad model file of the matrix, and one good one."""
    root = tmp_path_factory.mktemp("bad")
    good = small_classifier()
    paths = {name: root / f"{name}.onnx" for name in
             ("good", "garbage", "truncated", "empty", "unsupported", "dynamic", "float16", "quantised", "qdq",
              "two_images")}
    onnx.save(good, paths["good"])
    serialised = good.SerializeToString()
    paths["garbage"].write_bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes())
    paths["truncated"].write_bytes(serialised[:len(serialised) // 2])
    paths["empty"].write_bytes(b"")
    onnx.save(models.export(WithUnsupported()), paths["unsupported"])
    onnx.save(dynamic_size_export(), paths["dynamic"])
    onnx.save(small_classifier(dtype=TensorProto.FLOAT16), paths["float16"])
    onnx.save(quantised_classifier(), paths["quantised"])
    onnx.save(qdq_classifier(), paths["qdq"])
    onnx.save(small_classifier(second_image=True), paths["two_images"])
    paths["folder"] = root / "folder.onnx"
    paths["folder"].mkdir()
    paths["missing"] = root / "missing.onnx"
    return paths


def assert_clean_failure(code: int, expected_code: int, err: str, fragments, out_dir) -> None:
    """One error line naming what is wrong, the documented exit code, and nothing written."""
    assert code == expected_code, err
    assert err.startswith("agf-onnx: error:") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    leftovers = [f for f in os.listdir(out_dir) if f != "in"] if os.path.isdir(out_dir) else []
    assert not leftovers, leftovers


# (file, extra arguments, exit code, what the message must name)
COMPILE_MATRIX = {
    "garbage": ([], 1, ["garbage.onnx", "not a readable ONNX model"]),
    "truncated": ([], 1, ["truncated.onnx", "not a readable ONNX model"]),
    "empty": ([], 1, ["empty.onnx", "empty file"]),
    "folder": ([], 1, ["folder.onnx", "is a folder"]),
    "missing": ([], 1, ["missing.onnx", "no such model file"]),
    "unsupported": ([], 2, ["unsupported.onnx", "Sin (2)", "Cos (1)"]),
    "dynamic": ([], 1, ["dynamic.onnx", "--input-shape"]),
    "two_images": ([], 1, ["two_images.onnx", "x, x2", "--image"]),
    "good-bad-shape": (["--input-shape", "x=1,3,8"], 1, ["--input-shape", "x"]),
    "good-bad-image": (["--image", "nope"], 1, ["nope"]),
    "good-bad-logits": (["--logits", "nope"], 1, ["nope"]),
    "good-bad-steps": (["--method", "integrated-gradients", "--steps", "0"], 1, ["--steps 0"]),
    "good-bad-seed": (["--method", "smoothgrad", "--seed", str(2**31)], 1, ["--seed"]),
    "good-bad-top-k": (["--top-k", "0"], 1, ["top-k"]),
}


@pytest.mark.parametrize("case", sorted(COMPILE_MATRIX))
def test_compile_refuses_bad_input_clearly(case, files, tmp_path, capsys):
    extra, expected_code, fragments = COMPILE_MATRIX[case]
    out = tmp_path / "out" / "model_agf.onnx"
    code = main(["compile", str(files[case.split("-")[0]]), "-o", str(out), *extra])
    assert_clean_failure(code, expected_code, capsys.readouterr().err, fragments, tmp_path)


@pytest.mark.parametrize("case", ["garbage", "empty", "folder", "unsupported"])
def test_inspect_refuses_bad_input_clearly(case, files, capsys):
    code = main(["inspect", str(files[case])])
    captured = capsys.readouterr()
    assert code == 2
    if case == "unsupported":  # the report itself lists what is missing
        assert "Sin" in captured.out and "compiles: no" in captured.out
    else:
        assert captured.err.startswith("agf-onnx: error:") and f"{case}.onnx" in captured.err


@pytest.mark.parametrize("case", ["float16", "qdq", "quantised"])
def test_float16_and_quantised_files_compile_with_their_outputs_kept(case, files, tmp_path):
    """Once refused (FLOAT16 image, exit 1; QuantizeLinear/QLinearConv unsupported, exit 2): these
    deployed forms are explained through their float32 view (docs/deployed-formats.md), the original
    graph running untouched."""
    out = tmp_path / f"{case}_agf.onnx"
    assert main(["compile", str(files[case]), "-o", str(out), "-q"]) == 0
    original = onnx.load(files[case])
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 8))
    x = x.astype(np.float16 if case == "float16" else np.float32)
    expected = run(original, {"x": x}, optimize=False)["y"]
    outputs = run(onnx.load(out), {"x": x, "target": np.array([-1, -1])}, optimize=False)
    assert np.array_equal(outputs["y"], expected)
    assert outputs["heatmap"].shape == (2, 1, 8, 8) and np.isfinite(outputs["heatmap"]).all()


def test_a_second_image_input_is_chosen_with_image(files, tmp_path):
    out = tmp_path / "two.onnx"
    assert main(["compile", str(files["two_images"]), "--image", "x", "-o", str(out), "-q"]) == 0
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    outputs = run(onnx.load(out), {"x": x, "x2": x})
    assert outputs["heatmap"].shape == (2, 1, 8, 8) and np.isfinite(outputs["heatmap"]).all()


@pytest.mark.parametrize("opset", range(7, 22))
def test_every_opset_from_7_to_21_compiles_and_keeps_its_outputs(opset):
    model = small_classifier(opset)
    compiled = agf_onnx.compile(model)
    x = np.random.default_rng(opset).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(compiled, {"x": x})["y"], run(model, {"x": x})["y"], rtol=1e-6, atol=1e-6)
    assert np.isfinite(run(compiled, {"x": x})["heatmap"]).all()


# -- outputs that cannot be written ------------------------------------------------------------------

def test_output_under_a_regular_file_is_refused_before_compiling(files, tmp_path, capsys):
    blocker = tmp_path / "file.png"
    blocker.write_bytes(b"png")
    code = main(["compile", str(files["good"]), "-o", str(blocker / "x.onnx")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("agf-onnx: error:") and "file.png" in err and "not a folder" in err
    assert blocker.read_bytes() == b"png"


def test_output_that_is_a_folder_is_refused(files, tmp_path, capsys):
    code = main(["compile", str(files["good"]), "-o", str(tmp_path)])
    assert code == 1 and "is a folder" in capsys.readouterr().err


def test_explain_output_that_is_a_file_is_refused(files, images, tmp_path, capsys):
    taken = tmp_path / "results"
    taken.write_text("mine")
    code = main(["explain", str(files["good"]), str(images / "0.png"), "-o", str(taken)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("agf-onnx: error:") and "results: is a file" in err
    assert taken.read_text() == "mine"


def test_output_folder_without_write_permission_is_refused(files, tmp_path, capsys, monkeypatch):
    """Root ignores permission bits, so the permission check is what is stubbed here."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(cli.os, "access",
                        lambda path, mode: False if str(path) == str(locked) else real_access(path, mode))
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    for command in (["compile", str(files["good"]), "-o", str(locked / "m.onnx")],
                    ["explain", str(files["good"]), str(image), "-o", str(locked / "out")],
                    ["explain", str(files["good"]), str(image), "-o", str(locked)]):
        code = main(command)
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("agf-onnx: error:") and str(locked) in err and "write permission" in err
        assert os.listdir(locked) == []


def test_a_write_that_fails_late_leaves_nothing(files, tmp_path, capsys, monkeypatch):
    """A write refused only when it happens (a read-only file system): the error names the path."""
    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(tmp_path))

    monkeypatch.setattr(modelfile.tempfile, "mkdtemp", refuse)
    out = tmp_path / "m.onnx"
    code = main(["compile", str(files["good"]), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("agf-onnx: error:") and "m.onnx" in err and "Read-only" in err
    assert not out.exists()


def cli_process(*arguments: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agf_onnx", *arguments], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, cwd=REPOSITORY, timeout=300)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc, where no folder can be made")
def test_unwritable_output_as_a_process_prints_one_line(files):
    result = cli_process("compile", str(files["good"]), "-o", "/proc/agf-onnx-test/x.onnx")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("agf-onnx: error: -o /proc/agf-onnx-test/x.onnx")
    assert not os.path.exists("/proc/agf-onnx-test")


@pytest.mark.parametrize("arguments", [["rules"], ["inspect", "{good}", "--json"]])
def test_a_closed_pipe_ends_quietly(arguments, files):
    """``agf-onnx rules | head -5``: the reader is gone before anything is written."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = cli_process(*(a.format(good=files["good"]) for a in arguments), stdout=writer)
    finally:
        os.close(writer)
    assert result.returncode == BROKEN_PIPE_EXIT and result.stderr == ""


def test_garbage_model_as_a_process_prints_one_line(files):
    result = cli_process("compile", str(files["garbage"]), "-o", str(files["garbage"].parent / "x.onnx"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "garbage.onnx" in result.stderr


def test_evaluate_help_shows_percent_signs_and_every_exit_code():
    result = cli_process("evaluate", "--help")
    text = " ".join(result.stdout.split())
    assert "10%…90%" in text and "%%" not in text and "Exit 0" in text and ", 2 " in text


# -- explain: labels, classes and pixels --------------------------------------------------------------

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "labels.txt").write_text("\n".join(f"class {i}" for i in range(5)) + "\n")
    return folder


@pytest.mark.parametrize("target, fragments", [
    ("UNKNOWN", ["unknown label 'UNKNOWN'"]),
    ("1.5", ["'1.5'", "whole number"]),
])
def test_explain_rejects_a_bad_label_before_compiling(target, fragments, files, images, tmp_path, capsys, monkeypatch):
    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled before the label was checked")

    monkeypatch.setattr("agf_onnx.runtime.explain._compile_on_the_fly", no_compiling)
    out = tmp_path / "out"
    code = main(["explain", str(files["good"]), str(images / "0.png"), "-o", str(out), "--labels",
                 str(images / "labels.txt"), "--target", target])
    assert_clean_failure(code, 1, capsys.readouterr().err, fragments, out)


def test_explain_rejects_a_class_out_of_range(files, images, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["explain", str(files["good"]), str(images / "0.png"), "-o", str(out), "--target", "5"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("agf-onnx: error:") and "class 5 is out of range" in err and "5 classes" in err
    assert not (out / "results.json").exists()


def test_non_finite_pixels_are_a_per_image_error(files):
    explainer = Explainer(str(files["good"]), "cpu", preset="unit")
    good = np.random.default_rng(3).random((8, 8, 3))
    for bad_value in (np.nan, np.inf, -np.inf):
        bad = good.copy()
        bad[2, 3, 1] = bad_value
        with pytest.raises(ExplainError, match="NaN or infinite"):
            explainer.explain(bad)
    assert np.isfinite(explainer.explain(good).heatmaps).all()


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_a_non_finite_pixel_leaves_every_map_finite_and_the_other_samples_alone(bad_value):
    compiled = agf_onnx.compile(small_classifier())
    images = np.random.default_rng(5).random((2, 3, 8, 8)).astype(np.float32)
    clean = run(compiled, {"x": images[1:]})["heatmap"][0]
    images[0, 1, 2, 3] = bad_value
    heatmaps = run(compiled, {"x": images})["heatmap"]
    assert np.isfinite(heatmaps).all()
    np.testing.assert_allclose(heatmaps[1], clean, rtol=1e-6, atol=1e-7)


def test_compiled_model_target_out_of_range_or_of_the_wrong_type_is_refused_by_onnx_runtime(files):
    """The compiled graph cannot raise its own errors; ONNX Runtime refuses both (README, "The compiled model")."""
    compiled = agf_onnx.compile(str(files["good"]))
    x = np.zeros((1, 3, 8, 8), np.float32)
    with pytest.raises(Exception, match="GatherElements|out of bounds|indices"):
        run(compiled, {"x": x, "target": np.array([5])})
    with pytest.raises(Exception, match="target|int64|data type"):
        run(compiled, {"x": x, "target": np.array([1.0], np.float32)})


# -- weights beyond protobuf's 2 GiB -----------------------------------------------------------------

def test_weights_beyond_2_gib_in_a_sparse_external_file(tmp_path):
    """The weights lie past the 2 GiB mark of a sparse .data file (nothing of the gap is written)."""
    model = small_classifier()
    offset = 2**31 + 4096
    data = tmp_path / "big.onnx.data"
    with open(data, "wb") as handle:
        handle.truncate(offset)
        handle.seek(offset)
        for tensor in model.graph.initializer:
            start = handle.tell()
            handle.write(tensor.raw_data or numpy_helper.to_array(tensor).tobytes())
            tensor.ClearField("raw_data")
            tensor.ClearField("float_data")
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", str(start)), ("length", str(handle.tell() - start))):
                tensor.external_data.add(key=key, value=value)
    path = tmp_path / "big.onnx"
    onnx.save(model, path)
    if os.stat(data).st_blocks * 512 > 2**30:
        pytest.skip("this file system does not keep sparse files sparse")
    out = tmp_path / "out" / "big_agf.onnx"
    assert main(["compile", str(path), "-o", str(out), "-q"]) == 0
    x = np.random.default_rng(4).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(onnx.load(out), {"x": x})["y"], run(small_classifier(), {"x": x})["y"], rtol=1e-6)


def test_a_model_over_the_protobuf_limit_is_written_with_external_data(tmp_path, monkeypatch):
    """Over 2 GiB the weights go to OUT.data by themselves (the limit lowered to test it, not 2 GiB
    written), with the model file's permissions."""
    source = tmp_path / "vgg.onnx"
    net = models.seeded(models.VGGish(), seed=5)
    onnx.save(models.export(net), source)
    monkeypatch.setattr(modelfile, "PROTOBUF_LIMIT", 1000)
    out = tmp_path / "m.onnx"
    assert main(["compile", str(source), "-o", str(out), "-q"]) == 0
    data = tmp_path / "m.onnx.data"
    assert data.stat().st_size > sum(p.numel() * 4 for p in net.parameters()) // 2
    assert oct(data.stat().st_mode & 0o777) == oct(out.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
    x = torch.randn(1, 3, 32, 32).numpy()
    np.testing.assert_allclose(run(onnx.load(out), {"x": x})[onnx.load(source).graph.output[0].name],
                               net(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _Segmenter(torch.nn.Module):
    """A per-pixel classifier: scores [N, 5, H, W], no class per image."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, 5, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_logits_that_are_a_segmentation_map_are_named_not_an_internal_error(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "seg.onnx"
    torch.onnx.export(_Segmenter().eval(), (torch.randn(1, 3, 16, 16),), str(path), input_names=["x"],
                      output_names=["map"], dynamic_axes={"x": {0: "N"}, "map": {0: "N"}}, dynamo=False)
    out = tmp_path / "seg_agf.onnx"
    assert main(["compile", str(path), "-o", str(out), "--logits", "map"]) == 1
    error = capsys.readouterr().err
    assert error == (f"agf-onnx: error: {path}: --logits map: shape ['N', 5, 16, 16] is not [N, classes] (nor "
                     "[N, classes, 1, 1]); the class scores to explain hold one score per class for each image\n")
    assert not out.exists()
