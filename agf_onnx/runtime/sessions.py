"""The one place where agf_onnx creates ONNX Runtime sessions: provider choice and precision.

**fp32 on CUDA.** ONNX Runtime's CUDA provider computes float32 convolutions and GEMMs in TF32
unless ``use_tf32=0``: their operands are rounded to a 10-bit mantissa (relative error up to
2⁻¹¹ ≈ 4.9·10⁻⁴ per operand instead of float32's 2⁻²⁴ ≈ 6·10⁻⁸). A forward pass shrugs that
off, but gradient-based maps do not: a deep ReLU network's gradient is discontinuous in the
weights ("shattered"). Measured on an H100 (ONNX Runtime 1.31.1, seeded ResNet-50, 224², top
class, ``tools/bench_gpu.py``), r of the heatmap with the float64 reference: AGF 0.921 under the
TF32 default against 0.999997 with ``use_tf32=0``; the plain gradient 0.676 against 0.9998;
gradient × input 0.756 against 0.9999 (README "GPUs"; ``tools/precision.py`` emulates the
rounding on a CPU for every method). So every session made here passes ``use_tf32=0`` to the
CUDA provider; ``allow_tf32=True`` opts in to the faster, inexact maps.

**Provider choice.** ``"auto"`` takes CUDA when ONNX Runtime can really use it, else the CPU;
``"cuda"`` insists; ``"cpu"`` never tries. The GPU wheel lists the CUDA provider even where its
libraries or a GPU are missing, and then silently builds a CPU-only session, so the probe is
the session itself: CUDA counts only if ``get_providers()`` of the session made with it names
it. The CPU provider stays behind CUDA in the list, as ONNX Runtime's fallback for any node
the CUDA provider has no kernel for (the compiled graphs need none: on an H100 the compiled
VGG-19 of every method loads with ``session.disable_cpu_ep_fallback=1``, see ``cpu_fallback``).

**CUDA graphs** (``cuda_graph=True``, ``enable_cuda_graph=1``): ONNX Runtime captures the
session's kernel launches once and replays them, which removes the per-kernel launch cost that
dominates a batch of one (a compiled graph launches ~12,500 kernels per run). It needs fixed
input and output shapes and addresses (IO binding to buffers on the GPU, see
``explain.Explainer``) and the CUDA provider for every node; there is no CPU equivalent.
"""

from __future__ import annotations

import os
from typing import Any

import onnx

from ..errors import CompileError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PROVIDER_CHOICES = ("auto", "cuda", "cpu")


class ProviderError(CompileError):
    """The provider asked for cannot be used here, or an option needs another provider."""


def cuda_options(*, allow_tf32: bool = False, cuda_graph: bool = False) -> dict[str, str]:
    """The CUDA provider's options: fp32 convs/GEMMs unless ``allow_tf32``; CUDA graphs if asked."""
    options = {"use_tf32": "1" if allow_tf32 else "0"}
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    return options


def cuda_providers(*, allow_tf32: bool = False, cuda_graph: bool = False,
                   cpu_fallback: bool = True) -> list[tuple[str, dict[str, str]] | str]:
    """``providers=`` for a CUDA session: CUDA with :func:`cuda_options`, then the CPU fallback."""
    return [(CUDA, cuda_options(allow_tf32=allow_tf32, cuda_graph=cuda_graph))] + ([CPU] if cpu_fallback else [])


def cuda_listed() -> bool:
    """Whether this ONNX Runtime build lists the CUDA provider (not proof that it works)."""
    import onnxruntime as ort

    return CUDA in ort.get_available_providers()


def session_provider(session: Any) -> str:
    """``"cuda"`` if the session runs on the CUDA provider, else ``"cpu"``."""
    return "cuda" if CUDA in session.get_providers() else "cpu"


def create_session(model: onnx.ModelProto | bytes | str | os.PathLike, provider: str = "auto", *,
                   allow_tf32: bool = False, cuda_graph: bool = False, cpu_fallback: bool = True,
                   options: Any = None) -> Any:
    """An ``onnxruntime.InferenceSession`` on ``provider`` (``auto``, ``cuda`` or ``cpu``).

    Args:
        model: a ``ModelProto``, its serialised bytes or a file path.
        provider: ``"auto"``: CUDA when ONNX Runtime can use it, else the CPU; ``"cuda"``: CUDA or
            a ``ProviderError``; ``"cpu"``: the CPU.
        allow_tf32: let CUDA round conv/GEMM operands to TF32 (faster, inexact maps; see above).
        cuda_graph: capture and replay the run as a CUDA graph (fixed shapes, IO binding; CUDA only).
        cpu_fallback: ``False``: on CUDA, no CPU provider and ``session.disable_cpu_ep_fallback=1``,
            so that the session fails to load unless every node runs on CUDA (a placement check).
        options: an ``onnxruntime.SessionOptions``.

    Raises:
        ProviderError: an unknown provider, ``"cuda"`` or ``cuda_graph`` where CUDA cannot be used.
    """
    import onnxruntime as ort

    if provider not in PROVIDER_CHOICES:
        raise ProviderError(f"unknown provider '{provider}' ({', '.join(PROVIDER_CHOICES)})")
    if cuda_graph and provider == "cpu":
        raise ProviderError("cuda_graph=True needs the CUDA provider (CUDA graphs are CUDA only), not provider 'cpu'")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else \
        model if isinstance(model, bytes) else os.fspath(model)
    session = None
    if provider in ("auto", "cuda") and cuda_listed():
        # the GPU wheel lists CUDA even where its libraries are missing: try it, quietly for auto
        ort.set_default_logger_severity(4 if provider == "auto" else 3)
        providers = cuda_providers(allow_tf32=allow_tf32, cuda_graph=cuda_graph, cpu_fallback=cpu_fallback)
        if not cpu_fallback:
            options = options or ort.SessionOptions()
            options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        try:
            session = ort.InferenceSession(source, options, providers=providers)
        finally:
            ort.set_default_logger_severity(3)
        if session_provider(session) != "cuda":
            session = None
    if session is None:
        if provider == "cuda":
            raise ProviderError("--provider cuda: ONNX Runtime cannot use CUDA here (no CUDA build or no GPU)")
        if cuda_graph:
            raise ProviderError("cuda_graph=True needs the CUDA provider (CUDA graphs are CUDA only), and ONNX "
                                "Runtime cannot use CUDA here (no CUDA build or no GPU)")
        session = ort.InferenceSession(source, options, providers=[CPU])
    return session


def with_target(session: Any, feeds: dict, target: int = -1) -> dict:
    """``feeds`` plus ``target`` (int64 ``[N]``, every sample ``target``; −1 = its top class) when the session
    is a compiled model's (``target`` is a required input of every compiled model); unchanged otherwise."""
    if "target" not in {info.name for info in session.get_inputs()} or "target" in feeds:
        return feeds
    import numpy as np

    return {**feeds, "target": np.full(len(next(iter(feeds.values()))), target, np.int64)}
