"""Where the probe's passes over the model run, chosen once when the probe is built.

``Passes`` (this module): one process, or the ranks of a DDP model, each running its own units
through the unwrapped module. ``sharded_passes.ShardedPasses``: an FSDP2 model, where every forward and
backward is a collective and the ranks run every unit together (``fsdp``). The probe, the truth and
``measure_change`` call only these methods, so none of them asks which kind of model it holds.
"""

from __future__ import annotations

from torch import Tensor, nn

from .batch import RolloutBatch
from .config import ProbeConfig
from .engines import EvalProjections, TokenProjections, eval_projections, token_projections
from .from_grad import grad_checksums
from .logprobs import SequenceLogProbs, logprobs_at
from .response_tokens import ResponseTokens, response_tokens_at
from .vectors import Params, Vector, stepped_parameters


class Passes:
    """One process or DDP: the passes of the core engines on this rank's own units."""

    steps_in_place = False
    """True where the truth adds the step to the live parameters in place (FSDP2) instead of evaluating
    ``theta + alpha eta v`` functionally; then no fp32 copy of the model is made for it."""

    reads_v_whole = False
    """True where the E pass reads v whole for every unit (FSDP2's lock-step passes): ``from_grad`` then
    builds v once instead of a ``step_view.StepView`` that forms each step in the reverse hook."""

    def reshard(self, module: nn.Module) -> None:
        """Make ``named_parameters()`` yield the parameters as the caller holds them (nothing to do here)."""

    def check_call(self, cfg: ProbeConfig, source: str, eval_batch: RolloutBatch | None) -> None:
        """What a call may ask for; ``source`` names where v comes from. Everything, here."""

    def grad_view(self, params: Params, optimizer) -> tuple[Params, object]:
        """The parameters and optimizer whose ``.grad`` and state ``from_grad`` reads: the caller's own."""
        return params, optimizer

    def grad_checksums(self, params: Params) -> list | None:
        """What the ranks' ``.grad`` must agree on (``from_grad.grad_checksums``)."""
        return grad_checksums(params)

    def eval_projections(
        self,
        module: nn.Module,
        params: Params,
        batch: RolloutBatch,
        v: Vector,
        cfg: ProbeConfig,
        halves: Tensor | None = None,
    ) -> EvalProjections:
        """s_n of this rank's E units by the configured engine (``engines.eval_projections``)."""
        return eval_projections(module, params, batch, v, cfg, halves)

    def token_projections(
        self,
        module: nn.Module,
        params: Params,
        batch: RolloutBatch,
        v: Vector,
        cfg: ProbeConfig,
        halves: Tensor | None = None,
    ) -> TokenProjections:
        """The token-level pieces of this rank's E units (``engines.token_projections``)."""
        return token_projections(module, params, batch, v, cfg, halves)

    def logprobs(
        self, module: nn.Module, params: Params, batch: RolloutBatch, cfg: ProbeConfig
    ) -> SequenceLogProbs:
        """``S_i, S_w,i`` of ``batch``'s rows at the live parameters (a plain forward, no functional_call)."""
        return logprobs_at(module, None, batch, cfg)

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
        """``S_i, S_w,i`` at ``theta + step * v``, functionally (``base``: the fp32 copy of the model, in
        which the step is formed for a bf16/fp16 model; ``truth.full_precision_state``)."""
        if step == 0.0:
            return logprobs_at(module, base or dict(params), batch, cfg)
        return logprobs_at(module, stepped_parameters(params, v, step, base), batch, cfg)

    def tokens(
        self, module: nn.Module, params: Params, batch: RolloutBatch, cfg: ProbeConfig
    ) -> ResponseTokens:
        """Per-token ``l_t, H_t`` of ``batch``'s rows at the live parameters (the token-level entropy)."""
        return response_tokens_at(module, dict(params), batch, cfg.temperature, cfg.microbatch_units)

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
        """``tokens`` at ``theta + step * v``, functionally (``base`` as for ``logprobs_stepped``)."""
        moved = stepped_parameters(params, v, step, base) if step != 0.0 else (base or dict(params))
        return response_tokens_at(module, moved, batch, cfg.temperature, cfg.microbatch_units)
