"""The generic Fisher path: F v for any policy module whose `forward(obs)` returns one of
`trpo_ext.distributions`' families, as a JVP, the family's closed-form output Fisher and a VJP.

`generic_products` records one forward pass on the tape (`trpo_ext.tape`) and linearises it once per
solve; a pass the tape cannot follow exactly, or a rule that breaks on its first product, hands the
solve to `functorch_products`, which computes the same product with torch.func (a full JVP, forward
pass included, per product). Both are exact (tests/test_generic.py).
"""
from __future__ import annotations

import threading
import warnings

import torch

from .distributions import family_of
from .spaces import batch_len
from .tape import Tape
from .tape_rules import Unsupported

# torch.func's forward-mode AD keeps its levels in process-global state: two threads inside
# torch.func.jvp at once corrupt each other (wrong products, heap corruption, segfaults were seen
# with 4 threads, and a plain torch.func program fails the same way). The generic path therefore runs
# one thread at a time (the tape also calls torch.func.jvp); the fused ops need no lock.
GENERIC_LOCK = threading.Lock()


def generic_products(policy: torch.nn.Module, obs, params: list[torch.Tensor], mask: torch.Tensor | None = None):
    """Linearises the policy's distribution parameters once; returns v -> F v (no damping): the
    batch-mean Fisher (of the policy masked by `mask`, when given) times v, flat in
    `policy.parameters()` order. The caller holds GENERIC_LOCK and no_grad."""
    try:
        product = Tape(policy, obs, params).products(mask)
    except Unsupported:
        return functorch_products(policy, obs, params, mask)
    state = {"product": product, "first": True}

    def guarded(v: torch.Tensor) -> torch.Tensor:
        if not state["first"]:
            return state["product"](v)
        try:  # a rule that breaks on arguments it did not expect: torch.func computes the solve instead
            out = product(v)
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"trpo_ext: the generic path could not run its recorded linearisation ({exc!r}); "
                          "falling back to torch.func", RuntimeWarning, stacklevel=2)
            state["product"] = functorch_products(policy, obs, params, mask)
            out = state["product"](v)
        state["first"] = False
        return out

    return guarded


def functorch_products(policy: torch.nn.Module, obs, params: list[torch.Tensor], mask: torch.Tensor | None = None):
    """The fallback: torch.func's VJP closure built once, a full torch.func.jvp (which repeats the
    forward pass) per product."""
    names = [name for name, _ in policy.named_parameters()]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    dist = policy(obs)
    family = family_of(dist)
    fisher = family.output_fisher(dist, batch_len(obs), mask)

    def f(*flat_params):
        return family.fisher_outputs(torch.func.functional_call(policy, dict(zip(names, flat_params)), (obs,)))

    primals = tuple(p.detach() for p in params)
    # torch.func.linearize would trace the module with make_fx, which breaks on the data-dependent
    # argument checks of distributions.
    _, vjp_fn = torch.func.vjp(f, *primals)

    def product(v: torch.Tensor) -> torch.Tensor:
        tangents = tuple(t.view(s) for t, s in zip(torch.split(v, sizes), shapes))
        cotangents = vjp_fn(fisher(torch.func.jvp(f, primals, tangents)[1]))
        return torch.cat([c.reshape(-1) for c in cotangents])

    return product
