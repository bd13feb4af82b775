"""The benchmark's report (`trpo_ext.benchmark`): the markdown table of medians and ratios, the
fused solve's cost split, the --check table and the failures, and the environment line."""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

import torch

OP_LABELS = {"fvp": "fvp", "cg": "cg x{cg_iters}", "step": "policy step"}
# --check: largest relative error of a method's output against the reference's, per op (float32).
CHECK_BOUNDS = {"fvp": 1e-3, "cg": 1e-2}


@dataclass
class Result:
    """One configuration: median seconds per method, in table order, and what went wrong."""

    order: list  # every (op, method) attempted, in table order
    times: dict = field(default_factory=dict)  # (op, method) -> median seconds
    errors: dict = field(default_factory=dict)  # (op, method) -> "ExceptionType: message"
    rel_err: dict = field(default_factory=dict)  # (op, method) -> |out - ref| / |ref| (with check)
    rounds: int = 0


def environment(device: str) -> str:
    parts = [f"torch {torch.__version__}", f"python {platform.python_version()}",
             f"{platform.machine()} {os.cpu_count()} cpus", "float32"]
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        parts.append(f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
                     f"CUDA {torch.version.cuda}, TF32 matmul {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'})")
    return ", ".join(parts)


def _op_label(op: str, cg_iters: int) -> str:
    return OP_LABELS.get(op, op).format(cg_iters=cg_iters)


def table(results, cg_iters: int) -> str:
    """The markdown table: one row per (config, threads, op, method), ops in order of appearance."""
    lines = ["| config | threads | op | method | median ms | vs reference |", "|---|---|---|---|---|---|"]
    for (cfg, threads), res in results:
        for op in dict.fromkeys(o for o, _ in res.order):
            ref = res.times.get((op, "reference"))
            for key in res.order:
                if key[0] != op:
                    continue
                head = f"| {cfg} | {threads} | {_op_label(op, cg_iters)} | {key[1]} |"
                if key in res.errors:
                    lines.append(f"{head} failed | - |")
                elif key in res.times:
                    t = res.times[key]
                    ratio = f"{ref / t:.2f}x" if ref else "-"
                    lines.append(f"{head} {t * 1e3:.3f} | {ratio} |")
    return "\n".join(lines)


def cost_split(results, cg_iters: int) -> str:
    """The fused solve split into a per-call cost c (checks, forward pass and cache, workspace) and a
    per-product cost i, from FVP = c + i and CG = c + cg_iters·i, with i against the GEMM floor."""
    lines = ["| config | threads | per call c, ms | per product i, ms | i / gemm floor |", "|---|---|---|---|---|"]
    for (cfg, threads), res in results:
        fvp_t, cg_t, floor = (res.times.get((op, m)) for op, m in
                              [("fvp", "fused"), ("cg", "fused"), ("fvp", "gemm floor")])
        if fvp_t is None or cg_t is None or cg_iters < 2:
            continue
        per_product = (cg_t - fvp_t) / (cg_iters - 1)
        vs_floor = f"{per_product / floor:.2f}x" if floor else "-"
        lines.append(f"| {cfg} | {threads} | {(fvp_t - per_product) * 1e3:.3f} | {per_product * 1e3:.3f} | {vs_floor} |")
    return "\n".join(lines)


def check_table(results, cg_iters: int) -> str:
    lines = ["| config | op | method | rel. error vs reference | bound |", "|---|---|---|---|---|"]
    for (cfg, _threads), res in results:
        for (op, method), err in res.rel_err.items():
            bound = CHECK_BOUNDS.get(op)
            flag = "" if bound is None or err <= bound else " **exceeds**"
            lines.append(f"| {cfg} | {_op_label(op, cg_iters)} | {method} | {err:.2e}{flag} | "
                         f"{'-' if bound is None else f'{bound:.0e}'} |")
    return "\n".join(lines)


def problems(results) -> list[str]:
    """Every failed method and every --check error above its bound, as text lines."""
    out = []
    for (cfg, threads), res in results:
        for (op, method), why in res.errors.items():
            out.append(f"{cfg}, {threads} thread(s), {op} {method}: {why}")
        for (op, method), err in res.rel_err.items():
            bound = CHECK_BOUNDS.get(op)
            if bound is not None and not err <= bound:
                out.append(f"{cfg}, {op} {method}: relative error {err:.2e} vs reference exceeds {bound:.0e}")
    return out


def report(results, cg_iters: int, env: str, rounds: int, check: bool, skipped=(), command: str = "") -> str:
    """The whole markdown report: environment, table, notes (rounds, skips, failures), checks."""
    parts = [f"Environment: {env}\n"]
    if command:
        parts.append(f"Command: `{command}`\n")
    parts.append(table(results, cg_iters))
    parts.append("\nThe fused CG solve's time split (FVP = c + i, CG = c + %d i):\n" % cg_iters)
    parts.append(cost_split(results, cg_iters))
    notes = []
    short = [f"{cfg}: {res.rounds}" for (cfg, _), res in results
             if res.rounds < (rounds if cfg.rounds is None else min(rounds, cfg.rounds))]
    if short:
        notes.append(f"Fewer than {rounds} rounds (time budget): " + "; ".join(short))
    if skipped:
        notes.append("Skipped (time budget): " + "; ".join(map(str, skipped)))
    notes += [f"FAILED: {p}" for p in problems(results)]
    if notes:
        parts.append("\n" + "\n".join(f"- {n}" for n in notes))
    if check:
        parts.append("\nOutputs against the reference's (FVP: the product; CG: the solution x):\n")
        parts.append(check_table(results, cg_iters))
    return "\n".join(parts) + "\n"
