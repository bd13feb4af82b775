"""The tape's rules for layers (`trpo_ext.tape_rules` has the registry and the rest): linear,
convolutions and layer norm, each with its own JVP and transpose on cached values."""
from __future__ import annotations

import torch

from .tape_rules import bind, rule

_F = torch.nn.functional

NARROW = 16
"""Output features up to which a linear layer's tangent is computed feature-major, (out, N)."""


@rule(_F.linear)
def _linear(call):
    if not call.single:
        return None
    x, w, b = bind(call.args, call.kwargs, ("input", "weight", "bias"))
    x_, w_ = call.read(x), call.read(w)
    wt = w_.t() if w_.dim() == 2 else None
    x2 = x_.reshape(-1, x_.shape[-1]) if x_.dim() != 2 and x_.dim() > 0 else x_
    plain = x_.dim() == 2 and w_.dim() == 2
    # A narrow layer (the policy head) computes its tangent feature-major, (out, N), as the fused op
    # does: MKL runs those GEMMs faster in that orientation (docs/design.md, "The (K, N) output
    # orientation"); the (N, out) result is a transposed view.
    narrow = plain and w_.shape[0] <= NARROW
    x_t = x_.t() if plain else None
    out_buffer, x_buffer, w_buffer = call.buffer(), call.buffer(), call.buffer()

    def linear(t):
        tx, tw, tb = call.pick(t, x), call.pick(t, w), call.pick(t, b)
        if plain and tw is not None and (tx is None or tx.dim() == 2):
            if narrow:
                r = out_buffer.get((w_.shape[0], x_.shape[0]), x_)
                if tb is None:
                    torch.mm(tw, x_t, out=r)
                else:
                    torch.addmm(tb.unsqueeze(1), tw, x_t, out=r)
                if tx is not None:
                    r.addmm_(w_, tx.t())
                return (call.fit(r.t()),)
            r = out_buffer.get((x_.shape[0], w_.shape[0]), x_)
            if tb is None:
                torch.mm(x_, tw.t(), out=r)
            else:
                torch.addmm(tb, x_, tw.t(), out=r)
            if tx is not None:
                r.addmm_(tx, wt)
            return (call.fit(r),)
        r = None
        if tw is not None:
            r, tb = _F.linear(x_, tw, tb), None
        if tx is not None:
            r, tb = (_F.linear(tx, w_, tb), None) if r is None else (r.add_(_F.linear(tx, w_)), tb)
        if tb is not None:
            r = tb if r is None else r + tb
        return (call.fit(r),)

    def linear_back(g):
        g = g[0]
        g2 = g.reshape(-1, g.shape[-1]) if g.dim() != 2 else g
        gx = gw = gb = None
        if call.depends(x):
            gx = torch.mm(g, w_, out=x_buffer.get((g.shape[0], w_.shape[1]), g)) if g.dim() == 2 else g.matmul(w_)
        if call.depends(w):
            gw = torch.mm(g2.t(), x2, out=w_buffer.get(w_.shape, g))
        if call.depends(b):
            gb = g2.sum(0)
        return call.place((x, gx), (w, gw), (b, gb))
    return linear, linear_back


_CONV = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}


@rule(*_CONV)
def _conv(call):
    if not call.single:
        return None
    func = call.func
    x, w, b, stride, padding, dilation, groups = bind(
        call.args, call.kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
        {"stride": 1, "padding": 0, "dilation": 1, "groups": 1})
    k = _CONV[func]
    if isinstance(padding, str):
        if padding != "valid":
            return None  # 'same' may pad asymmetrically: torch.func's local rules
        padding = 0
    expand = lambda o: list(o) if isinstance(o, (tuple, list)) else [o] * k  # noqa: E731
    options = (stride, padding, dilation, groups)
    x_, w_ = call.read(x), call.read(w)
    spatial = (1,) * k
    bias_sizes = None if b is None else list(b.shape)
    back_options = (bias_sizes, expand(stride), expand(padding), expand(dilation), False, [0] * k, groups)

    def conv(t):
        tx, tw, tb = call.pick(t, x), call.pick(t, w), call.pick(t, b)
        r = None
        if tw is not None:
            r, tb = func(x_, tw, tb, *options), None
        if tx is not None:
            s, tb = func(tx, w_, tb, *options), None
            r = s if r is None else r.add_(s)
        if tb is not None:
            r = tb.view(-1, *spatial) if r is None else r + tb.view(-1, *spatial)
        return (call.fit(r),)

    mask = [call.depends(x), call.depends(w), call.depends(b)]

    def conv_back(g):
        g = g[0]
        batched = g.dim() == k + 2
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g if batched else g.unsqueeze(0), x_ if batched else x_.unsqueeze(0), w_, *back_options, mask)
        if gx is not None and not batched:
            gx = gx.squeeze(0)
        return call.place((x, gx), (w, gw), (b, gb))
    return conv, conv_back


@rule(_F.layer_norm)
def _layer_norm(call):
    if not call.single:
        return None
    x, normalized_shape, w, b, eps = bind(call.args, call.kwargs,
                                          ("input", "normalized_shape", "weight", "bias", "eps"), {"eps": 1e-5})
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    dims = tuple(range(-len(normalized_shape), 0))
    x_, w_ = call.read(x), call.read(w)
    _, mean, rstd = torch.native_layer_norm(x_, normalized_shape, None, None, eps)
    x_hat = (x_ - mean) * rstd

    def normalize_t(tx):  # d x_hat = rstd (dx - mean(dx) - x_hat mean(x_hat dx)): symmetric in dx
        r = tx - tx.mean(dims, keepdim=True)
        return r.sub_(x_hat * (tx * x_hat).mean(dims, keepdim=True)).mul_(rstd)

    def layer_norm(t):
        tx, tw, tb = call.pick(t, x), call.pick(t, w), call.pick(t, b)
        r = None
        if tx is not None:
            r = normalize_t(tx)
            if w_ is not None:
                r.mul_(w_)
        if tw is not None:
            s = x_hat * tw
            r = s if r is None else r.add_(s)
        if tb is not None:
            r = tb if r is None else r.add_(tb)
        return (call.fit(r),)

    def layer_norm_back(g):
        g = g[0]
        gx = gw = gb = None
        if call.depends(x):
            gx = normalize_t(g * w_ if w_ is not None else g)
        if call.depends(w):
            gw = (g * x_hat).sum_to_size(w.shape)
        if call.depends(b):
            gb = g.sum_to_size(b.shape)
        return call.place((x, gx), (w, gw), (b, gb))
    return layer_norm, layer_norm_back
