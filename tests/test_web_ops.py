"""Every op type the compiler emits for the test nets, with every method, has a kernel in onnxruntime-web's
WebGPU backend (the installed npm package's own operator table, docs/webgpu-operators.md, generated from its
kernel registrations) at the compiled models' opset; the WASM backend runs these very graphs in
test_web_runtimes.py. And no node uses an output the WebGPU kernels refuse (MaxPool's ``Indices``)."""

from __future__ import annotations

import functools
import re

import agf_onnx
from agf_onnx.compiler.builder import TARGET_OPSET
from agf_onnx.compiler.methods import METHODS

from . import models
from . import token_models as tm
from .runtime import js_install

NETS = {"vgg": lambda: models.export(models.seeded(models.VGGish(), seed=3)),
        "resnet": lambda: models.export(models.seeded(models.ResNetish(models.BasicBlock, (1, 1), (8, 16)), seed=3)),
        "vit": lambda: tm.export(tm.vit(seed=2))}
#: op type → the outputs WebGPU's kernel cannot produce (index of the first refused output)
REFUSED_OUTPUTS = {"MaxPool": 1}


def webgpu_kernels() -> dict[str, list[tuple[int, int]]]:
    """{op type: [(first, last opset)]} for the ai.onnx domain, from the package's operator table."""
    table = (js_install() / "onnxruntime-web" / "docs" / "webgpu-operators.md").read_text()
    kernels = {}
    for op, opsets in re.findall(r"^\| (\w+) \| ([^|]*)\|", table, re.M):
        found = re.search(r"ai\.onnx\(([^)]*)\)", opsets)
        if found:
            kernels[op] = [(int(r.split("-")[0].rstrip("+")), int(r.split("-")[1]) if "-" in r else 10**6)
                           for r in found.group(1).split(",")]
    return kernels


@functools.lru_cache(maxsize=None)
def emitted() -> dict[str, set[str]]:
    """{op type: the 'net/method' pairs whose compiled graph uses it}, with MaxPool nodes' output counts."""
    uses: dict[str, set[str]] = {}
    for net, build in NETS.items():
        model = build()
        for method in METHODS:
            if method == "chefer" and net != "vit":
                continue  # attention only
            for node in agf_onnx.compile(model, method=method).graph.node:
                uses.setdefault(node.op_type, set()).add(f"{net}/{method}")
                refused = REFUSED_OUTPUTS.get(node.op_type)
                if refused is not None and len([o for o in node.output if o]) > refused:
                    uses.setdefault(f"{node.op_type} output {refused}", set()).add(f"{net}/{method}")
    return uses


#: ops the compiled graphs use that the package's WebGPU table does not list: onnxruntime-web's JSEP build
#: places them on its CPU (WASM) kernels, with a copy across; element-wise on small tensors mostly (the
#: map's finite check IsNaN/IsInf, the signed stabiliser Sign, residual Sum/Max/Min). Not a failure, but a
#: new one must be seen: the test fails on any op outside this list.
CPU_FALLBACKS = {"Sign", "Or", "Max", "Min", "Sum", "IsNaN", "IsInf", "Identity", "ConstantOfShape"}


def test_every_emitted_op_has_a_webgpu_kernel():
    kernels = webgpu_kernels()
    assert {"Conv", "MatMul", "Relu", "MaxPool"} <= set(kernels), "the operator table did not parse"
    missing = {op: sorted(where)[:3] for op, where in emitted().items() if " output " not in op
               and not any(first <= TARGET_OPSET <= last for first, last in kernels.get(op, []))}
    unseen = {op: where for op, where in missing.items() if op not in CPU_FALLBACKS}
    assert not unseen, f"ops without an onnxruntime-web WebGPU kernel at opset {TARGET_OPSET}: {unseen}"


def test_no_node_uses_an_output_webgpu_refuses():
    refused = {op: sorted(where)[:3] for op, where in emitted().items() if " output " in op}
    assert not refused, f"outputs onnxruntime-web's WebGPU kernels refuse: {refused}"
    assert "MaxPool" in emitted() and "ArgMax" in emitted()  # the VJP without Indices ran
