"""Shared test helpers: the device list, tolerances, relative error and small policies."""
import gymnasium as gym
import torch

import trpo_ext

# CPU always; CUDA whenever a GPU is visible and the extension was built with its CUDA kernels.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and trpo_ext.cuda_built() else [])

# Relative error bounds against the double-backprop reference (docs/design.md, "Tolerances").
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def make_policy(kind="gaussian", obs_dim=5, act_dim=3, hidden=(8, 7), activation="tanh",
                dtype=torch.float64, device="cpu", seed=0):
    torch.manual_seed(seed)
    space = gym.spaces.Discrete(act_dim) if kind == "categorical" else gym.spaces.Box(-1, 1, (act_dim,))
    policy = trpo_ext.MLPPolicy(obs_dim, space, hidden=hidden, activation=activation).to(device, dtype)
    with torch.no_grad():  # move away from the near-uniform init so every block of F matters
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return policy


def n_params(policy) -> int:
    return sum(p.numel() for p in policy.parameters())


def zero_width(params, layer):
    """params with layer `layer` given 0 output units (and the next layer 0 inputs)."""
    params = list(params)
    params[2 * layer], params[2 * layer + 1] = params[2 * layer][:0], params[2 * layer + 1][:0]
    if 2 * layer + 2 < len(params) and params[2 * layer + 2].dim() == 2:
        params[2 * layer + 2] = params[2 * layer + 2][:, :0]
    return params
