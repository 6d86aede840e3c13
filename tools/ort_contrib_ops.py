"""Which ``com.microsoft`` ops ONNX Runtime's optimisers write for the test nets (docs/ort-optimised.md).

For each net of ``tests/test_contrib.py`` and ``tests/test_ort_optimised.py`` (TorchScript export at
opset 17 and dynamo at its default opset), it writes the optimised file with
``SessionOptions.optimized_model_filepath`` at BASIC, EXTENDED and ALL, and with
``onnxruntime.transformers.optimizer.optimize_model`` (opt_level 0, 1, 2; ``use_gpu=False``) for the
token models, and prints the non-``ai.onnx`` op types of each, with the fused activations.

    python tools/ort_contrib_ops.py [--nets vgg,resnet,vit]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import onnx  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402
from onnx import helper  # noqa: E402

from tests import architectures, models, token_models  # noqa: E402
from tests.test_contrib import Fusable, RMSNormNet, bert_export, ort_optimised, tanh_vit, transformer_optimised  # noqa: E402

#: name → (export(dynamo) → model, transformer optimiser arguments or None)
NETS = {
    "vgg": (lambda dynamo: models.export(models.seeded(models.VGGish()), dynamo=dynamo), None),
    "resnet": (lambda dynamo: models.export(models.seeded(models.ResNetish()), dynamo=dynamo), None),
    "mobilenetv2": (lambda dynamo: models.export(models.seeded(architectures.MobileNetV2ish()), dynamo=dynamo), None),
    "mobilenetv3": (lambda dynamo: models.export(models.seeded(architectures.MobileNetV3ish()), dynamo=dynamo), None),
    "efficientnet": (lambda dynamo: models.export(models.seeded(architectures.EfficientNetish()), dynamo=dynamo), None),
    "fusable": (lambda dynamo: models.export(models.seeded(Fusable()), dynamo=dynamo), None),
    "vit": (lambda dynamo: token_models.export(token_models.vit(0), dynamo=dynamo), ("vit", 2, 16)),
    "vit-mha": (lambda dynamo: token_models.export(token_models.vit(2, attention="torch"), dynamo=dynamo),
                ("vit", 2, 16)),
    "vit-tanh": (lambda dynamo: token_models.export(tanh_vit(), dynamo=dynamo), ("vit", 2, 16)),
    "convnext": (lambda dynamo: token_models.export(token_models.convnext(3), dynamo=dynamo), None),
    "rmsnorm": (lambda dynamo: models.export(RMSNormNet().eval(), dynamo=True), ("vit", 2, 16)),
    "bert": (lambda dynamo: bert_export(), ("bert", 2, 32)),
}


def contrib_ops(model: onnx.ModelProto) -> str:
    """``op×count`` of every node outside ai.onnx (and ONNX Runtime's ai.onnx-domain contrib op),
    FusedConv/FusedGemm with their activations."""
    counts: collections.Counter = collections.Counter()
    for node in model.graph.node:
        if node.domain or node.op_type == "SimplifiedLayerNormalization":
            activation = next((helper.get_attribute_value(a).decode() for a in node.attribute
                               if a.name == "activation"), None)
            domain = "" if node.domain in ("", "com.microsoft") else f"{node.domain}:"
            counts[f"{domain}{node.op_type}" + (f"({activation})" if activation else "")] += 1
    return ", ".join(f"{op}×{n}" for op, n in sorted(counts.items())) or "—"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default=",".join(NETS))
    args = parser.parse_args()
    print(f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, onnx {onnx.__version__}\n")
    print("| net | export | optimiser | contrib ops written |\n|---|---|---|---|")
    for name in args.nets.split(","):
        export, transformer = NETS[name]
        for dynamo in ((True,) if name == "rmsnorm" else (False,) if name == "bert" else (False, True)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    model = export(dynamo)
                except Exception as error:  # noqa: BLE001 — an exporter's refusal is a result here
                    print(f"| {name} | {'dynamo' if dynamo else 'torchscript'} | — | export failed: {error} |")
                    continue
                label = "dynamo" if dynamo else "torchscript"
                for level in ("BASIC", "EXTENDED", "ALL"):
                    print(f"| {name} | {label} | ORT_ENABLE_{level} | {contrib_ops(ort_optimised(model, level))} |")
                if transformer:
                    for opt_level in (0, 1, 2):
                        optimised = transformer_optimised(model, *transformer, opt_level=opt_level)
                        print(f"| {name} | {label} | optimize_model({transformer[0]!r}, opt_level={opt_level}) | "
                              f"{contrib_ops(optimised)} |")


if __name__ == "__main__":
    main()
