import gymnasium as gym
import torch

import trpo_ext


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


class Wrapped(torch.nn.Module):
    """A module that is not an MLPPolicy, to force the generic torch.func path."""

    def __init__(self, policy):
        super().__init__()
        self.inner = policy

    def forward(self, obs):
        return self.inner(obs)
