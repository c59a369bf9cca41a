"""``EntropyProbe``: forecast the entropy change of one RL optimizer step, with its standard error.

Reads top to bottom as the data flow of one call:

    rollout batch U -> update direction v        (objectives, direction, engines.update_gradient)
    rollout batch E -> per-unit projections s_n  (engines.eval_projections: backward or jvp)
    s_n -> statistics                            (statistics: delta_h1, SE over E, jackknife)
    s_n^(g) -> attribution by parameter group    (attribution: by_group)
    v, E -> q_n -> second order                  (engines.eval_second_order: delta_h2, forecast)
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

import torch
from torch import Tensor, nn

from . import fsdp
from .attribution import group_statistics, parameter_groups, wants_groups
from .batch import RolloutBatch, check_batch, on_device
from .caller_state import preserved_caller_state
from .change import EvalState, MeasuredChange, measure_change
from .config import ProbeConfig
from .direction import UpdateDirection, build_direction, given_direction
from .distributed import (
    all_reduce_vector,
    call_fingerprint,
    communicator_for,
    global_totals,
    unwrap,
)
from .engines import (
    EvalProjections,
    TokenProjections,
    eval_projections,
    eval_second_order,
    token_projections,
    update_gradient,
    uses_token_pieces,
)
from .eval_statistics import EvalStatistics, eval_statistics
from .forecast import SecondOrder, second_order_fields, second_order_statistics, token_second_order
from .from_grad import direction_from_grad, grad_checksums, optimizer_lr, unwrap_optimizer
from .logprobs import SequenceLogProbs
from .objectives import UpdateTotals, advantages, policy_gradient_coefficients, unit_entropy
from .result import ProbeResult
from .token_statistics import token_values
from .token_truth import measure_token_truth
from .truth import measure_truth
from .update_jackknife import (
    UpdateJackknife,
    deleted_unit_projections,
    eval_halves,
    gathered_jackknife,
    half_means,
)
from .vectors import Params, device_of, first_nonfinite


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

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        config: ProbeConfig | None = None,
    ):
        self.model = model
        self.module = unwrap(model)
        # accelerate's AcceleratedOptimizer holds the torch optimizer in .optimizer
        self.optimizer = unwrap_optimizer(optimizer)
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
            raise ValueError(
                "ProbeConfig.lr is None and no optimizer was given: set lr or pass the optimizer"
            )
        lr = optimizer_lr(self.optimizer)  # 0 at warm-up: the forecast is then exactly 0
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"optimizer.param_groups[0]['lr'] is {lr}; the probe needs a finite lr >= 0")
        return lr

    def _v_lr(self) -> float:
        """The rate v is normalised by: the optimizer's own, so ``ProbeConfig.lr`` scales the whole step."""
        return self.lr if self.optimizer is None else optimizer_lr(self.optimizer)

    # ---- 1. rollout batch U -> update direction v -----------------------------------------------
    def _update_coefficients(self, batch: RolloutBatch, totals: UpdateTotals) -> Tensor:
        """c_i with ``J_m = sum_{i in m} c_i S_i`` (global normalisers under DDP)."""
        cfg = self.config
        return policy_gradient_coefficients(
            batch, advantages(batch, cfg.advantage_estimator), cfg.loss_aggregation, totals, cfg.norm_length
        )

    def _direction_from(
        self, batch: RolloutBatch | None, params: Params, keep_grad: bool = False
    ) -> tuple[UpdateDirection, Tensor | None, int]:
        """(v, the c_i of this rank's U units, B_U over all ranks); ``batch`` None: a rank without U units.

        v is built in place in the summed gradient (one fp32 copy of the parameters, DESIGN section 17).
        """
        cfg = self.config
        local = UpdateTotals.of(batch) if batch is not None else UpdateTotals(0, 0, 0, 0)
        totals = global_totals(self.comm, local)  # the loss normalisers are global under DDP
        if totals.n_units == 0:
            raise ValueError("update_batch: no rank holds any update unit")
        grad_sum, coeff = {name: None for name in params}, None
        if batch is not None:
            check_batch(batch, "update_batch")
            coeff = self._update_coefficients(batch, totals)
            grad_sum = update_gradient(self.module, params, batch, coeff, cfg)
        # one all-reduce; the same bits on every rank
        grad_sum = all_reduce_vector(self.comm, grad_sum, params)
        n_units = totals.n_units
        # grad J_U = mean_m grad J_m, in place
        grad_j = {name: None if g is None else g.div_(n_units) for name, g in grad_sum.items()}
        grad_sum = None  # build_direction consumes grad_j: no other reference may keep the gradients alive
        bad = first_nonfinite(grad_j)
        if bad is not None:
            raise ValueError(f"update_batch: the policy gradient of parameter {bad!r} is not finite")
        # the jackknife over U (se_total) needs grad J_U after v is built: one more parameter-sized copy
        grad_kept = {n: None if g is None else g.clone() for n, g in grad_j.items()} if keep_grad else None
        upd = build_direction(
            cfg.direction, grad_j, params, self.optimizer, self._v_lr(), cfg.max_grad_norm
        )  # consumes grad_j
        upd.grad_j = grad_kept
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
                check_batch(update_batch, "update_batch")
            params, lr = self.parameters(), self.lr
            fsdp.check_call(params, self.config, False, None)
        except ValueError as e:
            error = e
        self.comm.check_same(
            "EntropyProbe.update_direction",
            lambda: call_fingerprint("update_direction", self.config, lr, params, self.optimizer, None),
            error,
        )
        with preserved_caller_state(self.module):
            batch = on_device(update_batch, device_of(params))
            direction, _, _ = self._direction_from(batch, params)
        return direction.v

    # ---- 2. rollout batch E -> per-unit projections s_n -------------------------------------------
    def _project_eval(
        self, batch: RolloutBatch | None, params: Params, upd: UpdateDirection, want_halves: bool
    ) -> tuple[EvalProjections, Tensor, Tensor]:
        """(projections, this rank's summed unit entropies, its unit ids); empty on a rank without E units.

        ``want_halves``: also sum X_n over the two halves of E (even and odd global unit positions)."""
        want_groups = wants_groups(self.config)
        halves, counts = None, None
        if want_halves or uses_token_pieces(self.config):  # this rank's place in the global E order
            n_local = torch.tensor([0 if batch is None else batch.n_units], device=device_of(params))
            counts = self.comm.stack(n_local).reshape(-1)
        if want_halves:
            halves = eval_halves(0 if batch is None else batch.n_units, int(counts[: self.comm.rank].sum()))
        if uses_token_pieces(self.config):
            return self._project_eval_token(batch, params, upd, halves, want_groups, counts)
        if batch is not None:
            proj = eval_projections(self.module, params, batch, upd.v, self.config, halves, want_groups)
            return proj, unit_entropy(proj.weighted, batch).double().sum(), batch.unit_ids
        empty = torch.zeros(0, device=device_of(params))
        x_half = None
        if want_halves:
            x_half = tuple({n: torch.zeros_like(x) for n, x in upd.v.items()} for _ in range(2))
        proj = EvalProjections(empty, empty, empty, x_half)
        if want_groups:  # (0, n_groups) float64, as the ranks holding units send
            n_groups = len(parameter_groups(params, self.config.groups)[0])
            proj.s_groups = torch.zeros((0, n_groups), dtype=torch.float64, device=empty.device)
        return proj, torch.zeros((), dtype=torch.float64, device=empty.device), empty.long()

    def _project_eval_token(self, batch, params, upd, halves, want_groups, counts):
        """``_project_eval`` through the exact H_t (``engines.token``, ``token_statistics``): the pieces of
        every rank's units gathered, this rank's s_n from them."""
        cfg = self.config
        if batch is not None:
            tp = token_projections(self.module, params, batch, upd.v, cfg, halves, want_groups)
            ids = batch.unit_ids
        else:  # a rank without E units still joins the gathers
            device = device_of(params)
            n_groups = len(parameter_groups(params, cfg.groups)[0]) if want_groups else None
            tp = TokenProjections.empty(0, 0, upd.v, halves is not None, n_groups, device)
            ids = torch.zeros(0, dtype=torch.long, device=device)
        values = token_values(self.comm, tp, [int(c) for c in counts.tolist()], ratio=cfg.entropy == "token")
        # S_w of the sequence functionals for a later measure_change: "sum" is S itself
        weighted = tp.seq_logprob if cfg.entropy == "sequence" else torch.full_like(tp.seq_logprob, math.nan)
        proj = EvalProjections(values.s, tp.seq_logprob, weighted, values.x_half, values.s_groups, tp.tokens)
        return proj, values.entropy_sum, ids

    # ---- 3. s_n -> statistics over E with U fixed (eval_statistics), by group (attribution) -------------
    # ---- 3c. v, E -> q_n -> delta_h2 and the forecast ----------------------------------------------
    def _second_order(
        self,
        batch: RolloutBatch | None,
        params: Params,
        upd: UpdateDirection,
        stats: EvalStatistics,
        lr: float,
    ) -> SecondOrder:
        """q_n by nested forward mode on this rank's E units, then the statistics over all ranks."""
        if uses_token_pieces(self.config):  # the exact H_t: the token functional's own pass
            return token_second_order(self.module, params, batch, upd.v, self.config, self.comm, stats, lr)
        q_local = torch.zeros(0, dtype=torch.float64, device=device_of(params))
        if batch is not None:
            q_local = eval_second_order(self.module, params, batch, upd.v, self.config)
        return second_order_statistics(
            self.comm, q_local, stats.s, stats.sizes, stats.unit_ids, stats.delta_h1, lr
        )

    # ---- 4. Xbar_A, Xbar_B, U -> the variance over U ----------------------------------------------
    def _update_jackknife(
        self,
        update_batch: RolloutBatch | None,
        params: Params,
        upd: UpdateDirection,
        coeff: Tensor | None,
        n_update: int,
        proj: EvalProjections,
        stats: EvalStatistics,
        lr: float,
    ) -> tuple[UpdateJackknife, Tensor]:
        """V_U and the update influences (update_jackknife), with the U unit ids in gathered order."""
        x_a, x_b, n_half = half_means(self.comm, proj.x_half, params, upd.v, stats.n_eval)
        pieces = None
        if update_batch is not None and n_update >= 2:
            pieces = deleted_unit_projections(
                self.module, params, update_batch, coeff, upd.grad_j, n_update, upd.v, x_a, x_b,
                self.config, self.optimizer, self._v_lr(),
            )  # fmt: skip
        return gathered_jackknife(
            self.comm, update_batch, pieces, n_half, lr, stats.delta_h1, self.config.direction
        )

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
                check_batch(eval_batch, "eval_batch")
            if update_batch is not None:
                check_batch(update_batch, "update_batch")
            params, lr = self.parameters(), self.lr
            fsdp.check_call(params, self.config, from_grad, eval_batch)  # FSDP2: what is supported
            given = None if direction is None else given_direction(direction, params)
            if from_grad:
                given = direction_from_grad(self.config.direction, params, self.optimizer, self._v_lr())
        except ValueError as e:
            error = e
        mode = "from_grad" if from_grad else "direction" if direction is not None else "update_batch"
        self.comm.check_same(
            "EntropyProbe.run",
            lambda: call_fingerprint(
                f"run({mode}, truth={bool(truth)})",
                self.config,
                lr,
                params,
                self.optimizer,
                None if given is None or from_grad else given.v,
                grad_checksums(params) if from_grad else None,
            ),
            error,
        )
        return params, lr, given

    def run(
        self,
        update_batch: RolloutBatch | None = None,
        eval_batch: RolloutBatch | None = None,
        truth: bool = False,
        direction: dict[str, Tensor] | None = None,
        from_grad: bool = False,
    ) -> ProbeResult:
        """Forecast the step on ``update_batch`` (or along a given ``direction``, or the step the optimizer
        will take from the ``.grad`` now on the parameters: ``from_grad=True``), measured on ``eval_batch``.

        With ``truth=True`` the step is also applied functionally and the real change measured; after the
        real ``optimizer.step()``, ``measure_change(result)`` measures it on the same E.
        Parameters, ``.grad``, optimizer state, RNG and train/eval mode are unchanged afterwards.
        """
        params, lr, given = self._checked_call(update_batch, eval_batch, direction, truth, from_grad)
        update_batch, eval_batch = (
            on_device(update_batch, device_of(params)),
            on_device(eval_batch, device_of(params)),
        )
        with preserved_caller_state(self.module):
            if given is None:  # 1. the update direction v, from U or as given
                upd, coeff, n_update = self._direction_from(
                    update_batch, params, self.config.unconditional_se
                )
            else:
                upd, coeff, n_update = given, None, 0
            want_total = self.config.unconditional_se and given is None
            proj, local_entropy, local_ids = self._project_eval(eval_batch, params, upd, want_total)  # 2.
            dropped = 0 if eval_batch is None else eval_batch.n_dropped_rows
            stats = eval_statistics(self.comm, proj, local_entropy, local_ids, dropped, lr)  # 3.
            groups, sizes = self.config.groups, stats.sizes
            by_group = group_statistics(self.comm, proj.s_groups, params, groups, sizes, lr)  # 3b.
            second = None
            if self.config.second_order:  # 3c.
                second = self._second_order(eval_batch, params, upd, stats, lr)
            se_total, jack, update_ids = None, None, None
            if want_total:  # 4.
                jack, update_ids = self._update_jackknife(
                    update_batch, params, upd, coeff, n_update, proj, stats, lr
                )
                se_total = math.sqrt(stats.var_cond_e + max(jack.var_update, 0.0))
            truth_result = None
            if truth:  # 5. the step applied functionally
                measure = measure_token_truth if uses_token_pieces(self.config) else measure_truth
                truth_result = measure(
                    self.module,
                    params,
                    upd.v,
                    lr,
                    eval_batch,
                    stats.s,
                    self.config,
                    self.comm,
                    per_unit_q=None if second is None else second.q,
                )
        kept = proj.tokens if proj.tokens is not None else SequenceLogProbs(proj.seq_logprob, proj.weighted)
        state = EvalState(eval_batch, kept)
        return ProbeResult(
            delta_h1=stats.delta_h1,
            se_cond_e=stats.se_cond_e,
            var_cond_e=stats.var_cond_e,
            se_jackknife=stats.se_jackknife,
            se_total=se_total,
            entropy=stats.entropy,
            n_eval_units=stats.n_eval,
            n_update_units=n_update,
            lr=lr,
            per_unit=stats.s.detach().double().cpu(),
            eval_unit_ids=stats.unit_ids.cpu(),
            truth=truth_result,
            n_dropped_rows=stats.n_dropped_rows,
            eval_state=state,
            by_group=by_group,
            **second_order_fields(second),
            var_update=None if jack is None else jack.var_update,
            update_influence=None if jack is None else jack.influence,
            update_unit_ids=update_ids,
        )

    def measure_change(self, result: ProbeResult) -> MeasuredChange:
        """After the real ``optimizer.step()``: the entropy change on ``result``'s E, one forward at the
        current parameters against the log-probs kept from the forecast pass (DESIGN section 11).

        Under DDP every rank calls it with its own result. The caller's state is unchanged.
        """
        state = getattr(result, "eval_state", None)
        error = None
        if not isinstance(state, EvalState):
            error = ValueError("measure_change: result must be a ProbeResult returned by this probe's run()")
        self.comm.check_same(
            "EntropyProbe.measure_change",
            lambda: call_fingerprint(
                "measure_change",
                self.config,
                getattr(result, "lr", None),
                self.parameters(),
                self.optimizer,
                None,
            ),
            error,
        )
        with preserved_caller_state(self.module):
            return measure_change(
                self.module, self.parameters(), state, result.per_unit, result.lr, self.config, self.comm
            )
