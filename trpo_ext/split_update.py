"""update_parallel="split" (2 ranks; docs/distributed.md): after their rollouts the ranks gather the
whole batch, then rank 0 takes the policy step while rank 1 fits the critic, and one collective
gives every rank both results.
"""
from __future__ import annotations

import dataclasses
import time
import typing

import torch

from . import distributed, spaces
from .critic import adam_state, draw_seed, fit_value_network, seeded_generator
from .rollout import Batch
from .step import StepRecord

STEP_FIELDS = typing.get_type_hints(StepRecord)
"""Each `StepRecord` field's type (bool, int or float), in field order: how the other rank restores
rank 0's step from the float64 tensor it travels in."""


def split_update(batch: Batch, group, policy_step, policy: torch.nn.Module, value_net: torch.nn.Module,
                 critic_optimizer: torch.optim.Adam, generator: torch.Generator, critic_epochs: int,
                 critic_batch_size: int) -> tuple[Batch, StepRecord, float, float]:
    """One split update over `group` (this rank's `batch`): the ranks gather the whole batch (one
    collective pair, which also carries rank 0's seed for the critic's minibatch order, drawn from
    `generator` as `critic.shared_generator` draws it); then rank 0 takes `policy_step(obs, actions,
    advantages, action_masks) -> StepRecord` and rank 1 fits the critic, on the whole batch and at
    the same time; one more collective gives every rank both results (the networks, the critic's
    Adam state, the step record). Returns the gathered batch, the step record, the value loss and
    the critic's time. A task that raises on its rank still shares what it left (its networks as
    they are), then both ranks raise."""
    rank = distributed.rank(group)
    obs, layout = spaces.pack(batch.obs)
    masks = [] if batch.action_masks is None else [batch.action_masks]
    gathered, ints = distributed.gather_tensors(
        [obs, batch.actions, batch.advantages, batch.returns, batch.values, *masks], group,
        [draw_seed(generator)])  # every rank draws: the ranks' streams advance alike
    obs, actions, advantages, returns, values, *masks = gathered
    batch = Batch(obs=spaces.unpack(obs, layout), actions=actions, advantages=advantages, returns=returns,
                  values=values, action_masks=masks[0] if masks else None)

    step_values, value_loss, critic_time, failure = [0.0] * len(STEP_FIELDS), float("nan"), 0.0, None
    try:
        if rank == 0:
            step = policy_step(batch.obs, batch.actions, batch.advantages, batch.action_masks)
            step_values = [float(v) for v in dataclasses.astuple(step)]
        else:
            t = time.perf_counter()
            value_loss = fit_value_network(value_net, critic_optimizer, batch.obs, batch.returns, critic_epochs,
                                           critic_batch_size, seeded_generator(int(ints[0, 0]), generator.device))
            critic_time = time.perf_counter() - t
    except Exception as exc:  # shared below, so that the other rank does not wait for results in vain
        failure = exc
    failed = float(failure is not None)
    policy_part = torch.tensor([*step_values, failed], dtype=torch.float64)
    critic_part = torch.tensor([value_loss, critic_time, failed], dtype=torch.float64)
    critic_params = list(value_net.parameters())
    _, steps, exp_avg, exp_avg_sq = adam_state(critic_optimizer, critic_params)
    distributed.share_([(0, [*policy.parameters(), policy_part]),
                        (1, [*critic_params, *steps, *exp_avg, *exp_avg_sq, critic_part])], group)
    if failure is not None:
        raise failure
    for owner, (part, task) in enumerate(((policy_part, "policy step"), (critic_part, "critic fit"))):
        if part[-1]:
            raise RuntimeError(f"data-parallel split update: the {task} failed on rank {owner} (its error is in "
                               "that rank's output); every rank holds the networks as that rank left them")
    step = StepRecord(**{name: kind(v) for (name, kind), v in zip(STEP_FIELDS.items(), policy_part.tolist())})
    return batch, step, critic_part[0].item(), critic_part[1].item()
