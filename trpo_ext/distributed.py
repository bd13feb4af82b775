"""Data-parallel training on torch.distributed (docs/distributed.md): what the step and the agent
need from a process group, and nothing home-made underneath (gloo on CPU, NCCL on GPU, launched by
torchrun / torch.distributed.run).

Every rank holds the same networks and collects its own rollouts; sums over the ranks make every
rank compute the same update. Helpers here take the group (None: one process, every helper is then
the identity) and are called by every rank in the same order.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import math
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0
"""How long a collective waits for the other ranks before it raises (`--dist-timeout`)."""

_HEARTBEAT_KEY = "trpo_ext/heartbeat/{rank}"


def resolve_group(process_group):
    """`process_group` for the helpers: None (one process) or a ProcessGroup this rank belongs to.
    "auto" is torch.distributed's default group when one is initialised, else None. A lookup: it
    changes nothing (`lower_gloo_event_loops` runs where a group is initialised or adopted)."""
    if process_group is None:
        return None
    if isinstance(process_group, str) and process_group == "auto":
        return resolve_group(dist.group.WORLD) if dist.is_available() and dist.is_initialized() else None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group: torch.distributed is not initialised in this process "
                         "(call torch.distributed.init_process_group first, or pass None)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be None, 'auto' or a torch.distributed ProcessGroup, "
                        f"got {type(process_group).__name__}")
    if dist.get_rank(process_group) < 0:
        raise ValueError("process_group: this rank is not a member of the group")
    return process_group


GLOO_EVENT_LOOP_THREAD = "gloo_tcp_loop"
"""The name gloo's TCP transport gives the thread that runs its epoll loop."""

GLOO_LOOP_PRIORITIES = ("low", "idle", "normal")
"""TRPO_EXT_GLOO_LOOP_PRIORITY's values: nice 19 (the default), SCHED_IDLE, or as gloo starts it."""

GLOO_LOOP_NAMING_WAIT_S = 1.0
"""How long `lower_gloo_event_loops` waits for a gloo group's loop thread when it finds none: gloo
names the thread from inside it, a few ms after a one-rank group's init has returned on a busy machine."""


def gloo_event_loop_threads() -> list[int]:
    """The thread ids of this process's gloo event loops (Linux; [] elsewhere)."""
    if not sys.platform.startswith("linux"):
        return []
    found = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == GLOO_EVENT_LOOP_THREAD:
                    found.append(int(tid))
        except FileNotFoundError:  # the thread ended
            continue
    return found


def lower_gloo_event_loops(group) -> int:
    """Lowers the scheduling priority of gloo's TCP event-loop threads in this process when `group`
    uses gloo (Linux; elsewhere nothing), to what TRPO_EXT_GLOO_LOOP_PRIORITY says: "low" (the
    default) nice 19, "idle" SCHED_IDLE, "normal" leaves them alone. Returns how many threads it
    changed. Called once where a group comes into use: `init_from_env` right after it initialises
    the default group, and a `TRPO` agent built with a group.

    Why (docs/distributed.md, "gloo's event loop"): when a worker thread holds a connection's
    mutex, the loop's handler fails a try_lock and returns to its level-triggered epoll, which
    wakes it again at once: it spins until the worker lets go. At normal priority that spinning
    loop preempts the threads it waits for and can keep the core until the scheduler's next tick:
    the slow mode of gloo's latency. At a low priority it does not preempt them. SCHED_IDLE goes
    furthest on a machine the job has to itself but starves behind other jobs' threads on the same
    cores; nice 19 keeps most of the gain and stays ahead of normal priority beside them (the
    measurements: docs/distributed.md)."""
    setting = os.environ.get("TRPO_EXT_GLOO_LOOP_PRIORITY", "low")
    if setting not in GLOO_LOOP_PRIORITIES:
        raise ValueError(f"TRPO_EXT_GLOO_LOOP_PRIORITY must be one of {GLOO_LOOP_PRIORITIES}, got {setting!r}")
    if group is None or setting == "normal" or not sys.platform.startswith("linux") \
            or "gloo" not in str(dist.get_backend(group)):
        return 0
    loops, deadline = gloo_event_loop_threads(), time.monotonic() + GLOO_LOOP_NAMING_WAIT_S
    while not loops and time.monotonic() < deadline:  # a gloo group has one; it may not be named yet
        time.sleep(0.005)
        loops = gloo_event_loop_threads()
    changed = 0
    for tid in loops:
        try:
            if setting == "idle" and os.sched_getscheduler(tid) != os.SCHED_IDLE:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                changed += 1
            elif setting == "low" and os.getpriority(os.PRIO_PROCESS, tid) < 19:
                os.setpriority(os.PRIO_PROCESS, tid, 19)  # a thread's own nice value (Linux)
                changed += 1
        except (ProcessLookupError, PermissionError):  # the thread ended; a sandbox forbids it
            continue
    return changed


def rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def world_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_name(group) -> str | None:
    """The name the extension's ops take to reduce over `group` (None: no reduction)."""
    return None if group is None else group.group_name


def all_reduce_sum_(t: torch.Tensor, group) -> torch.Tensor:
    """t = Σ_ranks t, in place (identity without a group)."""
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def any_rank(flag: bool, group) -> bool:
    """Whether `flag` is true on any rank of `group` (one all-reduce of one int, on the device the
    backend reduces on): how the ranks agree to stop after the same update when a signal reached
    some of them. `flag` itself without a group."""
    if group is None:
        return bool(flag)
    return bool(all_reduce_sum_(torch.tensor([int(bool(flag))], device=_backend_device(group)), group).item())


def gather_bytes(data: bytes, group) -> list[bytes]:
    """Every rank's `data` (any length per rank), in rank order, on every rank: `gather_tensors`'
    two collectives on the bytes as one uint8 column. [data] without a group."""
    if group is None:
        return [data]
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    column = flat.reshape(-1, 1).to(_backend_device(group))
    rows, counts = gather_tensors([column], group, [len(data)])
    return [bytes(part.reshape(-1).cpu().numpy()) for part in rows[0].split(counts[:, 0].tolist())]


def _backend_device(group) -> torch.device:
    """Where the group's backend takes tensors: this process's current GPU under NCCL, else the CPU."""
    nccl = dist.get_backend(group) == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def broadcast_(tensors, group, src_rank: int = 0) -> None:
    """Copies every tensor of `tensors` (one dtype and device) from the group's rank `src_rank` to
    all ranks, in place: one collective, on one flat buffer."""
    tensors = list(tensors)
    if group is None or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.broadcast(flat, group=group, group_src=src_rank)
    with torch.no_grad():
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))


def gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    """The ranks' tensors concatenated along dim 0 in rank order, on every rank (row counts may
    differ between ranks): two collectives, the row counts and the padded rows."""
    return gather_tensors([t], group)[0][0]


def gather_tensors(tensors, group, ints=()) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Every rank's `tensors` (one row count among them, any dtypes and trailing shapes; the same
    list on every rank) concatenated along dim 0 in rank order, and every rank's `ints` as a
    (world size, len(ints)) int64 tensor: two collectives, the row counts with the ints, then the
    rows as raw bytes (every value arrives bit for bit). Without a group: (tensors, None)."""
    tensors = list(tensors)
    if group is None:
        return tensors, None
    n = tensors[0].shape[0]
    device = tensors[0].device
    as_bytes = [t.reshape(n, math.prod(t.shape[1:])).contiguous().view(torch.uint8) for t in tensors]
    header = torch.zeros(world_size(group), 1 + len(ints), dtype=torch.int64, device=device)
    header[rank(group)] = torch.tensor([n, *ints], dtype=torch.int64)
    all_reduce_sum_(header, group)
    counts = header[:, 0].tolist()
    padded = torch.zeros((max(counts), sum(b.shape[1] for b in as_bytes)), dtype=torch.uint8, device=device)
    torch.cat(as_bytes, 1, out=padded[:n])
    rows = torch.cat([part[:k] for part, k in zip(all_gather_rows(padded, group), counts)])
    gathered = [part.contiguous().view(t.dtype).reshape(-1, *t.shape[1:])
                for t, part in zip(tensors, rows.split([b.shape[1] for b in as_bytes], 1))]
    return gathered, header[:, 1:]


def share_(owned, group) -> None:
    """For each (owner rank, tensors) of `owned`: copies the owner's tensors to every rank, in place,
    all in one collective: a float64 all-reduce (sum) in which each rank fills what it owns and
    leaves zeros elsewhere (x + 0 = x; float32 and integers below 2**53 pass through float64
    exactly). The buffer lives on the first tensor's device (Adam keeps its step counts on the CPU
    beside CUDA moments)."""
    owned = [(owner, list(tensors)) for owner, tensors in owned]
    everything = [t for _, tensors in owned for t in tensors]
    if group is None or not everything:
        return
    me, device = rank(group), everything[0].device
    flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float64) if owner == me
                      else torch.zeros(t.numel(), dtype=torch.float64, device=device)
                      for owner, tensors in owned for t in tensors])
    all_reduce_sum_(flat, group)
    with torch.no_grad():
        for t, part in zip(everything, flat.split([t.numel() for t in everything])):
            t.copy_(part.view_as(t))


def all_gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    """(world size, *t.shape): every rank's `t` (one shape on all ranks), stacked in rank order."""
    if group is None:
        return t.unsqueeze(0)
    parts = [torch.empty_like(t) for _ in range(world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def checksum(tensors) -> torch.Tensor:
    """A cheap fingerprint of a list of tensors: float64 sums of the values and of the values
    weighted by their position (a swap or a sign flip changes it)."""
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    position = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device) / flat.numel()
    return torch.stack([flat.sum(), (flat * position).sum()])


def check_replicas(named_tensors: dict[str, list[torch.Tensor]], group) -> None:
    """RuntimeError naming the ranks and the part whose tensors differ from rank 0's (one collective):
    the ranks apply the same updates to the same start, so any difference is a bug or a bad rank."""
    if group is None:
        return
    everyone = all_gather_rows(torch.stack([checksum(ts) for ts in named_tensors.values()]).reshape(-1), group)
    bad = {}
    for r in range(1, everyone.shape[0]):
        parts = (everyone[r] != everyone[0]).reshape(len(named_tensors), -1).any(1)
        if parts.any():
            bad[r] = [name for name, differs in zip(named_tensors, parts.tolist()) if differs]
    if bad:
        raise RuntimeError(f"data-parallel replicas drifted apart: {', '.join(f'rank {r}: {names}' for r, names in bad.items())} "
                           "differ from rank 0 (same updates from the same start should give identical tensors)")


# ----------------------------------------------------------------------------- faults
def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


HEARTBEAT_S = 1.0
"""How often each rank's heartbeat thread counts up its key in the job's store."""

_heartbeat = None  # the thread of this process, once started


def start_heartbeat(group) -> None:
    """Starts this rank's heartbeat: a daemon thread that increments the key
    trpo_ext/heartbeat/RANK in the job's store every HEARTBEAT_S seconds, so that a rank whose
    collective timed out can tell a stuck or dead rank (its count stops) from a slow one."""
    global _heartbeat
    store = _store() if group is not None else None
    if store is None or (_heartbeat is not None and _heartbeat.is_alive()):
        return
    key = _HEARTBEAT_KEY.format(rank=dist.get_rank())
    stop = threading.Event()

    def beat():
        while True:
            try:
                store.add(key, 1)
            except Exception:  # the job is over (store closed): stop quietly
                return
            if stop.wait(HEARTBEAT_S):
                return

    _heartbeat = threading.Thread(target=beat, name="trpo_ext-heartbeat", daemon=True)
    _heartbeat.stop = stop
    _heartbeat.start()
    # Stopped before the interpreter finalizes: a daemon thread still inside the store's C++ call
    # then is ended by CPython mid-call, which aborts the process ("terminate called without an
    # active exception", seen once under ASan) or can leave it hanging at exit.
    atexit.register(stop_heartbeat)


def stop_heartbeat() -> None:
    """Stops this process's heartbeat thread and waits for it (before the process group goes), so
    that no store call is in flight while the job shuts down."""
    global _heartbeat
    if _heartbeat is not None:
        _heartbeat.stop.set()
        _heartbeat.join(timeout=5 * HEARTBEAT_S)
        _heartbeat = None
        atexit.unregister(stop_heartbeat)


def leave_group(together: bool) -> None:
    """Stops this rank's heartbeat and destroys the default process group, if any. `together` (a
    run that ended well): after a barrier, so that every rank tears its connections down at the same
    time. Without it, a gloo rank that destroyed its group and exited while another rank was still
    busy (rank 0 evaluating) sometimes aborted in its exit ("terminate called without an active
    exception"; the runs: docs/distributed.md, "Faults and restarts")."""
    stop_heartbeat()
    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def _silent_ranks() -> str:
    """The ranks whose heartbeat stopped, watched for 3 heartbeats."""
    store = _store()
    if store is None:
        return "unknown"
    keys = [_HEARTBEAT_KEY.format(rank=r) for r in range(dist.get_world_size())]
    try:
        before = [store.add(key, 0) for key in keys]
        time.sleep(3 * HEARTBEAT_S)
        after = [store.add(key, 0) for key in keys]
    except Exception:
        return "unknown (the job's store is unreachable)"
    silent = [f"rank {r}" for r, (b, a) in enumerate(zip(before, after)) if a == b]
    return ", ".join(silent) if silent else "none (every rank is alive; one is slower than the timeout)"


@contextlib.contextmanager
def collective_errors(group):
    """Turns a failed or timed-out collective into a RuntimeError that says which ranks fell behind."""
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        if group is None or "data-parallel" in str(exc) or not _is_collective_failure(exc):
            raise
        raise RuntimeError(
            f"rank {dist.get_rank()}: a collective failed or waited past the process group's timeout for the other ranks "
            f"(ranks not responding: {_silent_ranks()}); a rank died or hangs. {type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}") from exc


def _is_collective_failure(exc: BaseException) -> bool:
    # DistError covers the backend, network and store errors torch.distributed raises; older gloo
    # builds raise a plain RuntimeError saying that a peer or the wait failed.
    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(word in text for word in (
        "timed out", "timeout", "connection closed", "connection reset", "peer"))


def init_from_env(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Joins the process group torchrun describes in the environment (WORLD_SIZE, RANK, MASTER_ADDR,
    ...), once; gloo on CPU, NCCL when a GPU is visible and `backend` is None. Returns whether this
    process is part of a multi-process job."""
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout_s}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    timeout = datetime.timedelta(seconds=timeout_s)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    # The store torchrun's agent hosts outlives a restart, keys included, and init_process_group's
    # env:// rendezvous does not separate the attempts: a restarted gloo group then reads the dead
    # ranks' addresses and fails to connect (seen with torch 2.13, `torchrun --standalone
    # --max-restarts 1`). Each attempt gets its own key prefix here.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(host, port, world, is_master=not agent_store and rank == 0, timeout=timeout,
                          multi_tenant=not agent_store)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"trpo_ext/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/attempt_{attempt}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    lower_gloo_event_loops(dist.group.WORLD)  # gloo's event loops yield to the ranks' work from the start
    return True
