"""The fused ops' action distributions beyond one softmax and a Gaussian (docs/design.md, "Action
spaces"): MultiDiscrete (kind "categorical" with `segments`), MultiBinary (kind "bernoulli") and
invalid-action masks (`action_mask`), each held to a pure-PyTorch double-backprop reference written
here from the formulas; sampling; bad input.

Run as a script under torch.distributed.run, this file is the worker of the data-parallel test:
    python -m torch.distributed.run --nproc-per-node 2 tests/test_action_spaces_ops.py OUT_DIR
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

from trpo_ext import _ops  # noqa: E402

from helpers import RTOL, rel_err  # noqa: E402

ops = torch.ops.trpo_ext
MASKED_LOGIT = -1e8  # what the ops put in place of a masked logit
OBS_DIM, HIDDEN, ACTIVATION = 5, (8, 7), "tanh"
DAMPING = 0.1


# ----------------------------------------------------------------------------- the reference
def forward(obs, params):
    """The MLP of the ops: tanh hidden layers, a linear output."""
    h = obs
    n_layers = len(params) // 2
    for layer in range(n_layers):
        h = F.linear(h, params[2 * layer], params[2 * layer + 1])
        if layer + 1 < n_layers:
            h = torch.tanh(h)
    return h


class Dist:
    """An action distribution written from the formulas, independently of the ops' -1e8 masking: a
    masked class is *excluded* (each segment's log-softmax normalizes over the allowed classes only,
    and its KL terms are weighted by exactly 0)."""

    def __init__(self, kind, width, segments=None, mask=None):
        self.kind, self.width, self.segments, self.mask = kind, width, segments, mask
        counts = list(segments) if segments is not None else [width]
        starts = [sum(counts[:s]) for s in range(len(counts))]
        self.bounds = list(zip(starts, counts))

    def with_mask(self, mask):
        return Dist(self.kind, self.width, self.segments, mask)

    def op_kwargs(self):
        return dict(kind=self.kind, segments=self.segments, action_mask=self.mask)

    def log_probs(self, logits):
        """Categorical: each segment's log-softmax over its allowed classes, (N, K)."""
        parts = []
        for lo, k in self.bounds:
            x = logits[:, lo:lo + k]
            allowed = x if self.mask is None else x.masked_fill(~self.mask[:, lo:lo + k], float("-inf"))
            parts.append(x - torch.logsumexp(allowed, 1, keepdim=True))
        return torch.cat(parts, 1)

    def probs(self, logits):
        if self.kind == "bernoulli":
            return torch.sigmoid(logits)
        p = self.log_probs(logits).exp()
        return p if self.mask is None else torch.where(self.mask, p, torch.zeros_like(p))

    def kl(self, old_logits, new_logits):
        """KL(old ‖ new) per state."""
        if self.kind == "bernoulli":
            x0, x1 = old_logits, new_logits
            return (torch.sigmoid(x0) * (F.logsigmoid(x0) - F.logsigmoid(x1))
                    + torch.sigmoid(-x0) * (F.logsigmoid(-x0) - F.logsigmoid(-x1))).sum(1)
        return (self.probs(old_logits) * (self.log_probs(old_logits) - self.log_probs(new_logits))).sum(1)

    def log_prob(self, logits, actions):
        """log π(a|s) per state."""
        if self.kind == "bernoulli":
            return (actions * F.logsigmoid(logits) + (1 - actions) * F.logsigmoid(-logits)).sum(1)
        lp = self.log_probs(logits)
        columns = actions.reshape(len(actions), -1) + torch.tensor([lo for lo, _ in self.bounds])
        return lp.gather(1, columns).sum(1)

    def sample(self, logits, generator):
        """Actions drawn from the reference distribution (torch.multinomial / torch.bernoulli)."""
        p = self.probs(logits).double()
        if self.kind == "bernoulli":
            return torch.bernoulli(p, generator=generator).to(logits.dtype)
        columns = [torch.multinomial(p[:, lo:lo + k], 1, generator=generator) for lo, k in self.bounds]
        actions = torch.cat(columns, 1)
        return actions if self.segments is not None else actions[:, 0]


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def leaves(params):
    return [p.detach().double().clone().requires_grad_() for p in params]


def reference_fvp(obs, params, v, dist, damping=DAMPING):
    """(F + damping I) v by double backprop of the batch-mean KL, in float64."""
    theta = leaves(params)
    logits = forward(obs.double(), theta)
    kl = dist.kl(logits.detach(), logits).mean()
    grads = torch.autograd.grad(kl, theta, create_graph=True)
    return flat(torch.autograd.grad(flat(grads) @ v.double(), theta)) + damping * v.double()


def reference_cg(obs, params, b, dist, iters=10):
    """CG on (F + damping I) x = b with x0 = 0 and the reference products, in float64."""
    b = b.double()
    x, r, p = torch.zeros_like(b), b.clone(), b.clone()
    rs = r @ r
    for _ in range(iters):
        Ap = reference_fvp(obs, params, p, dist)
        pAp = p @ Ap
        if pAp <= 1e-20 * (p @ p):
            break
        alpha = rs / pAp
        x, r = x + alpha * p, r - alpha * Ap
        rs_new = r @ r
        p, rs = r + (rs_new / rs) * p, rs_new
    return x


def reference_gradient(obs, params, actions, advantages, dist):
    """∇ mean(exp(log π − log π.detach()) A) at θ, in float64."""
    theta = leaves(params)
    logp = dist.log_prob(forward(obs.double(), theta), actions.double() if dist.kind == "bernoulli" else actions)
    surrogate = (torch.exp(logp - logp.detach()) * advantages.double()).mean()
    return flat(torch.autograd.grad(surrogate, theta))


# ----------------------------------------------------------------------------- problems
CASES = {
    "segments": dict(kind="categorical", width=9, segments=(3, 2, 4), masked=False),
    "bernoulli": dict(kind="bernoulli", width=4, segments=None, masked=False),
    "masked": dict(kind="categorical", width=5, segments=None, masked=True),
    "masked-segments": dict(kind="categorical", width=9, segments=(2, 1, 3, 3), masked=True),
}


def random_mask(n, dist, generator):
    """Each class allowed with probability 0.6, then one random class per segment allowed for sure."""
    mask = torch.rand(n, dist.width, generator=generator) < 0.6
    for lo, k in dist.bounds:
        mask[torch.arange(n), lo + torch.randint(0, k, (n,), generator=generator)] = True
    return mask


def make_params(width, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [OBS_DIM, *HIDDEN, width]
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        params.append(torch.randn(fan_out, fan_in, generator=g, dtype=torch.float64) / fan_in ** 0.5 * 1.5)
        params.append(0.5 * torch.randn(fan_out, generator=g, dtype=torch.float64))
    return [p.to(dtype) for p in params]


def problem(case, dtype=torch.float64, n=11, seed=0):
    """(obs, params, dist, actions, advantages): actions drawn from the (masked) policy itself."""
    spec = CASES[case]
    g = torch.Generator().manual_seed(seed + 1)
    params = make_params(spec["width"], dtype, seed)
    obs = torch.randn(n, OBS_DIM, generator=g, dtype=torch.float64).to(dtype)
    dist = Dist(spec["kind"], spec["width"], spec["segments"])
    if spec["masked"]:
        dist = dist.with_mask(random_mask(n, dist, g))
    actions = dist.sample(forward(obs.double(), [p.double() for p in params]), g)
    if dist.kind == "bernoulli":
        actions = actions.to(dtype)
    advantages = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    return obs, params, dist, actions, advantages


def n_params(params):
    return sum(p.numel() for p in params)


def on(device, value):
    """`value` (a tensor, a list of them, or an op's keyword dict) with its tensors on `device`: the
    ops run there, the reference stays on the CPU (CPU always, CUDA when present)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: on(device, v) for k, v in value.items()}
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return [v.to(device) for v in value]
    return value


DTYPES = [torch.float64, torch.float32]
CG_RTOL = {torch.float64: 1e-8, torch.float32: 1e-4}  # CG amplifies rounding (docs/design.md, "Tolerances")


# ----------------------------------------------------------------------------- FVP and CG
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_fvp_is_the_double_backprop_reference(case, dtype, device):
    obs, params, dist, _, _ = problem(case, dtype)
    v = torch.randn(n_params(params), generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    out = _ops.mlp_fvp(on(device, obs), on(device, params), on(device, v), activation=ACTIVATION, damping=DAMPING,
                       **on(device, dist.op_kwargs()))
    assert out.dtype == dtype and out.device.type == device.type
    assert rel_err(out.cpu(), reference_fvp(obs, params, v, dist)) <= RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_cg_is_the_reference_cg(case, dtype, device):
    obs, params, dist, _, _ = problem(case, dtype)
    b = torch.randn(n_params(params), generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(dtype)
    result = _ops.mlp_cg(on(device, obs), on(device, params), on(device, b), activation=ACTIVATION, damping=DAMPING,
                         iters=10, rtol=0.0, **on(device, dist.op_kwargs()))
    assert rel_err(result.x.cpu(), reference_cg(obs, params, b, dist)) <= CG_RTOL[dtype]
    assert result.iterations.item() == 10


@pytest.mark.parametrize("case", ["masked", "masked-segments"])
def test_masked_logits_contribute_nothing(case):
    """Whatever a masked class's raw logit is, the products are those of the policy without it: moving
    the masked logits (here through the output bias of a one-row batch) changes nothing."""
    obs, params, dist, _, _ = problem(case, n=1)
    v = torch.randn(n_params(params), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    moved = list(params)
    moved[-1] = params[-1] + torch.where(dist.mask[0], 0.0, 50.0 * torch.randn(dist.width, dtype=torch.float64))
    fvps = [_ops.mlp_fvp(obs, p, v, activation=ACTIVATION, damping=0.0, **dist.op_kwargs()) for p in (params, moved)]
    # The output bias's masked entries get exactly 0 (no gradient flows into a masked logit).
    bias_masked = fvps[0][-dist.width:][~dist.mask[0]]
    assert torch.equal(bias_masked, torch.zeros_like(bias_masked))
    torch.testing.assert_close(fvps[0], fvps[1], rtol=1e-12, atol=1e-14)
    assert rel_err(fvps[0], reference_fvp(obs, params, v, dist, damping=0.0)) <= RTOL[torch.float64]


def test_a_size_one_segment_adds_nothing():
    """A segment with one class is certain: its block of the output Fisher is 0, and the rest of the
    product is that of the network without the unit."""
    obs, params, _, _, _ = problem("segments")
    W, b = params[-2], params[-1]  # (9, 7), (9)
    extended = params[:-2] + [torch.cat([W, W[:1]]), torch.cat([b, b[:1]])]
    v = torch.randn(n_params(extended), generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out = _ops.mlp_fvp(obs, extended, v, kind="categorical", activation=ACTIVATION, damping=0.0,
                       segments=(3, 2, 4, 1))
    # Flat layout of the output layer: W (10 x 7, row-major), then b (10): unit 9's row and bias.
    unit = torch.cat([out[-17:-10], out[-1:]])
    assert torch.equal(unit, torch.zeros_like(unit))
    kept = torch.ones(n_params(extended), dtype=torch.bool)
    kept[-17:-10] = kept[-1] = False
    expected = _ops.mlp_fvp(obs, params, v[kept], kind="categorical", activation=ACTIVATION, damping=0.0,
                            segments=(3, 2, 4))
    torch.testing.assert_close(out[kept], expected, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- the policy step
@pytest.mark.parametrize("with_fvp_obs", [False, True], ids=["fvp-on-obs", "fvp-obs"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_policy_direction_is_the_autograd_gradient_and_the_reference_solve(case, dtype, with_fvp_obs, device):
    obs, params, dist, actions, advantages = problem(case, dtype)
    fvp_obs, fvp_dist = obs, dist
    kwargs = dist.op_kwargs()
    if with_fvp_obs:
        g = torch.Generator().manual_seed(9)
        fvp_obs = torch.randn(6, OBS_DIM, generator=g, dtype=torch.float64).to(dtype)
        if dist.mask is not None:
            fvp_dist = dist.with_mask(random_mask(6, dist, g))
            kwargs["fvp_action_mask"] = fvp_dist.mask
        else:
            fvp_dist = dist
        kwargs["fvp_obs"] = fvp_obs
    result = _ops.mlp_policy_direction(on(device, obs), on(device, params), on(device, actions), on(device, advantages),
                                       activation=ACTIVATION, damping=DAMPING, iters=10, rtol=0.0,
                                       **on(device, kwargs))
    gradient = reference_gradient(obs, params, actions, advantages, dist)
    assert rel_err(result.gradient.cpu(), gradient) <= RTOL[dtype]
    assert rel_err(result.x.cpu(), reference_cg(fvp_obs, params, gradient.to(dtype), fvp_dist)) <= CG_RTOL[dtype]
    logits = forward(obs, params)
    if dist.mask is not None:  # the masked logits: the old distribution as it was sampled
        logits = logits.masked_fill(~dist.mask, MASKED_LOGIT)
    torch.testing.assert_close(result.dist_params.cpu(), logits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_policy_trial_is_the_reference_kl_and_improvement(case, dtype, device):
    obs, params, dist, actions, advantages = problem(case, dtype)
    batch = on(device, obs), on(device, params), on(device, actions), on(device, advantages)
    old = _ops.mlp_policy_direction(*batch, activation=ACTIVATION, damping=DAMPING, iters=2, rtol=0.0,
                                    **on(device, dist.op_kwargs())).dist_params
    g = torch.Generator().manual_seed(10)
    trial = [p + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) for p in params]
    kl, improvement = _ops.mlp_policy_trial(batch[0], on(device, trial), *batch[2:], old_dist_params=old,
                                            old_log_std=None, activation=ACTIVATION, **on(device, dist.op_kwargs()))
    assert kl.dtype == improvement.dtype == torch.float64
    old_logits, new_logits = forward(obs.double(), [p.double() for p in params]), forward(obs.double(),
                                                                                          [p.double() for p in trial])
    a = actions.double() if dist.kind == "bernoulli" else actions
    log_ratio = dist.log_prob(new_logits, a) - dist.log_prob(old_logits, a)
    expected_kl = dist.kl(old_logits, new_logits).mean()
    expected_improvement = (torch.expm1(log_ratio) * advantages.double()).mean()
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert expected_kl > 1e-4  # a real trial, not a vanishing one
    assert abs(kl.item() - expected_kl.item()) <= tol * expected_kl.item()
    assert abs(improvement.item() - expected_improvement.item()) <= tol * max(abs(expected_improvement.item()), 1e-2)


@pytest.mark.parametrize("case", CASES)
def test_policy_trial_at_the_old_parameters_is_zero(case):
    obs, params, dist, actions, advantages = problem(case)
    old = _ops.mlp_policy_direction(obs, params, actions, advantages, activation=ACTIVATION, damping=DAMPING,
                                    iters=2, rtol=0.0, **dist.op_kwargs()).dist_params
    kl, improvement = _ops.mlp_policy_trial(obs, params, actions, advantages, old_dist_params=old, old_log_std=None,
                                            activation=ACTIVATION, **dist.op_kwargs())
    assert kl.item() == 0.0 and improvement.item() == 0.0


# ----------------------------------------------------------------------------- acting
def act(obs, params, dist, deterministic, seed=0, device=torch.device("cpu")):
    """mlp_act on `device` (a generator of that device), the actions back on the CPU."""
    return _ops.mlp_act(on(device, obs), on(device, params), activation=ACTIVATION, deterministic=deterministic,
                        generator=torch.Generator(device).manual_seed(seed), **on(device, dist.op_kwargs()))[1].cpu()


@pytest.mark.parametrize("case", CASES)
def test_samples_follow_the_distribution_and_never_a_masked_action(case, device):
    obs, params, dist, _, _ = problem(case, n=1)
    n = 20000
    many = obs.expand(n, -1)
    if dist.mask is not None:
        dist = dist.with_mask(dist.mask.expand(n, -1))
    actions = act(many, params, dist, deterministic=False, device=device)
    probs = dist.probs(forward(obs, params))[0]
    if dist.kind == "bernoulli":
        assert actions.shape == (n, dist.width) and actions.dtype == torch.float64
        assert set(actions.unique().tolist()) <= {0.0, 1.0}
        frequencies = actions.mean(0)
    else:
        assert actions.dtype == torch.int64
        assert actions.shape == ((n,) if dist.segments is None else (n, len(dist.segments)))
        columns = actions.reshape(n, -1)
        frequencies = torch.cat([torch.bincount(columns[:, s], minlength=k) / n
                                 for s, (_, k) in enumerate(dist.bounds)])
        assert frequencies.numel() == dist.width  # every class in range of its segment
        if dist.mask is not None:
            assert (frequencies[~dist.mask[0]] == 0).all()
    torch.testing.assert_close(frequencies.double(), probs, atol=0.02, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_deterministic_is_the_mode(case):
    obs, params, dist, _, _ = problem(case, n=40)
    logits = forward(obs, params)
    if dist.mask is not None:
        # Forbid the unmasked argmax of every segment with more than one class: the mode must move.
        mask = torch.ones(len(obs), dist.width, dtype=torch.bool)
        for lo, k in dist.bounds:
            if k > 1:
                mask[torch.arange(len(obs)), lo + logits[:, lo:lo + k].argmax(1)] = False
        dist = dist.with_mask(mask)
    actions = act(obs, params, dist, deterministic=True)
    if dist.kind == "bernoulli":
        torch.testing.assert_close(actions, (logits > 0).double(), rtol=0, atol=0)
        return
    masked = logits if dist.mask is None else logits.masked_fill(~dist.mask, float("-inf"))
    modes = torch.stack([masked[:, lo:lo + k].argmax(1) for lo, k in dist.bounds], 1)
    assert torch.equal(actions.reshape(len(obs), -1), modes)
    if dist.mask is not None:
        assert dist.mask.gather(1, modes + torch.tensor([lo for lo, _ in dist.bounds])).all()


def test_same_generator_same_samples_and_an_unsegmented_draw_is_unchanged():
    obs, params, dist, _, _ = problem("segments", n=30)
    assert torch.equal(act(obs, params, dist, False, seed=3), act(obs, params, dist, False, seed=3))
    # segments=(K,) is one softmax: the same draw as without segments, one column.
    whole = Dist("categorical", 9)
    one = Dist("categorical", 9, segments=(9,))
    assert torch.equal(act(obs, params, one, False, seed=4)[:, 0], act(obs, params, whole, False, seed=4))


def test_empty_batch_with_segments_and_a_mask():
    _, params, dist, _, _ = problem("masked-segments")
    obs = torch.zeros(0, OBS_DIM, dtype=torch.float64)
    for deterministic in (False, True):
        actions = act(obs, params, dist.with_mask(torch.zeros(0, 9, dtype=torch.bool)), deterministic)
        assert actions.shape == (0, 4) and actions.dtype == torch.int64


# ----------------------------------------------------------------------------- schema, fake kernels
@pytest.mark.parametrize("case", CASES)
def test_opcheck(case):
    obs, params, dist, actions, advantages = problem(case, torch.float32)
    segments = None if dist.segments is None else list(dist.segments)
    v = torch.randn(n_params(params))
    extra = (segments, dist.mask)
    torch.library.opcheck(ops.mlp_fvp.default, (obs, params, v, dist.kind, ACTIVATION, 0.1, *extra))
    torch.library.opcheck(ops.mlp_cg.default, (obs, params, v, dist.kind, ACTIVATION, 0.1, 5, 1e-6, *extra))
    torch.library.opcheck(ops.mlp_policy_direction.default,
                          (obs, params, actions, advantages, None, dist.kind, ACTIVATION, 0.1, 5, 1e-6, None, *extra))
    old = forward(obs, params)
    torch.library.opcheck(ops.mlp_policy_trial.default,
                          (obs, params, actions, advantages, old, None, dist.kind, ACTIVATION, None, *extra))
    # deterministic: opcheck runs the op several times and compares the outputs
    torch.library.opcheck(ops.mlp_act.default, (obs, None, None, 1.0, params, dist.kind, ACTIVATION, True, None,
                                                *extra))


# ----------------------------------------------------------------------------- bad input
def _call(op, case="masked-segments", **change):
    """Calls `op` on a valid problem of `case` with the keyword arguments in `change` replaced."""
    obs, params, dist, actions, advantages = problem(case)
    kwargs = dict(activation=ACTIVATION, **dist.op_kwargs())
    if op == "act":
        kwargs.update(deterministic=False, **change)
        return _ops.mlp_act(obs, params, **kwargs)
    if op in ("fvp", "cg"):
        v = torch.zeros(n_params(params), dtype=torch.float64)
        kwargs.update(damping=0.1, **(dict(iters=3, rtol=0.0) if op == "cg" else {}), **change)
        return (_ops.mlp_fvp if op == "fvp" else _ops.mlp_cg)(obs, params, v, **kwargs)
    kwargs["actions"], kwargs["advantages"] = actions, advantages
    if op == "trial":
        kwargs.update(old_dist_params=forward(obs, params), old_log_std=None)
    else:
        kwargs.update(damping=0.1, iters=3, rtol=0.0)
    kwargs.update(change)
    fn = _ops.mlp_policy_trial if op == "trial" else _ops.mlp_policy_direction
    return fn(obs, params, kwargs.pop("actions"), kwargs.pop("advantages"), **kwargs)


N = 11  # the problems' batch size
MASK_OPS = ["fvp", "cg", "direction", "trial", "act"]


def _mask_without_row(row, columns):
    mask = torch.ones(N, 9, dtype=torch.bool)
    mask[row, columns] = False
    return mask


@pytest.mark.parametrize("op", MASK_OPS)
@pytest.mark.parametrize("change, error, match", [
    pytest.param(dict(segments=(3, 2, 3)), ValueError, r"segments must sum to the output width 9", id="sum"),
    pytest.param(dict(segments=(5, 0, 4)), ValueError, r"segments must be class counts >= 1", id="zero"),
    pytest.param(dict(segments=(-1, 10)), ValueError, r"segments must be class counts >= 1", id="negative"),
    pytest.param(dict(segments=()), ValueError, r"segments must list at least one", id="empty"),
    pytest.param(dict(kind="beta"), ValueError, r"kind must be 'categorical', 'gaussian' or 'bernoulli'", id="kind"),
    pytest.param(dict(action_mask=torch.ones(N, 9)), TypeError, r"action_mask must be bool", id="mask-dtype"),
    pytest.param(dict(action_mask=torch.ones(N, 8, dtype=torch.bool)), ValueError,
                 r"action_mask must have shape \(11, 9\)", id="mask-shape"),
    pytest.param(dict(action_mask=torch.ones(9, dtype=torch.bool)), ValueError,
                 r"action_mask must have shape \(11, 9\)", id="mask-1d"),
    pytest.param(dict(action_mask=_mask_without_row(4, [3, 4, 5])), ValueError,
                 r"action_mask\[4\] allows no action in segment 2 \(columns \[3, 6\)\)", id="mask-empty-segment"),
    pytest.param(dict(action_mask=_mask_without_row(7, [2])), ValueError,
                 r"action_mask\[7\] allows no action in segment 1", id="mask-empty-one-class-segment"),
])
def test_bad_segments_and_masks_name_the_argument(op, change, error, match):
    with pytest.raises(error, match=match):
        _call(op, **change)


@pytest.mark.parametrize("op", MASK_OPS)
def test_an_unsegmented_row_that_allows_nothing(op):
    mask = torch.ones(N, 5, dtype=torch.bool)
    mask[2] = False
    with pytest.raises(ValueError, match=r"action_mask\[2\] allows no action: every row needs at least one"):
        _call(op, case="masked", action_mask=mask)


@pytest.mark.parametrize("op", MASK_OPS)
@pytest.mark.parametrize("kind", ["gaussian", "bernoulli"])
def test_segments_and_masks_are_for_categorical_only(op, kind):
    case = "bernoulli"
    obs, params, _, _, _ = problem(case)
    if kind == "gaussian":  # a gaussian's parameters: the bernoulli's plus a log_std
        params = params + [torch.zeros(4, dtype=torch.float64)]
    base = dict(kind=kind)
    if op in ("direction", "trial"):
        base["actions"] = torch.zeros(N, 4, dtype=torch.float64)
    if op == "trial" and kind == "gaussian":
        base["old_log_std"] = torch.zeros(4, dtype=torch.float64)

    def call(**change):
        return _call_with(op, obs, params, **base, **change)

    with pytest.raises(ValueError, match=f"segments is only for kind 'categorical', got kind '{kind}'"):
        call(segments=(2, 2))
    with pytest.raises(ValueError, match=f"action_mask is only for kind 'categorical', got kind '{kind}'"):
        call(action_mask=torch.ones(N, 4, dtype=torch.bool))


def _call_with(op, obs, params, kind, **change):
    """Like _call, with obs, params and kind given (segments and action_mask default to None)."""
    kwargs = dict(kind=kind, activation=ACTIVATION)
    if op == "act":
        return _ops.mlp_act(obs, params, deterministic=True, **kwargs, **change)
    if op in ("fvp", "cg"):
        v = torch.zeros(n_params(params), dtype=torch.float64)
        extra = dict(iters=3, rtol=0.0) if op == "cg" else {}
        return (_ops.mlp_fvp if op == "fvp" else _ops.mlp_cg)(obs, params, v, damping=0.1, **extra, **kwargs,
                                                               **change)
    actions = change.pop("actions")
    advantages = torch.zeros(N, dtype=torch.float64)
    if op == "trial":
        change.setdefault("old_log_std", None)
        return _ops.mlp_policy_trial(obs, params, actions, advantages, old_dist_params=forward(obs, params[:6]),
                                     **kwargs, **change)
    return _ops.mlp_policy_direction(obs, params, actions, advantages, damping=0.1, iters=3, rtol=0.0, **kwargs,
                                     **change)


@pytest.mark.parametrize("op", ["direction", "trial"])
@pytest.mark.parametrize("case, actions, error, match", [
    pytest.param("segments", lambda a: a[:, :2], ValueError, r"actions must have shape \(11, 3\) \(one class index",
                 id="segments-columns"),
    pytest.param("segments", lambda a: a[:, 0], ValueError, r"actions must have shape \(11, 3\)", id="segments-1d"),
    pytest.param("segments", lambda a: a.index_put((torch.tensor([5]), torch.tensor([1])), torch.tensor(2)),
                 ValueError, r"actions\[:, 1\] must be class indices in \[0, 2\) \(segments\[1\]\), got values in "
                 r"\[\d+, 2\]", id="segments-range"),
    pytest.param("segments", lambda a: a.index_put((torch.tensor([0]), torch.tensor([2])), torch.tensor(-1)),
                 ValueError, r"actions\[:, 2\] must be class indices in \[0, 4\)", id="segments-negative"),
    pytest.param("segments", lambda a: a.double(), TypeError, r"actions must be int64 class indices",
                 id="segments-dtype"),
    pytest.param("bernoulli", lambda a: a.index_put((torch.tensor([3]), torch.tensor([1])),
                                                    torch.tensor(0.5, dtype=torch.float64)),
                 ValueError, r"actions of a bernoulli policy must hold 0 or 1, got 0.5 at actions\[3, 1\]",
                 id="bernoulli-value"),
    pytest.param("bernoulli", lambda a: a.index_put((torch.tensor([0]), torch.tensor([0])),
                                                    torch.tensor(float("nan"), dtype=torch.float64)),
                 ValueError, r"must hold 0 or 1, got nan at actions\[0, 0\]", id="bernoulli-nan"),
    pytest.param("bernoulli", lambda a: a.long(), TypeError, r"actions must have obs's dtype", id="bernoulli-dtype"),
    pytest.param("bernoulli", lambda a: a[:, :3], ValueError, r"actions must have shape \(11, 4\)",
                 id="bernoulli-shape"),
])
def test_bad_actions_name_the_column(op, case, actions, error, match):
    good = problem(case)[3]
    with pytest.raises(error, match=match):
        _call(op, case=case, actions=actions(good))


@pytest.mark.parametrize("op", ["direction", "trial"])
@pytest.mark.parametrize("case", ["masked", "masked-segments"])
def test_a_masked_action_is_refused(op, case):
    obs, params, dist, actions, advantages = problem(case)
    mask = dist.mask.clone()
    columns = actions.reshape(N, -1) + torch.tensor([lo for lo, _ in dist.bounds])
    mask[6, columns[6, -1]] = False  # forbid row 6's action in its last segment...
    lo, k = dist.bounds[-1]
    mask[6, lo + (columns[6, -1] - lo + 1) % k] = True  # ...while the segment still allows one
    where = r"actions\[6\]" if dist.segments is None else rf"actions\[6, {len(dist.bounds) - 1}\]"
    with pytest.raises(ValueError, match=where + r" = \d+ is an action that action_mask\[6\] forbids"):
        _call(op, case=case, action_mask=mask)


def test_fvp_action_mask_comes_exactly_with_fvp_obs_and_action_mask():
    obs, params, dist, actions, advantages = problem("masked")
    fvp_obs = obs[:4]

    def direction(**kwargs):
        return _ops.mlp_policy_direction(obs, params, actions, advantages, kind="categorical", activation=ACTIVATION,
                                         damping=0.1, iters=3, rtol=0.0, **kwargs)

    with pytest.raises(ValueError, match="fvp_action_mask must be given when fvp_obs and action_mask are"):
        direction(fvp_obs=fvp_obs, action_mask=dist.mask)
    with pytest.raises(ValueError, match="fvp_action_mask is only for fvp_obs's rows when action_mask is given"):
        direction(fvp_obs=fvp_obs, fvp_action_mask=dist.mask[:4])
    with pytest.raises(ValueError, match="fvp_action_mask is only for fvp_obs's rows"):
        direction(action_mask=dist.mask, fvp_action_mask=dist.mask)
    with pytest.raises(ValueError, match=r"fvp_action_mask must have shape \(4, 5\)"):
        direction(fvp_obs=fvp_obs, action_mask=dist.mask, fvp_action_mask=dist.mask)
    with pytest.raises(TypeError, match="fvp_action_mask must be bool"):
        direction(fvp_obs=fvp_obs, action_mask=dist.mask, fvp_action_mask=dist.mask[:4].long())
    bad = dist.mask[:4].clone()
    bad[1] = False
    with pytest.raises(ValueError, match=r"fvp_action_mask\[1\] allows no action"):
        direction(fvp_obs=fvp_obs, action_mask=dist.mask, fvp_action_mask=bad)
    direction(fvp_obs=fvp_obs, action_mask=dist.mask, fvp_action_mask=dist.mask[:4])


# ----------------------------------------------------------------------------- data parallel
DIST_CASES = ["masked-segments", "bernoulli"]


def _dist_worker(out_dir):
    """Each rank: its shard of the batch through the ops with `group`; rank 0 also the whole batch alone."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD.group_name
    results = {}
    for case in DIST_CASES:
        obs, params, d, actions, advantages = problem(case, n=13)
        g = torch.Generator().manual_seed(11)
        fvp_obs = torch.randn(7, OBS_DIM, generator=g, dtype=torch.float64)
        fvp_mask = random_mask(7, d, g) if d.mask is not None else None
        trial = [p + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]

        def run(rows, fvp_rows, group):
            mask = None if d.mask is None else d.mask[rows]
            kwargs = dict(kind=d.kind, activation=ACTIVATION, segments=d.segments, action_mask=mask, group=group)
            direction = _ops.mlp_policy_direction(
                obs[rows], params, actions[rows], advantages[rows], damping=DAMPING, iters=10, rtol=0.0,
                fvp_obs=fvp_obs[fvp_rows], fvp_action_mask=None if fvp_mask is None else fvp_mask[fvp_rows],
                **kwargs)
            kl, improvement = _ops.mlp_policy_trial(obs[rows], trial, actions[rows], advantages[rows],
                                                    old_dist_params=direction.dist_params, old_log_std=None, **kwargs)
            return dict(g=direction.gradient, x=direction.x, dist_params=direction.dist_params, kl=kl,
                        improvement=improvement)

        # Uneven shards: ranks hold different numbers of states.
        bounds, fvp_bounds = [0, 5, 13], [0, 4, 7]
        results[case] = dict(shard=run(slice(bounds[rank], bounds[rank + 1]),
                                       slice(fvp_bounds[rank], fvp_bounds[rank + 1]), group))
        if rank == 0:
            results[case]["whole"] = run(slice(None), slice(None), None)
            results[case]["bounds"] = bounds
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
    assert world == 2


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("action_spaces_dist")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--monitor-interval=0.2",
           os.path.abspath(__file__), str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(2)]


@pytest.mark.parametrize("case", DIST_CASES)
def test_data_parallel_step_equals_one_process_on_the_whole_batch(dist_results, case):
    whole = dist_results[0][case]["whole"]
    bounds = dist_results[0][case]["bounds"]
    for rank, results in enumerate(dist_results):
        shard = results[case]["shard"]
        for key in ("g", "kl", "improvement"):
            torch.testing.assert_close(shard[key], whole[key], rtol=1e-10, atol=1e-12, msg=f"{key} on rank {rank}")
        # The CG direction relative to its norm, as tests/test_distributed.py compares it: ten CG
        # iterations amplify the shards' different summation order, and an elementwise bound fails
        # on the direction's small entries (seen: 4e-11 off in an entry, 2e-11 in norm, on an AVX2 host).
        assert rel_err(shard["x"], whole["x"]) <= RTOL[torch.float64], f"x on rank {rank}"
        torch.testing.assert_close(shard["dist_params"], whole["dist_params"][bounds[rank]:bounds[rank + 1]])


if __name__ == "__main__":
    _dist_worker(sys.argv[1])
