"""Is trpo_ext's policy step the same as sb3-contrib's TRPO step? Same batch, same weights, one update.

Trains trpo_ext briefly on an env's compare_sb3.py preset (bench/common.py), collects one rollout,
copies the policy weights into an sb3-contrib TRPO model, fills its rollout buffer with the same
observations, actions, log-probabilities and advantages, and runs one update in each library. Printed per
parameter block: the norm of each library's step, the norm of their difference and their cosine;
then the ratio of the two Fisher-vector products on a random vector.

For Box actions, sb3-contrib averages the Gaussian KL over action dimensions (`.mean()` of a
(batch, action_dim) tensor) where the TRPO paper, rllab and Spinning Up sum it. Its Fisher matrix and
its KL limit are then the summed KL's divided by d = action_dim, and its update with (target_kl δ,
cg_damping λ) is trpo_ext's with (max_kl d·δ, damping d·λ). Both settings are checked:

    python bench/sb3_step_check.py --env HalfCheetah-v5
    python bench/sb3_step_check.py --env Hopper-v5 --updates 2

The translation is trpo_ext.sb3_names's (through common.py). The drop-in `trpo_ext.sb3.TRPO`, given
sb3-contrib's arguments, takes the same step as sb3-contrib on one batch: tests/test_sb3.py,
test_one_update_equals_sb3_contribs (Box(3) actions, no MuJoCo needed).
"""
from __future__ import annotations

import argparse
import copy

import numpy as np
import torch

import trpo_ext
from common import PRESETS, sb3_kl_scale, sb3_kwargs, trpo_ext_kwargs


def sb3_actor_params(policy) -> list[torch.Tensor]:
    """sb3's actor parameters in trpo_ext's MLPPolicy.parameters() order (2 hidden layers)."""
    net = policy.mlp_extractor.policy_net
    params = [net[0].weight, net[0].bias, net[2].weight, net[2].bias, policy.action_net.weight,
              policy.action_net.bias]
    return params + ([policy.log_std] if hasattr(policy, "log_std") else [])  # Gaussian policies only


def one_step(env_id: str, kl_scale: int, updates: int, seed: int) -> None:
    from sb3_contrib import TRPO as SB3TRPO
    from stable_baselines3.common.distributions import kl_divergence
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.logger import configure

    p = PRESETS[env_id]
    agent = trpo_ext.TRPO(env_id, **trpo_ext_kwargs(p, seed, "cpu", kl_scale))
    agent.learn(p["n_steps"] * p["n_envs"] * updates, progress_bar=False)
    batch = agent.collector.collect(agent.policy, agent.value_net, agent.generator, agent.config.gamma,
                                     agent.config.gae_lambda)
    model = SB3TRPO("MlpPolicy", make_vec_env(env_id, n_envs=p["n_envs"], seed=seed), **sb3_kwargs(p, seed, "cpu"))
    model._logger = configure(None, [])
    ours, theirs = list(agent.policy.parameters()), sb3_actor_params(model.policy)
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            b.copy_(a)
        old_log_prob = agent.policy(batch.obs).log_prob(batch.actions)
    T, N = p["n_steps"], p["n_envs"]
    rb = model.rollout_buffer
    rb.reset()
    rb.observations[:] = batch.obs.view(T, N, -1).numpy()
    rb.actions[:] = batch.actions.view(T, N, -1).numpy()
    rb.log_probs[:] = old_log_prob.view(T, N).numpy()
    rb.advantages[:] = batch.advantages.view(T, N).numpy()
    rb.returns[:] = batch.returns.view(T, N).numpy()
    rb.values[:] = batch.values.view(T, N).numpy()
    rb.full, rb.pos = True, T

    # Fisher-vector products at the shared weights: trpo_ext's analytic one vs sb3's KL double backprop.
    with torch.no_grad():
        old = copy.copy(model.policy.get_distribution(batch.obs))
    kl = kl_divergence(model.policy.get_distribution(batch.obs), old).mean()
    grad_kl = torch.cat([g.reshape(-1) for g in torch.autograd.grad(kl, theirs, create_graph=True)])
    v = torch.randn(grad_kl.numel(), generator=torch.Generator().manual_seed(0))
    fv_sb3 = torch.cat([h.reshape(-1) for h in torch.autograd.grad((grad_kl * v).sum(), theirs)])
    fv_ours = trpo_ext.fvp(agent.policy, batch.obs, v, damping=0.0)
    ratio = (fv_ours.norm() / fv_sb3.norm()).item()
    cos = torch.nn.functional.cosine_similarity(fv_ours, fv_sb3, 0).item()

    before = [t.detach().clone() for t in ours]
    record = agent._policy_step(batch.obs, batch.actions, batch.advantages, None, agent.group)
    model.train()
    d = sb3_kl_scale(env_id)
    print(f"\n{env_id} (sb3 KL scale d = {d}), trpo_ext with max_kl = {kl_scale} x {p['max_kl']}, damping = "
          f"{kl_scale} x {p['damping']}; sb3-contrib with target_kl = {p['max_kl']}, cg_damping = {p['damping']}")
    print(f"Fisher-vector product: |F v| trpo_ext / sb3 = {ratio:.4f}, cosine {cos:.6f}")
    print("| block | step trpo_ext | step sb3 | difference | cosine |\n|---|---|---|---|---|")
    names = [f"{kind}{i}" for i in range(1, 4) for kind in ("W", "b")] + ["log_std"]
    for name, a, b, o in zip(names, ours, theirs, before):
        da, db = (a.detach() - o).flatten(), (b.detach() - o).flatten()
        c = torch.nn.functional.cosine_similarity(da, db, 0).item()
        print(f"| {name} | {da.norm():.4e} | {db.norm():.4e} | {(da - db).norm():.2e} | {c:.6f} |")
    print(f"trpo_ext's step: KL(old||new) summed over action dims = {record.kl:.4f}, line-search steps "
          f"{record.line_search_steps}, CG iterations {record.cg_iterations}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="HalfCheetah-v5", choices=sorted(PRESETS))
    parser.add_argument("--updates", type=int, default=1, help="trpo_ext updates before the compared one")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    np.set_printoptions(precision=4)
    print(f"torch {torch.__version__}, 1 thread, float32")
    d = sb3_kl_scale(args.env)
    for scale in sorted({1, d}):
        one_step(args.env, scale, args.updates, args.seed)


if __name__ == "__main__":
    main()
