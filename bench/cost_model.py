"""docs/distributed.md's cost model: the time of one data-parallel update at W ranks, from measured
inputs, and the projected speed-up (weak scaling: every rank keeps its envs and batch).

    python bench/cost_model.py --rollout-ms 187 --step-ms 9.5 --critic-us-per-row 10 --rows-per-rank 1024 \\
        --alpha-us 30 --beta-gbps 1.25

Per update and rank (P policy parameters, k CG iterations, t trials, d = obs_dim + 1):
    T(W) = rollout + step + critic_per_row · W · rows + comm(W)
    comm(W) = (6 + t) · allreduce(W, 3 floats) + (1 + k) · allreduce(W, P floats) + allgather(W, rows · d)
(`--critic reduce` models the alternative: each rank fits its own rows, one all-reduce of the V
critic parameters per minibatch instead of the gather)
with ring collectives (gloo's): allreduce(W, n) = 2 (W - 1) (alpha + 4 n / (W beta)),
allgather(W, n) = (W - 1) (alpha + 4 n / beta), and tree all-reduce (NCCL's at scale):
2 log2(W) (alpha + 4 n / beta). Speed-up(W) = W · T(1) / T(W), T(1) the one-process update on one
rank's batch (no collectives).
"""
from __future__ import annotations

import argparse
import math


def comm(w: int, args, tree: bool) -> float:
    alpha, beta = args.alpha_us * 1e-6, args.beta_gbps * 1e9
    if w == 1:
        return 0.0

    def allreduce(n):
        if tree:
            return 2 * math.log2(w) * (alpha + 4 * n / beta)
        return 2 * (w - 1) * (alpha + 4 * n / (w * beta))

    policy = (6 + args.trials) * allreduce(3) + (1 + args.cg_iters) * allreduce(args.params)
    if args.critic == "reduce":  # one all-reduce of the critic's gradient per minibatch
        minibatches = args.critic_epochs * math.ceil(args.rows_per_rank / args.critic_batch)
        return policy + minibatches * allreduce(args.value_params)
    return policy + (w - 1) * (alpha + 4 * args.rows_per_rank * args.row_width / beta)


def critic_rows(w: int, args) -> int:
    """The rows each rank's critic fits: all ranks' (gather) or its own (reduce)."""
    return args.rows_per_rank * (w if args.critic == "gather" else 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollout-ms", type=float, required=True, help="one rank's rollout per update")
    parser.add_argument("--step-ms", type=float, required=True, help="one rank's policy step compute per update")
    parser.add_argument("--critic-us-per-row", type=float, required=True, help="critic fit time per gathered row")
    parser.add_argument("--rows-per-rank", type=int, default=1024)
    parser.add_argument("--row-width", type=int, default=12, help="obs_dim + 1 floats per gathered row")
    parser.add_argument("--params", type=int, default=5126, help="policy parameters (Hopper-v5 64x64: 5,126)")
    parser.add_argument("--cg-iters", type=int, default=15)
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--alpha-us", type=float, required=True, help="per-message latency")
    parser.add_argument("--beta-gbps", type=float, required=True, help="bandwidth, GB/s")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 8, 64, 512])
    parser.add_argument("--tree", action="store_true", help="tree all-reduce (NCCL) instead of ring (gloo)")
    parser.add_argument("--critic", choices=["gather", "reduce"], default="gather",
                        help="gather: what trpo_ext does (every rank fits all rows); reduce: all-reduce each "
                             "minibatch's gradient (not implemented, for comparison)")
    parser.add_argument("--critic-epochs", type=int, default=10)
    parser.add_argument("--critic-batch", type=int, default=128)
    parser.add_argument("--value-params", type=int, default=4993, help="critic parameters (Hopper-v5 64x64: 4,993)")
    args = parser.parse_args()
    base = (args.rollout_ms + args.step_ms) * 1e-3 + args.critic_us_per_row * 1e-6 * args.rows_per_rank
    print(f"alpha {args.alpha_us:g} µs, beta {args.beta_gbps:g} GB/s, {'tree' if args.tree else 'ring'} all-reduce; "
          f"per rank: rollout {args.rollout_ms:g} ms, step {args.step_ms:g} ms, critic "
          f"{args.critic_us_per_row:g} µs/row x {args.rows_per_rank} rows; critic: {args.critic}\n")
    print("| ranks | critic (ms) | collectives (ms) | update (ms) | steps/s vs 1 rank |")
    print("|---|---|---|---|---|")
    for w in args.ranks:
        critic = args.critic_us_per_row * 1e-6 * critic_rows(w, args)
        c = comm(w, args, args.tree)
        total = (args.rollout_ms + args.step_ms) * 1e-3 + critic + c
        print(f"| {w} | {critic * 1e3:,.1f} | {c * 1e3:,.1f} | {total * 1e3:,.1f} | {w * base / total:,.1f}x |")


if __name__ == "__main__":
    main()
