"""The probe's passes on an FSDP2 model (``torch.distributed.fsdp.fully_shard``), docs/design.md section 11.

Under FSDP2 every trainable parameter is a DTensor holding this rank's dim-0 shard (``Shard(0)`` on a
1-D device mesh); a forward all-gathers each unit's parameters and a backward reduce-scatters their
gradients, averaged over ranks, into the sharded ``.grad``. Forward and backward are collectives:
every rank must run the same passes in the same order. What the probe does with that:

- v (``from_grad=True``, the only mode supported): the trainer's own reduce-scattered ``.grad``,
  read shard by shard (``local_view``); every direction rule is elementwise, so v is built on the
  local shards by the usual ``direction_from_grad`` (the optimizer's state is sharded the same way).
- s_n = v . X_n: the ranks first exchange their E batches (``all_batches``), then all process every
  E unit in lock-step: ``loss_n.backward()`` through the FSDP2 model. Every rank backpropagates the
  same loss, so FSDP2's average over ranks is X_n itself, and each rank holds X_n's shard in
  ``.grad``. The local partial dots of all units are summed over ranks by one all-reduce at the end;
  each rank keeps its own units' s_n and log-probs, so the statistics are those of DDP
  (``distributed``). The caller's ``.grad`` objects are set aside and put back, untouched, after the
  pass (also when it raises).
- ``measure_change``: one forward over every rank's E in lock-step; each rank keeps its own rows.
- the truth (``truth=True``): ``torch.func.functional_call`` does not reach the parameters FSDP2
  gathers, so ``theta + alpha eta v`` is written into the local shards in place, the E forward runs
  in lock-step, and the shards are restored from a saved copy, bit-exactly (``logprobs_stepped``).
  The step is formed in the parameters' dtype (a bf16 model's truth then measures the rounded step).

Cost: each rank runs the forward and backward of every E unit (W times the per-rank work of DDP);
memory stays sharded (v and one gradient shard; the truth one more shard copy). Not supported under
FSDP2, with a ValueError: an update batch (``run(U, E)``, ``update_direction``) or a given
``direction``, ``second_order`` and ``groups``.
FSDP2 must average its gradients (no ``set_gradient_divide_factor``) and reduce them
(no ``set_requires_gradient_sync(False)`` when the probe runs).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .batch import RolloutBatch
from .config import ProbeConfig
from .engines.projections import EvalProjections
from .logprobs import SequenceLogProbs, policy_logprobs, token_terms
from .objectives import entropy_surrogate
from .passes import Passes
from .response_tokens import ResponseTokens
from .vectors import Params, Vector, dot


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


def _check_reduction(module: nn.Module) -> None:
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


def _unit_backward(
    module: nn.Module, params: Params, batch: RolloutBatch, cfg: ProbeConfig, v: Vector
) -> tuple[Tensor, SequenceLogProbs]:
    """(this rank's partial dot ``v_r . X_n,r``, the log-probs) for one unit, ``.grad`` left as None."""
    lp = policy_logprobs(module, batch, cfg)
    entropy_surrogate(
        lp, batch, cfg.x_estimator
    ).backward()  # FSDP2: every rank the same loss, .grad = X_n's shard
    grads = {name: None if p.grad is None else p.grad.to_local() for name, p in params.items()}
    partial = dot(grads, v)
    for p in params.values():
        p.grad = None
    return partial, SequenceLogProbs(lp.seq.detach(), lp.weighted.detach())


def eval_projections(
    module: nn.Module, params: Params, batch: RolloutBatch, v: Vector, cfg: ProbeConfig
) -> EvalProjections:
    """s_n of this rank's E units: every rank's units processed by all ranks in lock-step (module docstring).

    ``v``: the local shards. One all-reduce of the ``(sum_r B_r,)`` partial dots at the end.
    """
    _check_reduction(module)
    group = fsdp2_group(module)
    rank, batches = dist.get_rank(group), all_batches(group, batch)
    caller_grads = {name: p.grad for name, p in params.items()}  # set aside, put back as they are
    partials, mine = [], EvalProjections.empty(batch, v, None)
    try:
        for p in params.values():
            p.grad = None  # else FSDP2 accumulates X_n into the caller's gradient
        for r, b in enumerate(batches):
            for mb in b.microbatches(1):
                partial, lp = _unit_backward(module, params, mb.batch, cfg, v)
                partials.append(partial)
                if r == rank:
                    mine.logprobs.put(mb.rows, lp)
    finally:
        for name, p in params.items():
            p.grad = caller_grads[name]
    s = torch.stack(partials).reshape(-1).clone()  # (sum_r B_r,) partial dots, rank order
    dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
    start = sum(b.n_units for b in batches[:rank])
    mine.s = s[start : start + batch.n_units]  # (B_E,) this rank's units
    return mine


@torch.no_grad()
def logprobs_lockstep(module: nn.Module, batch: RolloutBatch, cfg: ProbeConfig) -> SequenceLogProbs:
    """``S_i, S_w,i`` of this rank's E rows at the live parameters, every rank's E forwarded in lock-step."""
    group = fsdp2_group(module)
    out = SequenceLogProbs.empty(batch)
    for r, b in enumerate(all_batches(group, batch)):
        for mb in b.microbatches(cfg.microbatch_units):
            lp = policy_logprobs(module, mb.batch, cfg)
            if r == dist.get_rank(group):
                out.put(mb.rows, lp)
    reshard(module)  # the root's parameters as the caller had them: sharded
    return out


@contextmanager
def stepped_shards(params: Params, v: Vector, step: float):
    """The local shards moved to ``theta + step * v`` in place for the ``with`` block (in their dtype, as
    ``vectors.stepped_parameters`` forms it), then restored from a saved copy, bit-exactly, also on an
    error: ``functional_call`` does not reach the parameters FSDP2 gathers."""
    if step == 0.0:
        yield
        return
    shards = {name: p.to_local() for name, p in params.items()}
    saved = {name: t.detach().clone() for name, t in shards.items()}
    try:
        with torch.no_grad():
            for name, t in shards.items():
                t.copy_((t.float() + step * v[name]).to(t.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, t in shards.items():
                t.copy_(saved[name])


def logprobs_stepped(
    module: nn.Module, params: Params, batch: RolloutBatch, cfg: ProbeConfig, v: Vector, step: float
) -> SequenceLogProbs:
    """``logprobs_lockstep`` at ``theta + step * v`` (the truth; ``stepped_shards``)."""
    with stepped_shards(params, v, step):
        return logprobs_lockstep(module, batch, cfg)


@torch.no_grad()
def tokens_lockstep(module: nn.Module, batch: RolloutBatch, cfg: ProbeConfig) -> ResponseTokens:
    """Per-token ``l_t, H_t`` of this rank's E rows at the live parameters, every rank's E in lock-step."""
    group = fsdp2_group(module)
    out = ResponseTokens.zeros(batch)
    for r, b in enumerate(all_batches(group, batch)):
        for mb in b.microbatches(cfg.microbatch_units):
            t = token_terms(module, mb.batch, cfg.temperature)  # every rank's: the forwards are collectives
            if r == dist.get_rank(group):
                out.put(mb.rows, t.logprob, t.entropy, t.mask)
    reshard(module)  # the root's parameters as the caller had them: sharded
    return out


class ShardedPasses(Passes):
    """The passes of an FSDP2 model (module docstring): every rank runs every rank's units in lock-step."""

    steps_in_place = True
    reads_v_whole = True

    def reshard(self, module: nn.Module) -> None:
        reshard(module)

    def check_call(self, cfg: ProbeConfig, source: str, eval_batch: RolloutBatch | None) -> None:
        """The FSDP2 restrictions, as ValueErrors raised before any collective (module docstring)."""
        if source != "from_grad":
            raise ValueError(
                "FSDP2 model: only run(eval_batch=E, from_grad=True) is supported (v from the sharded "
                ".grad after the trainer's backward); an update batch or a given direction is not"
            )
        if cfg.second_order or cfg.groups is not None:
            raise ValueError("FSDP2 model: ProbeConfig.second_order and ProbeConfig.groups are not supported")
        if cfg.entropy == "token" or cfg.entropy_weighting == "sum":
            raise ValueError(
                f"FSDP2 model: ProbeConfig.entropy={cfg.entropy!r} (and entropy_weighting='sum') is not "
                "supported yet; use entropy='sequence' with entropy_weighting='token-mean'"
            )
        if cfg.direction == "optimizer-copy":  # the copy would step a stand-in optimizer (local_view)
            raise ValueError("FSDP2 model: direction='optimizer-copy' is not supported; use 'optimizer-step'")
        if eval_batch is None:
            raise ValueError(
                "FSDP2 model: every rank must pass an eval_batch (the ranks run every E unit together)"
            )

    def grad_view(self, params: Params, optimizer) -> tuple[Params, object]:
        return local_view(params, optimizer)

    def grad_checksums(self, params: Params) -> list | None:
        return None  # each rank holds a different shard of the one reduce-scattered gradient

    def eval_projections(
        self,
        module: nn.Module,
        params: Params,
        batch: RolloutBatch,
        v: Vector,
        cfg: ProbeConfig,
        halves: Tensor | None = None,
    ) -> EvalProjections:
        return eval_projections(module, params, batch, v, cfg)  # no halves: no U under FSDP2

    def logprobs(
        self, module: nn.Module, params: Params, batch: RolloutBatch, cfg: ProbeConfig
    ) -> SequenceLogProbs:
        return logprobs_lockstep(module, batch, cfg)

    def logprobs_stepped(
        self,
        module: nn.Module,
        params: Params,
        batch: RolloutBatch,
        cfg: ProbeConfig,
        v: Vector,
        step: float,
        base: Vector | None = None,
    ) -> SequenceLogProbs:
        return logprobs_stepped(module, params, batch, cfg, v, step)

    def tokens(
        self, module: nn.Module, params: Params, batch: RolloutBatch, cfg: ProbeConfig
    ) -> ResponseTokens:
        return tokens_lockstep(module, batch, cfg)

    def tokens_stepped(
        self,
        module: nn.Module,
        params: Params,
        batch: RolloutBatch,
        cfg: ProbeConfig,
        v: Vector,
        step: float,
        base: Vector | None = None,
    ) -> ResponseTokens:
        with stepped_shards(params, v, step):
            return tokens_lockstep(module, batch, cfg)


def passes_for(model: nn.Module) -> Passes:
    """``ShardedPasses`` for an FSDP2 (DTensor-sharded) model, else ``Passes``; chosen once per probe."""
    reshard(model)  # the root's parameters are gathered plain tensors after a forward without backward
    return ShardedPasses() if is_sharded(dict(model.named_parameters())) else Passes()
