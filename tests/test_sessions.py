"""Every ONNX Runtime session agf_onnx makes on CUDA asks for fp32 (``use_tf32=0``) unless TF32 is
allowed, and CUDA graphs run through fixed buffers. This machine has no GPU, so
``onnxruntime.InferenceSession`` is replaced by a recorder that keeps the ``providers=`` it was
given, runs the model on the CPU and reports the providers a working CUDA build would."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

import agf_onnx
from agf_onnx.cli import main
from agf_onnx.evaluate import Evaluation
from agf_onnx.runtime import sessions
from agf_onnx.runtime.explain import Explainer, ExplainError
from agf_onnx.runtime.sessions import ProviderError, create_session

from . import models

NET = models.seeded(models.ResNetish(), seed=5)
REAL_SESSION = ort.InferenceSession
FP32 = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
TF32 = [("CUDAExecutionProvider", {"use_tf32": "1"}), "CPUExecutionProvider"]


class RecordingSession:
    """Stands in for ``InferenceSession``: records ``providers``, runs on the CPU provider, and reports
    CUDA as in use when it was asked for and ``cuda_works``."""

    calls: list = []
    cuda_works = True

    def __init__(self, model, options=None, providers=None, **kwargs):
        RecordingSession.calls.append(providers)
        self._session = REAL_SESSION(model, options, providers=["CPUExecutionProvider"])
        asked = [p[0] if isinstance(p, tuple) else p for p in providers or []]
        self._providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] \
            if "CUDAExecutionProvider" in asked and self.cuda_works else ["CPUExecutionProvider"]

    def get_providers(self):
        return self._providers

    def __getattr__(self, name):
        return getattr(self._session, name)


@pytest.fixture
def recorder(monkeypatch):
    RecordingSession.calls, RecordingSession.cuda_works = [], True
    monkeypatch.setattr(ort, "InferenceSession", RecordingSession)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    return RecordingSession


@pytest.fixture(scope="module")
def original_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "resnet.onnx"
    onnx.save(models.export(NET, 32, softmax=True), path)
    return path


@pytest.fixture(scope="module")
def compiled_path(original_path):
    path = original_path.with_name("resnet_agf.onnx")
    onnx.save(agf_onnx.compile(original_path), path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A class-folder data set: two images in each of the classes 0 and 3."""
    folder = tmp_path_factory.mktemp("data")
    generator = np.random.default_rng(0)
    for label in ("0", "3"):
        (folder / label).mkdir()
        for n in range(2):
            Image.fromarray(generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / label / f"{n}.png")
    return folder


def photos(count: int) -> list[np.ndarray]:
    return list(np.random.default_rng(1).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8))


def test_cuda_options_ask_for_fp32_unless_tf32_is_allowed():
    assert sessions.cuda_providers() == FP32
    assert sessions.cuda_providers(allow_tf32=True) == TF32
    assert sessions.cuda_options(cuda_graph=True) == {"use_tf32": "0", "enable_cuda_graph": "1"}
    assert sessions.cuda_providers(cpu_fallback=False) == FP32[:1]


@pytest.mark.parametrize("provider", ["auto", "cuda"])
def test_create_session_on_cuda_passes_use_tf32_0(recorder, compiled_path, provider):
    assert sessions.session_provider(create_session(compiled_path, provider)) == "cuda"
    assert sessions.session_provider(create_session(compiled_path, provider, allow_tf32=True)) == "cuda"
    assert recorder.calls == [FP32, TF32]


def test_a_placement_check_offers_cuda_alone_and_forbids_the_cpu_fallback(recorder, compiled_path, monkeypatch):
    options = []
    monkeypatch.setattr(ort.SessionOptions, "add_session_config_entry",
                        lambda self, key, value: options.append((key, value)))
    create_session(compiled_path, "cuda", cpu_fallback=False)
    assert recorder.calls == [FP32[:1]] and options == [("session.disable_cpu_ep_fallback", "1")]


def test_cpu_is_never_offered_cuda_and_auto_falls_back_when_cuda_does_not_work(recorder, compiled_path):
    assert sessions.session_provider(create_session(compiled_path, "cpu")) == "cpu"
    assert recorder.calls == [["CPUExecutionProvider"]]
    recorder.cuda_works = False  # the GPU wheel without its CUDA libraries, or no GPU
    recorder.calls = []
    assert sessions.session_provider(create_session(compiled_path, "auto")) == "cpu"
    assert recorder.calls == [FP32, ["CPUExecutionProvider"]]
    with pytest.raises(ProviderError, match="--provider cuda: ONNX Runtime cannot use CUDA"):
        create_session(compiled_path, "cuda")
    with pytest.raises(ProviderError, match="unknown provider 'gpu'"):
        create_session(compiled_path, "gpu")


def test_explainer_on_cuda_is_fp32_and_gives_the_cpu_maps(recorder, compiled_path):
    explainer = Explainer(compiled_path)  # provider auto
    assert explainer.provider == "cuda" and recorder.calls == [FP32]
    Explainer(compiled_path, "cuda", allow_tf32=True)
    assert recorder.calls[-1] == TF32
    on_cpu = Explainer(compiled_path, "cpu")
    assert recorder.calls[-1] == ["CPUExecutionProvider"]
    np.testing.assert_array_equal(explainer.explain(photos(2)).heatmaps, on_cpu.explain(photos(2)).heatmaps)


@pytest.mark.parametrize("allow_tf32, expected", [(False, FP32), (True, TF32)])
def test_evaluation_sessions_on_cuda(recorder, original_path, data, allow_tf32, expected):
    evaluation = Evaluation(original_path, ["gradient", "lrp"], preset="unit", allow_tf32=allow_tf32)
    evaluation.run(agf_onnx.evaluate.load_dataset(data))
    # the first method's explainer, the classifier, the second method's explainer
    assert evaluation.provider == "cuda" and recorder.calls == [expected] * 3


@pytest.mark.parametrize("flag, expected", [([], FP32), (["--allow-tf32"], TF32)])
def test_cli_sessions_on_cuda(recorder, compiled_path, original_path, data, tmp_path, capsys, flag, expected):
    assert main(["explain", str(compiled_path), str(data / "0" / "0.png"), "-o", str(tmp_path / "e"), *flag]) == 0
    assert "provider: cuda" in capsys.readouterr().out and recorder.calls == [expected]
    settings = json.loads((tmp_path / "e" / "results.json").read_text())["settings"]
    assert settings["provider"] == "cuda" and settings["allow_tf32"] == bool(flag)
    recorder.calls = []
    assert main(["evaluate", str(original_path), str(data), "-o", str(tmp_path / "v"), "--methods", "agf,gradient",
                 "--preset", "unit", "--provider", "cuda", "-q", *flag]) == 0
    assert recorder.calls == [expected] * 3


def test_cli_provider_cuda_without_cuda_fails_clearly(recorder, compiled_path, data, tmp_path, capsys):
    recorder.cuda_works = False
    out = tmp_path / "e"
    assert main(["explain", str(compiled_path), str(data / "0" / "0.png"), "-o", str(out),
                 "--provider", "cuda"]) == 1
    assert "agf-onnx: error: --provider cuda: ONNX Runtime cannot use CUDA" in capsys.readouterr().err
    assert not out.exists()


# -- CUDA graphs ------------------------------------------------------------------------------


def test_cuda_graph_needs_cuda(recorder, compiled_path):
    with pytest.raises(ProviderError, match="CUDA graphs are CUDA only"):
        Explainer(compiled_path, "cpu", cuda_graph=True)
    recorder.cuda_works = False
    with pytest.raises(ProviderError, match="cuda_graph=True needs the CUDA provider"):
        Explainer(compiled_path, "auto", cuda_graph=True)


@pytest.fixture
def buffers_on_the_cpu(monkeypatch):
    """IO binding exactly as on CUDA, but with the bound buffers in CPU memory (no GPU here)."""
    make = ort.OrtValue.ortvalue_from_shape_and_type
    devices = []

    def on_cpu(shape, dtype, device, index=0):
        devices.append(device)
        return make(shape, dtype, "cpu", 0)

    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_shape_and_type", staticmethod(on_cpu))
    return devices


def test_cuda_graph_binds_fixed_buffers_and_pads_the_batch(recorder, buffers_on_the_cpu, compiled_path):
    graphed = Explainer(compiled_path, cuda_graph=True, batch_size=4)
    assert recorder.calls == [[("CUDAExecutionProvider", {"use_tf32": "0", "enable_cuda_graph": "1"}),
                               "CPUExecutionProvider"]]
    assert buffers_on_the_cpu == ["cuda"] * 4  # x, target; y, heatmap
    plain = Explainer(compiled_path, "cpu")
    for count in (4, 3, 1):  # a full batch, and smaller ones padded to the graph's fixed batch
        expected, got = plain.explain(photos(count), top_k=2), graphed.explain(photos(count), top_k=2)
        # float32 rounding only: a target fed as [N] instead of [1] changes the order of some sums
        np.testing.assert_allclose(got.heatmaps, expected.heatmaps, rtol=0, atol=1e-4)
        np.testing.assert_array_equal(got.targets, expected.targets)
    with pytest.raises(ExplainError, match="a batch of 5 exceeds the graph's fixed batch 4"):
        graphed.explain_photos(np.stack(photos(5)))
    assert graphed.explain(photos(6)).heatmaps.shape == (6, 1, 32, 32)  # explain() batches by batch_size


def test_cuda_graph_refuses_shapes_that_vary_beyond_the_batch(buffers_on_the_cpu):
    from types import SimpleNamespace

    from agf_onnx.runtime.explain import _CudaGraphRun

    def tensor(name, shape, kind="tensor(float)"):
        return SimpleNamespace(name=name, shape=shape, type=kind)

    session = SimpleNamespace(io_binding=lambda: SimpleNamespace(bind_ortvalue_input=lambda *a: None,
                                                                 bind_ortvalue_output=lambda *a: None),
                              get_inputs=lambda: [tensor("x", ["N", 3, 32, 32])],
                              get_overridable_initializers=lambda: [tensor("target", ["T"], "tensor(int64)")],
                              get_outputs=lambda: [tensor("heatmap", ["N", 1, "H", "W"])])
    with pytest.raises(ExplainError, match=r"static shapes apart from the batch axis: 'heatmap' is tensor\(float\) "
                                           r"\['N', 1, 'H', 'W'\]"):
        _CudaGraphRun(session, 2)
