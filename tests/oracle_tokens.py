"""An independent plain-PyTorch float64 implementation of AGF (``../shared/agf-spec.md``) for the
token models and normalised CNNs of ``token_models.py``: ViT (class token or mean pooling,
timm-style or ``nn.MultiheadAttention`` attention), ConvNeXt, GroupNorm CNN.

Written from the spec ("Two streams", the Start, "The factorisation", "Output", "Beyond the
paper: token models, normalisations, attention"), not from the compiler. The gradient stream is
``torch.autograd`` on a forward pass that keeps every intermediate tensor; the relevance stream
walks the modules backwards, each rule being the spec's formula on ``torch`` tensors (the CNN
helpers are those of ``oracle.py``). The forward passes are written out here (from the modules'
parameters) and checked against the models' own outputs, so the walk sees exactly the tensors
the model computes.

Rules, from the logits towards the image (Φ, G: relevance and gradient at an op's output):

- **Start** at the head Linear's input ``X``: ``ΦX = X ⊙ ∂ŷ_t/∂X`` with the spec's ŷ.
- **Class-token pooling** ``x[:, 0]`` moves Φ to token 0; **mean pooling** (over tokens, or
  ConvNeXt's/the GroupNorm CNN's global average pool) is a z-rule:
  ``ΦX = X ⊙ VJP_mean(sdiv(Φ, mean(X) ⊙ m))``.
- **LayerNorm, LayerNorm2d, GroupNorm**: ``ΦX = Φ``.
- **GELU** ``x · ½(1 + erf(x/√2))`` is a gate: ``Φx = Φ`` (nothing to the erf branch).
- **Linear with a constant weight on a token tensor** ``[N, *tokens, C]`` (the qkv, proj and MLP
  Linears; ConvNeXt's MLP on its NHWC map) is a 1×1 conv over the tokens. Flat rule (policies
  ``authors`` and ``pointwise``): ``ΦX = C = |X| ⊙ VJP_{|W|}(sdiv(Φ, (|X| |W|ᵀ) ⊙ m))``, eq. 9.
  Full rule (policy ``none``): the conv rule (eq. 10–14) on the channel-first view
  ``[N, C, T]`` (``T`` = all token axes flattened) with a kernel-1 ``conv1d``: ``mean_c`` over
  the channels, ``φ = mean_c(C)`` per token, ``F`` over ``[C, T]``, nmax and Δshift per sample.
  The qkv Linear is one op (``[N, T, 3C]`` out): Φ at its output is zero on q and k, and its
  full rule's ``M`` uses the whole gradient ``G`` (q, k and v parts), as the graph's MatMul sees it.
- **Attention** ``O = A V`` per head with ``A = softmax(q kᵀ · s)`` a constant:
  ``ΦV = V ⊙ Aᵀ sdiv(Φ, (A V) ⊙ m)``; q, k and the softmax input get no relevance.
- **Head split/merge** (reshape, permute, transpose, unbind), ConvNeXt's NCHW↔NHWC permutes and
  the patch flattening move Φ as they move data.
- **Layer-scale** ``γ ⊙ x``, **position embedding** and **bias** adds: ``ΦX = Φ``.
- **Class token**: its slot of the Concat is a constant; its relevance is dropped.
- **Residual Add** ``x + f(x)``: z-rule across its two data inputs, ``ΦXi = Xi ⊙ sdiv(Φ, (X1 + X2) ⊙ m)``.
- **Fan-out** (the residual stream read by the branch and by the Add; a block input read by a
  downsampling conv too): ``ΦX = X ⊙ Σ_k sdiv(Φk, X)``.
- **Convs**: the one that reads the image (patch embedding, ConvNeXt stem, CNN stem) gets z^B;
  the others the full rule unless the policy makes them flat: 1×1 convs under ``authors`` and
  ``pointwise``, and under ``authors`` a conv whose only reader chain reaches a residual Add
  through BatchNormalization only (the spec's wording).
- **Output**: ``Σ_c Φ₀ / max Φ₀`` per sample (``oracle.heatmap``).

Choices where the spec leaves one open (each is the reading that the spec's text gives most
directly; a different choice in the compiler shows up as a failed comparison, not as noise):

1. A conv that reaches the residual Add through a **GroupNorm** is *not* on the authors' flat
   list (the spec names BatchNormalization only); ``flat_through_groupnorm=True`` gives the other
   reading. Only the GroupNorm CNN's second conv of each block is affected.
2. ConvNeXt's **downsampling conv** (2×2/2) is on the trunk, not on a residual branch: its output
   is the next block's input, read by that block's depthwise conv and by its Add. It gets the
   full rule (as torchvision ResNet's stem conv does), not the flat one.
3. The **depthwise 7×7 conv** gets the full rule with ``mean_c``/``φ``/``F`` over all its
   channels (groups do not change the per-layer quantities of eq. 10–14).
4. ``fc_norm`` of the mean-pooled ViT (timm's layout: mean → LayerNorm → head) sits between the
   pooling and the head: the start is at its output, and it passes Φ to the mean.
5. The GELU gate's ``Φx = Φ`` is exact (no fan-out factor ``x/(x + 1e-9)`` for the erf branch,
   which receives no relevance).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .oracle import (
    _start,
    absolute_influence,
    conv_full,
    conv_op,
    fan_out,
    full_rule,
    heatmap,
    input_layer,
    sdiv,
    z_rule,
)
from .token_models import ConvNeXt, GroupNormCNN, TorchAttention, ViT

FLAT_POLICIES = ("authors", "pointwise", "none")


# -- rules ---------------------------------------------------------------------------------------
def token_linear(weight, x, gradient_out, relevance, full: bool):
    """A Linear ``x Wᵀ`` on ``[N, *tokens, C]``: flat (eq. 9) or the full rule as a 1×1 conv over the tokens."""
    if not full:
        return absolute_influence(lambda t, w: F.linear(t, w), x, weight, relevance)

    def channels_first(t):
        return t.reshape(t.shape[0], -1, t.shape[-1]).transpose(1, 2)

    pointwise = lambda t, w: F.conv1d(t, w[:, :, None])  # noqa: E731  (the 1×1 conv over the tokens)
    r = full_rule(pointwise, weight, channels_first(x), channels_first(gradient_out), channels_first(relevance))
    return r.transpose(1, 2).reshape(x.shape)


def conv_rule(conv: nn.Conv2d, x, gradient_out, relevance, kind: str):
    """``kind``: ``first`` (z^B, reads the image), ``flat`` (eq. 9) or ``full`` (eq. 10–14)."""
    w = conv.weight.detach()
    if kind == "first":
        return input_layer(conv_op(conv), x, w, relevance)
    if kind == "flat":
        return absolute_influence(conv_op(conv), x, w, relevance)
    return conv_full(conv, x, gradient_out, relevance)


def residual_add(a, b, relevance):
    """z-rule of ``a + b``: ``(Φa, Φb)``."""
    ratio = sdiv(relevance, (a + b) * (relevance != 0))
    return a * ratio, b * ratio


def attention_values(a, v, relevance):
    """``O = A V`` with ``A`` constant: ``ΦV = V ⊙ Aᵀ sdiv(Φ, (A V) ⊙ m)``."""
    return z_rule(lambda t: a @ t, v, relevance)


# -- forward passes that keep every tensor the rules read ----------------------------------------
def _keep(t):
    t.retain_grad()
    return t


def _attention(attn: nn.Module, x):
    """``(qkv weight, qkv output, A, v, merged heads, proj weight, proj output)`` of either attention."""
    b, n, c = x.shape
    if isinstance(attn, TorchAttention):
        mha = attn.mha
        heads, w_qkv, b_qkv = mha.num_heads, mha.in_proj_weight, mha.in_proj_bias
        proj = mha.out_proj
    else:
        heads, w_qkv, b_qkv, proj = attn.heads, attn.qkv.weight, attn.qkv.bias, attn.proj
    d = c // heads
    qkv = _keep(F.linear(x, w_qkv, b_qkv))
    q, k, v = qkv.reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    a = _keep((q @ k.transpose(-2, -1) * d ** -0.5).softmax(-1))
    merged = (a @ v).transpose(1, 2).reshape(b, n, c)
    out = _keep(F.linear(merged, proj.weight, proj.bias))
    return {"w_qkv": w_qkv.detach(), "qkv": qkv, "a": a, "v": v, "merged": merged, "w_proj": proj.weight.detach(),
            "proj": out}


def _mlp(mlp: nn.Module, x):
    f1 = _keep(mlp.fc1(x))
    gelu = F.gelu(f1)  # exact (erf) GELU, as nn.GELU()
    f2 = _keep(mlp.fc2(gelu))
    return {"fc1_in": x, "f1": f1, "gelu": gelu, "f2": f2, "w1": mlp.fc1.weight.detach(), "w2": mlp.fc2.weight.detach()}


def vit_forward(model: ViT, x):
    """Logits and the tensors of a ViT's forward pass (attention matrices, block outputs, ...)."""
    patches = _keep(model.patch_embed(x))
    h = patches.flatten(2).transpose(1, 2)
    if model.cls_token is not None:
        h = torch.cat([model.cls_token.expand(h.shape[0], -1, -1), h], 1)
    h = h + model.pos_embed
    blocks = []
    for block in model.blocks:
        record = {"x0": h, "n1": block.norm1(h)}
        record["attn"] = _attention(block.attn, record["n1"])
        record["x1"] = _keep(h + record["attn"]["proj"])
        record["mlp"] = _mlp(block.mlp, block.norm2(record["x1"]))
        h = record["x2"] = _keep(record["x1"] + record["mlp"]["f2"])
        blocks.append(record)
    pooled = model.norm(h)[:, 0] if model.pool == "cls" else h.mean(1)
    head_input = _keep(model.fc_norm(pooled))
    return {"patches": patches, "blocks": blocks, "tokens_out": h, "pooled": pooled, "head_input": head_input,
            "logits": model.head(head_input)}


def convnext_forward(model: ConvNeXt, x):
    stem = _keep(model.stem[0](x))
    h = model.stem[1](stem)
    stages = []
    for stage in model.stages:
        modules, record = list(stage), {"down": None, "blocks": []}
        if isinstance(modules[0], nn.LayerNorm):  # LayerNorm2d + Conv 2×2/2
            norm, conv = modules[:2]
            record["down"] = {"conv": conv, "in": norm(h)}
            h = record["down"]["out"] = _keep(conv(record["down"]["in"]))
            modules = modules[2:]
        for block in modules:
            dw = _keep(block.conv_dw(h))
            mlp = _mlp(block.mlp, block.norm(dw.permute(0, 2, 3, 1)))
            branch = (block.gamma * mlp["f2"]).permute(0, 3, 1, 2)
            record["blocks"].append({"block": block, "x0": h, "dw": dw, "mlp": mlp, "branch": branch})
            h = h + branch
        stages.append(record)
    pooled = h.mean((2, 3))
    head_input = _keep(model.norm(pooled))
    return {"stem": stem, "stages": stages, "features": h, "head_input": head_input, "logits": model.head(head_input)}


def groupnorm_forward(model: GroupNormCNN, x):
    stem = _keep(model.conv1(x))
    stem_norm = model.gn1(stem)
    h = torch.relu(stem_norm)
    blocks = []
    for block in model.blocks:
        record = {"block": block, "x": h, "c1": _keep(block.conv1(h))}
        record["n1"] = block.gn1(record["c1"])
        record["r1"] = torch.relu(record["n1"])
        record["c2"] = _keep(block.conv2(record["r1"]))
        record["main"] = block.gn2(record["c2"])
        if block.downsample is not None:
            record["down"] = _keep(block.downsample[0](h))
            record["skip"] = block.downsample[1](record["down"])
        else:
            record["skip"] = h
        record["sum"] = record["main"] + record["skip"]
        h = torch.relu(record["sum"])
        blocks.append(record)
    head_input = _keep(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))
    return {"stem": stem, "stem_norm": stem_norm, "blocks": blocks, "features": h, "head_input": head_input,
            "logits": model.fc(head_input)}


def forward(model: nn.Module, x):
    """The forward pass of any model of ``token_models``, checked against the model itself."""
    walk = {ViT: vit_forward, ConvNeXt: convnext_forward, GroupNormCNN: groupnorm_forward}[type(model)]
    record = walk(model, x)
    with torch.no_grad():
        expected = model(x)
    tolerance = 1e-10 if x.dtype == torch.float64 else 1e-4
    assert torch.allclose(record["logits"], expected, atol=tolerance, rtol=tolerance), "oracle forward ≠ model"
    return record


# -- the relevance walks -------------------------------------------------------------------------
def _vit_relevance(model: ViT, x, record, full: bool, trace: dict):
    head_input = record["head_input"]
    relevance = trace["start"] = (head_input * head_input.grad).detach()
    tokens = record["tokens_out"].detach()
    if model.pool == "cls":  # LayerNorm passes Φ; the Gather moves it to token 0
        relevance = torch.zeros_like(tokens).index_copy(1, torch.tensor([0]), relevance[:, None])
    else:  # fc_norm passes Φ; the mean over tokens is a z-rule
        relevance = z_rule(lambda t: t.mean(1), tokens, relevance)
    for index, block in reversed(list(enumerate(record["blocks"]))):
        trace[f"block{index}.out"] = relevance
        relevance = _vit_block(block, relevance, full, trace, f"block{index}")
    trace["tokens"] = relevance  # Φ at cat(class token, patches) + position embedding
    if model.cls_token is not None:
        relevance = relevance[:, 1:]  # the class token is a constant: its relevance is dropped
    relevance = relevance.transpose(1, 2).reshape(record["patches"].shape)
    trace["patch_embed.out"] = relevance
    return conv_rule(model.patch_embed, x.detach(), None, relevance, "first")


def _vit_block(record, relevance, full, trace, name):
    x0, x1 = record["x0"].detach(), record["x1"].detach()
    mlp, attn = record["mlp"], record["attn"]
    skip, branch = residual_add(x1, mlp["f2"].detach(), relevance)
    trace[f"{name}.mlp.fc2.out"] = branch
    branch = token_linear(mlp["w2"], mlp["gelu"].detach(), mlp["f2"].grad, branch, full)
    trace[f"{name}.mlp.fc1.out"] = branch  # the GELU gate gives all of it to its input
    branch = token_linear(mlp["w1"], mlp["fc1_in"].detach(), mlp["f1"].grad, branch, full)
    relevance = trace[f"{name}.x1"] = fan_out(x1, skip, branch)  # norm2 passes Φ

    skip, branch = residual_add(x0, attn["proj"].detach(), relevance)
    trace[f"{name}.attn.proj.out"] = branch
    merged = token_linear(attn["w_proj"], attn["merged"].detach(), attn["proj"].grad, branch, full)
    b, n, c = merged.shape
    heads = attn["a"].shape[1]
    per_head = merged.reshape(b, n, heads, c // heads).transpose(1, 2)
    trace[f"{name}.attn.av.out"] = per_head
    values = attention_values(attn["a"].detach(), attn["v"].detach(), per_head)
    packed = torch.stack([torch.zeros_like(values), torch.zeros_like(values), values])  # [3, B, h, N, d]
    packed = packed.permute(1, 3, 0, 2, 4).reshape(b, n, 3 * c)  # the inverse of permute(2, 0, 3, 1, 4)
    trace[f"{name}.attn.qkv.out"] = packed
    branch = token_linear(attn["w_qkv"], record["n1"].detach(), attn["qkv"].grad, packed, full)
    return fan_out(x0, skip, branch)  # norm1 passes Φ


def _convnext_relevance(model: ConvNeXt, x, record, full: bool, trace: dict):
    head_input = record["head_input"]
    relevance = trace["start"] = (head_input * head_input.grad).detach()
    relevance = z_rule(lambda t: t.mean((2, 3)), record["features"].detach(), relevance)  # the norm passes Φ
    for s, stage in reversed(list(enumerate(record["stages"]))):
        for index, block in reversed(list(enumerate(stage["blocks"]))):
            trace[f"stage{s}.block{index}.out"] = relevance
            skip, branch = residual_add(block["x0"].detach(), block["branch"].detach(), relevance)
            mlp = block["mlp"]
            branch = branch.permute(0, 2, 3, 1)  # γ passes Φ
            branch = token_linear(mlp["w2"], mlp["gelu"].detach(), mlp["f2"].grad, branch, full)
            branch = token_linear(mlp["w1"], mlp["fc1_in"].detach(), mlp["f1"].grad, branch, full)
            branch = branch.permute(0, 3, 1, 2)  # the LayerNorm passes Φ
            trace[f"stage{s}.block{index}.dw.out"] = branch
            branch = conv_rule(block["block"].conv_dw, block["x0"].detach(), block["dw"].grad, branch, "full")
            relevance = fan_out(block["x0"].detach(), skip, branch)
        if stage["down"] is not None:  # on the trunk: full rule (choice 2); the LayerNorm2d passes Φ
            trace[f"stage{s}.down.out"] = relevance
            down = stage["down"]
            relevance = conv_rule(down["conv"], down["in"].detach(), down["out"].grad, relevance, "full")
    trace["stem.out"] = relevance  # the stem's LayerNorm2d passes Φ
    return conv_rule(model.stem[0], x.detach(), None, relevance, "first")


def _groupnorm_relevance(model: GroupNormCNN, x, record, policy: str, flat_through_groupnorm: bool, trace: dict):
    head_input = record["head_input"]
    relevance = trace["start"] = (head_input * head_input.grad).detach()
    relevance = z_rule(lambda t: F.adaptive_avg_pool2d(t, 1), record["features"].detach(),
                       relevance.reshape(*relevance.shape, 1, 1))
    pointwise_flat = policy != "none"
    branch_flat = policy == "authors" and flat_through_groupnorm
    for index, block in reversed(list(enumerate(record["blocks"]))):
        trace[f"block{index}.out"] = relevance
        relevance = z_rule(torch.relu, block["sum"].detach(), relevance)
        main, skip = residual_add(block["main"].detach(), block["skip"].detach(), relevance)
        conv = block["block"].conv2  # GroupNorm passes Φ
        main = conv_rule(conv, block["r1"].detach(), block["c2"].grad, main, "flat" if branch_flat else "full")
        main = z_rule(torch.relu, block["n1"].detach(), main)
        main = conv_rule(block["block"].conv1, block["x"].detach(), block["c1"].grad, main, "full")
        if block["block"].downsample is not None:  # 1×1 conv + GroupNorm
            conv = block["block"].downsample[0]
            skip = conv_rule(conv, block["x"].detach(), block["down"].grad, skip,
                             "flat" if pointwise_flat or branch_flat else "full")
        relevance = fan_out(block["x"].detach(), main, skip)
    trace["stem.out"] = relevance
    relevance = z_rule(torch.relu, record["stem_norm"].detach(), relevance)
    return conv_rule(model.conv1, x.detach(), None, relevance, "first")


def relevance(model: nn.Module, images: torch.Tensor, target=None, dtype=torch.float64, flat_policy: str = "authors",
              flat_through_groupnorm: bool = False, trace: dict | None = None) -> torch.Tensor:
    """Φ₀ at the image ``[N, 3, H, W]``; ``trace`` (a dict) receives Φ at named intermediate tensors."""
    if flat_policy not in FLAT_POLICIES:
        raise ValueError(f"flat_policy {flat_policy!r} (one of {FLAT_POLICIES})")
    model = copy.deepcopy(model).to(dtype).eval()
    x = images.to(dtype).detach().requires_grad_(True)
    record = forward(model, x)
    _start(record["logits"], target)
    trace = {} if trace is None else trace
    with torch.no_grad():
        if isinstance(model, ViT):
            return _vit_relevance(model, x, record, flat_policy == "none", trace)
        if isinstance(model, ConvNeXt):
            return _convnext_relevance(model, x, record, flat_policy == "none", trace)
        return _groupnorm_relevance(model, x, record, flat_policy, flat_through_groupnorm, trace)


def explain(model: nn.Module, images: torch.Tensor, target=None, dtype=torch.float64, flat_policy: str = "authors",
            flat_through_groupnorm: bool = False, trace: dict | None = None) -> torch.Tensor:
    """The AGF heatmap ``[N, 1, H, W]`` of a ``token_models`` model (see the module docstring)."""
    return heatmap(relevance(model, images, target, dtype, flat_policy, flat_through_groupnorm, trace)).detach()


# -- text classifiers: BERT from its embeddings' LayerNorm output E (spec "Token-id inputs") -------
def _bert_linear(linear: nn.Module, x):
    return _keep(F.linear(x, linear.weight, linear.bias))


def bert_forward(model: nn.Module, feeds: dict):
    """``transformers``' ``BertForSequenceClassification`` (eager attention, post-norm blocks) written out
    from E = ``embeddings.LayerNorm(word + position + type)``, keeping the tensors the rules read;
    checked against the model's own logits."""
    bert = model.bert
    embeddings = bert.embeddings
    ids, types = feeds["input_ids"], feeds.get("token_type_ids", torch.zeros_like(feeds["input_ids"]))
    positions = torch.arange(ids.shape[1])[None]
    summed = embeddings.word_embeddings(ids) + embeddings.token_type_embeddings(types) + \
        embeddings.position_embeddings(positions)
    e = embeddings.LayerNorm(summed).detach().requires_grad_(True)
    mask = feeds["attention_mask"][:, None, None, :].to(e.dtype)
    additive = (1.0 - mask) * torch.finfo(e.dtype).min
    h, blocks = e, []
    for layer in bert.encoder.layer:
        attention, heads = layer.attention.self, layer.attention.self.num_attention_heads
        b, n, c = h.shape
        split = lambda t, b=b, n=n, c=c, heads=heads: t.reshape(b, n, heads, c // heads).transpose(1, 2)  # noqa: E731
        record = {"x0": h, "q": _bert_linear(attention.query, h), "k": _bert_linear(attention.key, h),
                  "v_out": _bert_linear(attention.value, h), "w_v": attention.value.weight.detach()}
        record["v"] = split(record["v_out"])
        scores = split(record["q"]) @ split(record["k"]).transpose(-1, -2) * (c // heads) ** -0.5 + additive
        record["a"] = _keep(scores.softmax(-1))
        record["merged"] = (record["a"] @ record["v"]).transpose(1, 2).reshape(b, n, c)
        output = layer.attention.output
        record["proj"], record["w_proj"] = _bert_linear(output.dense, record["merged"]), output.dense.weight.detach()
        record["x1"] = _keep(record["proj"] + h)
        h1 = record["h1"] = output.LayerNorm(record["x1"])
        record["mlp"] = {"fc1_in": h1, "f1": _bert_linear(layer.intermediate.dense, h1),
                         "w1": layer.intermediate.dense.weight.detach(), "w2": layer.output.dense.weight.detach()}
        record["mlp"]["gelu"] = F.gelu(record["mlp"]["f1"])
        record["mlp"]["f2"] = _bert_linear(layer.output.dense, record["mlp"]["gelu"])
        record["x2"] = _keep(record["mlp"]["f2"] + h1)
        h = layer.output.LayerNorm(record["x2"])
        blocks.append(record)
    pooler_in = h[:, 0]
    pooled = _bert_linear(bert.pooler.dense, pooler_in)
    head_input = _keep(torch.tanh(pooled))
    logits = model.classifier(head_input)
    with torch.no_grad():
        expected = model(**feeds).logits
    assert torch.allclose(logits, expected, atol=1e-10, rtol=1e-10), "oracle forward ≠ model"
    return {"e": e, "blocks": blocks, "tokens_out": h, "pooler_in": pooler_in, "pooled": pooled,
            "w_pool": bert.pooler.dense.weight.detach(), "head_input": head_input, "logits": logits}


def _bert_block(record, relevance, full: bool):
    """A post-norm block: the LayerNorms pass Φ; the residual Adds, MLP and attention as in the ViT's."""
    h1, mlp = record["h1"].detach(), record["mlp"]
    skip, branch = residual_add(h1, mlp["f2"].detach(), relevance)
    branch = token_linear(mlp["w2"], mlp["gelu"].detach(), mlp["f2"].grad, branch, full)
    branch = token_linear(mlp["w1"], h1, mlp["f1"].grad, branch, full)  # the GELU gate gives all to its input
    relevance = fan_out(h1, skip, branch)  # Φ at LayerNorm(x1), passed to x1
    x0 = record["x0"].detach()
    skip, branch = residual_add(x0, record["proj"].detach(), relevance)
    merged = token_linear(record["w_proj"], record["merged"].detach(), record["proj"].grad, branch, full)
    b, n, c = merged.shape
    per_head = merged.reshape(b, n, record["a"].shape[1], -1).transpose(1, 2)
    values = attention_values(record["a"].detach(), record["v"].detach(), per_head)
    values = values.transpose(1, 2).reshape(b, n, c)  # q and k get no relevance: their Linears add nothing
    branch = token_linear(record["w_v"], x0, record["v_out"].grad, values, full)
    return fan_out(x0, skip, branch)


def bert_relevance(model: nn.Module, feeds: dict, target=None, dtype=torch.float64,
                   flat_policy: str = "authors") -> torch.Tensor:
    """Φ at E ``[N, T, C]`` of a ``BertForSequenceClassification``: the start at the classifier's input,
    Tanh passes Φ where its output is non-zero, the pooler's Linear on ``[N, C]`` gets the authors' rule
    of a fully connected layer (the absolute influence C, eq. 9; it does not follow a flattened map, so
    no gradient–input term), the [CLS] gather moves Φ to token 0, then the blocks backwards (token-wise
    Linears flat under ``authors``/``pointwise``, the full rule under ``none``)."""
    model = copy.deepcopy(model).to(dtype).eval()
    record = bert_forward(model, feeds)
    _start(record["logits"], target)
    full = flat_policy == "none"
    with torch.no_grad():
        head_input = record["head_input"]
        relevance = (head_input * head_input.grad).detach() * (head_input != 0)
        relevance = token_linear(record["w_pool"], record["pooler_in"].detach(), None, relevance, False)
        tokens = record["tokens_out"].detach()
        relevance = torch.zeros_like(tokens).index_copy(1, torch.tensor([0]), relevance[:, None])
        for block in reversed(record["blocks"]):
            relevance = _bert_block(block, relevance, full)
    return relevance
