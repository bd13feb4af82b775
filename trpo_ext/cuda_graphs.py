"""CUDA-graph replay of the fused CG solve.

The solve never reads a value back to the host, so it can be captured whole. The first call with a
given signature captures a graph on static copies of its inputs; later calls copy their inputs into
those buffers and replay it. Outputs are cloned out of the graph's memory pool before returning.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from . import _ops

_MAX_GRAPHS = 8
_graphs: "OrderedDict[tuple, tuple]" = OrderedDict()


def _signature(obs, params, b, action_mask, options):
    # segments arrive as a list: a tuple in the key. The mask is an input (copied in), only its shape is keyed.
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))
    return (obs.device, obs.dtype, tuple(obs.shape), tuple(tuple(p.shape) for p in params), tuple(b.shape),
            None if action_mask is None else tuple(action_mask.shape), frozen)


def _capture(obs, params, b, action_mask, options):
    static_obs = obs.detach().clone()
    static_params = [p.detach().clone() for p in params]
    static_b = b.detach().clone()
    static_mask = None if action_mask is None else action_mask.clone()
    masks = {} if static_mask is None else {"action_mask": static_mask}
    side = torch.cuda.Stream(device=obs.device)
    side.wait_stream(torch.cuda.current_stream(obs.device))
    with torch.cuda.stream(side):  # warm-up outside the capture: cuBLAS handles and workspaces
        _ops.mlp_cg(static_obs, static_params, static_b, **options, **masks)
    torch.cuda.current_stream(obs.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = _ops.mlp_cg(static_obs, static_params, static_b, **options, **masks)
    return graph, static_obs, static_params, static_b, static_mask, outputs


def graphed_mlp_cg(obs, params, b, *, action_mask=None, **options) -> _ops.CGResult:
    """Same contract as `trpo_ext._ops.mlp_cg` (keyword options: kind, activation, damping, iters,
    rtol, segments, action_mask), replayed from a cached CUDA graph. The op checks its inputs when
    a graph is captured; a replay copies new values into the captured inputs, so the caller checks
    a mask's rows (`trpo_ext.fisher`) before each call."""
    key = _signature(obs, params, b, action_mask, options)
    entry = _graphs.get(key)
    if entry is None:
        entry = _capture(obs, params, b, action_mask, options)
        _graphs[key] = entry
        if len(_graphs) > _MAX_GRAPHS:
            _graphs.popitem(last=False)
    else:
        _graphs.move_to_end(key)
    graph, static_obs, static_params, static_b, static_mask, outputs = entry
    static_obs.copy_(obs)
    for dst, src in zip(static_params, params):
        dst.copy_(src)
    static_b.copy_(b)
    if static_mask is not None:
        static_mask.copy_(action_mask)
    graph.replay()
    return _ops.CGResult(*(t.clone() for t in outputs))


def clear_graphs() -> None:
    """Frees every captured graph (their memory pools go with them)."""
    _graphs.clear()
