"""An independent plain-PyTorch implementation of the algorithm (``docs/algorithm.md``) for the test models.

Written from the spec, not from the compiler: gradients come from ``torch.autograd``, every rule
is the spec's formula on ``torch`` tensors, and the walk follows the modules of ``VGGish`` and
``ResNetish`` the way the authors' layer classes do (each module back-propagates its own
relevance). Runs in float64 (or float32, to measure the round-off floor).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .models import Bottleneck, VGGish


# -- the spec's helpers -------------------------------------------------------------------------
def sdiv(a, b):
    return torch.where(b != 0, a / (b + 1e-9), torch.zeros_like(a))


def per_sample(reduce, x):
    return reduce(x.flatten(1), dim=1).reshape(-1, *([1] * (x.dim() - 1)))


def amax(x):
    return per_sample(lambda t, dim: t.max(dim=dim).values, x)


def nmax(x):
    return sdiv(x, amax(x))


def delta_shift(c, r):
    support = (c != 0).to(c.dtype)
    count = per_sample(torch.sum, support)
    mean = torch.where(count > 0, per_sample(torch.sum, r) / count.clamp(min=1), torch.zeros_like(count))
    return c + r - mean * support


def factorise(y, phi):
    """F(Y, φ): sigmoid(10·nmax(Y)), mean columns over φ>0 / φ<0, ridge least squares."""
    n, c = y.shape[:2]
    heat = torch.sigmoid(10 * nmax(y)).reshape(n, c, -1)
    phi = phi.reshape(n, -1)
    out = []
    for i in range(n):
        h, fg, bg = heat[i], phi[i] > 0, phi[i] < 0
        r_f = h[:, fg].mean(1) if fg.any() else torch.zeros(c, dtype=y.dtype)
        r_b = h[:, bg].mean(1) if bg.any() else torch.zeros(c, dtype=y.dtype)
        r = torch.stack([r_b, r_f], 1)  # [C, 2]
        w = torch.relu(torch.linalg.solve(r.T @ r + torch.eye(2, dtype=y.dtype), r.T @ h))  # [2, HW]
        out.append((w[1] - w[0]).reshape(1, *y.shape[2:]))
    return torch.stack(out)


def vjp(fn, x, g):
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        return torch.autograd.grad(fn(x), x, g)[0]


# -- rules ---------------------------------------------------------------------------------------
def z_rule(fn, x, relevance):
    activation = fn(x).detach() * (relevance != 0)
    return x * vjp(fn, x, sdiv(relevance, activation))


def absolute_influence(op, x, weight, relevance):
    ax, aw = x.abs(), weight.abs()
    z = op(ax, aw) * (relevance != 0)
    return ax * vjp(lambda t: op(t, aw), ax, sdiv(relevance, z))


def conv_op(conv):
    return lambda x, w: F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def full_rule(op, w, x, gradient_out, relevance):
    """The spec's full conv rule (eq. 10–14) for a linear ``op(x, w)`` on a channel-first ``x``."""
    c = absolute_influence(op, x, w, relevance)
    mask = (relevance != 0).to(x.dtype)
    g = vjp(lambda t: op(t, w), x, gradient_out)
    m = nmax(torch.relu((x * g).mean(1, keepdim=True)).expand_as(x))
    gm = vjp(lambda t: op(t, w), x, gradient_out * mask)
    phi = c.mean(1, keepdim=True)
    fx = torch.relu(factorise(x, phi)).expand_as(x)
    fdx = torch.relu(factorise(gm, phi)).expand_as(x)
    ones = torch.ones_like(x[:1])
    a = vjp(lambda t: op(t, w.abs()), x, sdiv(relevance, op(ones, w.abs()) * mask))
    r = (sdiv(fx + m, 1 + torch.exp(-c)) + fdx + a) * (c != 0)
    return delta_shift(c, r)


def conv_full(conv, x, gradient_out, relevance):
    return full_rule(conv_op(conv), conv.weight.detach(), x, gradient_out, relevance)


def input_layer(op, x, w, relevance):
    low, high = per_sample(lambda t, dim: t.min(dim=dim).values, x), amax(x)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    lb, hb = low * torch.ones_like(x), high * torch.ones_like(x)
    z = op(x, w) - op(lb, wp) - op(hb, wn)
    s = sdiv(relevance, z)
    return x * vjp(lambda t: op(t, w), x, s) - lb * vjp(lambda t: op(t, wp), x, s) - hb * vjp(lambda t: op(t, wn), x, s)


def linear_rule(linear, x, gradient_out, relevance, source=None):
    op, w = (lambda t, v: F.linear(t, v)), linear.weight.detach()
    c = absolute_influence(op, x, w, relevance)
    if source is None:
        return c
    g4 = vjp(lambda t: op(t, w), x, gradient_out).reshape(source.shape)
    m = torch.relu((source * g4).mean(1, keepdim=True)).expand_as(source).reshape(x.shape)
    return delta_shift(c, nmax(torch.relu(m) * (c != 0)))


def fan_out(x, *relevances):
    return x * sum(sdiv(r, x) for r in relevances)


def target_score(logits, target):
    """ŷ_t of the spec's start, summed over the batch (samples are independent)."""
    y_t = logits.gather(1, target[:, None])
    sigma = (logits - y_t).abs().max(1, keepdim=True).values
    y_hat = torch.softmax(y_t * torch.exp(-0.5 * ((logits - y_t) / sigma) ** 2), 1)
    return y_hat.gather(1, target[:, None]).sum()


def heatmap(relevance):
    total = relevance.sum(1, keepdim=True)
    peak, peak_abs = amax(relevance), amax(relevance.abs())
    scale = torch.where(peak > 0, peak, peak_abs)
    return torch.where(scale > 0, total / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(total))


# -- walks over the test models ------------------------------------------------------------------
class Tape:
    """Runs modules forward, keeping each input and output with its gradient."""

    def __init__(self):
        self.records = []

    def __call__(self, module, x, fn=None):
        y = (fn or module)(x)
        y.retain_grad()
        self.records.append((module, x, y))
        return y


def explain(model: nn.Module, images: torch.Tensor, target=None, dtype=torch.float64, flat_policy="authors"):
    """The AGF heatmap ``[N, 1, H, W]`` of ``model`` (a ``VGGish`` or ``ResNetish``)."""
    return heatmap(relevance_at_image(model, images, target, dtype, flat_policy))


def relevance_at_image(model: nn.Module, images: torch.Tensor, target=None, dtype=torch.float64,
                       flat_policy="authors", seed=None) -> torch.Tensor:
    """AGF's relevance Φ₀ ``[N, C, H, W]`` at the image, before the heatmap's scaling. ``seed``: a
    function of (logits, targets) giving the gradient that starts the stream at the logits in place
    of the spec's ŷ_t start (a contrast's others' seed, ``--contrast``)."""
    model = copy.deepcopy(model).to(dtype).eval()
    x = images.to(dtype).detach().requires_grad_(True)
    walk = _vgg if isinstance(model, VGGish) else _resnet
    return walk(model, x, target, flat_policy, seed).detach()


def _start(logits, target, seed=None):
    target = logits.argmax(1) if target is None else torch.as_tensor(target).expand(logits.shape[0])
    target = torch.where(target < 0, logits.argmax(1), target)
    if seed is None:
        target_score(logits, target).backward()
    else:
        logits.backward(seed(logits.detach(), target))


def _conv(conv, x, gradient_out, relevance, first, flat):
    if first:
        return input_layer(conv_op(conv), x, conv.weight.detach(), relevance)
    if flat:
        return absolute_influence(conv_op(conv), x, conv.weight.detach(), relevance)
    return conv_full(conv, x, gradient_out, relevance)


def _is_pointwise(conv):
    return conv.kernel_size == (1, 1)


def _vgg(model, x, target, flat_policy, seed=None):
    tape = Tape()
    h = x
    for module in model.features:
        h = tape(module, h)
    features = h
    h = tape(None, features, lambda t: torch.flatten(t, 1))
    for module in model.classifier:
        h = tape(module, h)
    _start(h, target, seed)
    records = tape.records
    *below, (_, top_input, _) = records
    relevance = top_input * top_input.grad
    for module, inp, out in reversed(below):
        if module is None:
            relevance = relevance.reshape(inp.shape)
        elif isinstance(module, nn.Linear):
            source = features if inp is records[len(model.features)][2] else None
            relevance = linear_rule(module, inp.detach(), out.grad, relevance, source.detach() if source is not None else None)
        elif isinstance(module, nn.Dropout):
            pass
        elif isinstance(module, nn.Conv2d):
            first = inp is x
            flat = _is_pointwise(module) and flat_policy != "none"
            relevance = _conv(module, inp.detach(), out.grad, relevance, first, flat)
        else:  # ReLU, MaxPool2d
            relevance = z_rule(module, inp.detach(), relevance)
    return relevance


def _block_forward(block, x, tape):
    record = {"x": x}
    h = x
    convs = [block.conv1, block.conv2] + ([block.conv3] if isinstance(block, Bottleneck) else [])
    norms = [block.bn1, block.bn2] + ([block.bn3] if isinstance(block, Bottleneck) else [])
    record["main"] = []
    for i, (conv, norm) in enumerate(zip(convs, norms)):
        c_in = h
        c_out = tape(conv, h)
        h = tape(norm, c_out)
        n_out = h
        r_out = None
        if i < len(convs) - 1:
            h = tape(nn.ReLU(), h)
            r_out = h
        record["main"].append((conv, c_in, c_out, n_out, r_out))
    if block.downsample is not None:
        d_conv = tape(block.downsample[0], x)
        skip = tape(block.downsample[1], d_conv)
        record["down"] = (block.downsample[0], x, d_conv)
    else:
        skip = x
    record["skip"], record["main_out"] = skip, h
    s = tape(None, h, lambda t: t + skip)
    record["sum"] = s
    out = tape(nn.ReLU(), s)
    record["out"] = out
    return out, record


def _resnet(model, x, target, flat_policy, seed=None):
    tape = Tape()
    stem = tape(model.conv1, x)
    stem_bn = tape(model.bn1, stem)
    stem_relu = tape(nn.ReLU(), stem_bn)
    h = tape(model.maxpool, stem_relu)

    blocks = []
    for stage in model.layers:
        for block in stage:
            h, record = _block_forward(block, h, tape)
            blocks.append((block, record))
    gap = tape(model.avgpool, h)
    flat = tape(None, gap, lambda t: torch.flatten(t, 1))
    logits = tape(model.fc, flat)
    _start(logits, target, seed)

    relevance = (flat * flat.grad).detach().reshape(gap.shape)
    relevance = z_rule(model.avgpool, h.detach(), relevance)
    authors = flat_policy == "authors"
    pointwise_flat = flat_policy in ("authors", "pointwise")
    for _, record in reversed(blocks):
        relevance = z_rule(torch.relu, record["sum"].detach(), relevance)
        ratio = sdiv(relevance, record["sum"].detach() * (relevance != 0))
        main, skip = record["main_out"].detach() * ratio, record["skip"].detach() * ratio
        last = len(record["main"]) - 1
        for i, (conv, c_in, c_out, n_out, r_out) in reversed(list(enumerate(record["main"]))):
            if r_out is not None:
                main = z_rule(torch.relu, n_out.detach(), main)
            is_flat = (pointwise_flat and _is_pointwise(conv)) or (authors and i == last)
            main = _conv(conv, c_in.detach(), c_out.grad, main, False, is_flat)
        if "down" in record:
            conv, d_in, d_out = record["down"]
            skip = _conv(conv, d_in.detach(), d_out.grad, skip, False, authors or pointwise_flat)
        relevance = fan_out(record["x"].detach(), main, skip)
    relevance = z_rule(model.maxpool, stem_relu.detach(), relevance)
    relevance = z_rule(torch.relu, stem_bn.detach(), relevance)
    return _conv(model.conv1, x.detach(), stem.grad, relevance, True, False)
