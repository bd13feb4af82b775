"""The critic's regression step: Adam on mean((V(s) - R)^2) over epochs of shuffled minibatches.

`fit_value_network` runs the whole loop as one extension op (forward, analytic backward and the
Adam update per minibatch, no autograd), keeping its state in the given `torch.optim.Adam`, so
checkpoints and a plain-PyTorch loop can take over at any point. A critic other than the built-in
`ValueNetwork` (a user's module, `TRPO(value_net=...)`) gets that plain-PyTorch loop instead, with the
same semantics (`fit_value_module`).
"""
from __future__ import annotations

import torch

from . import _ops, spaces
from .config import CRITIC_PARALLEL, check_int
from .policies import ValueNetwork


def adam_state(optimizer: torch.optim.Adam, params: list[torch.Tensor]):
    """(param group, steps, exp_avg, exp_avg_sq) of a plain Adam over `params`, its state created as
    torch.optim.Adam creates it when it has none yet."""
    group = optimizer.param_groups[0]
    if len(optimizer.param_groups) != 1 or group["weight_decay"] or group["amsgrad"] or group["maximize"]:
        raise ValueError("critic optimizer: one param group of plain Adam (no weight decay, amsgrad or maximize)")
    steps, exp_avg, exp_avg_sq = [], [], []
    for p in params:
        state = optimizer.state[p]
        if not state:  # what torch.optim.Adam creates on its first step
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        steps.append(state["step"])
        exp_avg.append(state["exp_avg"])
        exp_avg_sq.append(state["exp_avg_sq"])
    return group, steps, exp_avg, exp_avg_sq


def fused_value(value_net) -> bool:
    """Whether the fused `mlp_value_fit` op serves `value_net`: a `ValueNetwork` whose class keeps
    ValueNetwork's `forward` (a subclass that overrides it computes something else)."""
    return isinstance(value_net, ValueNetwork) and type(value_net).forward is ValueNetwork.forward


def check_parallel(value_net, parallel: str) -> None:
    """ValueError when `parallel` is "reduce" and `value_net` is not the built-in ValueNetwork (the
    per-minibatch gradient reduction lives inside the fused op). Whether `parallel` is one of
    CRITIC_PARALLEL at all is checked once, before: `TRPOConfig` for the agent, `fit_value_network`."""
    if parallel == "reduce" and not fused_value(value_net):
        raise ValueError(f"critic_parallel='reduce' needs the built-in ValueNetwork (the gradient reduction runs "
                         f"inside its fused critic op); the critic is a {type(value_net).__qualname__}: use "
                         "critic_parallel='gather'")


def fit_value_network(value_net: ValueNetwork, optimizer: torch.optim.Adam, obs: torch.Tensor,
                      returns: torch.Tensor, epochs: int, batch_size: int,
                      generator: torch.Generator | None = None, process_group=None,
                      parallel: str = "gather") -> float:
    """`epochs` passes of Adam minibatch regression of value_net(obs) on returns; the mean loss.

    Minibatches are consecutive slices of one `torch.randperm` per epoch drawn from `generator`,
    the order a plain PyTorch loop over `randperm(n).split(batch_size)` would use.

    `value_net` other than the built-in ValueNetwork (see `fused_value`): `fit_value_module`, the same
    loop in plain PyTorch.

    Data-parallel (`process_group`, from `trpo_ext.distributed.resolve_group`), two ways that make
    every rank's fit the same (docs/distributed.md, "Cost model", for when each is cheaper):
    - parallel="gather": every rank fits on the ranks' rows gathered in rank order, with the
      permutations drawn from `shared_generator(generator, process_group)` (3 collectives: the row
      counts, the rows, the seed);
    - parallel="reduce": every rank fits on its own rows in its own order, each Adam step taking the
      gradient of the ranks' minibatches together (1 collective to check that every rank has as many
      rows, 1 per minibatch, 1 for the loss).
    """
    from . import distributed

    if epochs == 0:
        return float("nan")
    if parallel not in CRITIC_PARALLEL:
        raise ValueError(f"parallel must be one of {CRITIC_PARALLEL}, got {parallel!r}")
    if not fused_value(value_net):
        if process_group is not None:
            check_parallel(value_net, parallel)
        return fit_value_module(value_net, optimizer, obs, returns, epochs, batch_size, generator, process_group)
    group_name = None
    if process_group is not None and parallel == "gather":
        rows = distributed.gather_rows(torch.cat([obs, returns.unsqueeze(1)], 1), process_group)
        obs, returns = rows[:, :-1], rows[:, -1]
        generator = shared_generator(generator, process_group)
    elif process_group is not None:
        counts = distributed.all_gather_rows(torch.tensor([obs.shape[0]], device=obs.device), process_group)
        if not bool((counts == counts[0]).all()):
            raise ValueError(f"critic parallel='reduce' needs as many rows on every rank (each step reduces one "
                             f"minibatch per rank); the ranks have {counts.flatten().tolist()}")
        group_name = distributed.group_name(process_group)
    params = list(value_net.parameters())
    group, steps, exp_avg, exp_avg_sq = adam_state(optimizer, params)
    order = torch.stack([torch.randperm(obs.shape[0], generator=generator, device=obs.device)
                         for _ in range(epochs)])
    beta1, beta2 = group["betas"]
    with torch.no_grad():
        tensors = {"parameters": [p.detach() for p in params], "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        before = [[t.clone() for t in group_] for group_ in tensors.values()] + [[s.clone() for s in steps]]
        loss = _ops.mlp_value_fit(obs, returns, tensors["parameters"], exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                                  steps=steps, order=order, batch_size=batch_size, lr=float(group["lr"]), beta1=beta1,
                                  beta2=beta2, eps=group["eps"], activation=value_net.activation, group=group_name)
        # One sync for the whole check (the step counts, on the CPU, stay finite). An overflow need
        # not show in the loss or the parameters: an infinite second moment makes every later step
        # 0, silently.
        finite = torch.stack([torch.isfinite(loss)] + [torch.stack([torch.isfinite(t).all() for t in group_]).all()
                                                       for group_ in tensors.values()])
        finite = finite.tolist()
        if not all(finite):
            for now, old in zip([*tensors.values(), steps], before):
                for t, b in zip(now, old):
                    t.copy_(b)
            bad = [name for name, ok in zip(["the loss", *tensors], finite) if not ok]
            raise ValueError(_overflow_message(bad, loss.item(), returns))
    return loss.item()


def fit_value_module(value_net: torch.nn.Module, optimizer: torch.optim.Adam, obs: torch.Tensor,
                     returns: torch.Tensor, epochs: int, batch_size: int,
                     generator: torch.Generator | None = None, process_group=None) -> float:
    """`fit_value_network` for any critic module (obs -> values (B,) or (B, 1); obs a tensor or a
    dict of them), in
    plain PyTorch: `epochs` passes over `torch.randperm` minibatches drawn from `generator` (all
    epochs' permutations first, as the fused op takes them), `optimizer.step()` on the mean squared
    error of each; returns the mean of the minibatch losses. Data-parallel: the "gather" approach
    (every rank fits on the ranks' rows in rank order, permutations from `shared_generator`), so
    every rank makes the same fit. Non-finite loss, parameters or Adam moments: everything is put
    back as it was before the call and a ValueError raised, as `fit_value_network` does."""
    from . import distributed

    if epochs == 0:
        return float("nan")
    n = spaces.batch_len(obs)
    if returns.shape != (n,):
        raise ValueError(f"critic fit: returns must have shape ({n},) (one per observation), got {tuple(returns.shape)}")
    batch_size = check_int("batch_size", batch_size, 1)  # TRPOConfig's rule for critic_batch_size
    sequences = isinstance(obs, spaces.Sequences)
    if sequences:  # minibatches of whole sequences, about batch_size rows each
        if process_group is not None:  # every rank's sequences, in rank order
            columns = distributed.gather_tensors(spaces.sequence_columns(obs, returns), process_group)[0]
            obs, returns = spaces.from_sequence_columns(columns, obs.valid is not None)
            generator = shared_generator(generator, process_group)
        seq_len, n = obs.episode_starts.shape
        rows_per_sequence = seq_len if obs.valid is None else max(1.0, float(obs.valid.sum()) / n)
        batch_size = max(1, round(batch_size / rows_per_sequence))
    elif process_group is not None:  # a dict of observations travels packed into one (N, D) tensor
        flat, layout = spaces.pack(obs)
        gathered = distributed.gather_rows(torch.cat([flat, returns.unsqueeze(1)], 1), process_group)
        obs, returns = spaces.unpack(gathered[:, :-1], layout), gathered[:, -1]
        generator = shared_generator(generator, process_group)
        n = returns.shape[0]
    params = list(value_net.parameters())
    _, steps, exp_avg, exp_avg_sq = adam_state(optimizer, params)
    tensors = {"parameters": [p.detach() for p in params], "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    with torch.no_grad():
        before = [[t.clone() for t in group_] for group_ in tensors.values()] + [[s.clone() for s in steps]]
    order = torch.stack([torch.randperm(n, generator=generator, device=returns.device) for _ in range(epochs)])
    losses = []
    for epoch in range(epochs):
        for idx in order[epoch].split(batch_size):
            if sequences:  # Sequences.valid: padding rows do not count (and the rows past every piece's end are cut)
                batch, target = spaces.rows(obs, idx), returns.view(seq_len, -1)[:, idx]
                if batch.valid is not None:
                    steps = int(batch.valid.any(1).nonzero().max()) + 1
                    batch, target = spaces.Sequences(*(x[:steps] for x in batch[:2]), batch.initial_state,
                                                     batch.valid[:steps]), target[:steps]
                values, target = value_net(batch).reshape(-1), target.reshape(-1)
                weight = None if batch.valid is None else batch.valid.reshape(-1).to(values.dtype)
                loss = ((values - target).square() * weight).sum() / weight.sum() if weight is not None \
                    else torch.nn.functional.mse_loss(values, target)
            else:
                values = value_net(spaces.rows(obs, idx))
                loss = torch.nn.functional.mse_loss(values.reshape(-1), returns[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
    with torch.no_grad():
        loss = torch.stack(losses).double().mean()
        finite = torch.stack([torch.isfinite(loss)] + [torch.stack([torch.isfinite(t).all() for t in group_]).all()
                                                       for group_ in tensors.values()]).tolist()
        if not all(finite):
            # torch.optim.Adam updates parameters, moments and step counts in place: put them back.
            for now, old in zip([*tensors.values(), [optimizer.state[p]["step"] for p in params]], before):
                for t, b in zip(now, old):
                    t.copy_(b)
            bad = [name for name, ok in zip(["the loss", *tensors], finite) if not ok]
            raise ValueError(_overflow_message(bad, loss.item(), returns))
    return loss.item()


def shared_generator(generator: torch.Generator | None, process_group) -> torch.Generator:
    """A generator seeded alike on every rank: from a seed each rank draws from its own `generator`
    (`draw_seed`: every stream advances the same way), rank 0's broadcast (one collective of one number)."""
    from . import distributed

    device = generator.device if generator is not None else torch.device("cpu")
    seed = torch.tensor([draw_seed(generator)], device=device)
    distributed.broadcast_([seed], process_group)
    return seeded_generator(int(seed), device)


def draw_seed(generator: torch.Generator | None) -> int:
    """A seed for another generator, drawn from `generator` (on its device)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device))


def seeded_generator(seed: int, device) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def _overflow_message(bad: list[str], loss: float, returns: torch.Tensor) -> str:
    finite = returns[torch.isfinite(returns)]
    span = f"[{finite.min().item():.3g}, {finite.max().item():.3g}]" if finite.numel() else "(none finite)"
    n_bad = returns.numel() - finite.numel()
    targets = f"the value targets lie in {span}" + (f", {n_bad} of them inf or NaN" if n_bad else "")
    return (f"critic fit: {', '.join(bad)} became inf or NaN in {returns.dtype} (loss {loss:.3g}; {targets}); "
            "the critic's parameters and Adam state were restored to their values before the call")
