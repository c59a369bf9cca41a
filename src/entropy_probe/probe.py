"""``EntropyProbe``: forecast the entropy change of one RL optimizer step, with its standard error.

Reads top to bottom as the data flow of one call:

    the call's inputs -> ProbeCall, the source of v (checked once, agreed by every rank)
    U batch / given v / .grad -> update direction v   (one place: _direction; objectives, direction)
    rollout batch E -> per-unit projections s_n       (passes.eval_projections: backward or jvp)
    v, E -> q_n                                       (engines.eval_second_order)
    s_n, q_n, s_n^(g) -> statistics over E            (eval_statistics: one gather of the per-unit values)
      -> result.first, result.second, result.by_group (forecast, attribution)
    Xbar_A, Xbar_B, U -> variance over U              (update_jackknife: result.update)
    v, E -> truth                                     (truth: the step applied functionally)
    v, E -> diagnostic, lookahead -> prediction       (lookahead: large steps, docs/design.md section 17)
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

from .attribution import group_statistics, parameter_groups
from .batch import RolloutBatch, check_batch, on_device
from .caller_state import preserved_caller_state
from .change import MeasuredChange, check_eval_state, eval_state, measure_change
from .config import ProbeConfig
from .context import ProbeCall
from .direction import UpdateDirection, build_direction, given_direction
from .distributed import all_reduce_vector, call_fingerprint, communicator_for, global_totals, unwrap
from .engines import EvalProjections, eval_second_order, update_gradient, uses_token_pieces
from .eval_statistics import EvalStatistics, eval_statistics
from .forecast import second_order_statistics, shared_token_pass, token_second_order_pass
from .from_grad import direction_from_grad, optimizer_lr, unwrap_optimizer
from .inputs import check_token_ids, model_vocab_size
from .logprobs import SequenceLogProbs
from .lookahead import large_step
from .objectives import UpdateTotals, advantages, policy_gradient_coefficients
from .result import EvalState, ProbeResult, UpdateVariance
from .sharded_passes import passes_for
from .token_statistics import token_eval_projections
from .token_truth import measure_token_truth
from .truth import measure_truth
from .update_jackknife import EvalHalves, eval_halves, half_means, update_variance
from .vectors import Params, device_of, first_nonfinite

SOURCES = ("update_batch", "direction", "from_grad=True")  # where v may come from: exactly one per call


def direction_source(update_batch, direction, from_grad: bool, world_size: int) -> str:
    """Which of ``SOURCES`` builds v, decided once per call; a ValueError naming the sources given when
    it is not exactly one (a DDP rank holding no U units gives none: its source is the U batch)."""
    given = [
        name
        for name, here in zip(SOURCES, (update_batch is not None, direction is not None, from_grad))
        if here
    ]
    if len(given) > 1 or (not given and world_size == 1):
        got = " and ".join(given) if given else "none of them"
        raise ValueError(f"run: give exactly one of update_batch, direction and from_grad=True (got {got})")
    return given[0] if given else "update_batch"


class EntropyProbe:
    """Forecasts ``delta_h1 = eta * Xbar_E . v`` for the step the optimizer is about to take on U.

    model: any ``nn.Module`` called as ``model(input_ids=..., attention_mask=...)`` returning logits
        ``(N, T, V)`` or an object with ``.logits``, optionally wrapped in DDP or sharded by FSDP2. Only
        parameters with ``requires_grad`` count.
    optimizer: the run's optimizer (read, never written); needed for "optimizer-step", for the
        preconditioner of "adam-preconditioned" and for ``lr`` when ``config.lr`` is None.
    process_group: the ``torch.distributed`` group whose ranks probe together, for a model that is not
        itself DDP-wrapped (a trainer handing over the unwrapped model). None: the DDP model's group,
        the FSDP2 model's mesh, or one process.

    Under DDP (docs/distributed.md) every rank calls the probe with its own share of U and E units
    (``None`` for a rank holding none); every rank gets the same result. The communicator and the
    passes (one process or DDP; FSDP2 shards) are chosen here, once.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        config: ProbeConfig | None = None,
        process_group=None,
    ):
        self.model = model
        self.module = unwrap(model)
        # accelerate's AcceleratedOptimizer holds the torch optimizer in .optimizer
        self.optimizer = unwrap_optimizer(optimizer)
        self.config = config if config is not None else ProbeConfig()
        self.comm = communicator_for(model, process_group)
        self.passes = passes_for(self.module)
        self.vocab_size = model_vocab_size(self.module)  # None: ids are not checked against a vocabulary

    # ---- parameters and learning rate ---------------------------------------------------------
    def parameters(self) -> Params:
        """The trainable parameters, keyed by the unwrapped model's ``named_parameters()``."""
        self.passes.reshard(self.module)  # FSDP2: the sharded parameters, also after a forward alone
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

    def _call(self) -> ProbeCall:
        """What every step of a call reads (``context.ProbeCall``), at the parameters and rates of now."""
        params, lr = self.parameters(), self.lr
        return ProbeCall(
            self.module, params, self.config, self.comm, self.passes, self.optimizer, lr, self._v_lr()
        )

    # ---- 0. the call's inputs, checked once and agreed by every rank -----------------------------
    def _checked_call(self, update_batch, eval_batch, direction, truth: bool, from_grad: bool):
        """(the call, the source of v, the given direction checked or None) after the local input checks
        and one agreement check across ranks, made before any other collective so that a bad rank cannot
        hang the rest."""
        call, source, given, error = None, None, None, None
        try:
            if eval_batch is None and self.comm.world_size == 1:
                raise ValueError("run: eval_batch is required")
            source = direction_source(update_batch, direction, bool(from_grad), self.comm.world_size)
            if eval_batch is not None:
                check_batch(eval_batch, "eval_batch")
            if update_batch is not None:
                check_batch(update_batch, "update_batch")
            call = self._call()  # first: the agreement check below needs the parameters
            check_token_ids(self.vocab_size, eval_batch=eval_batch, update_batch=update_batch)
            self.passes.check_call(self.config, source.partition("=")[0], eval_batch)  # FSDP2 restrictions
            given = None if direction is None else given_direction(direction, call.params)
        except ValueError as e:
            error = e
        mode = "update_batch" if source is None else source.partition("=")[0]
        self.comm.check_same(
            "EntropyProbe.run",
            lambda: call_fingerprint(
                f"run({mode}, truth={bool(truth)})",
                self.config,
                None if call is None else call.lr,
                None if call is None else call.params,
                self.optimizer,
                None if given is None else given.v,
                self.passes.grad_checksums(call.params) if from_grad and call is not None else None,
            ),
            error,
        )
        return call, source, given

    # ---- 1. the update direction v, from exactly one source --------------------------------------
    def _direction(
        self, call: ProbeCall, source: str, update_batch: RolloutBatch | None, given: UpdateDirection | None
    ) -> UpdateDirection:
        """v from the U batch, the given direction or the ``.grad``, as ``source`` says; the caller holds
        the caller-state guard. With U and ``unconditional_se`` it keeps what the jackknife over U needs."""
        if source == "direction":
            return given
        if source == "from_grad=True":
            params, optimizer = call.passes.grad_view(call.params, call.optimizer)  # FSDP2: local shards
            # the step formed in the E pass's hook (step_view), except where the passes read v whole
            whole = not call.config.step_in_hook or call.passes.reads_v_whole
            return direction_from_grad(call.config.direction, params, optimizer, call.v_lr, whole)
        return self._direction_from(call, update_batch, call.config.unconditional_se)

    def _direction_from(
        self, call: ProbeCall, batch: RolloutBatch | None, keep_grad: bool
    ) -> UpdateDirection:
        """v from U (``batch`` None: a rank without U units), with this rank's c_i and B_U over all ranks.

        v is built in place in the summed gradient (one fp32 copy of the parameters, docs/design.md
        section 11).
        """
        cfg, params = call.config, call.params
        local = UpdateTotals.of(batch) if batch is not None else UpdateTotals(0, 0, 0, 0)
        totals = global_totals(call.comm, local)  # the loss normalisers are global under DDP
        if totals.n_units == 0:
            raise ValueError("update_batch: no rank holds any update unit")
        grad_sum, coeff = {name: None for name in params}, None
        if batch is not None:
            check_batch(batch, "update_batch")
            adv = advantages(batch, cfg.advantage_estimator)
            coeff = policy_gradient_coefficients(batch, adv, cfg.loss_aggregation, totals, cfg.norm_length)
            grad_sum = update_gradient(call.module, params, batch, coeff, cfg)
        # one all-reduce; the same bits on every rank
        grad_sum = all_reduce_vector(call.comm, grad_sum, params)
        n_units = totals.n_units
        # grad J_U = mean_m grad J_m, in place
        grad_j = {name: None if g is None else g.div_(n_units) for name, g in grad_sum.items()}
        grad_sum = None  # build_direction consumes grad_j: no other reference may keep the gradients alive
        bad = first_nonfinite(grad_j)
        if bad is not None:
            raise ValueError(f"update_batch: the policy gradient of parameter {bad!r} is not finite")
        # the jackknife over U (se_total) needs grad J_U after v is built: one more parameter-sized copy
        grad_kept = {n: None if g is None else g.clone() for n, g in grad_j.items()} if keep_grad else None
        v = build_direction(cfg.direction, grad_j, params, call.optimizer, call.v_lr, cfg.max_grad_norm).v
        return UpdateDirection(v, grad_kept, batch, coeff, n_units)  # build_direction consumed grad_j

    def update_direction(self, update_batch: RolloutBatch | None) -> dict[str, Tensor]:
        """v of docs/design.md section 3 as ``{name: fp32 tensor}``; pass it back as ``run(direction=v)``.

        Under DDP every rank calls it with its share of U (None for none) and gets the same v.
        """
        call, error = None, None
        try:
            if update_batch is None and self.comm.world_size == 1:
                raise ValueError("update_direction: update_batch is required")
            if update_batch is not None:
                check_batch(update_batch, "update_batch")
            call = self._call()
            check_token_ids(self.vocab_size, update_batch=update_batch)
            self.passes.check_call(self.config, "update_batch", None)
        except ValueError as e:
            error = e
        self.comm.check_same(
            "EntropyProbe.update_direction",
            lambda: call_fingerprint(
                "update_direction",
                self.config,
                None if call is None else call.lr,
                None if call is None else call.params,
                self.optimizer,
                None,
            ),
            error,
        )
        with preserved_caller_state(self.module):
            batch = on_device(update_batch, device_of(call.params))
            return self._direction_from(call, batch, keep_grad=False).v

    # ---- 2. rollout batch E -> per-unit projections s_n (and q_n) ---------------------------------
    def _project_eval(
        self, call: ProbeCall, batch: RolloutBatch | None, upd: UpdateDirection, want_halves: bool
    ) -> EvalProjections:
        """The projections of this rank's E units; empty on a rank without E units.

        ``want_halves``: also sum X_n over the two halves of E (even and odd global unit positions)."""
        halves, counts = None, None
        if want_halves or uses_token_pieces(call.config):  # this rank's place in the global E order
            n_local = torch.tensor([0 if batch is None else batch.n_units], device=device_of(call.params))
            counts = call.comm.stack(n_local).reshape(-1)  # one all_gather of one integer
        if want_halves:
            halves = eval_halves(0 if batch is None else batch.n_units, int(counts[: call.comm.rank].sum()))
        if uses_token_pieces(call.config):  # through the exact H_t: every rank's pieces -> this rank's s_n
            return token_eval_projections(call, batch, upd.v, halves, [int(c) for c in counts.tolist()])
        if batch is not None:
            return call.passes.eval_projections(call.module, call.params, batch, upd.v, call.config, halves)
        empty = torch.zeros(0, device=device_of(call.params))
        x_half = None
        if want_halves:
            x_half = tuple({n: torch.zeros_like(x) for n, x in upd.v.items()} for _ in range(2))
        proj = EvalProjections(empty, SequenceLogProbs(empty, empty), x_half)
        if call.config.computes_groups:  # (0, n_groups) float64, as the ranks holding units send
            n_groups = len(parameter_groups(call.params, call.config.groups)[0])
            proj.s_groups = torch.zeros((0, n_groups), dtype=torch.float64, device=empty.device)
        return proj

    def _second_order_pass(self, call: ProbeCall, batch: RolloutBatch | None, upd: UpdateDirection):
        """This rank's ``(B_local,)`` float64 q_n by nested forward mode; None when second order is off."""
        if not call.config.second_order:
            return None
        if uses_token_pieces(call.config):  # the exact H_t: q_n need every rank's units (a gather)
            return token_second_order_pass(call, batch, upd.v)
        if batch is None:
            return torch.zeros(0, dtype=torch.float64, device=device_of(call.params))
        return eval_second_order(call.module, call.params, batch, upd.v, call.config)

    # ---- 4. Xbar_A, Xbar_B, U -> the variance over U ----------------------------------------------
    def _update_part(
        self, call: ProbeCall, upd: UpdateDirection, halves: EvalHalves | None, stats: EvalStatistics
    ) -> UpdateVariance | None:
        """``result.update``: None unless v came from U; the variance over U when asked for."""
        if upd.n_units == 0:
            return None
        if upd.grad_j is None:  # ProbeConfig(unconditional_se=False)
            return UpdateVariance(n_update_units=upd.n_units)
        return update_variance(call, upd, halves, stats)

    # ---- the whole call ------------------------------------------------------------------------
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
        call, source, given = self._checked_call(update_batch, eval_batch, direction, truth, from_grad)
        device = device_of(call.params)
        update_batch, eval_batch = on_device(update_batch, device), on_device(eval_batch, device)
        with preserved_caller_state(self.module):
            upd = self._direction(call, source, update_batch, given)  # 1. v, from its one source
            want_halves = upd.grad_j is not None or call.config.keep_halves  # X over E's halves
            if call.config.shares_second_order_pass and not want_halves:  # s_n, q_n from one pass
                proj, q_local = shared_token_pass(call, eval_batch, upd.v)
            else:
                proj = self._project_eval(call, eval_batch, upd, want_halves)  # 2. s_n
                q_local = self._second_order_pass(call, eval_batch, upd)  # q_n
            stats = eval_statistics(call, proj, eval_batch, q_local)  # 3. over E, one gather
            second = None if q_local is None else second_order_statistics(call, q_local, stats)
            by_group = group_statistics(call.params, self.config.groups, stats.s_groups, call.lr)
            halves = None if proj.x_half is None else half_means(call, proj.x_half, upd.v, stats.n_eval)
            update = self._update_part(call, upd, halves, stats)  # 4. the variance over U
            truth_result = None
            if truth:  # 5. the step applied functionally
                q = None if second is None else second.per_unit_q
                measure = measure_token_truth if uses_token_pieces(self.config) else measure_truth
                truth_result = measure(call, upd.v, eval_batch, stats.s, per_unit_q=q)
            first = stats.first_order(call.lr)  # 6. large steps: diagnostic, lookahead, prediction
            lookahead, prediction = large_step(
                call, upd.v, eval_batch, proj.logprobs.seq, stats.s, (first, second), truth_result, proj.d_seq
            )
        return ProbeResult(
            first=first,
            update=update,
            second=second,
            by_group=by_group,
            truth=truth_result,
            lookahead=lookahead,
            prediction=prediction,
            eval_state=eval_state(
                self.module, eval_batch, proj.logprobs if proj.tokens is None else proj.tokens, self.config
            ),
            caveats=tuple(c for c in (upd.caveat, stats.caveat) if c is not None),
            halves=halves if self.config.keep_halves else None,
        )

    def measure_change(self, result: ProbeResult, step_scale: float = 1.0) -> MeasuredChange:
        """After the real ``optimizer.step()``: the entropy change on ``result``'s E, one forward at the
        current parameters against the log-probs kept from the forecast pass (docs/design.md section 10).

        ``step_scale``: the step taken was ``step_scale`` times the forecast's (a guard scaled the learning
        rates, ``EntropyGuard``); ``se_diff`` is then against that step's first-order forecast.
        Under DDP every rank calls it with its own result. The caller's state is unchanged.
        """
        state = getattr(result, "eval_state", None)
        error = None
        if not isinstance(state, EvalState):
            error = ValueError("measure_change: result must be a ProbeResult returned by this probe's run()")
        else:
            try:  # before any collective, so that a refused result on one rank cannot hang the others
                check_eval_state(self.module, state, self.config)
            except ValueError as e:
                error = e
        lr = None if error is not None else result.first.lr * step_scale
        self.comm.check_same(
            "EntropyProbe.measure_change",
            lambda: call_fingerprint(
                "measure_change", self.config, lr, self.parameters(), self.optimizer, None
            ),
            error,
        )
        call = self._call()
        with preserved_caller_state(self.module):
            return measure_change(call, state, result.first.per_unit, lr)
