"""Learning at --nproc 1 vs --nproc 2: the same total envs, batch per update, budget and seeds.

    python bench/dist_learning.py --env Hopper-v5 --timesteps 1000000 --seeds 0 1 2 --out bench/results/distributed

Runs `trpo-ext train` once per (seed, nproc), alternating, each its own process (1 torch thread per
rank), and prints a markdown table: per run the final deterministic evaluation (10 episodes), the
mean return of the last 100 training episodes, and the training rate; then per nproc the mean ±
std over seeds.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import time

from common import ONE_THREAD_ENV, mean_std_text, read_progress, train_command, trained_rate


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="Hopper-v5")
    parser.add_argument("--n-envs", type=int, default=16, help="total envs (split over the ranks)")
    parser.add_argument("--n-steps", type=int, default=128)
    parser.add_argument("--timesteps", type=int, default=1_000_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="bench/results/distributed")
    args = parser.parse_args()
    results = {n: [] for n in args.nprocs}
    print(f"{args.env}, {args.timesteps} steps, {args.n_envs} envs x {args.n_steps} steps per update in total, "
          f"observation normalization, sb3-contrib's default TRPO settings; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| nproc | seed | final eval (10 episodes) | last-100 training return | steps/s |")
    print("|---|---|---|---|---|")
    for seed in args.seeds:
        for nproc in args.nprocs:
            out = os.path.join(args.out, f"{args.env}-nproc{nproc}-seed{seed}")
            cmd = train_command(args.env, nproc, args.n_envs // nproc, args.n_steps, args.timesteps, seed, out,
                                "--normalize-obs")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=ONE_THREAD_ENV)
            if proc.returncode != 0:  # the whole output kept: the last line rarely says why
                with open(out + ".failed.txt", "w") as f:
                    f.write(proc.stdout + proc.stderr)
                print(f"| {nproc} | {seed} | failed: {proc.stderr.strip().splitlines()[-1][:200]} (output: "
                      f"{out}.failed.txt) | | |", flush=True)
                continue
            final = float(re.search(r"episodes: ([-\d.]+)", proc.stdout).group(1))
            rate = trained_rate(proc.stdout)
            run_dir = re.search(r"saved (\S+)/model.pt", proc.stdout).group(1)
            last = float(read_progress(run_dir)[-1]["ep_return_mean"])
            results[nproc].append((final, last))
            print(f"| {nproc} | {seed} | {final:.1f} | {last:.1f} | {rate:,.0f} |", flush=True)
    print("\n| nproc | final eval, mean ± std over seeds | last-100 training return, mean ± std |")
    print("|---|---|---|")
    for nproc, rows in results.items():
        if len(rows) > 1:
            finals, lasts = zip(*rows)  # the sample std over seeds
            print(f"| {nproc} | {mean_std_text(finals, 1, ddof=1)} | {mean_std_text(lasts, 1, ddof=1)} |")


if __name__ == "__main__":
    main()
