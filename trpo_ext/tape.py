"""The generic path's tape: one forward pass of any policy recorded at the torch-function level and
linearised, so that each Fisher-vector product is a JVP and a VJP on cached values (docs/design.md,
"Which path computes the product").

The pass runs on fresh leaves (detached copies of the parameters). A tensor is *dependent* when it
came out of a recorded call with a dependent argument and requires grad (autograd's own verdict
that it depends on a leaf: `detach`, `no_grad` blocks and integer results are constants, as in the
reference); each gets a slot, and each call producing one gets its rules (`trpo_ext.tape_rules`):
a JVP and its transpose, a VJP, on cached primal values. What the tape cannot follow exactly raises
`Unsupported` (the caller falls back to torch.func): a call that writes into one of its arguments
(in-place ReLU excepted), a Python number read out of a dependent tensor, a tensor a rule reads that
changes later in the pass, a call torch.func cannot differentiate.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from . import tape_layers  # noqa: F401  (registers the layer rules)
from .distributions import family_of
from .spaces import batch_len
from .tape_rules import RELU, RELU_INPLACE, Call, Unsupported, bind, flatten, inplace_relu, linearise


class Tape(TorchFunctionMode):
    """One recorded forward pass of `policy` on `obs`; `products(mask)` gives v -> F v."""

    def __init__(self, policy: torch.nn.Module, obs, params: list[torch.Tensor]):
        super().__init__()
        self.leaves = [p.detach().requires_grad_() for p in params]
        self.slot = {id(t): i for i, t in enumerate(self.leaves)}  # id(dependent tensor) -> slot
        self.keep = []  # every dependent tensor stays alive, so that no other tensor takes its id
        self.nodes = []  # (jvp, vjp, input slots, output slots), in call order
        self.reads = []  # (tensor, version) for everything a rule reads
        self.n_slots = len(self.leaves)
        self.pool = BufferPool()
        names = [name for name, _ in policy.named_parameters()]
        with torch.enable_grad(), self:
            self.dist = torch.func.functional_call(policy, dict(zip(names, self.leaves)), (obs,))
            self.family = family_of(self.dist)
            self.outputs = self.family.fisher_outputs(self.dist)
        if any(o.requires_grad and id(o) not in self.slot for o in self.outputs):
            raise Unsupported("a distribution parameter that requires grad came from a call the tape did not see")
        for t, version in self.reads:
            if t._version != version:
                raise Unsupported("a tensor that the linearisation reads was modified later in the forward pass")
        self.n = batch_len(obs)

    def products(self, mask: torch.Tensor | None = None):
        """v -> F v from the recorded pass (of the policy masked by `mask`, when given)."""
        out_slots = [self.slot.get(id(o)) if o.requires_grad else None for o in self.outputs]
        needed, nodes = {s for s in out_slots if s is not None}, []
        for node in reversed(self.nodes):  # only the calls the outputs depend on
            if needed.intersection(node[3]):
                needed.update(node[2])
                nodes.append(node)
        nodes.reverse()
        fisher = self.family.output_fisher(self.dist, self.n, mask)
        n_slots, n_leaves = self.n_slots, len(self.leaves)
        shapes = [p.shape for p in self.leaves]
        sizes = [p.numel() for p in self.leaves]
        zeros = [torch.zeros_like(p) for p in self.leaves]
        self.keep = self.reads = None  # the rules hold what they read

        def product(v: torch.Tensor) -> torch.Tensor:
            if all(s is None for s in out_slots):  # the distribution does not depend on the parameters
                return torch.zeros_like(v)
            with torch.no_grad():
                tangent = [t.view(s) for t, s in zip(torch.split(v, sizes), shapes)] + [None] * (n_slots - n_leaves)
                for jvp, _, ins, outs in nodes:
                    for s, t in zip(outs, jvp([tangent[i] for i in ins])):
                        tangent[s] = t
                cot = [None] * n_slots
                for s, u in zip(out_slots, fisher(tuple(None if s is None else tangent[s] for s in out_slots))):
                    if s is not None:
                        cot[s] = u if cot[s] is None else cot[s] + u
                del tangent
                for _, vjp, ins, outs in reversed(nodes):
                    g = [cot[s] for s in outs]
                    for s in outs:
                        cot[s] = None
                    if all(x is None for x in g):
                        continue
                    for s, x in zip(ins, vjp(g)):
                        if x is not None:
                            cot[s] = x if cot[s] is None else cot[s] + x
                return torch.cat([(z if c is None else c).reshape(-1) for c, z in zip(cot[:n_leaves], zeros)])

        return product

    # -- recording
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, spec = flatten(args, kwargs)
        dep = [i for i, a in enumerate(flat) if isinstance(a, torch.Tensor) and id(a) in self.slot]
        if not dep:
            return func(*args, **kwargs)
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        if any(t.requires_grad and id(t) not in self.slot for t in tensors):
            # made by something the mode did not see (a custom autograd.Function, a C++ extension):
            # its dependence on θ is unknown
            raise Unsupported("a tensor that requires grad came from a call the tape did not see")
        versions = [t._version for t in tensors]
        in_slots = [self.slot[id(flat[i])] for i in dep]
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", repr(func))
        relu_inplace = dep == [0] and bool(args) and (
            func in RELU_INPLACE or (func in RELU and bind(args, kwargs, ("input", "inplace"))[1] is True))
        if not relu_inplace and (any(t._version != v for t, v in zip(tensors, versions))
                                 or kwargs.get("out") is not None):
            raise Unsupported(f"{name} writes into a tensor")
        out_flat = list(out) if isinstance(out, (tuple, list)) else [out]
        if any(isinstance(o, (float, complex)) for o in out_flat):
            raise Unsupported(f"{name} reads a number out of a tensor that depends on the parameters")
        produced = [j for j, o in enumerate(out_flat)
                    if isinstance(o, torch.Tensor) and o.requires_grad and o.is_floating_point()]
        if produced:
            call = Call(func, args, kwargs, flat, spec, dep, out_flat, produced, self._read, self._buffer)
            try:
                rules = inplace_relu(call) if relu_inplace else linearise(call)
            except Unsupported:
                raise
            except Exception as exc:  # noqa: BLE001 - arguments no rule expected: torch.func takes over
                raise Unsupported(f"no linearisation of {name}: {exc}") from exc
            out_slots = []
            for j in produced:
                self.slot[id(out_flat[j])] = self.n_slots
                self.keep.append(out_flat[j])
                out_slots.append(self.n_slots)
                self.n_slots += 1
            self.nodes.append((*rules, in_slots, out_slots))
        return out

    def _read(self, t):
        """`t` detached, for a rule; its version is checked after the pass."""
        if isinstance(t, torch.Tensor):
            self.reads.append((t, t._version))
            return t.detach()
        return t

    def _buffer(self) -> Buffer:
        return Buffer(self.pool)


# ----------------------------------------------------------------------------- the buffer pool
class Buffer:
    """A rule's reusable output tensor: whatever a rule returns is consumed within the product that
    made it, so the next product may write over it (no allocation, no page faults per product)."""

    __slots__ = ("pool", "t")

    def __init__(self, pool: BufferPool):
        self.pool, self.t = pool, None

    def get(self, shape, like):
        t = self.t
        if t is None or t.shape != shape or t.dtype != like.dtype or t.device != like.device:
            t = self.t = self.pool.take(shape, like)
        return t


# Buffers outlive their solve, up to this many bytes in all: the next solve of the same shapes takes
# them instead of allocating (and first touching) its own. Products never overlap (the generic
# path's lock) and none leaves a buffer behind, so solves may share them; within one solve each
# buffer is distinct.
_POOL: dict = {}  # (shape, dtype, device) -> [tensor, ...]
_POOL_LIMIT = 32 << 20
_pool_bytes = 0


class BufferPool:
    """One solve's view of the shared buffers: its k-th buffer of a shape is the pool's k-th."""

    def __init__(self):
        self.count = {}

    def take(self, shape, like):
        global _pool_bytes
        key = (tuple(shape), like.dtype, like.device)
        k = self.count.get(key, 0)
        self.count[key] = k + 1
        pooled = _POOL.setdefault(key, [])
        if k < len(pooled):
            return pooled[k]
        t = torch.empty(shape, dtype=like.dtype, device=like.device)
        if k == len(pooled) and _pool_bytes + t.numel() * t.element_size() <= _POOL_LIMIT:
            pooled.append(t)
            _pool_bytes += t.numel() * t.element_size()
        return t
