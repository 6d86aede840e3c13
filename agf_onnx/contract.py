"""The compiled model's contract: the names of the inputs and outputs the compiler adds and the
metadata keys it records, written by the compiler and read by every runtime module (explain,
evaluate, the web page, the Ray engine). The one module both halves share, so neither imports
the other for a name.

A compiled model takes its original inputs plus ``target`` (int64 ``[N]``, −1 = each sample's top
class) and returns its original outputs plus ``heatmap`` (float32 ``[N, 1, H, W]``, or ``[N, T]``
for token-id inputs); ``--top-k K`` adds ``heatmaps`` ``[N, K, …]`` and ``classes`` ``[N, K]``, and
a self-supervised bank adds ``ssl_target`` and ``ssl_neighbour`` (int64 ``[N]``).
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx

TARGET_INPUT = "target"
HEATMAP_OUTPUT = "heatmap"
HEATMAPS_OUTPUT, CLASSES_OUTPUT = "heatmaps", "classes"  # with top_k
SSL_TARGET_OUTPUT, SSL_NEIGHBOUR_OUTPUT = "ssl_target", "ssl_neighbour"  # with a self-supervised bank

#: Metadata keys (``ModelProto.metadata_props``) a compiled model carries.
METHOD = "agf_onnx.method"  # the method's name
MODIFIERS = "agf_onnx.modifiers"  # the modifiers (``modifiers.Modifiers.metadata``)
SPEC = "agf_onnx.spec"  # every compile option (``compiler.spec.CompileSpec.record``, JSON)
IMAGE = "agf_onnx.image"  # the explained input
LAYOUT = "agf_onnx.layout"  # "NCHW" or "NHWC"
LOGITS = "agf_onnx.logits"  # the tensor holding the class scores
SCORES = "agf_onnx.scores"  # the graph output carrying them ("" when none does)
SSL_MODE = "agf_onnx.ssl_mode"  # "diff", "sum" or "none"
SSL_FEATURES = "agf_onnx.ssl_features"  # the features tensor the bank was built from
SSL_BANK_ROWS = "agf_onnx.ssl_bank_rows"  # the bank's row count
#: Text models only (token-id inputs, ``text.py``): what ``explain`` needs to feed them.
INPUT_KIND = "agf_onnx.input"  # "tokens"
TOKEN_IDS = "agf_onnx.token_ids"  # the token-id input
ATTENTION_MASK = "agf_onnx.attention_mask"  # the attention-mask input ("" when none)
TOKEN_INPUTS = "agf_onnx.token_inputs"  # the other integer [N, T] inputs (token types), comma-separated
EMBEDDING = "agf_onnx.embedding"  # the explained embedding tensor
VOCABULARY = "agf_onnx.vocabulary"  # the embedding table's rows


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The model's metadata as a dict."""
    return {prop.key: prop.value for prop in model.metadata_props}


def record(model: onnx.ModelProto, values: Mapping[str, str]) -> None:
    """Add (or overwrite) metadata entries, keeping the others."""
    onnx.helper.set_model_props(model, {**metadata(model), **values})
