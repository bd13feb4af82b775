"""The CPO step's cost: the two-column solve against two separate solves, and `constrained_step`
against the double-backprop CPO step (`trpo_ext.reference.cpo_step`, OmniSafe's way: two Python CG
solves with double-backprop products).

One process, one thread by default; the methods are interleaved round by round on the same inputs
and the table reports the median over rounds (p10-p90 beside it). Every solve runs exactly
`--cg-iters` iterations (rtol 0) on both sides; the steps stop after one line-search trial
(max_backtracks=1), with a cost violation that puts the dual in case 2 (both directions used).

Methods:
  two-column solve      _ops.mlp_cg with b (P, 2): one forward pass, one GEMM per Jacobian product
                        and layer for both columns
  two separate solves   _ops.mlp_cg twice, b (P,) each (two forward passes, two GEMMs per product)
  constrained_step      trpo_ext.constrained_step, fused path: both gradients, the two-column
                        solve, the dual, one trial
  reference CPO step    trpo_ext.reference.cpo_step: autograd gradients, two double-backprop CG
                        solves, the dual, one trial loaded into the policy
  trust_region_step     trpo_ext.trust_region_step, fused (the unconstrained step, for scale)

    python bench/constrained_step.py                       # N = 2048, 64x64, 1 thread -> results/constrained_step.md
    python bench/constrained_step.py --rounds 3 --out -    # dry run, print only
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time

import gymnasium as gym
import torch

import trpo_ext
from trpo_ext import _ops, reference
from trpo_ext.benchmark_report import environment
from trpo_ext.distributions import sample_actions
from trpo_ext.policies import fused_spec

PROBLEMS = {  # name: (obs_dim, action space)
    "gaussian obs 17, 6 actions": (17, gym.spaces.Box(-1, 1, (6,))),
    "categorical obs 8, 4 actions": (8, gym.spaces.Discrete(4)),
}


def problem(obs_dim, space, n, hidden, seed=0):
    torch.manual_seed(seed)
    policy = trpo_ext.MLPPolicy(obs_dim, space, hidden=hidden)
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, obs_dim, generator=g)
    with torch.no_grad():
        actions = sample_actions(policy(obs), g)
    advantages = torch.randn(n, generator=g)
    cost_advantages = advantages + 0.5 * torch.randn(n, generator=g)
    return policy, obs, actions, advantages, cost_advantages


def case_two_violation(policy, obs, actions, cost_advantages, iters):
    """A cost violation c with the constraint's boundary inside the trust region (case 2)."""
    log_prob = reference.log_prob(policy, obs, actions)
    b = _ops.flat_vector(torch.autograd.grad((torch.exp(log_prob - log_prob.detach()) * cost_advantages).mean(),
                                             list(policy.parameters())))
    spec, params = fused_spec(policy), [p.detach() for p in policy.parameters()]
    y = _ops.mlp_cg(obs, params, b, damping=0.1, iters=iters, rtol=0.0, **spec.op_kwargs()).x
    return -0.3 * math.sqrt(0.02 * (b @ y).item())


def measure(name, obs_dim, space, args):
    policy, obs, actions, advantages, cost_advantages = problem(obs_dim, space, args.n, args.hidden)
    spec, params = fused_spec(policy), [p.detach() for p in policy.parameters()]
    kwargs = spec.op_kwargs()
    g = torch.Generator().manual_seed(1)
    b2 = torch.randn(sum(p.numel() for p in params), 2, generator=g)
    b_cols = [b2[:, 0].contiguous(), b2[:, 1].contiguous()]
    c = case_two_violation(policy, obs, actions, cost_advantages, args.cg_iters)
    step = dict(max_kl=0.01, damping=0.1, cg_iters=args.cg_iters, cg_rtol=0.0, max_backtracks=1)
    start = _ops.flat_vector(policy.parameters()).detach().clone()

    def reset():
        _ops.load_flat_(start, list(policy.parameters()))

    methods = {
        "two-column solve": lambda: _ops.mlp_cg(obs, params, b2, damping=0.1, iters=args.cg_iters, rtol=0.0, **kwargs),
        "two separate solves": lambda: [_ops.mlp_cg(obs, params, b, damping=0.1, iters=args.cg_iters, rtol=0.0,
                                                    **kwargs) for b in b_cols],
        "constrained_step": lambda: trpo_ext.constrained_step(policy, obs, actions, advantages, cost_advantages, c,
                                                              path="fused", **step),
        "reference CPO step": lambda: reference.cpo_step(policy, obs, actions, advantages, cost_advantages, c,
                                                         max_kl=0.01, damping=0.1, cg_iters=args.cg_iters,
                                                         cg_rtol=0.0, max_backtracks=1),
        "trust_region_step": lambda: trpo_ext.trust_region_step(policy, obs, actions, advantages, path="fused",
                                                                **step),
    }
    record = trpo_ext.constrained_step(copy.deepcopy(policy), obs, actions, advantages, cost_advantages, c,
                                       path="fused", **step)
    assert record.case == 2, f"{name}: the dual took case {record.case}, not 2"
    times = {m: [] for m in methods}
    for _ in range(args.warmup):
        for fn in methods.values():
            fn()
            reset()
    for _ in range(args.rounds):
        for m, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[m].append(time.perf_counter() - t0)
            reset()
    return times


def quantile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--hidden", type=lambda s: tuple(int(h) for h in s.split("x")), default=(64, 64))
    parser.add_argument("--cg-iters", type=int, default=15, help="OmniSafe's CPO default")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "constrained_step.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = ["# The CPO step: two-column solve and constrained_step", "",
             f"`python bench/constrained_step.py {' '.join(argv if argv is not None else sys.argv[1:])}`".replace(" `", "`"),
             "", f"{environment('cpu')}; {args.threads} thread(s); N = {args.n}, hidden "
             f"{'x'.join(map(str, args.hidden))}, {args.cg_iters} CG iterations per solve (rtol 0), one line-search "
             f"trial, dual case 2; median of {args.rounds} interleaved rounds (p10-p90).", ""]
    for name, (obs_dim, space) in PROBLEMS.items():
        times = measure(name, obs_dim, space, args)
        med = {m: statistics.median(t) for m, t in times.items()}
        lines += [f"## {name}", "", "| method | median ms | p10-p90 ms | ratio |", "|---|---|---|---|"]
        ratios = {"two-column solve": med["two separate solves"] / med["two-column solve"],
                  "constrained_step": med["reference CPO step"] / med["constrained_step"]}
        for m, t in times.items():
            ratio = ""
            if m == "two-column solve":
                ratio = f"{ratios[m]:.2f}x faster than two separate solves"
            elif m == "constrained_step":
                ratio = f"{ratios[m]:.1f}x faster than the reference CPO step"
            elif m == "trust_region_step":
                ratio = f"constrained_step costs {med['constrained_step'] / med[m]:.2f}x this"
            lines.append(f"| {m} | {med[m] * 1e3:.2f} | {quantile(t, 0.1) * 1e3:.2f}-{quantile(t, 0.9) * 1e3:.2f} "
                         f"| {ratio} |")
        lines.append("")
        print("\n".join(lines[-len(times) - 4:]), flush=True)
    text = "\n".join(lines)
    if args.out != "-":
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
