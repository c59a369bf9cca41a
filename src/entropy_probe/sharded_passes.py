"""The probe's passes on an FSDP2 model (``fsdp``), docs/design.md section 11: every rank runs every
rank's E units, in lock-step, because every forward and backward of FSDP2 is a collective.

- s_n = v . X_n: the ranks first exchange their E batches (``fsdp.all_batches``), then all process
  every E unit in rank order, one forward and ``backward()`` through the FSDP2 model. Every rank
  backpropagates the same loss, so FSDP2's average over ranks is X_n itself and ``.grad`` holds this
  rank's shard of it. Each rank forms its partial dots ``v_r . X_n,r`` parameter by parameter (summed
  per parameter group in float64 when ``by_group`` is computed, as the backward engine does); one
  all-reduce of every unit's partial sums at the end gives every s_n, and each rank keeps its own
  units' values, so the statistics are those of DDP. One loop (``_lockstep``) serves both readings of
  E: the sequence functionals back-propagate one surrogate per unit (``objectives.entropy_surrogate``);
  the exact-H_t pieces (``entropy="token"``, and the sequence "sum" numerator) two over one forward,
  the numerator's and the denominator's (``token_entropy``), as ``engines.token``'s backward route
  does. The caller's ``.grad`` objects are set aside and put back, untouched, after the pass (also
  when it raises).
- the live log-probs or per-token terms (``measure_change``): one forward over every rank's E in
  lock-step; each rank keeps its own rows.
- the truth and the lookahead: ``functional_call`` does not reach the parameters FSDP2 gathers, so
  ``theta + alpha eta v`` is written into the local shards in place, E is forwarded in lock-step, and
  the shards are restored from a saved copy, bit-exactly, also on an error (``stepped_shards``). The
  step is formed in the parameters' dtype (a bf16 model's truth then measures the rounded step).

Cost: each rank runs the forward and backward of every E unit (W times the per-rank work of DDP);
memory stays sharded (v and one gradient shard; the truth one more shard copy). Refused with a
ValueError before any pass (``ShardedPasses.check_call``): an update batch or a given direction,
``second_order`` (forward mode through FSDP2), ``keep_halves``, ``direction="optimizer-copy"`` and a
rank without an eval_batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .attribution import parameter_groups
from .batch import Microbatch, RolloutBatch
from .config import ProbeConfig
from .engines import EvalProjections, TokenProjections
from .fsdp import all_batches, check_reduction, fsdp2_group, is_sharded, local_view, reshard
from .logprobs import SequenceLogProbs, policy_logprobs, token_terms
from .objectives import entropy_surrogate
from .passes import Passes
from .response_tokens import ResponseTokens
from .token_entropy import denominator_surrogate, numerator_surrogate, token_coefficients
from .vectors import Params, Vector


def _shard_dots(params: Params, v: Vector, index: Tensor | None) -> Tensor:
    """This rank's float64 partial ``<X shard, v shard>`` from ``.grad`` (then reset to None): ``(1,)``, or
    ``(n_groups,)`` by parameter group (``index``: the group of each parameter). Per parameter in fp32,
    as the backward engine's hook forms it; 0 where the loss did not reach the parameter."""
    device = next(iter(v.values())).device
    dots = torch.zeros(len(params), dtype=torch.float32, device=device)  # (K,)
    for i, (name, p) in enumerate(params.items()):
        if p.grad is not None:
            dots[i] = torch.vdot(p.grad.to_local().reshape(-1).float(), v[name].reshape(-1))
        p.grad = None
    if index is None:
        return dots.double().sum().reshape(1)
    return torch.zeros(int(index.max()) + 1, dtype=torch.float64, device=device).index_add_(
        0, index, dots.double()
    )


def _group_index(params: Params, cfg: ProbeConfig, batch: RolloutBatch) -> Tensor | None:
    """``(K,)`` group of each parameter when the call computes ``by_group`` (``cfg.computes_groups``)."""
    return parameter_groups(params, cfg.groups)[1].to(batch.device) if cfg.computes_groups else None


def _lockstep(
    module: nn.Module, params: Params, batch: RolloutBatch, unit: Callable[[Microbatch, bool], Tensor]
) -> Tensor:
    """``unit(mb, mine)`` for every unit of every rank's E, in rank order, on every rank: it runs the unit's
    forward and backward, keeps what this rank's own units (``mine``) need, and returns this rank's ``(k,)``
    float64 partial sums (``_shard_dots``). Those of all units are summed over ranks by one all-reduce;
    this rank's units' rows come back, ``(B_E, k)``."""
    check_reduction(module)
    group = fsdp2_group(module)
    rank, batches = dist.get_rank(group), all_batches(group, batch)
    caller_grads = {name: p.grad for name, p in params.items()}  # set aside, put back as they are
    partials = []
    try:
        for p in params.values():
            p.grad = None  # else FSDP2 accumulates X_n into the caller's gradient
        for r, b in enumerate(batches):
            for mb in b.microbatches(1):
                partials.append(unit(mb, r == rank))
    finally:
        for name, p in params.items():
            p.grad = caller_grads[name]
    rows = torch.stack(partials)  # (sum_r B_r, k) partial sums, rank order
    dist.all_reduce(rows, op=dist.ReduceOp.SUM, group=group)
    start = sum(b.n_units for b in batches[:rank])
    return rows[start : start + batch.n_units]  # (B_E, k) this rank's units


def eval_projections(
    module: nn.Module, params: Params, batch: RolloutBatch, v: Vector, cfg: ProbeConfig
) -> EvalProjections:
    """s_n (and s_n^(g)) of this rank's E units for the sequence functionals; ``v``: the local shards."""
    index = _group_index(params, cfg, batch)
    out = EvalProjections.empty(batch, v, None)

    def unit(mb: Microbatch, mine: bool) -> Tensor:
        lp = policy_logprobs(module, mb.batch, cfg)
        entropy_surrogate(lp, mb.batch, cfg.x_estimator).backward()  # FSDP2: .grad = X_n's shard
        if mine:
            out.logprobs.put(mb.rows, SequenceLogProbs(lp.seq.detach(), lp.weighted.detach()))
        return _shard_dots(params, v, index)

    rows = _lockstep(module, params, batch, unit)  # (B_E, 1 or n_groups) float64
    out.s = rows.sum(dim=1).float()
    out.s_groups = None if index is None else rows
    return out


def token_projections(
    module: nn.Module, params: Params, batch: RolloutBatch, v: Vector, cfg: ProbeConfig
) -> TokenProjections:
    """``(N_n, D_n, dN_n, dD_n)`` (and dN, dD by parameter group) of this rank's E units, the exact-H_t
    reading of E (``engines.token``); ``v``: the local shards. No half sums: no U under FSDP2."""
    index = _group_index(params, cfg, batch)
    n_groups = None if index is None else int(index.max()) + 1
    out = TokenProjections.empty(batch.n_units, batch.n_sequences, v, False, n_groups, batch.device)
    out.tokens = ResponseTokens.zeros(batch)

    def unit(mb: Microbatch, mine: bool) -> Tensor:
        t = token_terms(module, mb.batch, cfg.temperature)
        coeff = token_coefficients(t.entropy, t.logprob, t.mask, mb.batch)
        # two reverse passes over one forward: the graph is kept for the denominator's
        numerator_surrogate(coeff, t.entropy, t.logprob).backward(retain_graph=True)
        num = _shard_dots(params, v, index)
        denominator_surrogate(coeff, t.logprob).backward()
        den = _shard_dots(params, v, index)
        if mine:
            out.put_totals(mb.units, mb.rows, t, mb.batch)
        return torch.cat([num, den])  # (2k,)

    rows = _lockstep(module, params, batch, unit).reshape(batch.n_units, 2, -1)  # (B_E, 2, k): dN, dD
    out.pieces[:, 2:] = rows.sum(dim=-1)
    if index is not None:
        out.groups = rows
    return out


@torch.no_grad()
def _forward_lockstep(module: nn.Module, batch: RolloutBatch, cfg: ProbeConfig, out, forward) -> None:
    """``out.put(rows, ...)`` of ``forward(microbatch)`` for this rank's E rows, every rank's E forwarded."""
    group = fsdp2_group(module)
    for r, b in enumerate(all_batches(group, batch)):
        for mb in b.microbatches(cfg.microbatch_units):
            got = forward(mb.batch)  # every rank's: the forwards are collectives
            if r == dist.get_rank(group):
                out.put(mb.rows, *got)
    reshard(module)  # the root's parameters as the caller had them: sharded


def logprobs_lockstep(module: nn.Module, batch: RolloutBatch, cfg: ProbeConfig) -> SequenceLogProbs:
    """``S_i, S_w,i`` of this rank's E rows at the live parameters."""
    out = SequenceLogProbs.empty(batch)
    _forward_lockstep(module, batch, cfg, out, lambda b: (policy_logprobs(module, b, cfg),))
    return out


def tokens_lockstep(module: nn.Module, batch: RolloutBatch, cfg: ProbeConfig) -> ResponseTokens:
    """Per-token ``l_t, H_t`` of this rank's E rows at the live parameters."""
    out = ResponseTokens.zeros(batch)

    def forward(b: RolloutBatch):
        t = token_terms(module, b, cfg.temperature)
        return t.logprob, t.entropy, t.mask

    _forward_lockstep(module, batch, cfg, out, forward)
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
        if cfg.second_order or cfg.keep_halves:
            raise ValueError(
                "FSDP2 model: ProbeConfig.second_order (forward mode through FSDP2) and "
                "ProbeConfig.keep_halves (the X sums of E's halves) are not supported"
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

    def token_projections(
        self,
        module: nn.Module,
        params: Params,
        batch: RolloutBatch,
        v: Vector,
        cfg: ProbeConfig,
        halves: Tensor | None = None,
    ) -> TokenProjections:
        return token_projections(module, params, batch, v, cfg)  # no halves: no U under FSDP2

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
        with stepped_shards(params, v, step):
            return logprobs_lockstep(module, batch, cfg)

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
