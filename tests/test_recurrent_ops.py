"""The fused products through time (`rnn_fvp`, `rnn_cg`; docs/design.md §12) on the built-in
recurrent policies: every fused action case (helpers.FUSED_CASES) × LSTM / GRU × one or two layers,
against the double-backprop reference (trpo_ext.reference) with episode starts inside the sequences
and non-zero initial states; symmetry; the public functions' fused path; opcheck; bad input."""
import copy

import pytest
import torch

import trpo_ext
from trpo_ext import _ops, fisher, reference
from trpo_ext.policies import recurrent_fused_spec
from trpo_ext.spaces import Sequences

from helpers import FUSED_CASES, RECURRENT_CELLS, RTOL, double_batch, recurrent_problem, rel_err

ops = torch.ops.trpo_ext
DTYPES = [torch.float32, torch.float64]
CG_RTOL = {torch.float64: 1e-8, torch.float32: 1e-4}  # CG amplifies rounding, as tests/test_ops.py's
T, B = 5, 3  # steps and sequences of every batch here


def problem(cell, case, n_layers, dtype=torch.float64, device="cpu", activation="tanh"):
    """(policy, seq, v, mask) for an ACTION_CASES entry: helpers.recurrent_problem at this file's sizes."""
    return recurrent_problem(case, cell, n_layers, dtype, device, steps=T, n_seq=B, activation=activation)


def op_args(policy, seq):
    """The recurrent ops' data arguments for the policy and batch."""
    return seq.obs, seq.episode_starts, list(seq.initial_state), [p.detach() for p in policy.parameters()]


def as_double(policy, seq, *tensors):
    return (copy.deepcopy(policy).double(), double_batch(seq),
            *(t.double() if t is not None and t.is_floating_point() else t for t in tensors))


# ----------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize("cell", RECURRENT_CELLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rnn_fvp_matches_reference(cell, case, n_layers, dtype, device):
    policy, seq, v, mask = problem(cell, case, n_layers, dtype, device)
    spec = recurrent_fused_spec(policy)
    out = _ops.rnn_fvp(*op_args(policy, seq), v, damping=0.1, **spec.op_kwargs(action_mask=mask))
    expected = reference.fvp(*as_double(policy, seq, v), damping=0.1, action_mask=mask)
    assert out.dtype == dtype and out.device == v.device
    assert rel_err(out, expected) < RTOL[dtype]


@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize("cell", RECURRENT_CELLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rnn_cg_matches_reference(cell, case, n_layers, dtype, device):
    policy, seq, b, mask = problem(cell, case, n_layers, dtype, device, activation="relu" if n_layers == 2 else "tanh")
    spec = recurrent_fused_spec(policy)
    x, used, res, xAx = _ops.rnn_cg(*op_args(policy, seq), b, damping=0.1, iters=6, rtol=1e-10,
                                    **spec.op_kwargs(action_mask=mask))
    ref_x, ref_used, ref_res, ref_xAx = reference.cg_solve(*as_double(policy, seq, b), iters=6, damping=0.1,
                                                           rtol=1e-10, action_mask=mask)
    assert x.dtype == dtype and used.dtype == torch.int64 and xAx.dtype == torch.float64
    assert int(used) == ref_used
    assert rel_err(x, ref_x) < CG_RTOL[dtype]
    assert abs(xAx.item() - ref_xAx.item()) <= CG_RTOL[dtype] * abs(ref_xAx.item())
    assert abs(res.item() - ref_res.item()) <= CG_RTOL[dtype] * b.double().norm().item()  # the recursion's, in dtype


@pytest.mark.parametrize("cell", RECURRENT_CELLS)
def test_rnn_cg_columns_are_single_solves(cell):
    policy, seq, b, _ = problem(cell, "gaussian", 2)
    spec = recurrent_fused_spec(policy)
    columns = torch.stack([b, b.flip(0) + 0.5], 1)
    x, used, res, xAx = _ops.rnn_cg(*op_args(policy, seq), columns, damping=0.1, iters=5, rtol=1e-10,
                                    **spec.op_kwargs())
    assert x.shape == columns.shape and used.shape == (2,)
    for c in range(2):
        one = _ops.rnn_cg(*op_args(policy, seq), columns[:, c].contiguous(), damping=0.1, iters=5, rtol=1e-10,
                          **spec.op_kwargs())
        assert torch.equal(x[:, c], one.x) and used[c] == one.iterations and xAx[c] == one.xAx


@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize("cell", RECURRENT_CELLS)
def test_rnn_fvp_is_symmetric(cell, case):
    policy, seq, u, mask = problem(cell, case, 2)
    v = torch.randn_like(u)
    spec = recurrent_fused_spec(policy)
    fu, fv = (_ops.rnn_fvp(*op_args(policy, seq), w, damping=0.0, **spec.op_kwargs(action_mask=mask)) for w in (u, v))
    assert abs(torch.dot(u, fv) - torch.dot(v, fu)) <= 1e-12 * (u.norm() * fv.norm())


def test_first_step_reset_ignores_initial_state():
    """A state reset at step 0 makes the initial state irrelevant (and its tangent is never formed)."""
    policy, seq, v, _ = problem("lstm", "gaussian", 2)
    starts = torch.ones_like(seq.episode_starts)
    spec = recurrent_fused_spec(policy)
    outs = [_ops.rnn_fvp(*op_args(policy, Sequences(seq.obs, starts, state)), v, damping=0.0, **spec.op_kwargs())
            for state in (seq.initial_state, tuple(torch.zeros_like(s) for s in seq.initial_state))]
    assert torch.equal(outs[0], outs[1])


# ----------------------------------------------------------------------------- the public functions
@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize("cell", RECURRENT_CELLS)
def test_public_fvp_and_cg_take_the_fused_path(cell, case):
    policy, seq, v, mask = problem(cell, case, 1)
    assert isinstance(fisher.choose_path(policy, "auto"), trpo_ext.policies.RecurrentFusedSpec)
    fused = trpo_ext.fvp(policy, seq, v, damping=0.1, action_mask=mask)
    assert torch.equal(fused, trpo_ext.fvp(policy, seq, v, damping=0.1, path="fused", action_mask=mask))
    generic = trpo_ext.fvp(policy, seq, v, damping=0.1, path="generic", action_mask=mask)
    assert rel_err(fused, generic) < 1e-10
    x, info = trpo_ext.cg_solve(policy, seq, v, iters=5, rtol=1e-10, action_mask=mask)
    gx, ginfo = trpo_ext.cg_solve(policy, seq, v, iters=5, rtol=1e-10, path="generic", action_mask=mask)
    assert rel_err(x, gx) < 1e-8 and int(info.iterations) == int(ginfo.iterations)


def test_overridden_policy_takes_the_generic_path():
    policy, seq, v, _ = problem("gru", "gaussian", 1)

    class Doubled(type(policy)):
        def head_out(self, seq):
            out, state = super().head_out(seq)
            return 2 * out, state

    policy.__class__ = Doubled
    assert recurrent_fused_spec(policy) is None
    with pytest.raises(TypeError, match="path='fused' needs"):
        trpo_ext.fvp(policy, seq, v, path="fused")


@pytest.mark.parametrize("cell", RECURRENT_CELLS)
def test_direction_solves_in_the_extension(cell):
    """trust_region_step's direction: g from autograd, the solve rnn_cg's, equal to the generic solve's."""
    from trpo_ext.config import TrustRegionConfig
    from trpo_ext.step import _direction

    policy, seq, _, _ = problem(cell, "categorical", 2)
    with torch.no_grad():
        actions = policy(seq).sample()
    advantages = torch.randn(T * B, dtype=torch.float64)
    params = list(policy.parameters())
    config = TrustRegionConfig(0.01, 0.1, 8, 1e-10, 0.8, 10)
    fused = _direction(policy, params, seq, actions, advantages, config, None, "auto", None)
    generic = _direction(policy, params, seq, actions, advantages, config, None, "generic", None)
    assert torch.equal(fused.gradient, generic.gradient)
    assert rel_err(fused.x, generic.x) < 1e-8


# ----------------------------------------------------------------------------- schema, fake kernels
@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize("cell", RECURRENT_CELLS)
def test_opcheck_rnn_ops(cell, case, device):
    policy, seq, v, mask = problem(cell, case, 2, torch.float32, device)
    kw = recurrent_fused_spec(policy).op_kwargs()
    args = (*op_args(policy, seq), v, kw["cell"], kw["kind"], kw["activation"])
    torch.library.opcheck(ops.rnn_fvp.default, (*args, 0.1, kw["segments"], mask))
    torch.library.opcheck(ops.rnn_cg.default, (*args, 0.1, 4, 1e-6, kw["segments"], mask))


# ----------------------------------------------------------------------------- bad input
def _bad(name):
    """Mutations of the op's arguments (obs, starts, state, params, v, kwargs) -> (error, words)."""
    return {
        "obs-dtype": (lambda a: a.update(obs=a["obs"].double()), TypeError, "initial_state[0] must have obs's dtype"),
        "obs-2d": (lambda a: a.update(obs=a["obs"][0]), ValueError, "obs must have shape (T, B, obs_dim)"),
        "starts-dtype": (lambda a: a.update(starts=a["starts"].float()), TypeError, "episode_starts must be bool"),
        "starts-shape": (lambda a: a.update(starts=a["starts"][:, :2]), ValueError, "episode_starts must have shape"),
        "state-count": (lambda a: a.update(state=a["state"][:1]), ValueError, "initial_state must be [h, c]"),
        "state-shape": (lambda a: a.update(state=[s[:, :2] for s in a["state"]]), ValueError,
                        "initial_state[0] must have shape"),
        "state-dtype": (lambda a: a.update(state=[a["state"][0], a["state"][1].double()]), TypeError,
                        "initial_state[1] must have obs's dtype"),
        "w-hh-shape": (lambda a: a["params"].__setitem__(1, a["params"][1][:, :-1]), ValueError,
                       "params[1] (weight_hh of recurrent layer 0) must have shape (20, 5)"),
        "head-shape": (lambda a: a["params"].__setitem__(4, a["params"][4][:, :-1]), ValueError,
                       "params[4] (weight of head layer 0) must have shape (out, 5)"),
        "params-count": (lambda a: a["params"].pop(), ValueError, "params must be [weight_ih, weight_hh, bias_ih"),
        "v-length": (lambda a: a.update(v=a["v"][:-1]), ValueError, "v must be a flat vector of length"),
        "cell": (lambda a: a["kw"].update(cell="rnn"), ValueError, "cell must be 'lstm' or 'gru'"),
        "mask-shape": (lambda a: a["kw"].update(action_mask=torch.ones(T * B - 1, 3, dtype=torch.bool)), ValueError,
                       "action_mask must have shape (15, 3)"),
    }[name]


@pytest.mark.parametrize("name", ["obs-dtype", "obs-2d", "starts-dtype", "starts-shape", "state-count", "state-shape",
                                  "state-dtype", "w-hh-shape", "head-shape", "params-count", "v-length", "cell",
                                  "mask-shape"])
def test_bad_input_names_the_argument(name):
    policy, seq, v, _ = problem("lstm", "categorical", 1, torch.float32)
    obs, starts, state, params = op_args(policy, seq)
    a = dict(obs=obs, starts=starts, state=state, params=params, v=v, kw=recurrent_fused_spec(policy).op_kwargs())
    mutate, error, words = _bad(name)
    mutate(a)
    for call in (lambda: _ops.rnn_fvp(a["obs"], a["starts"], a["state"], a["params"], a["v"], damping=0.1, **a["kw"]),
                 lambda: _ops.rnn_cg(a["obs"], a["starts"], a["state"], a["params"], a["v"], damping=0.1, iters=3,
                                     rtol=1e-6, **a["kw"])):
        with pytest.raises(error) as info:
            call()
        assert words in str(info.value).replace("b must", "v must")  # rnn_cg calls its vector b


def test_bad_cg_settings():
    policy, seq, b, _ = problem("gru", "gaussian", 1)
    kw = recurrent_fused_spec(policy).op_kwargs()
    for settings, words in ((dict(damping=-1.0, iters=3, rtol=1e-6), "damping must be finite and >= 0"),
                            (dict(damping=0.1, iters=0, rtol=1e-6), "iters must be >= 1"),
                            (dict(damping=0.1, iters=3, rtol=float("nan")), "rtol must be finite")):
        with pytest.raises(ValueError, match=words):
            _ops.rnn_cg(*op_args(policy, seq), b, **settings, **kw)
