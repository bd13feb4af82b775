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


def _signature(obs, params, b, **options):
    return (obs.device, obs.dtype, tuple(obs.shape), tuple(tuple(p.shape) for p in params),
            tuple(sorted(options.items())))


def _capture(obs, params, b, **options):
    static_obs = obs.detach().clone()
    static_params = [p.detach().clone() for p in params]
    static_b = b.detach().clone()
    side = torch.cuda.Stream(device=obs.device)
    side.wait_stream(torch.cuda.current_stream(obs.device))
    with torch.cuda.stream(side):  # warm-up outside the capture: cuBLAS handles and workspaces
        _ops.mlp_cg(static_obs, static_params, static_b, **options)
    torch.cuda.current_stream(obs.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = _ops.mlp_cg(static_obs, static_params, static_b, **options)
    return graph, static_obs, static_params, static_b, outputs


def graphed_mlp_cg(obs, params, b, **options) -> _ops.CGResult:
    """Same contract as `trpo_ext._ops.mlp_cg` (keyword options: kind, activation, damping, iters,
    rtol), replayed from a cached CUDA graph."""
    key = _signature(obs, params, b, **options)
    entry = _graphs.get(key)
    if entry is None:
        entry = _capture(obs, params, b, **options)
        _graphs[key] = entry
        if len(_graphs) > _MAX_GRAPHS:
            _graphs.popitem(last=False)
    else:
        _graphs.move_to_end(key)
    graph, static_obs, static_params, static_b, outputs = entry
    static_obs.copy_(obs)
    for dst, src in zip(static_params, params):
        dst.copy_(src)
    static_b.copy_(b)
    graph.replay()
    return _ops.CGResult(*(t.clone() for t in outputs))


def clear_graphs() -> None:
    """Frees every captured graph (their memory pools go with them)."""
    _graphs.clear()
