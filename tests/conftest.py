import pytest
import torch

from helpers import DEVICES, rel_err  # noqa: F401  (rel_err: until test_critic imports it from helpers)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
