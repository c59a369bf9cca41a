"""``EntropyProbe``: forecast the entropy change of one RL optimizer step, with its standard error.

Reads top to bottom as the data flow of one call:

    rollout batch U -> update direction v        (objectives, direction, projections.update_gradient)
    rollout batch E -> per-unit projections s_n  (projections.eval_projections or the jvp engine)
    s_n -> statistics                            (statistics: delta_h1, SE over E, jackknife)
    Xbar_E, U -> variance over U                 (projections.update_projections: se_total)
    v, E -> truth                                (truth: the step applied functionally)
    -> ProbeResult

Run the README example with ``python -c "import entropy_probe"``; a minimal call:

>>> import torch, entropy_probe as ep
>>> from entropy_probe.toy import TabularPolicy, sample_enumerated
>>> policy = TabularPolicy(seed=0)
>>> U, E = sample_enumerated(policy, n_units=8, seed=1), sample_enumerated(policy, n_units=8, seed=2)
>>> probe = ep.EntropyProbe(policy, config=ep.ProbeConfig(lr=1e-2, direction="sgd"))
>>> r = probe.run(U, E)
>>> r.n_eval_units, r.n_update_units, r.se_cond_e >= 0
(8, 8, True)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .batch import RolloutBatch
from .caller_state import preserved_caller_state
from .config import ProbeConfig
from .direction import UpdateDirection, build_direction
from .distributed import communicator_for, unwrap
from .objectives import UpdateTotals, advantages, policy_gradient_coefficients, unit_entropy
from .projections import EvalProjections, eval_projections, update_gradient, update_projections
from .result import ProbeResult
from .statistics import conditional_variance, jackknife_se, moments_update, update_variance_term
from .truth import measure_truth


class EntropyProbe:
    """Forecasts ``delta_h1 = eta * Xbar_E . v`` for the step the optimizer is about to take on U.

    model: any ``nn.Module`` called as ``model(input_ids=..., attention_mask=...)`` returning logits
        ``(N, T, V)`` or an object with ``.logits``, optionally wrapped in DDP. Only parameters with
        ``requires_grad`` count.
    optimizer: the run's optimizer (read, never written); needed for "optimizer-step", for the
        preconditioner of "adam-preconditioned" and for ``lr`` when ``config.lr`` is None.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 config: ProbeConfig | None = None):
        self.model = model
        self.module = unwrap(model)
        self.optimizer = optimizer
        self.config = config if config is not None else ProbeConfig()
        self.comm = communicator_for(model)

    # ---- parameters and learning rate ---------------------------------------------------------
    def parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters, keyed by the unwrapped model's ``named_parameters()``."""
        params = {name: p for name, p in self.module.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError("EntropyProbe: the model has no parameter with requires_grad=True")
        return params

    @property
    def lr(self) -> float:
        if self.config.lr is not None:
            return float(self.config.lr)
        if self.optimizer is None:
            raise ValueError("ProbeConfig.lr is None and no optimizer was given: set lr or pass the optimizer")
        lr = float(self.optimizer.param_groups[0]["lr"])
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"optimizer.param_groups[0]['lr'] is {lr}; the probe needs a finite lr > 0")
        return lr

    # ---- 1. rollout batch U -> update direction v -----------------------------------------------
    def _update_coefficients(self, batch: RolloutBatch) -> Tensor:
        """c_i with ``J_m = sum_{i in m} c_i S_i`` (global normalisers under DDP)."""
        cfg = self.config
        totals = UpdateTotals.of(batch)  # TODO(ddp): all-reduce across ranks
        return policy_gradient_coefficients(batch, advantages(batch, cfg.advantage_estimator),
                                            cfg.loss_aggregation, totals, cfg.norm_length)

    def _direction_from(self, batch: RolloutBatch, params: dict[str, nn.Parameter]) -> tuple[UpdateDirection, Tensor]:
        cfg = self.config
        _check_batch(batch, "update_batch")
        coeff = self._update_coefficients(batch)
        grad_sum = update_gradient(self.module, params, batch, coeff, temperature=cfg.temperature,
                                   weighting=cfg.entropy_weighting, microbatch_units=cfg.microbatch_units)
        n_units = batch.n_units
        grad_j = {name: None if g is None else g / n_units for name, g in grad_sum.items()}  # grad J_U = mean_m
        for name, g in grad_j.items():
            if g is not None and not torch.isfinite(g).all():
                raise ValueError(f"update_batch: the policy gradient of parameter {name!r} is not finite")
        return build_direction(cfg.direction, grad_j, params, self.optimizer, self.lr, cfg.max_grad_norm), coeff

    def update_direction(self, update_batch: RolloutBatch) -> dict[str, Tensor]:
        """v of DESIGN section 4 as ``{name: fp32 tensor}``; pass it back as ``run(direction=v)``."""
        with preserved_caller_state(self.module):
            direction, _ = self._direction_from(update_batch, self.parameters())
        return direction.v

    def _given_direction(self, v: dict[str, Tensor], params: dict[str, nn.Parameter]) -> UpdateDirection:
        if not isinstance(v, dict):
            raise ValueError(f"direction must be a dict {{name: tensor}} from update_direction(), got {type(v).__name__}")
        missing, extra = sorted(set(params) - set(v)), sorted(set(v) - set(params))
        if missing or extra:
            raise ValueError(f"direction does not match the model's trainable parameters: missing {missing[:3]}"
                             f"{'...' if len(missing) > 3 else ''}, unknown {extra[:3]}{'...' if len(extra) > 3 else ''}")
        out = {}
        for name, p in params.items():
            t = v[name]
            if not isinstance(t, Tensor) or tuple(t.shape) != tuple(p.shape):
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"direction[{name!r}] has shape {shape}, the parameter has {tuple(p.shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"direction[{name!r}] is not finite")
            out[name] = t.detach().to(device=p.device, dtype=torch.float32)
        return UpdateDirection(v=out)

    # ---- 2. rollout batch E -> per-unit projections s_n -------------------------------------------
    def _project(self, batch: RolloutBatch, params, v, want_x_sum: bool) -> EvalProjections:
        cfg = self.config
        opts = dict(temperature=cfg.temperature, weighting=cfg.entropy_weighting, estimator=cfg.x_estimator,
                    want_x_sum=want_x_sum)
        if cfg.engine == "jvp":
            from .projections_jvp import eval_projections_jvp
            proj = eval_projections_jvp(self.module, params, batch, v, microbatch_units=cfg.microbatch_units, **opts)
        else:
            proj = eval_projections(self.module, params, batch, v, **opts)
        bad = (~torch.isfinite(proj.s)).nonzero()
        if len(bad):
            unit = int(bad[0, 0])
            raise ValueError(f"eval_batch: s_n is not finite for unit {int(batch.unit_ids[unit])} (position {unit})")
        return proj

    # ---- the whole call ------------------------------------------------------------------------
    def run(self, update_batch: RolloutBatch | None = None, eval_batch: RolloutBatch | None = None,
            truth: bool = False, direction: dict[str, Tensor] | None = None) -> ProbeResult:
        """Forecast the step on ``update_batch`` (or along a given ``direction``), measured on ``eval_batch``.

        With ``truth=True`` the step is also applied functionally and the real change measured.
        Parameters, ``.grad``, optimizer state, RNG and train/eval mode are unchanged afterwards.
        """
        if eval_batch is None:
            raise ValueError("run: eval_batch is required")
        if (update_batch is None) == (direction is None):
            raise ValueError("run: give exactly one of update_batch and direction")
        _check_batch(eval_batch, "eval_batch")
        cfg, lr = self.config, self.lr
        params = self.parameters()
        with preserved_caller_state(self.module):
            # 1. the update direction v, from U or as given
            if direction is None:
                upd, coeff = self._direction_from(update_batch, params)
            else:
                upd, coeff = self._given_direction(direction, params), None
            want_total = cfg.unconditional_se and upd.scale is not None
            # 2. per-unit projections on E
            proj = self._project(eval_batch, params, upd.v, want_x_sum=want_total)
            # 3. statistics over E with U fixed
            s = self.comm.gather(proj.s)  # (B_E,) over all ranks
            n_eval = int(s.numel())
            moments = moments_update(s)
            var_e, se_e = conditional_variance(moments, lr)
            delta_h1 = lr * float(moments.mean)
            se_jack = jackknife_se(s, lr)
            entropy = float(unit_entropy(proj.weighted, eval_batch).double().mean())
            # 4. the variance over U: t_m = Xbar_E . Y_m with Y_m = scale * grad J_m
            se_total = None
            if want_total:
                u = {name: upd.scale[name] * x / n_eval for name, x in proj.x_sum.items()}
                if cfg.engine == "jvp":
                    from .projections_jvp import update_projections_jvp
                    t = update_projections_jvp(self.module, params, update_batch, coeff, u, temperature=cfg.temperature,
                                               weighting=cfg.entropy_weighting, microbatch_units=cfg.microbatch_units)
                else:
                    t = update_projections(self.module, params, update_batch, coeff, u, temperature=cfg.temperature,
                                           weighting=cfg.entropy_weighting)
                se_total = math.sqrt(var_e + update_variance_term(self.comm.gather(t), lr))
            # 5. the truth
            truth_result = None
            if truth:
                truth_result = measure_truth(self.module, params, eval_batch, upd.v, s, lr=lr,
                                             alphas=cfg.truth_alphas, temperature=cfg.temperature,
                                             weighting=cfg.entropy_weighting, microbatch_units=cfg.microbatch_units)
        return ProbeResult(delta_h1=delta_h1, se_cond_e=se_e, var_cond_e=var_e, se_jackknife=se_jack,
                           se_total=se_total, entropy=entropy, n_eval_units=n_eval,
                           n_update_units=0 if update_batch is None else update_batch.n_units, lr=lr,
                           per_unit=s.detach().double().cpu(), eval_unit_ids=eval_batch.unit_ids.cpu(),
                           truth=truth_result)


def _check_batch(batch, name: str) -> None:
    if not isinstance(batch, RolloutBatch):
        raise ValueError(f"run: {name} must be an entropy_probe.RolloutBatch, got {type(batch).__name__}")
