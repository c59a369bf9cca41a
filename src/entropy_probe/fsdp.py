"""What an FSDP2 model (``torch.distributed.fsdp.fully_shard``) is to the probe, docs/design.md section 11.

Under FSDP2 every trainable parameter is a DTensor holding this rank's dim-0 shard (``Shard(0)`` on a
1-D device mesh); a forward all-gathers each unit's parameters and a backward reduce-scatters their
gradients, averaged over ranks, into the sharded ``.grad``. Forward and backward are collectives:
every rank must run the same passes in the same order (``sharded_passes`` runs them). Here:

- recognising the layout (``is_sharded``, ``fsdp2_group``: every trainable parameter ``Shard(0)`` on
  one 1-D mesh, else a ValueError) and making ``named_parameters()`` yield the shards (``reshard``);
- v (``from_grad=True``, the only source supported): the trainer's own reduce-scattered ``.grad``,
  read shard by shard (``local_view``); every direction rule is elementwise, so v is built on the
  local shards by the usual ``direction_from_grad`` (the optimizer's state is sharded the same way);
- every rank's E batch, exchanged once (``all_batches``), and the check that FSDP2 averages and
  reduces the gradients the lock-step pass reads (``check_reduction``: no ``set_gradient_divide_factor``,
  no ``set_requires_gradient_sync(False)`` when the probe runs).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from .batch import RolloutBatch
from .vectors import Params


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        return None
    return DTensor


def is_sharded(params: Params) -> bool:
    """Whether the parameters are DTensors (an FSDP2 model)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in params.values())


def reshard(model: nn.Module) -> None:
    """Register the sharded parameters again where a forward without backward left them gathered.

    FSDP2 keeps the root module's parameters gathered after a forward (they are resharded by the
    next backward); ``named_parameters()`` then yields the gathered tensors. Local, no collective.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def fsdp2_group(model: nn.Module):
    """The process group of an FSDP2 model: every trainable parameter ``Shard(0)`` on one 1-D mesh.

    Raises a ValueError for any other sharding (FSDP1, HSDP's 2-D mesh, tensor parallelism, a
    trainable parameter left out of ``fully_shard``).
    """
    from torch.distributed.tensor import Shard

    dtensor = _dtensor_type()
    reshard(model)
    meshes = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if not isinstance(p, dtensor) or p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(
                f"EntropyProbe: parameter {name!r} is not sharded as fully_shard does (Shard(0) on a "
                "1-D device mesh); the probe supports FSDP2 (fully_shard) with every trainable "
                "parameter sharded, or DistributedDataParallel"
            )
        meshes.add(p.device_mesh)
    if len(meshes) != 1:
        raise ValueError(
            f"EntropyProbe: the trainable parameters live on {len(meshes)} device meshes; one expected"
        )
    return meshes.pop().get_group()


def _fsdp_param_groups(model: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    groups = []
    for m in model.modules():
        if isinstance(m, FSDPModule):
            groups += list(getattr(m._get_fsdp_state(), "_fsdp_param_groups", []))
    return groups


def local_view(params: Params, optimizer) -> tuple[Params, object]:
    """This rank's shards as stand-in parameters (``.grad``: the local gradient shard) and an optimizer
    of the same class reading the local shards of the state, for ``direction_from_grad``.

    The stand-ins share the shards' storage and are only read; the caller's tensors are untouched.
    """
    dtensor = _dtensor_type()
    local = lambda t: t.to_local() if isinstance(t, dtensor) else t  # noqa: E731
    out, of = {}, {}
    for name, p in params.items():
        shard = nn.Parameter(local(p.detach()), requires_grad=True)
        shard.grad = None if p.grad is None else local(p.grad.detach())
        out[name], of[id(p)] = shard, shard
    if optimizer is None:
        return out, None
    view = object.__new__(type(optimizer))  # isinstance checks hold; only param_groups and state are read
    view.defaults = optimizer.defaults
    view.param_groups = [
        {**g, "params": [of.get(id(p), p) for p in g["params"]]} for g in optimizer.param_groups
    ]
    view.state = {
        of[id(p)]: {k: local(x) for k, x in st.items()} for p, st in optimizer.state.items() if id(p) in of
    }
    return out, view


def all_batches(group, batch: RolloutBatch) -> list[RolloutBatch]:
    """Every rank's E batch, in rank order, on ``batch``'s device (one all_gather_object)."""
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, batch.to("cpu"), group=group)
    return [b.to(batch.device) for b in out]


def check_reduction(module: nn.Module) -> None:
    """ValueError unless FSDP2 will reduce-scatter and average the gradient of the next backward."""
    for group in _fsdp_param_groups(module):
        if not getattr(group, "reduce_grads", True):
            raise ValueError(
                "FSDP2 model: gradient sync is off (set_requires_gradient_sync(False)); the probe's "
                "per-unit gradients need FSDP2's reduce-scatter: turn it back on before the probe"
            )
        if getattr(group, "gradient_divide_factor", None) is not None:
            raise ValueError(
                "FSDP2 model: a custom gradient divide factor is set; the probe needs FSDP2's "
                "default average over ranks"
            )
