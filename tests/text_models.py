"""Tiny BERT-family sequence classifiers from ``transformers`` Config classes (random weights,
seeded, no hub), their ONNX exports, a WordPiece tokenizer built with ``tokenizers``, and
float64 references at the explained tensor E (the embeddings' LayerNorm output).

- ``build(arch)``: BERT, DistilBERT, RoBERTa, ALBERT (factorised embedding: E has 16 channels,
  the encoder 32) for sequence classification, 2 layers, hidden 32, 4 heads, a vocabulary of
  ``VOCAB`` words, 3 classes, eager attention for the references (the exports use whatever
  attention the model has: the export is the same graph for eager and sdpa up to the mask).
- ``export(model, dynamo)``: ``torch.onnx.export`` with dynamic batch and sequence axes
  (TorchScript at opset 17, dynamo at 18), inputs ``input_ids``, ``attention_mask`` and, for BERT
  and ALBERT, ``token_type_ids``.
- ``at_embeddings(model, ...)``: the logits as a function of E (the input of the embeddings'
  LayerNorm), in float64, so that torch.autograd and Captum give the references of the gradient
  methods at E.
"""

from __future__ import annotations

import copy
import io
import sys
import warnings

import onnx
import torch
from torch import nn

VOCAB, LENGTH, CLASSES, POSITIONS = 120, 12, 3, 40
ARCHS = ("bert", "distilbert", "roberta", "albert")
#: Words of the test tokenizer's vocabulary (WordPiece, lower case); ids 0–4 are the specials.
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ("the a good bad movie film great terrible plot acting was is not very really story and but it "
         "this that boring fun loved hated").split()


def import_transformers():
    """``transformers``, imported with the real absence of torchvision: the zennit tests put a stand-in
    ``torchvision`` (no ``__spec__``) into ``sys.modules``, on which ``transformers``' availability check
    (``importlib.util.find_spec``) raises; the check is cached, so the stand-in can go back after."""
    stand_ins = {name: module for name, module in sys.modules.items()
                 if name.split(".")[0] == "torchvision" and getattr(module, "__spec__", None) is None}
    for name in stand_ins:
        del sys.modules[name]
    try:
        import transformers
    finally:
        sys.modules.update(stand_ins)
    return transformers


def build(arch: str, seed: int = 0) -> nn.Module:
    tf = import_transformers()
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                  max_position_embeddings=POSITIONS, num_labels=CLASSES, attn_implementation="eager")
    if arch == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(**common))
    elif arch == "roberta":
        model = tf.RobertaForSequenceClassification(tf.RobertaConfig(**common, pad_token_id=1))
    elif arch == "albert":
        model = tf.AlbertForSequenceClassification(tf.AlbertConfig(**common, embedding_size=16))
    elif arch == "distilbert":
        model = tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=VOCAB, n_layers=2, n_heads=4, dim=32, hidden_dim=64, max_position_embeddings=POSITIONS,
            num_labels=CLASSES, attn_implementation="eager"))
    else:
        raise ValueError(arch)
    return model.eval()


def input_names(arch: str) -> list[str]:
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if arch in ("bert", "albert") else [])


class Logits(nn.Module):
    """The classifier with positional inputs, returning the logits (what an exporter traces)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs))).logits


def batch(arch: str, seed: int = 0, n: int = 2, length: int = LENGTH) -> dict[str, "torch.Tensor"]:
    """``n`` sequences of ``length`` random ids (specials excluded); the second has 4 padding tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIALS), VOCAB, (n, length), generator=generator)
    mask = torch.ones(n, length, dtype=torch.long)
    if n > 1:
        mask[1, length - 4:] = 0
        ids[1, length - 4:] = 1 if arch == "roberta" else 0  # the [PAD] id
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in input_names(arch):
        types = torch.zeros_like(ids)
        types[:, length // 2:] = 1
        feeds["token_type_ids"] = types
    return feeds


def export(model: nn.Module, arch: str, dynamo: bool) -> onnx.ModelProto:
    names = input_names(arch)
    wrapped = Logits(model, names).eval()
    args = tuple(batch(arch)[name] for name in names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            sizes = {"batch": torch.export.Dim("batch"), "sequence": torch.export.Dim("sequence", max=POSITIONS - 2)}
            program = torch.onnx.export(wrapped, args, input_names=names, output_names=["logits"], dynamo=True,
                                        opset_version=18, verbose=False,
                                        dynamic_shapes=(tuple({0: sizes["batch"], 1: sizes["sequence"]} for _ in names),))
            return program.model_proto
        buffer = io.BytesIO()
        torch.onnx.export(wrapped, args, buffer, input_names=names, output_names=["logits"], dynamo=False,
                          opset_version=17, dynamic_axes={n: {0: "batch", 1: "sequence"} for n in [*names, "logits"]})
        return onnx.load_from_string(buffer.getvalue())


def _embedding_norm(model: nn.Module) -> nn.Module:
    """The LayerNorm that reads E (every architecture here calls it ``embeddings.LayerNorm``)."""
    base = getattr(model, model.base_model_prefix)
    return base.embeddings.LayerNorm


def at_embeddings(model: nn.Module, feeds: dict, dtype=torch.float64, copied: bool = True):
    """``(E, f)``: the explained tensor E ``[N, T, C]`` of ``feeds`` (the output of the embeddings'
    LayerNorm, ``agf_onnx.compiler.text``) and ``f(E') → logits``, the model with E replaced by ``E'`` (any
    batch that is a whole number of copies of the feeds' batch). ``copied=False``: ``model`` itself
    (already in ``dtype``) runs, with whatever hooks the caller registered on it."""
    model = copy.deepcopy(model).to(dtype).eval() if copied else model
    norm, captured = _embedding_norm(model), {}
    handle = norm.register_forward_hook(lambda module, args, output: captured.setdefault("E", output.detach()))
    with torch.no_grad():
        model(**feeds)
    handle.remove()

    def logits(embedding: torch.Tensor) -> torch.Tensor:
        copies = embedding.shape[0] // feeds["input_ids"].shape[0]
        repeated = {k: v.repeat(copies, 1) for k, v in feeds.items()}
        hook = norm.register_forward_hook(lambda module, args, output: embedding)
        try:
            return model(**repeated).logits
        finally:
            hook.remove()

    return captured["E"], logits


def tokenizer_json(path) -> None:
    """A WordPiece tokenizer over ``SPECIALS + WORDS`` (BERT's normaliser, pre-tokenizer and
    [CLS] … [SEP] template), written with ``tokenizers`` to ``path``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate([*SPECIALS, *WORDS])}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer.save(str(path))
