"""torch.distributed for training: read torchrun's environment, wrap a model for data parallelism
(DDP, FSDP, HSDP) and move full state dicts in and out of a wrapped model.

One process without torchrun is world 1 and everything here is a no-op, so a recipe runs unchanged on
one CPU and under `torchrun --nnodes N --nproc_per_node G`.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from kuaida.errors import InvalidArgumentError

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "none", "ddp", "fsdp", "hsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): nccl
    on CUDA with one GPU per local rank, gloo on CPU. Without torchrun: world 1, no process group.
    Safe to call twice (the second call reads the existing group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        log.info("rank %d of %d on %s (%s)", rank, world, device, dist.get_backend())
    return DistInfo(rank, world, local_rank, device)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True in the process that logs, saves and reports (rank 0, or the only process)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def resolve_strategy(parallel: str, world: int) -> str:
    """"auto" -> "ddp" with several processes, "none" with one. Several processes need a strategy that
    keeps the replicas in step, so "none" is refused there."""
    if parallel not in STRATEGIES:
        raise InvalidArgumentError(f"unknown parallel strategy {parallel!r} (known: {', '.join(STRATEGIES)})")
    if parallel == "auto":
        return "ddp" if world > 1 else "none"
    if parallel == "none" and world > 1:
        raise InvalidArgumentError(f"--parallel none with {world} processes would train {world} separate "
                                   "models; use ddp, fsdp or hsdp (or run one process)")
    return parallel


def wrap_model(model: nn.Module, strategy: str, mesh_shape: tuple[int, int] | None = None) -> nn.Module:
    """Wrap for data parallelism. "ddp": DistributedDataParallel (a full replica per process); "fsdp":
    fully_shard each Block, then the root (parameters, gradients and optimizer state sharded over all
    processes); "hsdp": fully_shard over a 2-D mesh (replicate across nodes, shard within a node;
    mesh_shape defaults to (nodes, LOCAL_WORLD_SIZE)); "none" or world 1: the model unchanged.
    The model must already be on this process's device. FSDP changes the model in place."""
    world = world_size()
    strategy = resolve_strategy(strategy, world)
    if strategy == "none" or world == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        device_ids = [model_device(model)] if model_device(model).type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    device_type = model_device(model).type
    if strategy == "fsdp":
        mesh = init_device_mesh(device_type, (world,))
    else:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        shape = mesh_shape or (world // per_node, per_node)
        if shape[0] * shape[1] != world:
            raise InvalidArgumentError(f"hsdp mesh {shape} does not cover {world} processes")
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=("replicate", "shard"))
    for block in getattr(model, "layers", []):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP wraps in place: the model itself). A loss function gets the
    wrapped model; it reads attributes such as `.args` through unwrap(model)."""
    return model.module if hasattr(model, "module") else model


def is_sharded(model: nn.Module) -> bool:
    """True once fully_shard (FSDP/HSDP) has been applied: parameters are DTensors."""
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """Skip the gradient all-reduce for a micro-batch that is not the last of a step (accumulation)."""
    if skip and hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif skip and hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place (no-op in one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's value everywhere, in place (rank 0 decides when to stop or checkpoint)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(t, src=0)
    return t


def broadcast_object(obj):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# -- full state dicts ----------------------------------------------------------------------------------
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU in rank 0 ({} elsewhere), keys without wrapper prefixes.
    Gathers shards under FSDP: every rank must call it."""
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter names, on CPU in rank 0 (every rank must call it)."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict,
                    optimizer_state: dict | None) -> None:
    """Load full state dicts read by rank 0 (the other ranks pass {}): broadcast and shard as needed."""
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world_size() > 1)
    set_model_state_dict(model, model_state, options=opts)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=opts)


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of the model with its parameters on the meta device (no memory) and its buffers and
    shared (tied) parameters as in the original: what a sharded model's full state dict is loaded into
    to give back a plain model after FSDP training."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def load_into_skeleton(skeleton: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Assign a full state dict into a meta skeleton, keeping parameter ties (lm_head = embed_tokens)."""
    names = {}
    ties = []  # (alias name, first name) of parameters that are the same tensor
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        if id(p) in names:
            ties.append((name, names[id(p)]))
        else:
            names[id(p)] = name
    skeleton.load_state_dict(state, strict=False, assign=True)
    for alias, first in ties:
        owner, _, attr = alias.rpartition(".")
        setattr(skeleton.get_submodule(owner), attr, skeleton.get_parameter(first))
    missing = [n for n, p in skeleton.named_parameters() if p.is_meta]
    if missing:
        raise InvalidArgumentError(f"state dict misses parameters {missing[:3]}")
    return skeleton
