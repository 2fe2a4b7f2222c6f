"""Data-parallel training across processes and nodes: a thin layer over ``torch.distributed``.

torchrun starts one process per rank and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; ``init_from_env`` joins the process group from them (gloo on CPU, NCCL on
CUDA). Without them (WORLD_SIZE unset or 1) every function here is a no-op, so the same
stage code runs in one plain process exactly as before.

The training steps (``trainer.sft.sft_step``, ``trainer.rm_training.rm_step``,
``trainer.ppo.ppo_minibatch_step``) take this rank's SHARD of a global batch and the
trained models wrapped by ``wrap_data_parallel``: DDP, or with ``RLHF_DATA_PARALLEL=fsdp2``
FSDP2 for the policy and the value model (``strategy``). Each rank scales its loss so that
the gradient AVERAGE over the W ranks (DDP's all-reduce, FSDP2's reduce-scatter) is the
gradient of the GLOBAL batch's loss. With S_r rank r's sum
over its n_r items (prompts, or tokens for a token-level mean) and N = sum_r n_r
(all-reduced, so shards may differ in size):

    global loss            L   = sum_r S_r / N
    rank r computes        l_r = S_r / n_r           (the single-process code, on its shard)
    rank r backpropagates  W * (n_r / N) * l_r       (1/W) * sum_r grad(W * S_r / N) = grad L

``loss_scale`` is that factor; ``weighted_means`` combines the ranks' l_r into L (and any
other per-item mean the same way) for reporting. On one process the factor is exactly 1
and nothing is all-reduced. When a step accumulates several micro-batches, all backward
passes but the last run under ``no_sync`` (``gradient_sync``: DDP then all-reduces the
accumulated gradient once), so every rank runs the same number of synchronising backward passes even when
their shards split into different numbers of micro-batches.

Failure: a rank that dies leaves its peers waiting in a collective. On gloo the peers
see the closed socket and raise at once; a hung rank (or NCCL) is caught by the process
group's timeout (``RLHF_DIST_TIMEOUT_S``, default 600 s: longer than a step or a
checkpoint save should take). ``collective`` turns either into ``PeerFailure``; torchrun
then stops the other ranks with SIGTERM, which ``init_from_env`` also turns into
``PeerFailure``, so every rank ends with an error that says a peer failed, and nothing is
published by a stage that did not finish.

A whole cycle (``trainer.service`` under torchrun): rank 0, the COORDINATOR, runs the
service as on one process (the store, the snapshot, evaluation, publishing, the swap); the
other ranks, the FOLLOWERS, only train. At each data-parallel stage the coordinator sends
the stage's call to them (``everywhere``) and runs it itself; between cycles they wait in
``follow`` on a gloo group of its own whose timeout is a year (the next cycle may be hours
away, and a collective of the training group would time out). A stage that fails on any
rank leaves the ranks out of step (a peer may sit in a collective that never completes):
the coordinator records the cycle as failed and the job ends (``in_step``) for the launcher
to restart, as torchrun's ``--max-restarts`` or the service manager does.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

TIMEOUT_ENV = "RLHF_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
COMMAND_TIMEOUT = timedelta(days=365)  # how long a follower waits for the next stage
STRATEGY_ENV = "RLHF_DATA_PARALLEL"
STRATEGIES = ("ddp", "fsdp2")
T = TypeVar("T")

_commands: Any = None  # the coordinator's channel to the followers (a gloo group), set on joining
_in_step = True  # False once a stage failed on this rank: the ranks may sit in different collectives

# Substrings of the errors gloo and NCCL raise when a peer is gone or late; a collective
# that fails with one of them failed because of ANOTHER rank, not because of this one's data.
_PEER_ERRORS = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out",
                "timeout", "socket", "nccl communicator was aborted", "connection refused")


class PeerFailure(RuntimeError):
    """A collective failed because another rank died, hung past the timeout or dropped its connection."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one training job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the rank on this node: its GPU index

    @property
    def is_coordinator(self) -> bool:
        """Rank 0 writes outputs (checkpoints, results); the others only train."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


# ---------------------------------------------------------------------------- joining and leaving


def world() -> World:
    """This process's rank and the job's size; ``World()`` (rank 0 of 1) outside a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def timeout_from_env() -> timedelta:
    """How long a collective waits for a late peer before it fails (``RLHF_DIST_TIMEOUT_S``)."""
    raw = os.environ.get(TIMEOUT_ENV)
    seconds = DEFAULT_TIMEOUT_S if raw in (None, "") else float(raw)
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0 seconds, got {raw!r}")
    return timedelta(seconds=seconds)


def init_from_env(device: torch.device | str | None = "auto", timeout: timedelta | None = None) -> World:
    """Join the process group torchrun describes in the environment; a no-op without one.

    ``device``: where this rank trains (``trainer.device.resolve_device``'s names); CUDA
    selects NCCL and this rank's GPU (``LOCAL_RANK``), anything else gloo. ``timeout``
    defaults to ``timeout_from_env()``.
    Also turns the SIGTERM with which torchrun stops the surviving ranks of a failed job into
    ``PeerFailure`` (only where SIGTERM still has its default action), so they report why.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if dist.is_initialized():
        return world()
    from trainer.device import resolve_device

    device = resolve_device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)  # "cuda" now means this rank's GPU
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timeout or timeout_from_env(), rank=int(os.environ["RANK"]),
                            world_size=size)
    joined = world()
    global _commands
    # Every rank creates the group, in the same order: the followers' channel (``follow``).
    _commands = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)
    _stop_on_sigterm(joined.rank)
    log.info("rank %d of %d joined (%s)", joined.rank, joined.size, backend)
    return joined


def _stop_on_sigterm(rank: int) -> None:
    def stop(signum: int, frame: Any) -> None:
        raise PeerFailure(f"rank {rank}: stopped by the launcher (SIGTERM): another rank failed, "
                          "or the job was stopped")

    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, stop)


def shutdown() -> None:
    """Leave the process group (when in one)."""
    global _commands
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _commands = None


# ---------------------------------------------------------------------------- sharding and DDP


def strategy() -> str:
    """How the trained models are replicated across ranks (``RLHF_DATA_PARALLEL``): ``ddp``
    (a whole copy per rank, gradients all-reduced; the default) or ``fsdp2`` (the weights,
    gradients and optimiser state sharded across the ranks: for a policy that does not fit
    one device). The launcher gives every rank the same environment."""
    value = os.environ.get(STRATEGY_ENV) or "ddp"
    if value not in STRATEGIES:
        raise ValueError(f"{STRATEGY_ENV} must be one of {', '.join(STRATEGIES)}, got {value!r}")
    return value


def sharded() -> bool:
    """True when the trained policy and value model are sharded across ranks (FSDP2): every
    forward through them is then a collective, so every rank must make the same number
    (``row_chunks``), generate in step (``synced_gpus``) and validate."""
    return world().distributed and strategy() == "fsdp2"


def is_sharded(module: Any) -> bool:
    """Whether ``module``'s weights are sharded across the ranks (``fully_shard`` ran on it):
    every forward through it is a collective."""
    if not world().distributed:
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def row_chunks(rows: int, size: int, model: Any = None) -> list[slice]:
    """Slices of at most ``size`` of this rank's ``rows`` for batched forwards through
    ``model``. Sharded (``is_sharded``), every rank makes the SAME number, ceil(the largest
    rank's rows / size), spreading its rows evenly over them; otherwise consecutive chunks."""
    if not is_sharded(model):
        return consecutive_slices(rows, size)
    largest = int(reduce_max({"rows": float(rows)})["rows"])
    count = max(1, -(-largest // size))
    if rows < count:
        raise ValueError(f"rank {world().rank} has {rows} rows for {count} forwards of every rank "
                         f"(sharded weights): a larger batch, or fewer ranks")
    return even_slices(rows, count)


def consecutive_slices(n: int, size: int) -> list[slice]:
    """[0, size), [size, 2 size), ... covering ``n`` items."""
    return [slice(start, start + size) for start in range(0, n, size)]


def even_slices(n: int, parts: int) -> list[slice]:
    """``n`` items in ``parts`` consecutive slices whose sizes differ by at most 1."""
    bounds = [i * n // parts for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


def shard_bounds(n: int, of: World | None = None) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous block of ``n`` items; sizes differ by at most 1."""
    ranks = of or world()
    return ranks.rank * n // ranks.size, (ranks.rank + 1) * n // ranks.size


def shard(items: Sequence[T], of: World | None = None) -> Sequence[T]:
    """This rank's slice of a global batch (a list, or a tensor's rows): the same on every run."""
    start, stop = shard_bounds(len(items), of)
    return items[start:stop]


class _Forward(torch.nn.Module):
    """``fn(module, ...)`` as a module's forward. DDP syncs the gradients of what runs inside
    the forward of the module it wraps only, and a step may call something else
    (``RewardModel.per_token_values``, the RM's cached-trunk scoring)."""

    def __init__(self, module: torch.nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.module, *args, **kwargs)


def wrap_data_parallel(module: torch.nn.Module, forward: Callable[..., Any] | None = None, *,
                       shard: bool = True, find_unused_parameters: bool = False) -> Callable[..., Any]:
    """What a training step calls instead of ``module`` (or ``forward(module, ...)``): a
    replica across the ranks, or, on one process, the module (the function) itself.

    DDP (``RLHF_DATA_PARALLEL=ddp``, the default): the parameters ``module`` trains are
    synced; on construction DDP copies rank 0's weights and buffers to every rank. Buffers
    are not re-synced at every forward: they do not change while training (the RM's bias is
    set after it), and each broadcast would be one more collective per forward.

    FSDP2 (``RLHF_DATA_PARALLEL=fsdp2``, and ``shard``): rank 0's weights are broadcast, then
    each decoder layer and the rest of the model are sharded across the ranks
    (``fully_shard``, in place: ``module`` itself becomes the replica, and ``forward``, a
    method of it, is registered so that calling it gathers the weights as ``forward`` does).
    From then on EVERY forward through ``module`` is a collective (``sharded``), and its
    whole weights come back only through ``full_state_dict``. ``shard=False`` keeps DDP
    (the RM: its trunk is frozen and cached, only its top trains).
    """
    if not world().distributed:
        return module if forward is None else functools.partial(forward, module)
    if shard and sharded():
        return _shard(module, forward)
    target = module if forward is None else _Forward(module, forward)
    from torch.nn.parallel import DistributedDataParallel

    with collective("DDP setup (broadcast of rank 0's weights)"):
        # device_ids=None: the module is on one device already, and the step moves its inputs
        return DistributedDataParallel(target, device_ids=None, forward_sync_buffers=False,
                                       find_unused_parameters=find_unused_parameters)


def _shard(module: torch.nn.Module, forward: Callable[..., Any] | None) -> Callable[..., Any]:
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from trainer.torch_parts import decoder_layers

    with collective("FSDP2 setup (broadcast of rank 0's weights, sharding)"):
        for tensor in module.state_dict().values():
            dist.broadcast(tensor.data, src=0)
        for layer in decoder_layers(getattr(module, "backbone", module)):  # a RewardModel's are its backbone's
            fully_shard(layer)
        fully_shard(module)
    if forward is None:
        return module
    if getattr(type(module), forward.__name__, None) is not forward:
        raise ValueError(f"FSDP2 can only gather the weights for a method of the module, not {forward.__name__}")
    register_fsdp_forward_method(module, forward.__name__)
    return getattr(module, forward.__name__)  # the bound method as registered: it gathers the weights


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """A sharded (FSDP2) module's whole weights, on CPU, on the coordinator (a collective:
    every rank calls it, the others get an empty dict); None for a module whose own
    weights are whole (one process, DDP): save it as it is."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    with collective("gathering the sharded weights"):
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def no_sync(replica: Any) -> contextlib.AbstractContextManager:
    """Accumulate gradients locally inside the block (DDP's ``no_sync``); a no-op for anything
    else (FSDP2 reduce-scatters every micro-batch's gradients into the shards: correct, and
    the sharded gradients are what saves memory)."""
    from torch.nn.parallel import DistributedDataParallel

    return replica.no_sync() if isinstance(replica, DistributedDataParallel) else contextlib.nullcontext()


@contextlib.contextmanager
def gradient_sync(replica: Any, *, sync: bool) -> Iterator[None]:
    """Around ONE micro-batch's forward AND backward through ``replica`` (``wrap_data_parallel``'s): on
    several ranks its gradients are all-reduced only when ``sync`` (a step's last micro-batch;
    the others accumulate locally under ``no_sync``, which DDP reads in the forward, hence
    the forward inside), and a peer's failure meanwhile raises ``PeerFailure``. A no-op on
    one process."""
    if not world().distributed:
        yield
    elif not sync:
        with no_sync(replica):
            yield
    else:
        with collective("gradient all-reduce"):
            yield


# ---------------------------------------------------------------------------- reductions


@contextlib.contextmanager
def collective(operation: str) -> Iterator[None]:
    """Re-raise a failure of the collectives inside as ``PeerFailure`` when a peer caused it."""
    try:
        yield
    except PeerFailure:
        raise
    except (RuntimeError, dist.DistError) as e:
        if not (isinstance(e, dist.DistError) or any(s in str(e).lower() for s in _PEER_ERRORS)):
            raise
        raise PeerFailure(f"rank {world().rank}: {operation} failed: a peer rank died, hung past the timeout "
                          f"or dropped its connection ({type(e).__name__}: {str(e).strip()[:300]})") from e


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over the ranks, in ONE all-reduce (float64); unchanged on one process."""
    return _all_reduce(values, "sum")


def reduce_max(values: dict[str, float]) -> dict[str, float]:
    """Each value's maximum over the ranks, in ONE all-reduce; unchanged on one process."""
    return _all_reduce(values, "max")


def _all_reduce(values: dict[str, float], op: str) -> dict[str, float]:
    if not world().distributed:
        return dict(values)
    packed = torch.tensor(list(values.values()), dtype=torch.float64, device=_collective_device())
    with collective(f"all-reduce ({op}) of " + ", ".join(values)):
        dist.all_reduce(packed, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return dict(zip(values, packed.tolist()))


def loss_scale(local: float, total: float) -> float:
    """W * local / total: what a rank multiplies its shard's mean loss by before ``backward``
    so that DDP's average of the ranks' gradients is the gradient of the global mean (the
    module docstring). ``local``: this rank's items (or tokens), ``total``: all ranks'. 1 on
    one process."""
    ranks = world()
    if not ranks.distributed:
        return 1.0
    return ranks.size * local / total if total > 0 else 0.0


def weighted_means(means: dict[str, float], local: float, total: float) -> dict[str, float]:
    """The global means from the ranks' shard means, each rank weighted by its share
    ``local / total`` of the items (one all-reduce); the means themselves on one process."""
    if not world().distributed:
        return dict(means)
    share = local / total if total > 0 else 0.0
    return reduce_sum({key: value * share for key, value in means.items()})


def barrier() -> None:
    """Wait for every rank (a no-op on one process)."""
    if world().distributed:
        with collective("barrier"):
            dist.barrier()


def local_steps(local_items: int, global_items: int, batch_size: int) -> list[slice]:
    """The slices of this rank's (shuffled) items that make one epoch's optimiser steps.

    One process: consecutive ``batch_size`` slices, as always. Several ranks: every rank must
    take part in every step (each step all-reduces), so each splits its own items into the
    same number of steps, ceil(global / batch_size), as evenly as it can: together the ranks'
    slices of a step hold about ``batch_size`` items. A rank with fewer items than steps
    would have an empty step: that is refused (a smaller world size or a larger batch)."""
    if not world().distributed:
        return consecutive_slices(local_items, batch_size)
    steps = max(1, -(-global_items // batch_size))
    if local_items < steps:
        raise ValueError(f"rank {world().rank} has {local_items} items for {steps} steps of {batch_size}: "
                         "every rank needs one per step (a larger batch size, or fewer ranks)")
    return even_slices(local_items, steps)


# ---------------------------------------------------------------------------- the coordinator's stages


def everywhere(fn: Callable[..., T], /, *args: Any, local: dict[str, Any] | None = None, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs, **local)`` on every rank and return this rank's result.

    Called by the coordinator: it sends ``fn`` (a module-level function, pickled by name),
    ``args`` and ``kwargs`` to the followers, which run it as ``follow`` receives it, then
    runs it itself. ``local`` holds what each process has its own of and must not be sent
    (a cache): the followers fill those names from their own ``follow(local=...)``. A
    failure here leaves the ranks out of step (``in_step``). On one process: just the call."""
    local = local or {}
    ranks = world()
    if not ranks.distributed:
        return fn(*args, **kwargs, **local)
    if not ranks.is_coordinator:
        raise RuntimeError("only the coordinator (rank 0) sends stages to the other ranks")
    global _in_step
    try:
        _send((fn, args, kwargs, tuple(local)))
        return fn(*args, **kwargs, **local)
    except BaseException:
        _in_step = False
        raise


def follow(local: dict[str, Any] | None = None, before: Callable[[str], None] | None = None) -> None:
    """A follower's life: run each call the coordinator sends (``everywhere``) until it
    releases the followers (``release_followers``). ``local``: this process's own values of
    the names the coordinator keeps local; ``before(name)`` runs before each call (the
    trainer's fault-injection hook). A failed call raises out of here: the job ends."""
    local = local or {}
    while (command := _receive()) is not None:
        fn, args, kwargs, local_names = command
        name = getattr(fn, "__name__", str(fn))
        log.info("rank %d: running %s", world().rank, name)
        if before is not None:
            before(name)
        fn(*args, **kwargs, **{key: local.get(key) for key in local_names})


def release_followers() -> None:
    """Tell the followers that no stage follows (the coordinator is stopping); a no-op on one
    process and when the ranks are out of step (the followers are stuck, or gone)."""
    if world().distributed and world().is_coordinator and _in_step:
        _send(None)


def in_step() -> bool:
    """False once a stage failed on this rank: the job must end (its launcher restarts it)."""
    return _in_step


def _send(command: Any) -> None:
    with collective("sending a stage to the other ranks"):
        dist.broadcast_object_list([command], src=0, group=_commands)


def _receive() -> Any:
    box: list[Any] = [None]
    with collective("waiting for the coordinator"):
        dist.broadcast_object_list(box, src=0, group=_commands)
    return box[0]
