"""FVP / CG microbenchmarks: fused op vs the double-backprop reference vs the generic torch.func path.

One process; the methods are interleaved round by round, each round timing every method on the same
inputs; the table reports medians over rounds and ratios to the reference. On CUDA the timings come
from CUDA events after warm-up. "gemm floor" is the time of the FVP's GEMMs alone, on the same shapes.

Methods: "reference" = double backprop (`trpo_ext.reference`); "fused" = the extension's op, eager
(`fvp`, `cg_solve(..., cuda_graph=False)`); "fused+graph" (CUDA only) = CUDA-graph replay: for CG the
library's own path, `cg_solve(..., cuda_graph=True)` (copies the inputs into the captured graph's
buffers, replays, clones the outputs); for the FVP, which has no graph path in the library, a graph
the benchmark captures around `fvp(...)` and replays with its inputs already in place; "generic" =
the torch.func path (`path="generic"`).

"lstm" / "gru" configurations: a built-in recurrent policy (`MlpLstmPolicy` / `MlpGruPolicy`, RNN
of `rnn` units, then the MLP head `hidden`) on B = `batch` sequences of T = `steps` steps (a few
episode starts inside them); "fused" is the extension's product through time (`rnn_fvp`, `rnn_cg`;
docs/design.md §12), "reference" double backprop through time.

"policy step" is the whole TRPO policy step up to its first line-search trial: the surrogate's
gradient, a 10-iteration CG solve, the step size and one trial's KL and surrogate.
"reference" = `trpo_ext.reference.sb3_policy_step`, the step as sb3-contrib computes it (double-backprop
products, CG from 1e-4·randn, one more product for xᵀAx); "fused" / "generic" =
`trpo_ext.trust_region_step` with `max_backtracks=1` on that path. Both sides run exactly 10 CG
iterations (no early stop).

    python -m trpo_ext.benchmark                 # the CPU configurations, 1 thread and all threads
    python -m trpo_ext.benchmark --device cuda   # the GPU configurations
    python -m trpo_ext.benchmark --device cpu --sizes 256,1024 --hidden 16x16 --rounds 3   # dry run
    python -m trpo_ext.benchmark --quick         # the first configuration, 1 thread, 5 rounds
    python -m trpo_ext.benchmark --threads 1 --net lstm,gru --rounds 5   # the recurrent rows only

A median whose timings spread too much over the rounds, and a cost split that cannot be true (a
negative cost, a product faster than its GEMM floor), are reported as unreliable, not as results
(`trpo_ext.benchmark_report`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass

import gymnasium as gym
import torch

from . import reference
from ._ops import flat_vector, load_flat_
from .benchmark_report import Result, environment, problems, report, unreliable
from .config import POLICY_KWARGS
from .distributions import action_spec
from .fisher import cg_solve, fvp
from .policies import MLPPolicy, built_in_policy
from .recurrent import FLAT_NAMES
from .spaces import ObservationCodec, Sequences
from .step import trust_region_step


@dataclass(frozen=True)
class Config:
    """net: "mlp" (MLPPolicy: fused, reference and generic), "layernorm" (a plain nn.Module MLP with a
    LayerNorm after each hidden Linear) or "cnn" (a plain nn.Module conv net on 3 x obs_dim x obs_dim
    images, `NATURE_CNN`, then `hidden` and the head); the last two have no fused op, only the
    reference and the generic path; "lstm" / "gru" the built-in recurrent policy (an RNN of `rnn`
    units, then `hidden`) on `batch` sequences of `steps` steps (fused, reference and generic).
    rounds: at most this many rounds (the slow configurations)."""

    kind: str
    obs_dim: int
    hidden: tuple
    act_dim: int
    batch: int
    net: str = "mlp"
    rounds: int | None = None
    steps: int = 0
    rnn: int = 0

    def __str__(self):
        widths = "x".join(map(str, self.hidden))
        if self.net in RECURRENT_NETS:
            return (f"{self.net} {self.kind[:4]} {self.obs_dim}->{self.net}{self.rnn}->{widths}->{self.act_dim} "
                    f"T={self.steps} B={self.batch}")
        if self.net == "cnn":
            return f"cnn {self.kind[:4]} 3x{self.obs_dim}x{self.obs_dim}->conv->{widths}->{self.act_dim} N={self.batch}"
        head = f"{self.kind[:4]} {self.obs_dim}->{widths}->{self.act_dim} N={self.batch}"
        return head if self.net == "mlp" else f"ln {head}"


CPU_CONFIGS = [
    Config("gaussian", 17, (64, 64), 6, 2048),
    Config("gaussian", 17, (64, 64), 6, 16384),
    Config("gaussian", 17, (256, 256), 6, 16384),
    Config("categorical", 4, (64, 64), 2, 2048),
    Config("gaussian", 17, (64, 64), 6, 2048, net="layernorm"),
    Config("categorical", 64, (256,), 6, 2048, net="cnn", rounds=3),
    Config("gaussian", 17, (64, 64), 6, 16, net="lstm", steps=128, rnn=64),
    Config("gaussian", 17, (64, 64), 6, 16, net="gru", steps=128, rnn=64),
]
RECURRENT_NETS = FLAT_NAMES
"""The recurrent configurations' nets (their cells) and the built-in policies they run."""
# The "cnn" configurations' conv stack, NatureCNN's shape (8x8 stride 4, 4x4 stride 2, 3x3 stride 1,
# ReLU after each) at half its widths: (out channels, kernel, stride) per layer.
NATURE_CNN = ((16, 8, 4), (32, 4, 2), (32, 3, 1))
GPU_SIZES = (2048, 65536, 1048576)
GPU_HIDDEN = ((64, 64), (256, 256))
# Hidden-major, so that under a time budget every size of the small network is measured first.
GPU_CONFIGS = [Config("gaussian", 17, h, 6, n) for h in GPU_HIDDEN for n in GPU_SIZES]

# How each op is labelled in the table (an op missing here is shown under its own name).
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


def _graphed(fn):
    """Captures fn() (which must not synchronise with the host) in a CUDA graph; returns a callable
    that replays it and returns the output of the captured call (the graph's own buffer)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: cuBLAS handles and workspaces
        fn(), fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


ACTION_SPACES = {"categorical": lambda n: gym.spaces.Discrete(n), "gaussian": lambda n: gym.spaces.Box(-1, 1, (n,))}
"""The action space of a configuration's kind, for `act_dim` actions."""


class LayerNormMLP(torch.nn.Module):
    """The "layernorm" configurations' policy: Linear -> LayerNorm -> tanh per hidden layer, a linear
    head, and the action space's distribution (a Gaussian's log-std a state-independent parameter)."""

    def __init__(self, cfg: Config):
        super().__init__()
        layers, width = [], cfg.obs_dim
        for h in cfg.hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.LayerNorm(h), torch.nn.Tanh()]
            width = h
        self._head(cfg, layers, width)

    def _head(self, cfg: Config, layers: list, width: int) -> None:
        self.spec = action_spec(ACTION_SPACES[cfg.kind](cfg.act_dim))
        self.body = torch.nn.Sequential(*layers, torch.nn.Linear(width, self.spec.width))
        self.log_std = torch.nn.Parameter(torch.zeros(self.spec.width)) if self.spec.family.has_log_std else None

    def forward(self, obs):
        return self.spec.distribution(self.body(obs), self.log_std)


class ConvPolicy(LayerNormMLP):
    """The "cnn" configurations' policy: `NATURE_CNN` on 3 x obs_dim x obs_dim images, Flatten,
    Linear + ReLU per `hidden` width, a linear head."""

    def __init__(self, cfg: Config):
        torch.nn.Module.__init__(self)
        layers, channels, side = [], 3, cfg.obs_dim
        for out, kernel, stride in NATURE_CNN:
            layers += [torch.nn.Conv2d(channels, out, kernel, stride=stride), torch.nn.ReLU()]
            channels, side = out, (side - kernel) // stride + 1
        layers.append(torch.nn.Flatten())
        width = channels * side * side
        for h in cfg.hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
            width = h
        self._head(cfg, layers, width)


def make_policy(cfg: Config, device: str):
    """The policy and a batch of observations of `cfg` (seeded)."""
    torch.manual_seed(0)
    if cfg.net == "mlp":
        policy = MLPPolicy(cfg.obs_dim, ACTION_SPACES[cfg.kind](cfg.act_dim), cfg.hidden)
        return policy.to(device), torch.randn(cfg.batch, cfg.obs_dim, device=device)
    if cfg.net == "layernorm":
        return LayerNormMLP(cfg).to(device), torch.randn(cfg.batch, cfg.obs_dim, device=device)
    if cfg.net == "cnn":
        return ConvPolicy(cfg).to(device), torch.rand(cfg.batch, 3, cfg.obs_dim, cfg.obs_dim, device=device)
    if cfg.net in RECURRENT_NETS:
        codec = ObservationCodec(gym.spaces.Box(-1, 1, (cfg.obs_dim,)))
        policy = built_in_policy(RECURRENT_NETS[cfg.net], codec, ACTION_SPACES[cfg.kind](cfg.act_dim), cfg.hidden,
                                 "tanh", 0.0, None, {**POLICY_KWARGS, "lstm_hidden_size": cfg.rnn,
                                                     "n_lstm_layers": 1}).to(device)
        starts = torch.rand(cfg.steps, cfg.batch, device=device) < 0.01  # a few episodes end inside the sequences
        starts[0] = True
        obs = torch.randn(cfg.steps, cfg.batch, cfg.obs_dim, device=device)
        return policy, Sequences(obs, starts, policy.initial_state(cfg.batch))
    raise ValueError(f"unknown net {cfg.net!r}")


def _methods(cfg: Config, device: str, cg_iters: int, with_generic: bool, with_graph: bool = True):
    """{(op, method): callable}, in table order within each op. A callable returns the method's
    output (compared against the reference's by --check) or None. Factories (builders that need
    warm-up or capture) are wrapped in _Lazy so a failure is reported per method. Only an MLPPolicy
    has the fused rows."""
    policy, obs = make_policy(cfg, device)
    v = torch.randn(sum(p.numel() for p in policy.parameters()), device=device)
    graphs = with_graph and device == "cuda" and cfg.net == "mlp"
    fused = cfg.net == "mlp" or cfg.net in RECURRENT_NETS

    def fused_fvp():
        return fvp(policy, obs, v, 0.1, check_finite=False)

    def fused_cg(cuda_graph):
        return lambda: cg_solve(policy, obs, v, cg_iters, 0.1, rtol=0.0, check_finite=False, cuda_graph=cuda_graph)

    m = {("fvp", "reference"): lambda: reference.fvp(policy, obs, v, 0.1)}
    if fused:
        m[("fvp", "fused")] = fused_fvp
        if graphs:
            m[("fvp", "fused+graph")] = _Lazy(lambda: _graphed(fused_fvp))
        if cfg.net == "mlp":
            m[("fvp", "gemm floor")] = _Lazy(lambda: _gemm_floor(policy, obs))
    if with_generic:
        m[("fvp", "generic")] = lambda: fvp(policy, obs, v, 0.1, check_finite=False, path="generic")
    m[("cg", "reference")] = lambda: reference.cg_solve(policy, obs, v, cg_iters, 0.1, rtol=0.0)
    if fused:
        m[("cg", "fused")] = fused_cg(False)
        if graphs:
            m[("cg", "fused+graph")] = fused_cg(True)
    if with_generic:
        m[("cg", "generic")] = lambda: cg_solve(policy, obs, v, cg_iters, 0.1, rtol=0.0, check_finite=False,
                                                path="generic")
    # The whole policy step up to its first line-search trial, on a batch the policy acted on.
    with torch.no_grad():
        actions = policy(obs).sample()
    advantages = torch.randn(cfg.batch * max(cfg.steps, 1), device=device)
    m[("step", "reference")] = lambda: reference.sb3_policy_step(policy, obs, actions, advantages, 0.01, 0.1, cg_iters,
                                                                residual_tol=0.0)
    if fused:
        m[("step", "fused")] = _policy_step(policy, obs, actions, advantages, cg_iters, "fused")
    if with_generic:
        m[("step", "generic")] = _policy_step(policy, obs, actions, advantages, cg_iters, "generic")
    return m


def _policy_step(policy, obs, actions, advantages, cg_iters: int, path: str):
    """trust_region_step with exactly `cg_iters` CG iterations and one line-search trial; the
    policy's parameters are put back after each call, so every call starts from the same θ."""
    params = list(policy.parameters())
    start = flat_vector(params).detach()

    def run():
        record = trust_region_step(policy, obs, actions, advantages, cg_iters=cg_iters, cg_rtol=0.0,
                                   max_backtracks=1, path=path)
        load_flat_(start, params)
        return record
    return run


class _Lazy:
    """A method whose callable is built on first use (so building errors land in that method's row)."""

    def __init__(self, factory):
        self.factory, self.fn = factory, None

    def __call__(self):
        if self.fn is None:
            self.fn = self.factory()
        return self.fn()


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


def _output(out):
    """The tensor a method's output is compared on: the FVP, or the CG solution."""
    if isinstance(out, tuple):
        out = out[0]
    return out.detach().double().cpu() if isinstance(out, torch.Tensor) else None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}".rstrip(": ")


def bench_config(cfg: Config, device: str, rounds: int, cg_iters: int, with_generic: bool,
                 deadline: float | None = None, min_rounds: int = 3, check: bool = False,
                 with_graph: bool = True) -> Result:
    """Times every method of `cfg`; stops after `rounds` rounds, or after `min_rounds` once
    time.perf_counter() passes `deadline`. A method that raises is dropped and reported."""
    methods = _methods(cfg, device, cg_iters, with_generic, with_graph)
    rounds = rounds if cfg.rounds is None else min(rounds, cfg.rounds)
    min_rounds = min(min_rounds, rounds)
    res = Result(order=list(methods))
    outputs = {}
    for key, fn in list(methods.items()):  # warm-up (and CUDA graph capture)
        try:
            out = fn()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            outputs[key] = _output(out)
        except Exception as exc:  # noqa: BLE001 - an out-of-memory or capture failure is a table row
            res.errors[key] = _describe(exc)
            del methods[key]
            if device == "cuda":
                torch.cuda.empty_cache()
    if check:
        for (op, method), out in outputs.items():
            ref = outputs.get((op, "reference"))
            if method != "reference" and out is not None and ref is not None:
                res.rel_err[(op, method)] = ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()
    # Aim at ~20 ms per timing so short calls are not dominated by timer resolution.
    inner = {k: max(1, int(0.02 / max(_time(fn, device, 1), 1e-6))) for k, fn in methods.items()}
    samples = {k: [] for k in methods}
    for r in range(rounds):
        if deadline is not None and r >= min_rounds and time.perf_counter() > deadline:
            break
        for k, fn in methods.items():
            samples[k].append(_time(fn, device, inner[k]))
        res.rounds = r + 1
    res.times = {k: statistics.median(s) for k, s in samples.items() if s}
    res.spread = {k: (max(s) - min(s)) / res.times[k] for k, s in samples.items() if s and res.times[k] > 0}
    return res


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def _hidden(text: str) -> list[tuple]:
    return [tuple(int(w) for w in h.split("x")) if h else () for h in text.replace(" ", "").split(",")]


def configurations(device: str, sizes=None, hidden=None) -> list[Config]:
    """The default configurations of `device`, or, with sizes and/or hidden, every MLP head (kind,
    obs_dim, act_dim, net) of the defaults with those hidden layers and batch sizes (the conv and
    recurrent configurations keep their own shape and are left out)."""
    base = CPU_CONFIGS if device == "cpu" else GPU_CONFIGS
    if not sizes and not hidden:
        return list(base)
    flat = [c for c in base if c.net in ("mlp", "layernorm")]
    heads = dict.fromkeys((c.kind, c.obs_dim, c.act_dim, c.net) for c in flat)
    hidden = hidden or list(dict.fromkeys(c.hidden for c in flat))
    sizes = sizes or list(dict.fromkeys(c.batch for c in flat))
    return [Config(k, o, tuple(h), a, n, net) for (k, o, a, net) in heads for h in hidden for n in sizes]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="trpo-ext bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", default=None,
                        help="comma-separated torch thread counts (default: 1 and all cores; CPU only)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per configuration")
    parser.add_argument("--cg-iters", type=int, default=10)
    parser.add_argument("--quick", action="store_true",
                        help="5 rounds, 1 thread unless --threads, and the first configuration only unless "
                             "--sizes/--hidden are given: seconds on an idle machine")
    parser.add_argument("--no-generic", action="store_true", help="skip the torch.func generic path")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replay rows (CUDA)")
    parser.add_argument("--sizes", type=_ints, default=None,
                        help="comma-separated batch sizes N, replacing the defaults' (e.g. 2048,65536)")
    parser.add_argument("--hidden", type=_hidden, default=None,
                        help="comma-separated hidden layers, replacing the defaults' (e.g. 64x64,256x256)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="stop starting configurations after this long; rounds are cut (to 3 at least) "
                             "so the configurations share it")
    parser.add_argument("--net", default=None,
                        help="comma-separated nets to run (mlp, layernorm, cnn, lstm, gru; default: all of the device's)")
    parser.add_argument("--check", action="store_true",
                        help="compare every method's output with the reference's; exceeding the bound fails")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="also write the markdown report here (rewritten after every configuration)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    configs = configurations(args.device, args.sizes, args.hidden)
    if args.net:
        nets = set(args.net.replace(" ", "").split(","))
        configs = [c for c in configs if c.net in nets]
        if not configs:
            parser.error(f"--net {args.net}: no configuration of those nets on {args.device}")
    rounds = args.rounds
    if args.quick:
        rounds = min(rounds, 5)
        if not args.sizes and not args.hidden:
            configs = configs[:1]
    if args.device == "cpu":
        threads = [int(t) for t in args.threads.split(",")] if args.threads else \
            [1] if args.quick else sorted({1, os.cpu_count() or 1})
    else:
        threads = [torch.get_num_threads()]
    env = environment(args.device)
    command = "python -m trpo_ext.benchmark " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# trpo_ext microbenchmark: {env}; {rounds} interleaved rounds, medians", file=sys.stderr)
    start = time.perf_counter()
    deadline = None if args.time_budget is None else start + args.time_budget
    runs = [(n, cfg) for n in threads for cfg in configs]
    results, skipped = [], []

    def write():
        if args.out:
            with open(args.out, "w") as f:
                f.write(report(results, args.cg_iters, env, rounds, args.check, skipped, command))

    saved_threads = torch.get_num_threads()
    try:
        for i, (n_threads, cfg) in enumerate(runs):
            now = time.perf_counter()
            if deadline is not None and now > deadline:
                skipped.append(f"{cfg}, {n_threads} thread(s)")
                print(f"  {cfg}, {n_threads} thread(s): skipped (time budget)", file=sys.stderr, flush=True)
                continue
            # Each remaining configuration gets an equal share of the remaining budget.
            share = None if deadline is None else now + (deadline - now) / (len(runs) - i)
            torch.set_num_threads(n_threads)
            print(f"  {cfg}, {n_threads} thread(s) ...", file=sys.stderr, flush=True)
            res = bench_config(cfg, args.device, rounds, args.cg_iters, not args.no_generic, deadline=share,
                               check=args.check, with_graph=not args.no_graph)
            print(f"    {res.rounds} rounds, {time.perf_counter() - now:.1f} s"
                  + "".join(f"; {op} {m} FAILED: {why}" for (op, m), why in res.errors.items()),
                  file=sys.stderr, flush=True)
            results.append(((cfg, n_threads), res))
            if args.device == "cuda":
                from . import cuda_graphs

                getattr(cuda_graphs, "clear_graphs", lambda: None)()
                torch.cuda.empty_cache()
            write()
    finally:
        torch.set_num_threads(saved_threads)
    write()
    print(report(results, args.cg_iters, env, rounds, args.check, skipped))
    doubtful = unreliable(results, args.cg_iters)
    if doubtful:
        print(f"{len(doubtful)} measurement(s) unreliable, marked so in the report (a busy CPU?):\n"
              + "\n".join(f"  {d}" for d in doubtful), file=sys.stderr)
    failed = problems(results) + ([] if results else ["no configuration was measured"])
    if failed:
        print(f"{len(failed)} problem(s):\n" + "\n".join(f"  {p}" for p in failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
