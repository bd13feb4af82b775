"""Fisher-vector products and the conjugate-gradient solve (docs/design.md, "The Fisher-vector product").

Two paths compute the same product, a JVP, the closed-form output Fisher and a VJP (never a second
derivative):
- fused: for an `MLPPolicy` whose class keeps `forward`, `distribution_params` and `distribution`
  as MLPPolicy defines them, one call into the extension (the whole CG loop in C++/CUDA);
- generic: torch.func, for any module whose `forward(obs)` returns a Categorical or a (possibly
  Independent) Normal.
`path="auto"` picks the fused one whenever `fused_mlp(policy)` allows it; "fused" and "generic" force one.
"""
from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass

import torch
from torch.distributions import Bernoulli, Categorical, Normal
from torch.overrides import TorchFunctionMode

from . import _ops
from .distributions import MultiCategorical, base_of, masked
from .policies import MLPPolicy
from .spaces import batch_len
from .reference import conjugate_gradient


PATHS = ("auto", "fused", "generic")


@dataclass(frozen=True)
class FusedMLP:
    """What the fused ops need to know about a policy besides its parameters."""

    kind: str  # "categorical", "bernoulli" or "gaussian"
    activation: str
    segments: tuple[int, ...] | None = None  # MultiDiscrete: the class count of each sub-action

    def extra(self, action_mask: torch.Tensor | None = None, **masks) -> dict:
        """The ops' keyword arguments for the segments and masks (none for a plain Discrete / Box
        policy without masks; `masks`: more mask arguments by name, e.g. fvp_action_mask)."""
        extra = {} if self.segments is None else {"segments": list(self.segments)}
        if action_mask is not None:
            extra["action_mask"] = action_mask
        extra.update((k, v) for k, v in masks.items() if v is not None)
        return extra


def fused_mlp(policy) -> FusedMLP | None:
    """The fused-op description of `policy`, or None when only the generic path is exact for it.

    The fused ops compute the Fisher of the plain MLP that `MLPPolicy` defines; a subclass that
    overrides `forward`, `distribution_params` or `distribution` computes something else, so it gets None.
    """
    if not isinstance(policy, MLPPolicy):
        return None
    cls = type(policy)
    if any(getattr(cls, name) is not getattr(MLPPolicy, name) for name in ("forward", "distribution_params",
                                                                          "distribution")):
        return None
    return FusedMLP(policy.kind, policy.activation, policy.segments)


def choose_path(policy, path: str) -> FusedMLP | None:
    """Resolves `path` for `policy`: the FusedMLP for the fused path, None for the generic one."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    fused = fused_mlp(policy) if path != "generic" else None
    if path == "fused" and fused is None:
        raise TypeError(f"path='fused' needs an MLPPolicy that does not override forward or distribution_params, "
                        f"got {type(policy).__name__}; use path='auto' or 'generic'")
    return fused


@dataclass
class CGInfo:
    """What a CG solve reports. Fields are 0-dim tensors on the solve's device (no host sync)."""

    iterations: torch.Tensor  # CG iterations used (int64)
    residual_norm: torch.Tensor  # ||b - A x|| as tracked by the recursion (float64)
    xAx: torch.Tensor  # x'(F + damping I)x, for the TRPO step size (float64)


# ----------------------------------------------------------------------------- input checks
def check_policy(policy) -> list[torch.Tensor]:
    if not isinstance(policy, torch.nn.Module):
        raise TypeError(f"policy must be a torch.nn.Module, got {type(policy).__name__}")
    params = list(policy.parameters())
    if not params:
        raise ValueError("policy has no parameters")
    dtype, device = params[0].dtype, params[0].device
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"policy parameters must be float32 or float64, got {dtype}")
    for p in params:
        if p.dtype != dtype or p.device != device:
            raise TypeError("policy parameters must all share one dtype and device")
    return params


def _check_tensor(name: str, t, params: list[torch.Tensor]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    ref = params[0]
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the policy's dtype {ref.dtype}, got {t.dtype}")
    if t.device != ref.device:
        raise TypeError(f"{name} must be on the policy's device {ref.device}, got {t.device}")


def _check_obs(name: str, obs, params, fused: FusedMLP | None, obs_dim: int | None) -> None:
    if isinstance(obs, dict) and fused is None:  # a Dict observation space's batch: every entry, one batch size
        if not obs:
            raise ValueError(f"{name} is an empty dict")
        for key, t in obs.items():
            _check_obs(f"{name}[{key!r}]", t, params, None, None)
        if len({t.shape[0] for t in obs.values()}) != 1:
            raise ValueError(f"{name}: the entries have different batch sizes "
                             f"{ {k: t.shape[0] for k, t in obs.items()} }")
        return
    _check_tensor(name, obs, params)
    if fused is not None:
        if obs.dim() != 2 or obs.shape[1] != obs_dim:
            raise ValueError(f"{name} must have shape (N, {obs_dim}), got {tuple(obs.shape)}")
    elif obs.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension, got shape {tuple(obs.shape)}")
    if obs.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (N = 0); the Fisher is a mean over at least one state")


def _check_vector(name: str, v, params) -> None:
    _check_tensor(name, v, params)
    n = sum(p.numel() for p in params)
    if v.dim() != 1 or v.numel() != n:
        raise ValueError(f"{name} must be a flat vector of length {n} (the policy's parameter count), "
                         f"got shape {tuple(v.shape)}")


def _check_finite(**tensors) -> None:
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf")


def _check_damping(damping) -> float:
    damping = float(damping)
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be a finite number >= 0, got {damping}")
    return damping


def check_inputs(policy, params: list[torch.Tensor], fused: FusedMLP | None, **observations) -> None:
    """Checks observation batches (keyword name -> tensor) against `policy` and its `params` (from
    `check_policy`) for the path `fused` describes (None: generic)."""
    for name, obs in observations.items():
        _check_obs(name, obs, params, fused, getattr(policy, "obs_dim", None))
    if fused is not None and params[0].is_cuda and not _ops.cuda_built():
        raise RuntimeError("this trpo_ext build has no CUDA kernels (built CPU-only); "
                           "move the policy to the CPU or rebuild with a CUDA torch and nvcc")


def _validate(policy, obs, vec_name, vec, damping, check_finite, path):
    params = check_policy(policy)
    fused = choose_path(policy, path)
    check_inputs(policy, params, fused, obs=obs)
    _check_vector(vec_name, vec, params)
    damping = _check_damping(damping)
    if check_finite:
        _check_finite(obs=obs, **{vec_name: vec})
    return params, damping, fused


# ----------------------------------------------------------------------------- generic path
# torch.func's forward-mode AD keeps its levels in process-global state: two threads inside
# torch.func.jvp at once corrupt each other (wrong products, heap corruption, segfaults were seen
# with 4 threads, and a plain torch.func program fails the same way). The generic path therefore runs
# one thread at a time (the tape below also calls torch.func.jvp); the fused ops need no lock.
_GENERIC_LOCK = threading.Lock()


def _distribution_outputs(dist) -> tuple[torch.distributions.Distribution, tuple[torch.Tensor, ...]]:
    """(base distribution, the parameters the output Fisher acts on): logits (of every segment), or
    (loc, scale)."""
    base = base_of(dist)
    if isinstance(base, MultiCategorical):
        return base, (base.raw_logits,)
    if isinstance(base, (Categorical, Bernoulli)):
        return base, (base.logits,)
    if isinstance(base, Normal):
        return base, (base.loc, base.scale)
    raise TypeError("policy must return Categorical, MultiCategorical, Independent(Bernoulli) or (Independent) "
                    f"Normal, got {type(dist).__name__}")


def _output_fisher(base, n: int, mask: torch.Tensor | None = None):
    """u -> M u / n on the distribution's parameters; a None block (a parameter that does not
    depend on θ) stays None. With an action mask the probabilities are the masked distribution's
    (`trpo_ext.distributions.masked`): a masked logit's row and column of M are exactly 0, so the
    product equals the masked policy's without the tape seeing the masking."""
    if isinstance(base, (Categorical, MultiCategorical)):
        probs = masked(base, mask).probs.detach()
        segments = base.segments if isinstance(base, MultiCategorical) else (probs.shape[-1],)

        def apply(t):  # M u = p * u - p (p'u), p'u per segment
            (u,) = t
            pu = probs * u
            if len(segments) == 1:
                dot = pu.sum(-1, keepdim=True)
            else:
                dot = torch.cat([part.sum(-1, keepdim=True).expand_as(part) for part in pu.split(segments, -1)], -1)
            return ((pu - probs * dot) / n,)
    elif isinstance(base, Bernoulli):
        weight = (torch.sigmoid(base.logits) * torch.sigmoid(-base.logits)).detach()  # p (1 - p), accurate saturated

        def apply(t):
            return (t[0] * weight / n,)
    else:
        inv_var = base.scale.detach().pow(-2)

        def apply(t):  # mean: 1/sigma^2, scale: 2/sigma^2 (a state-dependent scale is a network output)
            return tuple(None if u is None else u * inv_var / n * w for u, w in zip(t, (1.0, 2.0)))
    return apply


def _generic_products(policy: torch.nn.Module, obs, params: list[torch.Tensor], mask: torch.Tensor | None = None):
    """Linearises the policy's distribution parameters once; returns v -> F v (no damping): the
    batch-mean Fisher times v, flat in `policy.parameters()` order.

    One forward pass is recorded (`_Tape`); each product pushes the tangent through the recorded
    calls' JVP rules and pulls M times it back through their VJP rules, on the cached activations
    (no forward pass, no autograd graph, no second derivative). A forward pass the tape cannot
    follow exactly takes `_functorch_products`, which computes the same product with a torch.func
    JVP (forward pass included) per product.
    """
    try:
        product = _Tape(policy, obs, params).products(mask)
    except _Unsupported:
        return _functorch_products(policy, obs, params, mask)
    state = {"product": product, "first": True}

    def guarded(v: torch.Tensor) -> torch.Tensor:
        if not state["first"]:
            return state["product"](v)
        try:  # a rule that breaks on arguments it did not expect: torch.func computes the solve instead
            out = product(v)
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"trpo_ext: the generic path could not run its recorded linearisation ({exc!r}); "
                          "falling back to torch.func", RuntimeWarning, stacklevel=2)
            state["product"] = _functorch_products(policy, obs, params, mask)
            out = state["product"](v)
        state["first"] = False
        return out

    return guarded


def _functorch_products(policy: torch.nn.Module, obs, params: list[torch.Tensor], mask: torch.Tensor | None = None):
    """The fallback: torch.func's VJP closure built once, a full torch.func.jvp (which repeats the
    forward pass) per product."""
    names = [name for name, _ in policy.named_parameters()]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    base, _ = _distribution_outputs(policy(obs))
    fisher = _output_fisher(base, batch_len(obs), mask)

    def f(*flat_params):
        return _distribution_outputs(torch.func.functional_call(policy, dict(zip(names, flat_params)), (obs,)))[1]

    primals = tuple(p.detach() for p in params)
    # torch.func.linearize would trace the module with make_fx, which breaks on the data-dependent
    # argument checks of distributions.
    _, vjp_fn = torch.func.vjp(f, *primals)

    def product(v: torch.Tensor) -> torch.Tensor:
        tangents = tuple(t.view(s) for t, s in zip(torch.split(v, sizes), shapes))
        cotangents = vjp_fn(fisher(torch.func.jvp(f, primals, tangents)[1]))
        return torch.cat([c.reshape(-1) for c in cotangents])

    return product


class _Unsupported(Exception):
    """The forward pass did something the tape cannot linearise exactly."""


def _bind(args, kwargs, names, defaults=None):
    """The values of a call's arguments `names` (positional first, then keywords, then `defaults`)."""
    defaults = defaults or {}
    return [args[i] if i < len(args) else kwargs.get(name, defaults.get(name)) for i, name in enumerate(names)]


_T, _F = torch.Tensor, torch.nn.functional
# Linear in their first argument, the others only saying how (shapes, dims, indices, dtypes): the
# tangent is the same call on the first argument's tangent.
_STRUCTURAL = {
    _T.view, _T.view_as, _T.reshape, torch.reshape, _T.reshape_as, _T.flatten, torch.flatten, _T.unflatten,
    _T.expand, _T.expand_as, _T.squeeze, torch.squeeze, _T.unsqueeze, torch.unsqueeze, _T.t, torch.t,
    _T.transpose, torch.transpose, _T.permute, torch.permute, _T.contiguous, _T.clone, torch.clone,
    _T.__getitem__, _T.chunk, torch.chunk, _T.split, torch.split, _T.unbind, torch.unbind, _T.narrow,
    torch.narrow, _T.select, torch.select, _T.index_select, torch.index_select, _T.repeat, _T.flip,
    torch.flip, _T.movedim, torch.movedim, _T.sum, torch.sum, _T.mean, torch.mean, _T.neg, torch.neg,
    _T.__neg__, _T.__pos__, _T.to, _T.float, _T.double, _T.type_as,
}
_RESHAPES = {_T.view, _T.view_as, _T.reshape, torch.reshape, _T.reshape_as, _T.flatten, torch.flatten, _T.unflatten,
             _T.squeeze, torch.squeeze, _T.unsqueeze, torch.unsqueeze, _T.contiguous, _T.clone, torch.clone}
_EXPANDS = {_T.expand, _T.expand_as}
_CASTS = {_T.to, _T.float, _T.double, _T.type_as}
_NEG = {_T.neg, torch.neg, _T.__neg__}
_ADD = {_T.__add__, _T.__radd__, _T.add, torch.add}
_SUB = {_T.__sub__, _T.sub, torch.sub}
_MUL = {_T.__mul__, _T.__rmul__, _T.mul, torch.mul}
_MM = {_T.__matmul__, _T.matmul, torch.matmul, _T.mm, torch.mm}  # two matrices (else torch.func's rules)
_DIV = {_T.__truediv__, _T.div, torch.div, _T.true_divide, torch.true_divide}
_CONV = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_TANH = {torch.tanh, _T.tanh, _F.tanh}
_SIGMOID = {torch.sigmoid, _T.sigmoid, _F.sigmoid}
_EXP = {torch.exp, _T.exp}
_RELU = {torch.relu, _T.relu, _F.relu}
_RELU_INPLACE = {torch.relu_, _T.relu_}
_TANH_BACKWARD = torch.ops.aten.tanh_backward.grad_input
_SIGMOID_BACKWARD = torch.ops.aten.sigmoid_backward.grad_input


def _RELU_BACKWARD(t, y, grad_input):
    return torch.ops.aten.threshold_backward.grad_input(t, y, 0, grad_input=grad_input)
_LOGSUMEXP = {torch.logsumexp, _T.logsumexp}
# Element-wise in their first argument (scalar or constant options after it): the tangent is the
# first argument's times the derivative, computed once per solve by torch.func.jvp.
_POINTWISE = {
    _F.elu, _F.leaky_relu, _F.gelu, _F.silu, _F.softplus, _F.mish, _F.selu, _F.celu, _F.hardtanh, _F.softsign,
    _F.logsigmoid, torch.log, _T.log, torch.sqrt, _T.sqrt, torch.rsqrt, _T.rsqrt, torch.clamp, _T.clamp,
    torch.clip, _T.clip, torch.pow, _T.pow, _T.__pow__, _T.__rpow__, torch.square, _T.square, torch.log1p,
    _T.log1p, torch.expm1, _T.expm1, torch.sin, _T.sin, torch.cos, _T.cos, torch.reciprocal, _T.reciprocal,
    _T.__rtruediv__, _T.__rsub__,
}


class _Tape(TorchFunctionMode):
    """One forward pass of the policy recorded at the torch-function level, and linearised.

    The pass runs on fresh leaves (detached copies of the parameters that require grad). A tensor
    is *dependent* when it came out of a recorded call with a dependent argument and requires grad
    (autograd's own verdict that it depends on a leaf: `detach`, `no_grad` blocks and integer
    results are constants, as in the reference); each gets a slot, and each call producing one gets
    a pair of rules: a JVP (input tangents -> output tangents) and its transpose, a VJP (output
    cotangents -> input cotangents). Rules read cached primal values only (layer inputs, activation
    derivatives, layer-norm statistics), so a product never repeats the forward pass and never
    touches autograd. Linear, convolutions, layer norm, the usual activations and tensor arithmetic
    have rules of their own; any other call is linearised locally by torch.func on that call alone.
    What the tape cannot follow exactly raises `_Unsupported` (the caller falls back to torch.func):
    a call that writes into one of its arguments (in-place ReLU excepted), a Python float read out of
    a dependent tensor, a tensor a rule reads that changes later in the pass, a call torch.func
    cannot differentiate.
    """

    def __init__(self, policy: torch.nn.Module, obs: torch.Tensor, params: list[torch.Tensor]):
        super().__init__()
        self.leaves = [p.detach().requires_grad_() for p in params]
        self.slot = {id(t): i for i, t in enumerate(self.leaves)}  # id(dependent tensor) -> slot
        self.keep = []  # every dependent tensor stays alive, so that no other tensor takes its id
        self.nodes = []  # (jvp, vjp, input slots, output slots), in call order
        self.reads = []  # (tensor, version) for everything a rule reads
        self.n_slots = len(self.leaves)
        self.pool = _BufferPool()
        names = [name for name, _ in policy.named_parameters()]
        with torch.enable_grad(), self:
            dist = torch.func.functional_call(policy, dict(zip(names, self.leaves)), (obs,))
            self.base, self.outputs = _distribution_outputs(dist)
        if any(o.requires_grad and id(o) not in self.slot for o in self.outputs):
            raise _Unsupported("a distribution parameter that requires grad came from a call the tape did not see")
        for t, version in self.reads:
            if t._version != version:
                raise _Unsupported("a tensor that the linearisation reads was modified later in the forward pass")
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
        fisher = _output_fisher(self.base, self.n, mask)
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
        flat, spec = _flatten(args, kwargs)
        dep = [i for i, a in enumerate(flat) if isinstance(a, torch.Tensor) and id(a) in self.slot]
        if not dep:
            return func(*args, **kwargs)
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        if any(t.requires_grad and id(t) not in self.slot for t in tensors):
            # made by something the mode did not see (a custom autograd.Function, a C++ extension):
            # its dependence on θ is unknown
            raise _Unsupported("a tensor that requires grad came from a call the tape did not see")
        versions = [t._version for t in tensors]
        in_slots = [self.slot[id(flat[i])] for i in dep]
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", repr(func))
        relu_inplace = dep == [0] and bool(args) and (
            func in _RELU_INPLACE or (func in _RELU and _bind(args, kwargs, ("input", "inplace"))[1] is True))
        if not relu_inplace and (any(t._version != v for t, v in zip(tensors, versions))
                                 or kwargs.get("out") is not None):
            raise _Unsupported(f"{name} writes into a tensor")
        out_flat = list(out) if isinstance(out, (tuple, list)) else [out]
        if any(isinstance(o, (float, complex)) for o in out_flat):
            raise _Unsupported(f"{name} reads a number out of a tensor that depends on the parameters")
        produced = [j for j, o in enumerate(out_flat)
                    if isinstance(o, torch.Tensor) and o.requires_grad and o.is_floating_point()]
        if produced:
            try:
                if relu_inplace:
                    rules = self._diagonal(_RELU_BACKWARD, self._read(out))
                else:
                    rules = self._rules(func, args, kwargs, flat, spec, dep, out_flat, produced)
            except _Unsupported:
                raise
            except Exception as exc:  # noqa: BLE001 - arguments no rule expected: torch.func takes over
                raise _Unsupported(f"no linearisation of {name}: {exc}") from exc
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

    def _rules(self, func, args, kwargs, flat, spec, dep, out_flat, produced):
        """(jvp, vjp) of one call. jvp: the tangents of its dependent arguments (in `dep` order) ->
        the tangents of its `produced` outputs; vjp: the cotangents of those outputs (None: zero) ->
        the cotangents of the dependent arguments (None: zero)."""
        position = {}
        for k, i in enumerate(dep):
            position.setdefault(id(flat[i]), k)
        n_dep = len(dep)

        def pick(t, a):  # the tangent of argument a, or None
            k = position.get(id(a)) if isinstance(a, torch.Tensor) else None
            return None if k is None else t[k]

        def place(**grads):  # cotangents by argument -> in `dep` order (a repeated argument gets the sum)
            res = [None] * n_dep
            for a, g in grads.values():
                k = position.get(id(a)) if isinstance(a, torch.Tensor) else None
                if k is not None and g is not None:
                    res[k] = g if res[k] is None else res[k] + g
            return res

        out = out_flat[produced[0]]
        shape = out.shape

        def fit(t):  # a broadcast term may lack some of the output's dimensions
            return t if t.shape == shape else t.expand(shape)

        def unfit(g, like):  # the transpose of the broadcast
            return g if g.shape == like.shape else g.sum_to_size(like.shape)

        first = bool(args) and dep[0] == 0 and isinstance(args[0], torch.Tensor)
        if first and func in _STRUCTURAL:  # other dependent tensors are only shape or index donors
            x, rest, options = args[0], args[1:], kwargs
            in_shape, in_dtype, in_device = x.shape, x.dtype, x.device

            def structural(t):
                res = func(t[0], *rest, **options)
                res = list(res) if isinstance(res, (tuple, list)) else [res]
                return tuple(res[j] for j in produced)
            if func in _RESHAPES and len(produced) == 1:
                back = lambda g: (g[0].reshape(in_shape),) + (None,) * (n_dep - 1)  # noqa: E731
            elif func in _EXPANDS:
                back = lambda g: (g[0].sum_to_size(in_shape),) + (None,) * (n_dep - 1)  # noqa: E731
            elif func in _CASTS:
                back = lambda g: (g[0].to(in_device, in_dtype),) + (None,) * (n_dep - 1)  # noqa: E731
            elif func in _NEG:
                back = lambda g: (-g[0],) + (None,) * (n_dep - 1)  # noqa: E731
            elif func is _T.__pos__:
                back = lambda g: (g[0],) + (None,) * (n_dep - 1)  # noqa: E731
            else:
                back = self._local_vjp(func, flat, spec, dep[:1], produced, n_dep)
            return structural, back
        if dep == [0] and first and len(produced) == 1:
            d = None
            for group, backward in ((_TANH, _TANH_BACKWARD), (_SIGMOID, _SIGMOID_BACKWARD), (_RELU, _RELU_BACKWARD)):
                if func in group:  # autograd's own kernel on the output, both ways (the map is diagonal)
                    return self._diagonal(backward, self._read(out))
            if func in _EXP:
                d = self._read(out)
            elif func in _POINTWISE:
                x, rest, options = self._read(args[0]), args[1:], kwargs
                d = torch.func.jvp(lambda z: func(z, *rest, **options), (x,), (torch.ones_like(x),))[1].detach()
            if d is not None:
                return self._scale(d, args[0], fit, unfit)
            if func in _LOGSUMEXP and args[0].dim() > 0:
                return self._logsumexp(args, kwargs, out)
        if len(produced) == 1:
            if func is _F.linear:
                return self._linear(args, kwargs, pick, place, fit)
            if func in _CONV:
                rules = self._conv(func, args, kwargs, pick, place, fit)
                if rules is not None:
                    return rules
            if func is _F.layer_norm:
                return self._layer_norm(args, kwargs, pick, place, fit)
            a, b, third = _bind(args, kwargs, ("input", "other", "alpha"))
            operands_only = all(flat[i] is a or flat[i] is b for i in dep)
            if operands_only and (func in _ADD or func in _SUB):
                scale = 1 if third is None else third
                scale = -scale if func in _SUB else scale

                def add(t):
                    ta, tb = pick(t, a), pick(t, b)
                    if tb is not None and scale != 1:
                        tb = tb * scale
                    return (fit(tb if ta is None else (ta if tb is None else ta + tb)),)

                def add_back(g):
                    g = g[0]
                    return place(a=(a, unfit(g, a) if position.get(id(a)) is not None else None),
                                 b=(b, unfit(g if scale == 1 else g * scale, b)
                                    if isinstance(b, torch.Tensor) and id(b) in position else None))
                return add, add_back
            if operands_only and (func in _MUL or (func in _MM and a.dim() == 2 and b.dim() == 2)):
                a_, b_ = self._read(a), self._read(b)
                mm = func in _MM

                def bilinear(t):
                    ta, tb = pick(t, a), pick(t, b)
                    r = None if ta is None else func(ta, b_)
                    s = None if tb is None else func(a_, tb)
                    return (fit(s if r is None else (r if s is None else r + s)),)

                def bilinear_back(g):
                    g = g[0]
                    ga = gb = None
                    if position.get(id(a)) is not None:
                        ga = g.mm(b_.t()) if mm else unfit(g * b_, a)
                    if isinstance(b, torch.Tensor) and id(b) in position:
                        gb = a_.t().mm(g) if mm else unfit(g * a_, b)
                    return place(a=(a, ga), b=(b, gb))
                return bilinear, bilinear_back
            if operands_only and func in _DIV and third is None:  # (the third argument is rounding_mode)
                b_, y = self._read(b), self._read(out)

                def div(t):
                    ta, tb = pick(t, a), pick(t, b)
                    r = None if ta is None else ta / b_
                    s = None if tb is None else -(y * tb) / b_
                    return (fit(s if r is None else (r if s is None else r + s)),)

                def div_back(g):
                    g = g[0]
                    ga = unfit(g / b_, a) if position.get(id(a)) is not None else None
                    gb = (unfit(-(g * y) / b_, b) if isinstance(b, torch.Tensor) and id(b) in position else None)
                    return place(a=(a, ga), b=(b, gb))
                return div, div_back
        if func is torch.broadcast_tensors and all(isinstance(a, torch.Tensor) for a in args):
            sources = [position.get(id(args[j])) for j in produced]
            shapes = [out_flat[j].shape for j in produced]
            if None not in sources and len(set(sources)) == len(sources):
                in_shapes = [args[j].shape for j in produced]

                def broadcast_back(g):
                    res = [None] * n_dep
                    for k, x, s in zip(sources, g, in_shapes):
                        if x is not None:
                            res[k] = x if x.shape == s else x.sum_to_size(s)
                    return res
                return (lambda t: tuple(t[k].expand(s) for k, s in zip(sources, shapes))), broadcast_back
        return self._local(func, flat, spec, dep, produced)

    def _diagonal(self, backward, y):
        """The rules of tanh, sigmoid or ReLU: their derivative from the output y, applied by the backward
        kernel autograd uses (one pass, nothing cached but y)."""
        forward_buffer, backward_buffer = _Buffer(self.pool), _Buffer(self.pool)

        def apply(t, buffer):
            t = t[0]
            if t.shape != y.shape:
                t = t.expand(y.shape)
            return (backward(t, y, grad_input=buffer.get(y.shape, y)),)
        return (lambda t: apply(t, forward_buffer)), (lambda g: apply(g, backward_buffer))

    def _scale(self, d, x, fit, unfit):
        """The rules of an element-wise function with derivative d: multiply by d both ways."""
        same = d.shape == x.shape
        forward, backward = _Buffer(self.pool), _Buffer(self.pool)

        def jvp(t):
            t = t[0]
            return (torch.mul(t, d, out=forward.get(d.shape, d)) if same and t.shape == d.shape else fit(t * d),)

        def vjp(g):
            g = g[0]
            return (torch.mul(g, d, out=backward.get(d.shape, d)) if same and g.shape == d.shape else unfit(g * d, x),)
        return jvp, vjp

    def _linear(self, args, kwargs, pick, place, fit):
        x, w, b = _bind(args, kwargs, ("input", "weight", "bias"))
        x_, w_ = self._read(x), self._read(w)
        wt = w_.t() if w_.dim() == 2 else None
        x2 = x_.reshape(-1, x_.shape[-1]) if x_.dim() != 2 and x_.dim() > 0 else x_
        plain = x_.dim() == 2 and w_.dim() == 2
        # A narrow layer (the policy head) computes its tangent feature-major, (out, N), as the fused
        # op does: MKL runs those GEMMs about twice as fast (docs/design.md, "The (K, N) output
        # orientation"); the (N, out) result is a transposed view.
        narrow = plain and w_.shape[0] <= _NARROW
        x_t = x_.t() if plain else None
        out_buffer, x_buffer, w_buffer = _Buffer(self.pool), _Buffer(self.pool), _Buffer(self.pool)

        def linear(t):
            tx, tw, tb = pick(t, x), pick(t, w), pick(t, b)
            if plain and tw is not None and (tx is None or tx.dim() == 2):
                if narrow:
                    r = out_buffer.get((w_.shape[0], x_.shape[0]), x_)
                    if tb is None:
                        torch.mm(tw, x_t, out=r)
                    else:
                        torch.addmm(tb.unsqueeze(1), tw, x_t, out=r)
                    if tx is not None:
                        r.addmm_(w_, tx.t())
                    return (fit(r.t()),)
                r = out_buffer.get((x_.shape[0], w_.shape[0]), x_)
                if tb is None:
                    torch.mm(x_, tw.t(), out=r)
                else:
                    torch.addmm(tb, x_, tw.t(), out=r)
                if tx is not None:
                    r.addmm_(tx, wt)
                return (fit(r),)
            r = None
            if tw is not None:
                r, tb = _F.linear(x_, tw, tb), None
            if tx is not None:
                r, tb = (_F.linear(tx, w_, tb), None) if r is None else (r.add_(_F.linear(tx, w_)), tb)
            if tb is not None:
                r = tb if r is None else r + tb
            return (fit(r),)

        def linear_back(g):
            g = g[0]
            g2 = g.reshape(-1, g.shape[-1]) if g.dim() != 2 else g
            gx = gw = gb = None
            if pick(_ALL, x) is not None:
                gx = torch.mm(g, w_, out=x_buffer.get((g.shape[0], w_.shape[1]), g)) if g.dim() == 2 else g.matmul(w_)
            if pick(_ALL, w) is not None:
                gw = torch.mm(g2.t(), x2, out=w_buffer.get(w_.shape, g))
            if b is not None and pick(_ALL, b) is not None:
                gb = g2.sum(0)
            return place(x=(x, gx), w=(w, gw), b=(b, gb))
        return linear, linear_back

    def _conv(self, func, args, kwargs, pick, place, fit):
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        x, w, b, stride, padding, dilation, groups = _bind(
            args, kwargs, names, {"stride": 1, "padding": 0, "dilation": 1, "groups": 1})
        k = _CONV[func]
        if isinstance(padding, str):
            if padding != "valid":
                return None  # 'same' may pad asymmetrically: torch.func's local rules
            padding = 0
        expand = lambda o: list(o) if isinstance(o, (tuple, list)) else [o] * k  # noqa: E731
        options = (stride, padding, dilation, groups)
        x_, w_ = self._read(x), self._read(w)
        spatial = (1,) * k
        bias_sizes = None if b is None else list(b.shape)
        back_options = (bias_sizes, expand(stride), expand(padding), expand(dilation), False, [0] * k, groups)

        def conv(t):
            tx, tw, tb = pick(t, x), pick(t, w), pick(t, b)
            r = None
            if tw is not None:
                r, tb = func(x_, tw, tb, *options), None
            if tx is not None:
                s, tb = func(tx, w_, tb, *options), None
                r = s if r is None else r.add_(s)
            if tb is not None:
                r = tb.view(-1, *spatial) if r is None else r + tb.view(-1, *spatial)
            return (fit(r),)

        mask = [pick(_ALL, x) is not None, pick(_ALL, w) is not None, b is not None and pick(_ALL, b) is not None]

        def conv_back(g):
            g = g[0]
            batched = g.dim() == k + 2
            gx, gw, gb = torch.ops.aten.convolution_backward(
                g if batched else g.unsqueeze(0), x_ if batched else x_.unsqueeze(0), w_, *back_options, mask)
            if gx is not None and not batched:
                gx = gx.squeeze(0)
            return place(x=(x, gx), w=(w, gw), b=(b, gb))
        return conv, conv_back

    def _layer_norm(self, args, kwargs, pick, place, fit):
        x, normalized_shape, w, b, eps = _bind(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"),
                                               {"eps": 1e-5})
        normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        dims = tuple(range(-len(normalized_shape), 0))
        x_, w_ = self._read(x), self._read(w)
        _, mean, rstd = torch.native_layer_norm(x_, normalized_shape, None, None, eps)
        x_hat = (x_ - mean) * rstd

        def normalize_t(tx):  # d x_hat = rstd (dx - mean(dx) - x_hat mean(x_hat dx)): symmetric in dx
            r = tx - tx.mean(dims, keepdim=True)
            return r.sub_(x_hat * (tx * x_hat).mean(dims, keepdim=True)).mul_(rstd)

        def layer_norm(t):
            tx, tw, tb = pick(t, x), pick(t, w), pick(t, b)
            r = None
            if tx is not None:
                r = normalize_t(tx)
                if w_ is not None:
                    r.mul_(w_)
            if tw is not None:
                s = x_hat * tw
                r = s if r is None else r.add_(s)
            if tb is not None:
                r = tb if r is None else r.add_(tb)
            return (fit(r),)

        def layer_norm_back(g):
            g = g[0]
            gx = gw = gb = None
            if pick(_ALL, x) is not None:
                gx = normalize_t(g * w_ if w_ is not None else g)
            if w is not None and pick(_ALL, w) is not None:
                gw = (g * x_hat).sum_to_size(w.shape)
            if b is not None and pick(_ALL, b) is not None:
                gb = g.sum_to_size(b.shape)
            return place(x=(x, gx), w=(w, gw), b=(b, gb))
        return layer_norm, layer_norm_back

    def _logsumexp(self, args, kwargs, out):
        x, dim, keepdim = _bind(args, kwargs, ("input", "dim", "keepdim"), {"keepdim": False})
        x_, y = self._read(x), self._read(out)
        dims = sorted(d % x_.dim() for d in ((dim,) if isinstance(dim, int) else dim))
        if not keepdim:
            for d in dims:
                y = y.unsqueeze(d)
        p = torch.exp(x_ - y)  # the softmax along dims

        def back(g):
            g = g[0]
            if not keepdim:
                for d in dims:
                    g = g.unsqueeze(d)
            return (g * p,)
        return (lambda t: ((p * t[0]).sum(dims, keepdim=bool(keepdim)),)), back

    def _call(self, func, flat, spec, dep, produced):
        """The call as a function of its dependent arguments, returning its produced outputs."""
        def call(*xs):
            values = list(flat)
            for i, x in zip(dep, xs):
                values[i] = x
            a, k = _unflatten(values, spec)
            res = func(*a, **k)
            res = list(res) if isinstance(res, (tuple, list)) else [res]
            return tuple(res[j] for j in produced)
        return call

    def _local_vjp(self, func, flat, spec, dep, produced, n_dep):
        """torch.func's VJP of the call in its first `len(dep)` dependent arguments (built once)."""
        primals = tuple(self._read(flat[i]) for i in dep)
        outs, vjp_fn = torch.func.vjp(self._call(func, flat, spec, dep, produced), *primals)
        pad = (None,) * (n_dep - len(dep))

        def back(g):
            return tuple(vjp_fn(tuple(torch.zeros_like(o) if x is None else x for x, o in zip(g, outs)))) + pad
        return back

    def _local(self, func, flat, spec, dep, produced):
        """torch.func's JVP (the call's forward runs again per product) and VJP of one call with no rule
        of its own."""
        primals = tuple(self._read(flat[i]) for i in dep)
        call = self._call(func, flat, spec, dep, produced)

        def local(t):
            return torch.func.jvp(call, primals, tuple(t))[1]
        try:  # now, so that a call torch.func cannot differentiate is found before the solve
            local(tuple(torch.zeros_like(p) for p in primals))
            back = self._local_vjp(func, flat, spec, dep, produced, len(dep))
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            raise _Unsupported(f"torch.func cannot differentiate {getattr(func, '__name__', func)}") from exc
        return local, back


_NARROW = 16  # output features up to which a linear layer's tangent is computed feature-major


class _Buffer:
    """A rule's reusable output tensor: whatever a rule returns is consumed within the product that
    made it, so the next product may write over it (no allocation, no page faults per product)."""

    __slots__ = ("pool", "t")

    def __init__(self, pool: "_BufferPool"):
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


class _BufferPool:
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


class _AllPresent:
    """`pick(_ALL, a)` is not None exactly when a is a dependent argument."""

    def __getitem__(self, k):
        return True


_ALL = _AllPresent()


def _flatten(args, kwargs):
    """A call's arguments as a flat list (tensors in tuples/lists included) and what rebuilds them."""
    flat, spec = [], []
    for group in (args, tuple(kwargs.values())):
        for a in group:
            if isinstance(a, (tuple, list)):
                spec.append((type(a), len(a)))
                flat.extend(a)
            else:
                spec.append(None)
                flat.append(a)
    return flat, (spec, len(args), tuple(kwargs))


def _unflatten(flat, spec):
    spec, n_args, keys = spec
    values, i = [], 0
    for s in spec:
        if s is None:
            values.append(flat[i])
            i += 1
        else:
            kind, n = s
            values.append(kind(flat[i:i + n]))
            i += n
    return values[:n_args], dict(zip(keys, values[n_args:]))


# ----------------------------------------------------------------------------- public API
def fvp(policy: torch.nn.Module, obs: torch.Tensor, v: torch.Tensor, damping: float = 0.0,
        check_finite: bool = True, path: str = "auto") -> torch.Tensor:
    """(F + damping I) v, flat in `policy.parameters()` order; F is the Hessian of the batch-mean KL.

    `check_finite` tests obs and v for NaN/Inf (one device sync on a GPU). `path`: "auto", "fused"
    or "generic" (module docstring).
    """
    params, damping, fused = _validate(policy, obs, "v", v, damping, check_finite, path)
    if fused is not None:
        return _ops.mlp_fvp(obs, [p.detach() for p in params], v, kind=fused.kind, activation=fused.activation,
                            damping=damping)
    with _GENERIC_LOCK, torch.no_grad():
        return _generic_products(policy, obs, params)(v) + damping * v


def cg_solve(policy: torch.nn.Module, obs: torch.Tensor, b: torch.Tensor, iters: int = 10,
             damping: float = 0.1, rtol: float = 1e-6, check_finite: bool = True,
             cuda_graph: bool = True, path: str = "auto") -> tuple[torch.Tensor, CGInfo]:
    """Solves (F + damping I) x = b by conjugate gradient; returns (x, CGInfo).

    Stops after `iters` Fisher-vector products or when ||r|| <= rtol ||b||. For an `MLPPolicy`
    the whole loop is one extension call; on a GPU it never synchronises with the host, and with
    `cuda_graph=True` repeated solves of one shape replay a captured CUDA graph.
    `check_finite` tests obs and b for NaN/Inf first (one device sync on a GPU). `path`: "auto",
    "fused" or "generic" (module docstring).
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    rtol = float(rtol)
    if not math.isfinite(rtol) or rtol < 0:
        raise ValueError(f"rtol must be a finite number >= 0, got {rtol}")
    params, damping, fused = _validate(policy, obs, "b", b, damping, check_finite, path)
    if fused is not None:
        solve = _ops.mlp_cg
        if b.is_cuda and cuda_graph:
            from .cuda_graphs import graphed_mlp_cg as solve
        x, used, res, xAx = solve(obs, [p.detach() for p in params], b, kind=fused.kind,
                                  activation=fused.activation, damping=damping, iters=iters, rtol=rtol)
        return x, CGInfo(used, res, xAx)
    return generic_cg_solve(policy, obs, params, b, damping, iters, rtol)


def generic_cg_solve(policy: torch.nn.Module, obs, params: list[torch.Tensor], b: torch.Tensor,
                     damping: float, iters: int, rtol: float, combine=None,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, CGInfo]:
    """CG on (F + damping I) x = b on the generic path, the inputs already checked. `combine`, when
    given, maps this process's product F v to the one the solve uses (data-parallel: the sum over
    the ranks, trpo_ext.step); `mask`: the action mask of obs's rows (the Fisher of the masked policy)."""
    with _GENERIC_LOCK, torch.no_grad():
        fisher = _generic_products(policy, obs, params, mask)
        product = fisher if combine is None else (lambda v: combine(fisher(v)))
        x, used, res, xAx = conjugate_gradient(lambda p: product(p) + damping * p, b, iters, rtol)
    return x, CGInfo(torch.tensor(used, device=b.device), res, xAx)
