"""Latency of the collectives a data-parallel TRPO update runs, on this machine's backend (the
inputs of docs/distributed.md's cost model).

    python -m torch.distributed.run --nproc-per-node 2 bench/collective_latency.py [--iters 300] [--gloo-loop low]

Rank 0 prints a markdown table: per collective and message size, the median, 90th-percentile and
mean wall time of one blocking call (the ranks run in lock-step, interleaving the sizes round by round),
and what an update of the Hopper-v5 set-up spends in collectives at that latency; then 500
back-to-back all-reduces of 5,126 floats: their wall time and the CPU time of gloo's event-loop
thread(s) (docs/distributed.md, "gloo's event loop"). --gloo-loop: the priority those threads get
first, as trpo_ext sets it (TRPO_EXT_GLOO_LOOP_PRIORITY; "normal", the default here, leaves them as
gloo starts them).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

from trpo_ext.distributed import gloo_event_loop_threads, lower_gloo_event_loops

from common import median_p90_mean


def timed(fn, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def thread_cpu_s(tid: int) -> float:
    """User + system CPU seconds of one thread of this process."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--gloo-loop", choices=("normal", "low", "idle"), default="normal",
                        help="gloo's event-loop priority: as started, nice 19, SCHED_IDLE")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    linux = sys.platform.startswith("linux")
    if args.gloo_loop != "normal":
        if not linux:
            parser.error("--gloo-loop needs Linux (per-thread priorities, /proc/self/task)")
        os.environ["TRPO_EXT_GLOO_LOOP_PRIORITY"] = args.gloo_loop
        lower_gloo_event_loops(dist.group.WORLD)
    group_name = dist.group.WORLD.group_name

    def all_reduce(n, dtype=torch.float32):
        t = torch.ones(n, dtype=dtype)
        return lambda: dist.all_reduce(t)

    def functional_all_reduce(n):  # what the extension's ops call, through the dispatcher
        t = torch.ones(n)

        def run():
            torch.ops._c10d_functional.all_reduce_(t, "sum", group_name)
            torch.ops._c10d_functional.wait_tensor(t)
        return run

    def all_gather(n):
        t = torch.ones(n)
        parts = [torch.empty_like(t) for _ in range(world)]
        return lambda: dist.all_gather(parts, t)

    def broadcast(n):
        t = torch.ones(n, dtype=torch.int64)
        return lambda: dist.broadcast(t, 0)

    cases = {  # name -> callable; the sizes of the Hopper-v5 update (5,126 policy parameters, 16 x 128 states)
        "all_reduce 3 x f64 (counts, trial scalars)": all_reduce(3, torch.float64),
        "all_reduce 5,126 x f32 (gradient, one CG product), torch.distributed": all_reduce(5126),
        "all_reduce 5,126 x f32, _c10d_functional from the op": functional_all_reduce(5126),
        "all_reduce 1,000,000 x f32 (bandwidth)": all_reduce(1_000_000),
        "all_gather 1,024 x 12 f32 per rank (critic rows)": all_gather(1024 * 12),
        "broadcast 1 int64 (critic seed)": broadcast(1),
    }
    times = {name: [] for name in cases}
    for fn in cases.values():  # warm-up: connections, buffers
        for _ in range(10):
            fn()
    dist.barrier()
    for _ in range(args.iters // 10):  # interleaved, 10 calls of each at a time
        for name, fn in cases.items():
            times[name] += timed(fn, 10)
    # Back to back: nothing between the calls, the pattern of a critic's gather or a step's first reductions.
    back_to_back = torch.ones(5126)
    loops = gloo_event_loop_threads()
    cpu_before = sum(thread_cpu_s(t) for t in loops)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(500):
        dist.all_reduce(back_to_back)
    wall = time.perf_counter() - start
    loop_cpu = sum(thread_cpu_s(t) for t in loops) - cpu_before
    if rank == 0:
        print(f"torch {torch.__version__}, backend {args.backend}, world size {world} on one machine "
              f"({os.cpu_count()} cores), python {platform.python_version()}, {platform.machine()}; "
              f"{args.iters} calls each, interleaved; 1 torch thread per rank\n")
        print("| collective | median (µs) | p90 (µs) | mean (µs) |")
        print("|---|---|---|---|")
        for name, ts in times.items():
            median, p90, mean = median_p90_mean(ts)
            print(f"| {name} | {median * 1e6:,.0f} | {p90 * 1e6:,.0f} | {mean * 1e6:,.0f} |")
        # Means: an update pays every call, the slow ones included.
        small = statistics.mean(times["all_reduce 3 x f64 (counts, trial scalars)"])
        grad = statistics.mean(times["all_reduce 5,126 x f32 (gradient, one CG product), torch.distributed"])
        gather = statistics.mean(times["all_gather 1,024 x 12 f32 per rank (critic rows)"])
        bcast = statistics.mean(times["broadcast 1 int64 (critic seed)"])
        # docs/distributed.md: 1 + 1 (statistics, advantages), 2 + 15 + ~1 (step), 3 (critic), 1 (episodes).
        update = 3 * small + 16 * grad + small + small + gather + bcast + small + small
        print(f"\nHopper-v5 update (15 CG products, 1 trial, obs normalization): {update * 1e3:.2f} ms in collectives")
        print(f"\n500 back-to-back all_reduce of 5,126 x f32 (gloo event loop: {args.gloo_loop}): "
              f"{wall * 1e3:.0f} ms, {wall / 500 * 1e6:.0f} µs per call; rank 0's event-loop CPU "
              f"{loop_cpu * 1e3:.0f} ms ({len(loops)} thread(s))" + ("" if linux else " (not measured: not Linux)"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
