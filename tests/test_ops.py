"""torch.library.opcheck on every op: schema, fake (meta) kernels, dispatch; and torch.compile tracing."""
import pytest
import torch

import trpo_ext

from helpers import make_policy, n_params

ops = torch.ops.trpo_ext


def _args(kind, dtype, device):
    policy = make_policy(kind, 5, 3, (8, 7), "tanh", dtype, device)
    obs = torch.randn(9, 5, dtype=dtype, device=device)
    v = torch.randn(n_params(policy), dtype=dtype, device=device)
    return obs, [p.detach() for p in policy.parameters()], v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_opcheck_mlp_fvp(kind, dtype, device):
    obs, params, v = _args(kind, dtype, device)
    torch.library.opcheck(ops.mlp_fvp.default, (obs, params, v, kind, "tanh", 0.1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_opcheck_mlp_cg(kind, dtype, device):
    obs, params, v = _args(kind, dtype, device)
    torch.library.opcheck(ops.mlp_cg.default, (obs, params, v, kind, "relu", 0.1, 5, 1e-6))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    obs, params, v = _args("gaussian", torch.float32, "cpu")
    with FakeTensorMode() as mode:
        fobs, fparams, fv = mode.from_tensor(obs), [mode.from_tensor(p) for p in params], mode.from_tensor(v)
        x, iters, res, xAx = ops.mlp_cg(fobs, fparams, fv, "gaussian", "tanh", 0.1, 5, 1e-6)
    assert x.shape == v.shape and iters.dtype == torch.int64 and res.shape == () and xAx.dtype == torch.float64


def test_torch_compile_traces_the_ops():
    obs, params, v = _args("categorical", torch.float32, "cpu")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def solve(obs, params, v):
        return ops.mlp_cg(obs, params, v, "categorical", "tanh", 0.1, 5, 1e-6)[0]

    expected = ops.mlp_cg(obs, params, v, "categorical", "tanh", 0.1, 5, 1e-6)[0]
    torch.testing.assert_close(solve(obs, params, v), expected)


def test_cuda_built_reports_a_bool():
    assert isinstance(trpo_ext.cuda_built(), bool)
