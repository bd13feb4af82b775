"""The linearisation rules of the generic path's tape (`trpo_ext.tape`), one registered function per
torch function, as `torch._decomp` registers decompositions.

A rule takes the `Call` the tape recorded and returns `(jvp, vjp)`: jvp maps the tangents of the
call's dependent arguments (in `Call.dep` order) to the tangents of its produced outputs, vjp maps the
outputs' cotangents (None: zero) back to the arguments' (None: zero) and must be jvp's transpose
(tests/test_generic.py checks uᵀFv = vᵀFu). Rules read cached primal values only (through
`Call.read`), never autograd. A rule returns None when the arguments are not the ones it handles; a
call no rule takes is linearised by torch.func on that call alone (`local`).

Adding a rule: a function decorated with `@rule(torch_fn, ...)` here (layers: `trpo_ext.tape_layers`);
nothing else changes.
"""
from __future__ import annotations

import torch

RULES: dict = {}
"""torch function -> its rules, in registration order."""


def rule(*funcs):
    """Registers the decorated function as a linearisation of each of `funcs`."""
    def register(fn):
        for func in funcs:
            RULES.setdefault(func, []).append(fn)
        return fn
    return register


class Unsupported(Exception):
    """The forward pass did something the tape cannot linearise exactly."""


def bind(args, kwargs, names, defaults=None):
    """The values of a call's arguments `names` (positional first, then keywords, then `defaults`)."""
    defaults = defaults or {}
    return [args[i] if i < len(args) else kwargs.get(name, defaults.get(name)) for i, name in enumerate(names)]


def flatten(args, kwargs):
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


def unflatten(flat, spec):
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


class Call:
    """One recorded call as its rule sees it: the function, its arguments, which of them depend on θ
    (`dep`: indices into `flat`), its outputs and which of them it produces for the tape."""

    def __init__(self, func, args, kwargs, flat, spec, dep, out_flat, produced, read, buffer):
        self.func, self.args, self.kwargs, self.flat, self.spec = func, args, kwargs, flat, spec
        self.dep, self.out_flat, self.produced = dep, out_flat, produced
        self.read = read  # t -> t detached, its version checked after the pass
        self.buffer = buffer  # () -> a reusable output tensor (`tape.Buffer`)
        self.position = {}
        for k, i in enumerate(dep):
            self.position.setdefault(id(flat[i]), k)
        self.n_dep = len(dep)
        self.out = out_flat[produced[0]]
        self.single = len(produced) == 1
        # The first argument is a dependent tensor: the shape of most element-wise and structural calls.
        self.first = bool(args) and dep[0] == 0 and isinstance(args[0], torch.Tensor)

    def depends(self, a) -> bool:
        """Whether argument `a` is one of the call's dependent tensors."""
        return isinstance(a, torch.Tensor) and id(a) in self.position

    def pick(self, t, a):
        """The tangent of argument `a` among the tangents `t`, or None."""
        return t[self.position[id(a)]] if self.depends(a) else None

    def place(self, *grads):
        """(argument, cotangent) pairs -> cotangents in `dep` order (a repeated argument gets the sum)."""
        res = [None] * self.n_dep
        for a, g in grads:
            if self.depends(a) and g is not None:
                k = self.position[id(a)]
                res[k] = g if res[k] is None else res[k] + g
        return res

    def fit(self, t):
        """A broadcast term may lack some of the output's dimensions."""
        return t if t.shape == self.out.shape else t.expand(self.out.shape)

    @staticmethod
    def unfit(g, like):
        """The transpose of the broadcast."""
        return g if g.shape == like.shape else g.sum_to_size(like.shape)

    def first_only(self, g):
        """Cotangents with `g` for the first dependent argument and None for the others."""
        return (g,) + (None,) * (self.n_dep - 1)

    def as_function(self, dep=None):
        """The call as a function of its dependent arguments `dep` (all by default), returning its produced outputs."""
        dep = self.dep if dep is None else dep

        def call(*xs):
            values = list(self.flat)
            for i, x in zip(dep, xs):
                values[i] = x
            a, k = unflatten(values, self.spec)
            res = self.func(*a, **k)
            res = list(res) if isinstance(res, (tuple, list)) else [res]
            return tuple(res[j] for j in self.produced)
        return call


def linearise(call: Call):
    """(jvp, vjp) for `call`: its first registered rule that applies, else torch.func's `local`."""
    for fn in RULES.get(call.func, ()):
        rules = fn(call)
        if rules is not None:
            return rules
    return local(call)


# ----------------------------------------------------------------------------- torch.func on one call
def local_vjp(call: Call, dep=None):
    """torch.func's VJP of the call in its dependent arguments `dep` (all by default; built once)."""
    dep = call.dep if dep is None else dep
    primals = tuple(call.read(call.flat[i]) for i in dep)
    outs, vjp_fn = torch.func.vjp(call.as_function(dep), *primals)
    pad = (None,) * (call.n_dep - len(dep))

    def back(g):
        return tuple(vjp_fn(tuple(torch.zeros_like(o) if x is None else x for x, o in zip(g, outs)))) + pad
    return back


def local(call: Call):
    """torch.func's JVP (the call's forward runs again per product) and VJP of a call with no rule."""
    primals = tuple(call.read(call.flat[i]) for i in call.dep)
    function = call.as_function()

    def jvp(t):
        return torch.func.jvp(function, primals, tuple(t))[1]
    try:  # now, so that a call torch.func cannot differentiate is found before the solve
        jvp(tuple(torch.zeros_like(p) for p in primals))
        back = local_vjp(call)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        raise Unsupported(f"torch.func cannot differentiate {getattr(call.func, '__name__', call.func)}") from exc
    return jvp, back


_T, _F = torch.Tensor, torch.nn.functional


# ----------------------------------------------------------------------------- shape and structure
# Linear in their first argument, the others only saying how (shapes, dims, indices, dtypes): the
# tangent is the same call on the first argument's tangent; the cotangent goes back by the transpose.
_RESHAPES = (_T.view, _T.view_as, _T.reshape, torch.reshape, _T.reshape_as, _T.flatten, torch.flatten, _T.unflatten,
             _T.squeeze, torch.squeeze, _T.unsqueeze, torch.unsqueeze, _T.contiguous, _T.clone, torch.clone)
_EXPANDS = (_T.expand, _T.expand_as)
_CASTS = (_T.to, _T.float, _T.double, _T.type_as)
_NEGATIONS = (_T.neg, torch.neg, _T.__neg__)
_OTHER_STRUCTURAL = (
    _T.t, torch.t, _T.transpose, torch.transpose, _T.permute, torch.permute, _T.__getitem__, _T.chunk, torch.chunk,
    _T.split, torch.split, _T.unbind, torch.unbind, _T.narrow, torch.narrow, _T.select, torch.select,
    _T.index_select, torch.index_select, _T.repeat, _T.flip, torch.flip, _T.movedim, torch.movedim, _T.sum,
    torch.sum, _T.mean, torch.mean, _T.__pos__)


def _structural(call: Call, back=None):
    if not call.first:
        return None
    func, rest, options, produced = call.func, call.args[1:], call.kwargs, call.produced

    def jvp(t):
        res = func(t[0], *rest, **options)
        res = list(res) if isinstance(res, (tuple, list)) else [res]
        return tuple(res[j] for j in produced)
    return jvp, back if back is not None else local_vjp(call, call.dep[:1])


@rule(*_RESHAPES)
def _reshape(call):
    in_shape = call.args[0].shape if call.first else None
    back = (lambda g: call.first_only(g[0].reshape(in_shape))) if call.single else None
    return _structural(call, back)


@rule(*_EXPANDS)
def _expand(call):
    in_shape = call.args[0].shape if call.first else None
    return _structural(call, lambda g: call.first_only(g[0].sum_to_size(in_shape)))


@rule(*_CASTS)
def _cast(call):
    x = call.args[0] if call.first else None
    return _structural(call, lambda g: call.first_only(g[0].to(x.device, x.dtype)))


@rule(*_NEGATIONS)
def _negation(call):
    return _structural(call, lambda g: call.first_only(-g[0]))


@rule(*_OTHER_STRUCTURAL)
def _other_structural(call):
    back = (lambda g: call.first_only(g[0])) if call.func is _T.__pos__ else None
    return _structural(call, back)


# ----------------------------------------------------------------------------- element-wise
def _unary(call) -> bool:
    """A call on its first argument alone, producing one output: an element-wise function."""
    return call.dep == [0] and call.first and call.single


def _diagonal(call, backward, y):
    """tanh, sigmoid or ReLU: the derivative from the output y, applied by the backward kernel
    autograd uses, both ways (the map is diagonal; nothing cached but y)."""
    forward_buffer, backward_buffer = call.buffer(), call.buffer()

    def apply(t, buffer):
        t = t[0]
        if t.shape != y.shape:
            t = t.expand(y.shape)
        return (backward(t, y, grad_input=buffer.get(y.shape, y)),)
    return (lambda t: apply(t, forward_buffer)), (lambda g: apply(g, backward_buffer))


def relu_backward(t, y, grad_input):
    return torch.ops.aten.threshold_backward.grad_input(t, y, 0, grad_input=grad_input)


@rule(torch.tanh, _T.tanh, _F.tanh)
def _tanh(call):
    return _diagonal(call, torch.ops.aten.tanh_backward.grad_input, call.read(call.out)) if _unary(call) else None


@rule(torch.sigmoid, _T.sigmoid, _F.sigmoid)
def _sigmoid(call):
    return _diagonal(call, torch.ops.aten.sigmoid_backward.grad_input, call.read(call.out)) if _unary(call) else None


RELU = (torch.relu, _T.relu, _F.relu)
RELU_INPLACE = (torch.relu_, _T.relu_)


@rule(*RELU)
def _relu(call):
    return _diagonal(call, relu_backward, call.read(call.out)) if _unary(call) else None


def inplace_relu(call):
    """An in-place ReLU (the one in-place call the tape follows): the rules of its output."""
    return _diagonal(call, relu_backward, call.read(call.out))


def _scale(call, d):
    """An element-wise function with derivative d: multiply by d both ways."""
    x = call.args[0]
    same = d.shape == x.shape
    forward, backward = call.buffer(), call.buffer()

    def jvp(t):
        t = t[0]
        return (torch.mul(t, d, out=forward.get(d.shape, d)) if same and t.shape == d.shape else call.fit(t * d),)

    def vjp(g):
        g = g[0]
        return (torch.mul(g, d, out=backward.get(d.shape, d)) if same and g.shape == d.shape else call.unfit(g * d, x),)
    return jvp, vjp


@rule(torch.exp, _T.exp)
def _exp(call):
    return _scale(call, call.read(call.out)) if _unary(call) else None


# Element-wise in their first argument (scalar or constant options after it): the derivative is
# computed once per solve by torch.func.jvp.
_POINTWISE = (
    _F.elu, _F.leaky_relu, _F.gelu, _F.silu, _F.softplus, _F.mish, _F.selu, _F.celu, _F.hardtanh, _F.softsign,
    _F.logsigmoid, torch.log, _T.log, torch.sqrt, _T.sqrt, torch.rsqrt, _T.rsqrt, torch.clamp, _T.clamp,
    torch.clip, _T.clip, torch.pow, _T.pow, _T.__pow__, _T.__rpow__, torch.square, _T.square, torch.log1p,
    _T.log1p, torch.expm1, _T.expm1, torch.sin, _T.sin, torch.cos, _T.cos, torch.reciprocal, _T.reciprocal,
    _T.__rtruediv__, _T.__rsub__,
)


@rule(*_POINTWISE)
def _pointwise(call):
    if not _unary(call):
        return None
    func, x, rest, options = call.func, call.read(call.args[0]), call.args[1:], call.kwargs
    d = torch.func.jvp(lambda z: func(z, *rest, **options), (x,), (torch.ones_like(x),))[1].detach()
    return _scale(call, d)


@rule(torch.logsumexp, _T.logsumexp)
def _logsumexp(call):
    if not _unary(call) or call.args[0].dim() == 0:
        return None
    x, dim, keepdim = bind(call.args, call.kwargs, ("input", "dim", "keepdim"), {"keepdim": False})
    x_, y = call.read(x), call.read(call.out)
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


# ----------------------------------------------------------------------------- arithmetic
def _operands(call):
    """(a, b, third) of a binary call whose dependent arguments are among its two operands, else None."""
    a, b, third = bind(call.args, call.kwargs, ("input", "other", "alpha"))
    if not call.single or not all(call.flat[i] is a or call.flat[i] is b for i in call.dep):
        return None
    return a, b, third


def _sum_of(*terms):
    present = [t for t in terms if t is not None]
    return present[0] if len(present) == 1 else present[0] + present[1]


@rule(_T.__add__, _T.__radd__, _T.add, torch.add, _T.__sub__, _T.sub, torch.sub)
def _add(call):
    operands = _operands(call)
    if operands is None:
        return None
    a, b, alpha = operands
    scale = 1 if alpha is None else alpha
    scale = -scale if call.func in (_T.__sub__, _T.sub, torch.sub) else scale

    def add(t):
        ta, tb = call.pick(t, a), call.pick(t, b)
        if tb is not None and scale != 1:
            tb = tb * scale
        return (call.fit(_sum_of(ta, tb)),)

    def add_back(g):
        g = g[0]
        return call.place((a, call.unfit(g, a) if call.depends(a) else None),
                          (b, call.unfit(g if scale == 1 else g * scale, b) if call.depends(b) else None))
    return add, add_back


_MM = (_T.__matmul__, _T.matmul, torch.matmul, _T.mm, torch.mm)


@rule(_T.__mul__, _T.__rmul__, _T.mul, torch.mul, *_MM)
def _bilinear(call):
    operands = _operands(call)
    if operands is None:
        return None
    a, b, _ = operands
    mm = call.func in _MM
    if mm and not (a.dim() == 2 and b.dim() == 2):  # two matrices (else torch.func's rules)
        return None
    func, a_, b_ = call.func, call.read(a), call.read(b)

    def bilinear(t):
        ta, tb = call.pick(t, a), call.pick(t, b)
        return (call.fit(_sum_of(None if ta is None else func(ta, b_), None if tb is None else func(a_, tb))),)

    def bilinear_back(g):
        g = g[0]
        ga = (g.mm(b_.t()) if mm else call.unfit(g * b_, a)) if call.depends(a) else None
        gb = (a_.t().mm(g) if mm else call.unfit(g * a_, b)) if call.depends(b) else None
        return call.place((a, ga), (b, gb))
    return bilinear, bilinear_back


@rule(_T.__truediv__, _T.div, torch.div, _T.true_divide, torch.true_divide)
def _div(call):
    operands = _operands(call)
    if operands is None or operands[2] is not None:  # (the third argument is rounding_mode)
        return None
    a, b, _ = operands
    b_, y = call.read(b), call.read(call.out)

    def div(t):
        ta, tb = call.pick(t, a), call.pick(t, b)
        return (call.fit(_sum_of(None if ta is None else ta / b_, None if tb is None else -(y * tb) / b_)),)

    def div_back(g):
        g = g[0]
        ga = call.unfit(g / b_, a) if call.depends(a) else None
        gb = call.unfit(-(g * y) / b_, b) if call.depends(b) else None
        return call.place((a, ga), (b, gb))
    return div, div_back


@rule(torch.broadcast_tensors)
def _broadcast_tensors(call):
    args, produced = call.args, call.produced
    if not all(isinstance(a, torch.Tensor) for a in args):
        return None
    sources = [call.position.get(id(args[j])) for j in produced]
    if None in sources or len(set(sources)) != len(sources):
        return None
    shapes = [call.out_flat[j].shape for j in produced]
    in_shapes = [args[j].shape for j in produced]

    def broadcast_back(g):
        res = [None] * call.n_dep
        for k, x, s in zip(sources, g, in_shapes):
            if x is not None:
                res[k] = x if x.shape == s else x.sum_to_size(s)
        return res
    return (lambda t: tuple(t[k].expand(s) for k, s in zip(sources, shapes))), broadcast_back

