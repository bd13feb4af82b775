"""FVP / CG microbenchmarks: fused op vs the double-backprop reference vs the generic torch.func path.

One process; the methods are interleaved round by round, each round timing every method on the same
inputs; the table reports medians over rounds and ratios to the reference. On CUDA the timings come
from CUDA events after warm-up. "gemm floor" is the time of the FVP's GEMMs alone, on the same shapes.

    python -m trpo_ext.benchmark                 # the CPU configurations, 1 thread and all threads
    python -m trpo_ext.benchmark --device cuda   # the GPU configurations
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import gymnasium as gym
import torch

from . import reference
from .fisher import cg_solve, fvp
from .policies import MLPPolicy


@dataclass(frozen=True)
class Config:
    kind: str
    obs_dim: int
    hidden: tuple
    act_dim: int
    batch: int

    def __str__(self):
        return f"{self.kind[:4]} {self.obs_dim}->{'x'.join(map(str, self.hidden))}->{self.act_dim} N={self.batch}"


CPU_CONFIGS = [
    Config("gaussian", 17, (64, 64), 6, 2048),
    Config("gaussian", 17, (64, 64), 6, 16384),
    Config("gaussian", 17, (256, 256), 6, 16384),
    Config("categorical", 4, (64, 64), 2, 2048),
]
GPU_CONFIGS = [Config("gaussian", 17, h, 6, n) for h in [(64, 64), (256, 256)]
               for n in [2048, 16384, 131072, 1048576]]


class _Generic(torch.nn.Module):
    """Hides the MLPPolicy type so fvp / cg_solve take the generic torch.func path."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, obs):
        return self.policy(obs)


def _gemm_floor(policy: MLPPolicy, obs: torch.Tensor):
    """The GEMMs of one fused FVP on preallocated buffers, in the fused op's orientations, and
    nothing else (no element-wise work, no forward pass): the speed limit of the product."""
    weights = [layer.weight.detach() for layer in policy.layers]
    last = len(weights) - 1
    inputs, h = [obs], obs
    for layer in policy.layers[:-1]:
        h = torch.tanh(layer(h)).detach()
        inputs.append(h)
    like = dict(device=obs.device, dtype=obs.dtype)
    tangents = [torch.empty(obs.shape[0], w.shape[0], **like) for w in weights[:-1]]
    out_t = torch.empty(weights[-1].shape[0], obs.shape[0], **like)  # the output layer: (K, N)
    grads = [torch.empty_like(w) for w in weights]
    dirs = [torch.randn_like(w) for w in weights]

    def run():
        for i in range(last):
            torch.mm(inputs[i], dirs[i].t(), out=tangents[i])
            if i:
                tangents[i].addmm_(tangents[i - 1], weights[i].t())
        torch.mm(dirs[last], inputs[last].t(), out=out_t)
        if last:
            out_t.addmm_(weights[last], tangents[last - 1].t())
        torch.mm(out_t, inputs[last], out=grads[last])
        for i in reversed(range(last)):
            upstream = out_t.t() if i + 1 == last else tangents[i + 1]
            torch.mm(upstream, weights[i + 1], out=tangents[i])
            torch.mm(tangents[i].t(), inputs[i], out=grads[i])
    return run


def _methods(cfg: Config, device: str, cg_iters: int, with_generic: bool):
    space = gym.spaces.Discrete(cfg.act_dim) if cfg.kind == "categorical" else gym.spaces.Box(-1, 1, (cfg.act_dim,))
    torch.manual_seed(0)
    policy = MLPPolicy(cfg.obs_dim, space, cfg.hidden).to(device)
    obs = torch.randn(cfg.batch, cfg.obs_dim, device=device)
    v = torch.randn(sum(p.numel() for p in policy.parameters()), device=device)
    generic = _Generic(policy)
    m = {
        ("fvp", "reference"): lambda: reference.fvp(policy, obs, v, 0.1),
        ("fvp", "fused"): lambda: fvp(policy, obs, v, 0.1, check_finite=False),
        ("fvp", "gemm floor"): _gemm_floor(policy, obs),
        ("cg", "reference"): lambda: reference.cg_solve(policy, obs, v, cg_iters, 0.1, rtol=0.0),
        ("cg", "fused"): lambda: cg_solve(policy, obs, v, cg_iters, 0.1, rtol=0.0, check_finite=False),
    }
    if with_generic:
        m[("fvp", "generic")] = lambda: fvp(generic, obs, v, 0.1, check_finite=False)
        m[("cg", "generic")] = lambda: cg_solve(generic, obs, v, cg_iters, 0.1, rtol=0.0, check_finite=False)
    return m


def _time(fn, device: str, inner: int) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def bench_config(cfg: Config, device: str, rounds: int, cg_iters: int, with_generic: bool):
    methods = _methods(cfg, device, cg_iters, with_generic)
    for fn in methods.values():  # warm-up (and CUDA graph capture)
        fn(), fn()
    # Aim at ~20 ms per timing so short calls are not dominated by timer resolution.
    inner = {k: max(1, int(0.02 / max(_time(fn, device, 1), 1e-6))) for k, fn in methods.items()}
    samples = {k: [] for k in methods}
    for _ in range(rounds):
        for k, fn in methods.items():
            samples[k].append(_time(fn, device, inner[k]))
    return {k: statistics.median(s) for k, s in samples.items()}


def environment(device: str) -> str:
    parts = [f"torch {torch.__version__}", f"python {platform.python_version()}",
             f"{platform.machine()} {os.cpu_count()} cpus", "float32"]
    if device == "cuda":
        parts.append(f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    return ", ".join(parts)


def table(results, cg_iters: int) -> str:
    lines = ["| config | threads | op | method | median ms | vs reference |", "|---|---|---|---|---|---|"]
    for (cfg, threads), res in results:
        for op in ("fvp", "cg"):
            ref = res[(op, "reference")]
            for (o, method), t in res.items():
                if o == op:
                    label = f"cg x{cg_iters}" if op == "cg" else "fvp"
                    lines.append(f"| {cfg} | {threads} | {label} | {method} | {t * 1e3:.3f} | {ref / t:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="trpo-ext bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", default=None,
                        help="comma-separated torch thread counts (default: 1 and all cores; CPU only)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per configuration")
    parser.add_argument("--cg-iters", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="the first configuration only, 5 rounds")
    parser.add_argument("--no-generic", action="store_true", help="skip the torch.func generic path")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    configs = CPU_CONFIGS if args.device == "cpu" else GPU_CONFIGS
    rounds = args.rounds
    if args.quick:
        configs, rounds = configs[:1], 5
    if args.device == "cpu":
        threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, os.cpu_count() or 1})
    else:
        threads = [torch.get_num_threads()]
    print(f"# trpo_ext microbenchmark: {environment(args.device)}; {rounds} interleaved rounds, medians",
          file=sys.stderr)
    results = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for cfg in configs:
            print(f"  {cfg}, {n_threads} thread(s) ...", file=sys.stderr, flush=True)
            results.append(((cfg, n_threads), bench_config(cfg, args.device, rounds, args.cg_iters,
                                                           not args.no_generic)))
    print(f"Environment: {environment(args.device)}\n")
    print(table(results, args.cg_iters))
    return 0


if __name__ == "__main__":
    sys.exit(main())
