"""The benchmark's report (`trpo_ext.benchmark`): the markdown table of medians and ratios, the
fused solve's cost split, the --check table and the failures, and the environment line.

A measurement the report cannot trust is marked unreliable instead of printed as a result: a method
whose timings spread by more than SPREAD_LIMIT of their median over the rounds, and a cost split
whose per-call or per-product cost comes out negative or whose product beats its own GEMM floor
(what a busy CPU produces: the methods were timed under different loads)."""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

import torch

OP_LABELS = {"fvp": "fvp", "cg": "cg x{cg_iters}", "step": "policy step"}
# --check: largest relative error of a method's output against the reference's, per op (float32).
CHECK_BOUNDS = {"fvp": 1e-3, "cg": 1e-2}
SPREAD_LIMIT = 0.25
"""A method's timings over the rounds may spread (max - min) by this much of their median; more,
and its median is reported as unreliable (on an idle machine 15 rounds spread by a few percent)."""


@dataclass
class Result:
    """One configuration: median seconds per method, in table order, and what went wrong."""

    order: list  # every (op, method) attempted, in table order
    times: dict = field(default_factory=dict)  # (op, method) -> median seconds
    errors: dict = field(default_factory=dict)  # (op, method) -> "ExceptionType: message"
    rel_err: dict = field(default_factory=dict)  # (op, method) -> |out - ref| / |ref| (with check)
    spread: dict = field(default_factory=dict)  # (op, method) -> (max - min) / median of its timings
    rounds: int = 0

    def unreliable(self, key) -> str | None:
        """Why the median of `key` cannot be trusted, or None."""
        spread = self.spread.get(key, 0.0)
        return f"spread {spread:.0%} over {self.rounds} rounds" if spread > SPREAD_LIMIT else None


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
                elif res.unreliable(key):
                    lines.append(f"{head} unreliable ({res.unreliable(key)}) | - |")
                elif key in res.times:
                    t = res.times[key]
                    trusted = ref and not res.unreliable((op, "reference"))
                    lines.append(f"{head} {t * 1e3:.3f} | {f'{ref / t:.2f}x' if trusted else '-'} |")
    return "\n".join(lines)


SPLIT_KEYS = [("fvp", "fused"), ("cg", "fused"), ("fvp", "gemm floor")]


def split(res: Result, cg_iters: int) -> tuple | None:
    """(per call c, per product i, GEMM floor or None, why unreliable or None) of the fused solve,
    from FVP = c + i and CG = c + cg_iters·i; None without the fused rows."""
    fvp_t, cg_t, floor = (res.times.get(k) for k in SPLIT_KEYS)
    if fvp_t is None or cg_t is None or cg_iters < 2:
        return None
    per_product = (cg_t - fvp_t) / (cg_iters - 1)
    per_call = fvp_t - per_product
    why = next((f"{op} {m}: {res.unreliable((op, m))}" for op, m in SPLIT_KEYS if res.unreliable((op, m))), None)
    if why is None and (per_product <= 0 or per_call < 0):
        why = f"a negative cost (c = {per_call * 1e3:.3f} ms, i = {per_product * 1e3:.3f} ms)"
    if why is None and floor and (per_product < floor or fvp_t < floor):
        why = f"faster than its own GEMM floor ({floor * 1e3:.3f} ms), which the product contains"
    return per_call, per_product, floor, why


def cost_split(results, cg_iters: int) -> str:
    """The fused solve split into a per-call cost c (checks, forward pass and cache, workspace) and a
    per-product cost i, with i against the GEMM floor; a split that cannot be true is marked."""
    lines = ["| config | threads | per call c, ms | per product i, ms | i / gemm floor |", "|---|---|---|---|---|"]
    for (cfg, threads), res in results:
        found = split(res, cg_iters)
        if found is None:
            continue
        per_call, per_product, floor, why = found
        if why is not None:
            lines.append(f"| {cfg} | {threads} | unreliable | unreliable | {why} |")
            continue
        vs_floor = f"{per_product / floor:.2f}x" if floor else "-"
        lines.append(f"| {cfg} | {threads} | {per_call * 1e3:.3f} | {per_product * 1e3:.3f} | {vs_floor} |")
    return "\n".join(lines)


def unreliable(results, cg_iters: int) -> list[str]:
    """Every measurement the report marks unreliable, as text lines."""
    out = []
    for (cfg, threads), res in results:
        out += [f"{cfg}, {threads} thread(s), {op} {m}: {res.unreliable((op, m))}" for op, m in res.order
                if res.unreliable((op, m))]
        found = split(res, cg_iters)
        if found is not None and found[3] is not None and not any(res.unreliable(k) for k in SPLIT_KEYS):
            out.append(f"{cfg}, {threads} thread(s), the cost split: {found[3]}")
    return out


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
    doubtful = unreliable(results, cg_iters)
    if doubtful:
        notes.append("UNRELIABLE (timings disturbed, e.g. by other work on the CPU; rerun on an idle machine or "
                     "with more --rounds): " + "; ".join(doubtful))
    if notes:
        parts.append("\n" + "\n".join(f"- {n}" for n in notes))
    if check:
        parts.append("\nOutputs against the reference's (FVP: the product; CG: the solution x):\n")
        parts.append(check_table(results, cg_iters))
    return "\n".join(parts) + "\n"
