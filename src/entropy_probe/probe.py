"""``EntropyProbe``: forecast the entropy change of one RL optimizer step, with its standard error.

Reads top to bottom as the data flow of one call:

    rollout batch U -> update direction v        (objectives, direction, engines.update_gradient)
    rollout batch E -> per-unit projections s_n  (engines.eval_projections: backward or jvp)
    s_n -> statistics                            (statistics: delta_h1, SE over E, jackknife)
    Xbar_A, Xbar_B, U -> variance over U         (update_jackknife: se_total, update influences)
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

from .batch import RolloutBatch
from .caller_state import preserved_caller_state
from .config import ProbeConfig
from .direction import UpdateDirection, build_direction
from .distributed import (
    all_reduce_vector,
    call_fingerprint,
    communicator_for,
    global_totals,
    merged_moments,
    unwrap,
)
from .engines import EvalProjections, eval_projections, update_gradient
from .objectives import UpdateTotals, advantages, policy_gradient_coefficients, unit_entropy
from .result import ProbeResult
from .statistics import conditional_variance, jackknife_se, moments_update
from .truth import measure_truth
from .update_jackknife import UpdateJackknife, combine, deleted_unit_projections, eval_halves, half_sizes
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
        self.optimizer = optimizer
        self.config = config if config is not None else ProbeConfig()
        self.comm = communicator_for(model)

    # ---- parameters and learning rate ---------------------------------------------------------
    def parameters(self) -> Params:
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
    def _update_coefficients(self, batch: RolloutBatch, totals: UpdateTotals) -> Tensor:
        """c_i with ``J_m = sum_{i in m} c_i S_i`` (global normalisers under DDP)."""
        cfg = self.config
        return policy_gradient_coefficients(batch, advantages(batch, cfg.advantage_estimator),
                                            cfg.loss_aggregation, totals, cfg.norm_length)

    def _direction_from(self, batch: RolloutBatch | None, params: Params
                        ) -> tuple[UpdateDirection, Tensor | None, int]:
        """(v, the c_i of this rank's U units, B_U over all ranks); ``batch`` is None on a rank without U units."""
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
        grad_j = {name: None if g is None else g / n_units for name, g in grad_sum.items()}  # grad J_U = mean_m
        bad = first_nonfinite(grad_j)
        if bad is not None:
            raise ValueError(f"update_batch: the policy gradient of parameter {bad!r} is not finite")
        upd = build_direction(cfg.direction, grad_j, params, self.optimizer, self.lr, cfg.max_grad_norm)
        if cfg.unconditional_se:
            upd.grad_j = grad_j  # kept for the jackknife over U (se_total)
        return upd, coeff, n_units

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
        except ValueError as e:
            error = e
        self.comm.check_same("EntropyProbe.update_direction", lambda: call_fingerprint(
            "update_direction", self.config, lr, params, self.optimizer, None), error)
        with preserved_caller_state(self.module):
            direction, _, _ = self._direction_from(update_batch, params)
        return direction.v

    def _given_direction(self, v: dict[str, Tensor], params: Params) -> UpdateDirection:
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
            out[name] = t.detach().to(device=p.device, dtype=torch.float32)
        bad = first_nonfinite(out)
        if bad is not None:
            raise ValueError(f"direction[{bad!r}] is not finite")
        return UpdateDirection(v=out)

    # ---- 2. rollout batch E -> per-unit projections s_n -------------------------------------------
    def _project_eval(self, batch: RolloutBatch | None, params: Params, upd: UpdateDirection,
                      want_halves: bool) -> tuple[EvalProjections, Tensor, Tensor]:
        """(projections, this rank's summed unit entropies, its unit ids); empty on a rank without E units.

        ``want_halves``: also sum X_n over the two halves of E (even and odd global unit positions)."""
        halves = None
        if want_halves:  # this rank's offset in the global E order: one all_gather of one integer
            counts = self.comm.stack(torch.tensor([0 if batch is None else batch.n_units])).reshape(-1)
            halves = eval_halves(0 if batch is None else batch.n_units, int(counts[: self.comm.rank].sum()))
        if batch is not None:
            proj = eval_projections(self.module, params, batch, upd.v, self.config, halves)
            return proj, unit_entropy(proj.weighted, batch).double().sum(), batch.unit_ids
        empty = torch.zeros(0, device=_device_of(params))
        x_half = None
        if want_halves:
            x_half = tuple({n: torch.zeros_like(x) for n, x in upd.v.items()} for _ in range(2))
        proj = EvalProjections(empty, empty, empty, x_half)
        return proj, torch.zeros((), dtype=torch.float64), torch.zeros(0, dtype=torch.long)

    # ---- 3. s_n -> statistics over E with U fixed -------------------------------------------------
    def _eval_statistics(self, proj: EvalProjections, local_entropy: Tensor, local_ids: Tensor,
                         lr: float) -> EvalStatistics:
        """float64 moments merged over ranks, then the s_n themselves for the jackknife and attribution."""
        comm = self.comm
        moments, entropy_sum, sizes = merged_moments(comm, moments_update(proj.s), local_entropy.reshape(1))
        n_eval = int(moments.count)
        if n_eval == 0:
            raise ValueError("eval_batch: no rank holds any evaluation unit")
        s = comm.gather(proj.s, sizes)  # (B_E,) over all ranks, rank order
        unit_ids = comm.gather(local_ids, sizes)  # (B_E,)
        bad = (~torch.isfinite(s)).nonzero()
        if len(bad):
            unit = int(bad[0, 0])
            raise ValueError(f"eval_batch: s_n is not finite for unit {int(unit_ids[unit])} (position {unit})")
        var_e, se_e = conditional_variance(moments, lr)
        return EvalStatistics(s=s, unit_ids=unit_ids, n_eval=n_eval, delta_h1=lr * float(moments.mean),
                              var_cond_e=var_e, se_cond_e=se_e, se_jackknife=jackknife_se(s, lr),
                              entropy=float(entropy_sum[0]) / n_eval)

    # ---- 4. Xbar_A, Xbar_B, U -> the variance over U ----------------------------------------------
    def _update_jackknife(self, update_batch: RolloutBatch | None, params: Params, upd: UpdateDirection,
                          coeff: Tensor | None, n_update: int, proj: EvalProjections, stats: EvalStatistics,
                          lr: float) -> tuple[UpdateJackknife, Tensor]:
        """V_U and the update influences (update_jackknife), with the U unit ids in gathered order."""
        n_half = half_sizes(stats.n_eval)
        x_a, x_b = (all_reduce_vector(self.comm, x, params) for x in proj.x_half)  # sums over all ranks
        x_a = {n: (torch.zeros_like(upd.v[n]) if x is None else x / n_half[0]) for n, x in x_a.items()}
        if n_half[1] == 0:  # B_E = 1: no second half; Xbar_E for both (V_U then keeps the E noise)
            x_b = x_a
        else:
            x_b = {n: (torch.zeros_like(upd.v[n]) if x is None else x / n_half[1]) for n, x in x_b.items()}
        pieces, ids = torch.zeros((0, 2), dtype=torch.float64), torch.zeros(0, dtype=torch.long)
        if update_batch is not None and n_update >= 2:
            pieces = deleted_unit_projections(self.module, params, update_batch, coeff, upd.grad_j, n_update,
                                              upd.v, x_a, x_b, self.config, self.optimizer, lr)
        if update_batch is not None:
            ids = update_batch.unit_ids.cpu()
            if n_update < 2:
                pieces = torch.zeros((update_batch.n_units, 2), dtype=torch.float64)
        sizes = [int(c) for c in self.comm.stack(torch.tensor([len(ids)])).reshape(-1).tolist()]
        pieces, ids = self.comm.gather(pieces, sizes), self.comm.gather(ids, sizes)  # (B_U, 2), (B_U,)
        return combine(pieces, n_half, lr, stats.delta_h1, self.config.direction), ids

    # ---- the whole call ------------------------------------------------------------------------
    def _checked_call(self, update_batch, eval_batch, direction, truth: bool):
        """(params, lr, the given direction or None) after the local input checks and one agreement
        check across ranks, made before any other collective so that a bad rank cannot hang the rest."""
        params, lr, given, error = None, None, None, None
        try:
            if eval_batch is None and self.comm.world_size == 1:
                raise ValueError("run: eval_batch is required")
            if update_batch is not None and direction is not None or (
                    update_batch is None and direction is None and self.comm.world_size == 1):
                raise ValueError("run: give exactly one of update_batch and direction")
            if eval_batch is not None:
                _check_batch(eval_batch, "eval_batch")
            if update_batch is not None:
                _check_batch(update_batch, "update_batch")
            params, lr = self.parameters(), self.lr
            given = None if direction is None else self._given_direction(direction, params)
        except ValueError as e:
            error = e
        mode = "direction" if direction is not None else "update_batch"
        self.comm.check_same("EntropyProbe.run", lambda: call_fingerprint(
            f"run({mode}, truth={bool(truth)})", self.config, lr, params, self.optimizer,
            None if given is None else given.v), error)
        return params, lr, given

    def run(self, update_batch: RolloutBatch | None = None, eval_batch: RolloutBatch | None = None,
            truth: bool = False, direction: dict[str, Tensor] | None = None) -> ProbeResult:
        """Forecast the step on ``update_batch`` (or along a given ``direction``), measured on ``eval_batch``.

        With ``truth=True`` the step is also applied functionally and the real change measured.
        Parameters, ``.grad``, optimizer state, RNG and train/eval mode are unchanged afterwards.
        """
        params, lr, given = self._checked_call(update_batch, eval_batch, direction, truth)
        with preserved_caller_state(self.module):
            if given is None:  # 1. the update direction v, from U or as given
                upd, coeff, n_update = self._direction_from(update_batch, params)
            else:
                upd, coeff, n_update = given, None, 0
            want_total = self.config.unconditional_se and given is None
            proj, local_entropy, local_ids = self._project_eval(eval_batch, params, upd, want_total)  # 2.
            stats = self._eval_statistics(proj, local_entropy, local_ids, lr)  # 3.
            se_total, jack, update_ids = None, None, None
            if want_total:  # 4.
                jack, update_ids = self._update_jackknife(update_batch, params, upd, coeff, n_update, proj,
                                                          stats, lr)
                se_total = math.sqrt(stats.var_cond_e + max(jack.var_update, 0.0))
            truth_result = None
            if truth:  # 5. the step applied functionally
                truth_result = measure_truth(self.module, params, upd.v, lr, eval_batch, stats.s, self.config,
                                             self.comm)
        return ProbeResult(delta_h1=stats.delta_h1, se_cond_e=stats.se_cond_e, var_cond_e=stats.var_cond_e,
                           se_jackknife=stats.se_jackknife, se_total=se_total, entropy=stats.entropy,
                           n_eval_units=stats.n_eval, n_update_units=n_update, lr=lr,
                           per_unit=stats.s.detach().double().cpu(), eval_unit_ids=stats.unit_ids.cpu(),
                           truth=truth_result, var_update=None if jack is None else jack.var_update,
                           update_influence=None if jack is None else jack.influence,
                           update_unit_ids=update_ids)


def _device_of(params: Params) -> torch.device:
    return next(iter(params.values())).device


def _check_batch(batch, name: str) -> None:
    if not isinstance(batch, RolloutBatch):
        raise ValueError(f"run: {name} must be an entropy_probe.RolloutBatch, got {type(batch).__name__}")
