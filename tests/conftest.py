import pytest
import torch

import trpo_ext

# CPU always; CUDA whenever a GPU is visible and the extension was built with its CUDA kernels.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and trpo_ext.cuda_built() else [])

# Relative error bounds against the double-backprop reference (DESIGN §5).
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()
