"""``EntropyProbe``: forecast the entropy change of one RL optimizer step, with its standard error.

Reads top to bottom as the data flow of one call:

    rollout batch U -> update direction v        (objectives, direction, engines.update_gradient)
    rollout batch E -> per-unit projections s_n  (engines.eval_projections: backward or jvp)
    s_n -> statistics                            (statistics: delta_h1, SE over E, jackknife)
    s_n^(g) -> attribution by parameter group    (attribution: by_group)
    v, E -> q_n -> second order                  (engines.eval_second_order: delta_h2, forecast)
    Xbar_E, U -> variance over U                 (engines.update_projections: se_total)
    v, E -> truth                                (truth: the step applied functionally)
    -> ProbeResult

A minimal call, on the exactly enumerable policy of ``entropy_probe.toy``:

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
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import fsdp
from .batch import RolloutBatch
from .caller_state import preserved_caller_state
from .change import EvalState, MeasuredChange, measure_change
from .config import ProbeConfig
from .direction import UpdateDirection, build_direction, given_direction
from .distributed import (
    all_reduce_vector,
    call_fingerprint,
    communicator_for,
    global_totals,
    merged_moments,
    unwrap,
)
from .attribution import group_values, parameter_groups, wants_groups
from .engines import EvalProjections, eval_projections, eval_second_order, update_gradient, update_projections
from .from_grad import direction_from_grad, grad_checksums, optimizer_lr, unwrap_optimizer
from .logprobs import SequenceLogProbs
from .objectives import UpdateTotals, advantages, policy_gradient_coefficients, unit_entropy
from .result import ProbeResult
from .statistics import conditional_variance, jackknife_se, moments_update, update_variance_term
from .truth import measure_truth
from .vectors import Params, first_nonfinite


@dataclass
class EvalStatistics:
    """Step 3 of a call: the E statistics, over all ranks.

    s, unit_ids: ``(B_E,)`` the s_n and their group ids in rank order; the rest as in ``ProbeResult``.
    """

    s: Tensor
    unit_ids: Tensor
    n_eval: int
    delta_h1: float
    var_cond_e: float
    se_cond_e: float
    se_jackknife: float
    entropy: float
    n_dropped_rows: int
    sizes: list[int] | None = None  # E units per rank


@dataclass
class SecondOrder:
    """Step 4b of a call: the second-order term and the forecast (DESIGN section 12), over all ranks."""

    q: Tensor  # (B_E,) float64 q_n, rank order
    delta_h2: float
    se_delta_h2: float
    forecast: float
    se_forecast: float


class EntropyProbe:
    """Forecasts ``delta_h1 = eta * Xbar_E . v`` for the step the optimizer is about to take on U.

    model: any ``nn.Module`` called as ``model(input_ids=..., attention_mask=...)`` returning logits
        ``(N, T, V)`` or an object with ``.logits``, optionally wrapped in DDP. Only parameters with
        ``requires_grad`` count.
    optimizer: the run's optimizer (read, never written); needed for "optimizer-step", for the
        preconditioner of "adam-preconditioned" and for ``lr`` when ``config.lr`` is None.

    Under DDP (docs/distributed.md) every rank calls the probe with its own share of U and E units
    (``None`` for a rank holding none); every rank gets the same result.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 config: ProbeConfig | None = None):
        self.model = model
        self.module = unwrap(model)
        self.optimizer = unwrap_optimizer(optimizer)  # accelerate's AcceleratedOptimizer holds it in .optimizer
        self.config = config if config is not None else ProbeConfig()
        self.comm = communicator_for(model)

    # ---- parameters and learning rate ---------------------------------------------------------
    def parameters(self) -> Params:
        """The trainable parameters, keyed by the unwrapped model's ``named_parameters()``."""
        fsdp.reshard(self.module)  # FSDP2: the sharded parameters, also after a forward without backward
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
        lr = optimizer_lr(self.optimizer)  # 0 at warm-up: the forecast is then exactly 0
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"optimizer.param_groups[0]['lr'] is {lr}; the probe needs a finite lr >= 0")
        return lr

    def _v_lr(self) -> float:
        """The rate v is normalised by: the optimizer's own, so that ``ProbeConfig.lr`` scales the whole step."""
        return self.lr if self.optimizer is None else optimizer_lr(self.optimizer)

    # ---- 1. rollout batch U -> update direction v -----------------------------------------------
    def _update_coefficients(self, batch: RolloutBatch, totals: UpdateTotals) -> Tensor:
        """c_i with ``J_m = sum_{i in m} c_i S_i`` (global normalisers under DDP)."""
        cfg = self.config
        return policy_gradient_coefficients(batch, advantages(batch, cfg.advantage_estimator),
                                            cfg.loss_aggregation, totals, cfg.norm_length)

    def _direction_from(self, batch: RolloutBatch | None, params: Params, want_scale: bool = True
                        ) -> tuple[UpdateDirection, Tensor | None, int]:
        """(v, the c_i of this rank's U units, B_U over all ranks); ``batch`` is None on a rank without U units.

        v is built in place in the summed gradient (one fp32 copy of the parameters, DESIGN section 17).
        """
        cfg = self.config
        local = UpdateTotals.of(batch) if batch is not None else UpdateTotals(0, 0, 0, 0)
        totals = global_totals(self.comm, local)  # the loss normalisers are global under DDP
        if totals.n_units == 0:
            raise ValueError("update_batch: no rank holds any update unit")
        grad_sum, coeff = {name: None for name in params}, None
        if batch is not None:
            _check_batch(batch, "update_batch")
            coeff = self._update_coefficients(batch, totals)
            grad_sum = update_gradient(self.module, params, batch, coeff, cfg)
        grad_sum = all_reduce_vector(self.comm, grad_sum, params)  # one all-reduce; the same bits on every rank
        n_units = totals.n_units
        # grad J_U = mean_m grad J_m, in place
        grad_j = {name: None if g is None else g.div_(n_units) for name, g in grad_sum.items()}
        grad_sum = None  # build_direction consumes grad_j: no other reference may keep the gradients alive
        bad = first_nonfinite(grad_j)
        if bad is not None:
            raise ValueError(f"update_batch: the policy gradient of parameter {bad!r} is not finite")
        return build_direction(cfg.direction, grad_j, params, self.optimizer, self._v_lr(), cfg.max_grad_norm,
                               want_scale=want_scale and cfg.unconditional_se), coeff, n_units

    def update_direction(self, update_batch: RolloutBatch | None) -> dict[str, Tensor]:
        """v of DESIGN section 4 as ``{name: fp32 tensor}``; pass it back as ``run(direction=v)``.

        Under DDP every rank calls it with its share of U (None for none) and gets the same v.
        """
        params, lr, error = None, None, None
        try:
            if update_batch is None and self.comm.world_size == 1:
                raise ValueError("update_direction: update_batch is required")
            if update_batch is not None:
                _check_batch(update_batch, "update_batch")
            params, lr = self.parameters(), self.lr
            fsdp.check_call(params, self.config, False, None)
        except ValueError as e:
            error = e
        self.comm.check_same("EntropyProbe.update_direction", lambda: call_fingerprint(
            "update_direction", self.config, lr, params, self.optimizer, None), error)
        with preserved_caller_state(self.module):
            batch = _on_model_device(update_batch, params)
            direction, _, _ = self._direction_from(batch, params, want_scale=False)
        return direction.v

    # ---- 2. rollout batch E -> per-unit projections s_n -------------------------------------------
    def _project_eval(self, batch: RolloutBatch | None, params: Params, upd: UpdateDirection,
                      want_x_sum: bool) -> tuple[EvalProjections, Tensor, Tensor]:
        """(projections, this rank's summed unit entropies, its unit ids); empty on a rank without E units."""
        want_groups = wants_groups(self.config)
        if batch is not None:
            proj = eval_projections(self.module, params, batch, upd.v, self.config, want_x_sum, want_groups)
            return proj, unit_entropy(proj.weighted, batch).double().sum(), batch.unit_ids
        empty = torch.zeros(0, device=_device_of(params))
        x_sum = {n: torch.zeros_like(x) for n, x in upd.v.items()} if want_x_sum else None
        proj = EvalProjections(empty, empty, empty, x_sum)
        if want_groups:  # (0, n_groups) float64, as the ranks holding units send
            n_groups = len(parameter_groups(params, self.config.groups)[0])
            proj.s_groups = torch.zeros((0, n_groups), dtype=torch.float64, device=empty.device)
        return proj, torch.zeros((), dtype=torch.float64, device=empty.device), empty.long()

    # ---- 3. s_n -> statistics over E with U fixed -------------------------------------------------
    def _eval_statistics(self, proj: EvalProjections, local_entropy: Tensor, local_ids: Tensor,
                         local_dropped: int, lr: float) -> EvalStatistics:
        """float64 moments merged over ranks, then the s_n themselves for the jackknife and attribution."""
        comm = self.comm
        # with groups, s_n is their float64 sum, so that the groups add up to delta_h1 to float64 rounding
        local_s = proj.s if proj.s_groups is None else proj.s_groups.sum(dim=1)
        dropped = torch.tensor(float(local_dropped), dtype=torch.float64, device=local_entropy.device)
        extra = torch.stack([local_entropy, dropped])
        moments, sums, sizes = merged_moments(comm, moments_update(local_s), extra)
        n_eval = int(moments.count)
        if n_eval == 0:
            raise ValueError("eval_batch: no rank holds any evaluation unit")
        s = comm.gather(local_s, sizes)  # (B_E,) over all ranks, rank order
        unit_ids = comm.gather(local_ids, sizes)  # (B_E,)
        bad = (~torch.isfinite(s)).nonzero()
        if len(bad):
            unit = int(bad[0, 0])
            raise ValueError(f"eval_batch: s_n is not finite for unit {int(unit_ids[unit])} (position {unit})")
        var_e, se_e = conditional_variance(moments, lr)
        return EvalStatistics(s=s, unit_ids=unit_ids, n_eval=n_eval, delta_h1=lr * float(moments.mean),
                              var_cond_e=var_e, se_cond_e=se_e, se_jackknife=jackknife_se(s, lr),
                              entropy=float(sums[0]) / n_eval, n_dropped_rows=int(sums[1]), sizes=sizes)

    # ---- 3b. s_n^(g) -> delta_h1 by parameter group -------------------------------------------------
    def _by_group(self, proj: EvalProjections, params: Params, stats: EvalStatistics,
                  lr: float) -> dict[str, tuple[float, float]] | None:
        """``{group: (eta mean_n s_n^(g), its SE over E)}`` from every rank's per-unit group values."""
        if proj.s_groups is None:
            return None
        names = parameter_groups(params, self.config.groups)[0]
        per_unit = self.comm.gather(proj.s_groups, stats.sizes)  # (B_E, n_groups) float64, rank order
        means, ses = group_values(per_unit, lr)
        return dict(zip(names, zip(means, ses)))

    # ---- 3c. v, E -> q_n -> delta_h2 and the forecast ----------------------------------------------
    def _second_order(self, batch: RolloutBatch | None, params: Params, upd: UpdateDirection,
                      stats: EvalStatistics, lr: float) -> SecondOrder:
        """q_n by nested forward mode; float64 moments of q_n and of ``eta s_n + eta^2/2 q_n`` merged over ranks."""
        comm = self.comm
        q_local = torch.zeros(0, dtype=torch.float64, device=_device_of(params))
        if batch is not None:
            q_local = eval_second_order(self.module, params, batch, upd.v, self.config)
        q = comm.gather(q_local, stats.sizes)  # (B_E,) rank order, as the s_n
        bad = (~torch.isfinite(q)).nonzero()
        if len(bad):
            unit = int(bad[0, 0])
            raise ValueError(f"eval_batch: q_n (second order) is not finite for unit {int(stats.unit_ids[unit])} "
                             f"(position {unit})")
        half = 0.5 * lr * lr
        rank = comm.rank
        start = sum(stats.sizes[:rank])
        s_local = stats.s[start: start + stats.sizes[rank]].double().to(q_local.device)  # this rank's s_n
        m_q, _, _ = merged_moments(comm, moments_update(q_local), torch.zeros(0))
        m_c, _, _ = merged_moments(comm, moments_update(lr * s_local + half * q_local), torch.zeros(0))
        _, se_q = conditional_variance(m_q, 1.0)
        _, se_c = conditional_variance(m_c, 1.0)
        delta_h2 = half * float(m_q.mean)
        return SecondOrder(q=q, delta_h2=delta_h2, se_delta_h2=half * se_q, forecast=stats.delta_h1 + delta_h2,
                           se_forecast=se_c)

    # ---- 4. Xbar_E, U -> the variance over U ------------------------------------------------------
    def _se_total(self, update_batch: RolloutBatch | None, params: Params, upd: UpdateDirection,
                  coeff: Tensor | None, proj: EvalProjections, stats: EvalStatistics, lr: float) -> float:
        """``sqrt(var_cond_e + V_Y)`` with the note's ``t_m = Xbar_E . Y_m``, ``Y_m = scale * grad J_m``."""
        x_sum = all_reduce_vector(self.comm, proj.x_sum, params)  # sum_n X_n over all ranks
        u = {name: upd.scale[name] * x / stats.n_eval for name, x in x_sum.items()}
        t = torch.zeros(0, device=stats.s.device)
        if update_batch is not None:
            t = update_projections(self.module, params, update_batch, coeff, u, self.config)
        return math.sqrt(stats.var_cond_e + update_variance_term(self.comm.gather(t), lr))

    # ---- the whole call ------------------------------------------------------------------------
    def _checked_call(self, update_batch, eval_batch, direction, truth: bool, from_grad: bool):
        """(params, lr, the given direction or None) after the local input checks and one agreement
        check across ranks, made before any other collective so that a bad rank cannot hang the rest."""
        params, lr, given, error = None, None, None, None
        try:
            if eval_batch is None and self.comm.world_size == 1:
                raise ValueError("run: eval_batch is required")
            n_sources = (update_batch is not None) + (direction is not None) + bool(from_grad)
            if n_sources > 1 or (n_sources == 0 and self.comm.world_size == 1):
                raise ValueError("run: give exactly one of update_batch, direction and from_grad=True")
            if eval_batch is not None:
                _check_batch(eval_batch, "eval_batch")
            if update_batch is not None:
                _check_batch(update_batch, "update_batch")
            params, lr = self.parameters(), self.lr
            fsdp.check_call(params, self.config, from_grad, eval_batch)  # FSDP2: what is supported
            given = None if direction is None else given_direction(direction, params)
            if from_grad:
                given = direction_from_grad(self.config.direction, params, self.optimizer, self._v_lr())
        except ValueError as e:
            error = e
        mode = "from_grad" if from_grad else "direction" if direction is not None else "update_batch"
        self.comm.check_same("EntropyProbe.run", lambda: call_fingerprint(
            f"run({mode}, truth={bool(truth)})", self.config, lr, params, self.optimizer,
            None if given is None or from_grad else given.v, grad_checksums(params) if from_grad else None), error)
        return params, lr, given

    def run(self, update_batch: RolloutBatch | None = None, eval_batch: RolloutBatch | None = None,
            truth: bool = False, direction: dict[str, Tensor] | None = None, from_grad: bool = False) -> ProbeResult:
        """Forecast the step on ``update_batch`` (or along a given ``direction``, or the step the optimizer
        will take from the ``.grad`` now on the parameters: ``from_grad=True``), measured on ``eval_batch``.

        With ``truth=True`` the step is also applied functionally and the real change measured; after the
        real ``optimizer.step()``, ``measure_change(result)`` measures it on the same E.
        Parameters, ``.grad``, optimizer state, RNG and train/eval mode are unchanged afterwards.
        """
        params, lr, given = self._checked_call(update_batch, eval_batch, direction, truth, from_grad)
        update_batch, eval_batch = _on_model_device(update_batch, params), _on_model_device(eval_batch, params)
        with preserved_caller_state(self.module):
            if given is None:  # 1. the update direction v, from U or as given
                upd, coeff, n_update = self._direction_from(update_batch, params)
            else:
                upd, coeff, n_update = given, None, 0
            want_total = self.config.unconditional_se and upd.scale is not None
            proj, local_entropy, local_ids = self._project_eval(eval_batch, params, upd, want_total)  # 2.
            dropped = 0 if eval_batch is None else eval_batch.n_dropped_rows
            stats = self._eval_statistics(proj, local_entropy, local_ids, dropped, lr)  # 3.
            by_group = self._by_group(proj, params, stats, lr)  # 3b.
            second = None
            if self.config.second_order:  # 3c.
                second = self._second_order(eval_batch, params, upd, stats, lr)
            se_total = None
            if want_total:  # 4.
                se_total = self._se_total(update_batch, params, upd, coeff, proj, stats, lr)
            truth_result = None
            if truth:  # 5. the step applied functionally
                truth_result = measure_truth(self.module, params, upd.v, lr, eval_batch, stats.s, self.config,
                                             self.comm, per_unit_q=None if second is None else second.q)
        state = EvalState(eval_batch, SequenceLogProbs(proj.seq_logprob, proj.weighted))
        return ProbeResult(delta_h1=stats.delta_h1, se_cond_e=stats.se_cond_e, var_cond_e=stats.var_cond_e,
                           se_jackknife=stats.se_jackknife, se_total=se_total, entropy=stats.entropy,
                           n_eval_units=stats.n_eval, n_update_units=n_update, lr=lr,
                           per_unit=stats.s.detach().double().cpu(), eval_unit_ids=stats.unit_ids.cpu(),
                           truth=truth_result, n_dropped_rows=stats.n_dropped_rows, eval_state=state,
                           by_group=by_group, **_second_order_fields(second))

    def measure_change(self, result: ProbeResult) -> MeasuredChange:
        """After the real ``optimizer.step()``: the entropy change on ``result``'s E, one forward at the
        current parameters against the log-probs kept from the forecast pass (DESIGN section 11).

        Under DDP every rank calls it with its own result. The caller's state is unchanged.
        """
        state = getattr(result, "eval_state", None)
        error = None
        if not isinstance(state, EvalState):
            error = ValueError("measure_change: result must be a ProbeResult returned by this probe's run()")
        self.comm.check_same("EntropyProbe.measure_change", lambda: call_fingerprint(
            "measure_change", self.config, getattr(result, "lr", None), self.parameters(), self.optimizer, None),
            error)
        with preserved_caller_state(self.module):
            return measure_change(self.module, self.parameters(), state, result.per_unit, result.lr, self.config,
                                  self.comm)


def _second_order_fields(second: SecondOrder | None) -> dict:
    if second is None:
        return {}
    return dict(delta_h2=second.delta_h2, se_delta_h2=second.se_delta_h2, forecast=second.forecast,
                se_forecast=second.se_forecast, per_unit_q=second.q.detach().cpu())


def _device_of(params: Params) -> torch.device:
    return next(iter(params.values())).device


def _on_model_device(batch: RolloutBatch | None, params: Params) -> RolloutBatch | None:
    """The batch on the device of the model's (first) parameter: every tensor the probe makes lives there."""
    return None if batch is None else batch.to(_device_of(params))


def _check_batch(batch, name: str) -> None:
    if not isinstance(batch, RolloutBatch):
        raise ValueError(f"run: {name} must be an entropy_probe.RolloutBatch, got {type(batch).__name__}")
    if name == "update_batch" and batch.n_dropped_rows:
        # The trainer's loss normalisers count such rows (they add 0 to the sums): dropping them would not.
        raise ValueError(f"update_batch: {batch.n_dropped_rows} row(s) have no response token; an update batch "
                         "must keep every row its loss counts (use from_grad=True to forecast the trainer's step)")
