"""Relative Attributing Propagation (Nam et al., AAAI 2020) in plain PyTorch, written from the
definition as the authors' ``RAP_relprop`` computes it, for VGG-style ``torch.nn`` networks
(``features``, flatten, ``classifier``): the oracle of the compiled ``rap`` method. Every
proportional step is an explicit ``torch.autograd.grad`` of the layer's (positive or negative)
pre-activation, one per term, exactly as their code does."""

from __future__ import annotations

import torch
from torch import nn


def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).type(den.type()) * 1e-9
    return a / den * b.ne(0).type(b.type())


def _grad(z: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(z, x, s, retain_graph=True)[0]


def _shift(r: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    support = r.ne(0).type(r.type())
    return r - safe_divide(value, support.flatten(1).sum(1).reshape(value.shape)) * support


def _pos_prop(r, za1, za2, x1, negative_on_second):
    r_pos, r_neg = r.clamp(min=0), r.clamp(max=0)
    c1 = x1 * _grad(za1, x1, safe_divide(r_pos * safe_divide(za1 + za2, za1 + za2), za1))
    z_neg = za2 if negative_on_second else za1
    c1n = x1 * _grad(z_neg, x1, safe_divide(r_neg * safe_divide(za1 + za2, za1 + za2), z_neg))
    c2 = x1 * _grad(za2, x1, safe_divide(r_pos * safe_divide(za2, za1 + za2), za2))
    c2n = x1 * _grad(za2, x1, safe_divide(r_neg * safe_divide(za2, za1 + za2), za2))
    c = c1 + c2 + c2n + c1n
    dims = tuple(range(1, c.dim()))
    return _shift(c, c.sum(dims, keepdim=True) - r.sum(tuple(range(1, r.dim())), keepdim=True).reshape(
        [-1] + [1] * (c.dim() - 1)))


def _hidden(layer, r, x, op):
    """The sign-split rule of a hidden Conv2d/Linear (no bias, as in their backward)."""
    w = layer.weight
    pw, nw = w.clamp(min=0), w.clamp(max=0)
    px = x.clamp(min=0).detach().requires_grad_(True)
    nx = x.clamp(max=0).detach().requires_grad_(True)
    mask = r.ne(0).type(r.type())
    negative_on_second = isinstance(layer, nn.Conv2d)
    za1, za2 = op(px, pw) * mask, -op(px, nw) * mask
    zb1, zb2 = -op(nx, pw) * mask, op(nx, nw) * mask
    return _pos_prop(r, za1, za2, px, negative_on_second) + _pos_prop(r, zb1, zb2, nx, negative_on_second)


def _first(layer: nn.Linear, one_hot, x):
    w = layer.weight
    pw, nw = w.clamp(min=0), w.clamp(max=0)
    px = x.clamp(min=0).detach().requires_grad_(True)
    nx = x.clamp(max=0).detach().requires_grad_(True)
    z1, z2, z3, z4 = (nn.functional.linear(a, v) for a, v in ((px, pw), (px, nw), (nx, pw), (nx, nw)))
    rpp, rpn, rnp, rnn = z1 * one_hot, z2 * one_hot, z3 * one_hot, z4 * one_hot
    pos, neg = (rpp + rnn).sum(-1, keepdim=True), (rpn + rnp).sum(-1, keepdim=True)
    c = (px * _grad(z1, px, safe_divide(rpp, z1)) + nx * _grad(z4, nx, safe_divide(rnn, z4))
         + px * _grad(z2, px, safe_divide(rpn, z2)) + nx * _grad(z3, nx, safe_divide(rnp, z3)))
    bp = layer.bias * one_hot * safe_divide(pos, pos + neg)
    bn = layer.bias * one_hot * safe_divide(neg, pos + neg)
    c = c + px * _grad(z1, px, safe_divide(bp, z1)) + px * _grad(z2, px, safe_divide(bn, z2))
    rp, rn = c.clamp(min=0), c.clamp(max=0)
    total = (rp - rn).sum(-1, keepdim=True)
    return safe_divide(rp, total) * (rp + rn).sum(-1, keepdim=True) - safe_divide(rn, total) * (rp + rn).sum(
        -1, keepdim=True)


def _input_layer(layer: nn.Conv2d, r, x):
    w = layer.weight
    pw, nw = w.clamp(min=0), w.clamp(max=0)
    x = x.detach().requires_grad_(True)
    low = (x * 0 + x.flatten(1).min(1).values.reshape(-1, 1, 1, 1)).detach().requires_grad_(True)
    high = (x * 0 + x.flatten(1).max(1).values.reshape(-1, 1, 1, 1)).detach().requires_grad_(True)

    def conv(a, v):
        return nn.functional.conv2d(a, v, None, layer.stride, layer.padding)

    z, z_low, z_high = conv(x, w), conv(low, pw), conv(high, nw)
    s = safe_divide(r, z - z_low - z_high)
    return x * _grad(z, x, s) - low * _grad(z_low, low, s) - high * _grad(z_high, high, s)


def rap(model: nn.Module, images: torch.Tensor, targets) -> torch.Tensor:
    """Relevance at the image ``[N, C, H, W]`` explaining ``targets`` (float64 recommended)."""
    layers = list(model.features) + [nn.Flatten()] + list(model.classifier)
    inputs, x = [], images
    with torch.no_grad():
        for layer in layers:
            inputs.append(x)
            x = layer(x)
    relevance = torch.zeros_like(x)
    relevance[torch.arange(len(x)), torch.as_tensor(targets)] = 1
    for index in range(len(layers) - 1, -1, -1):
        layer, x = layers[index], inputs[index]
        if isinstance(layer, nn.Linear) and index == len(layers) - 1:
            relevance = _first(layer, relevance, x)
        elif isinstance(layer, nn.Linear):
            relevance = _hidden(layer, relevance, x, nn.functional.linear)
        elif isinstance(layer, nn.Conv2d) and index == 0:
            relevance = _input_layer(layer, relevance, x)
        elif isinstance(layer, nn.Conv2d):
            relevance = _hidden(layer, relevance, x,
                                lambda a, v, m=layer: nn.functional.conv2d(a, v, None, m.stride, m.padding))
        elif isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
            x = x.detach().requires_grad_(True)
            z = layer(x)
            relevance = x * _grad(z, x, safe_divide(relevance, z))
        elif isinstance(layer, nn.Flatten):
            relevance = relevance.reshape(x.shape)
        elif not isinstance(layer, (nn.ReLU, nn.Dropout)):
            raise TypeError(f"no RAP rule for {type(layer).__name__}")
        relevance = relevance.detach()
    return relevance
