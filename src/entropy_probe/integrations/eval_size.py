"""How many E units a callback samples per probed step: a fixed number, or as few as reach an SE target.

The first-order SE is ``se_cond_e = eta * sd(s_n) / sqrt(B_E)`` (docs/design.md section 5), so the
units that reach a target SE follow from the per-unit SD of the s_n, which does not depend on B_E:

    B_E = ceil((eta * sd / se_target)^2),   clipped to [MIN_UNITS, cap]

with ``sd = se_cond_e * sqrt(B_E) / eta`` read from the previous probed step's result (the s_n carry no
eta, so a learning-rate schedule moves the size with it) and ``cap`` the most units the callback may
take (``max_eval_units``, else the trainer's prompts per optimizer step). The first probed step has no
previous SD and takes ``cap``. The size is decided from the previous step's E, never the current one,
so this step's E stays an independent draw of the size it was given (no optional stopping on its own
noise). Every rank sees the same combined ``se_cond_e``, so every rank picks the same size.
"""

from __future__ import annotations

import math

MIN_UNITS = 2
"""A variance over E needs two units (and the token-level ratio's jackknife needs two)."""


def units_for_se(se_target: float, lr: float, unit_sd: float, cap: int) -> int:
    """The units that bring ``eta * unit_sd / sqrt(B)`` down to ``se_target``, within ``[MIN_UNITS, cap]``."""
    want = math.ceil((lr * unit_sd / se_target) ** 2) if unit_sd > 0 and lr > 0 else MIN_UNITS
    return max(min(MIN_UNITS, cap), min(want, cap))


def trainer_prompts_per_step(args, world_size: int) -> int | None:
    """Prompts in one optimizer step of a TRL ``GRPOTrainer`` over all ranks (completions /
    ``num_generations``); None for a trainer whose arguments have no ``num_generations``."""
    generations = getattr(args, "num_generations", None)
    if not generations:
        return None
    completions = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    return max(1, completions // generations)


class EvalSize:
    """The size and the prompts of each probed step's E (``EntropyProbeCallback``'s ``max_eval_units``,
    ``se_target``).

    Without ``se_target`` every probed step takes ``cap`` prompts, the k-th probed step the k-th slice
    of ``cap`` consecutive prompts (wrapping around the list, so a resumed run continues the rotation).
    With it, the slices have the sizes ``units_for_se`` gives and follow one another from a cursor.
    """

    def __init__(self, max_units: int | None, se_target: float | None):
        self.max_units, self.se_target = max_units, se_target
        self.unit_sd: float | None = None  # per-unit SD of the s_n (no eta) of the latest probed step
        self.cursor = 0  # with se_target: the next prompt to take

    def cap(self, args, n_prompts: int, world_size: int = 1) -> int:
        """``max_eval_units``, or the trainer's prompts per step; at most ``n_prompts``."""
        n = self.max_units
        if n is None:
            n = trainer_prompts_per_step(args, world_size)
        return min(n, n_prompts) if n is not None else n_prompts

    def units(self, args, n_prompts: int, lr: float | None, world_size: int = 1) -> int:
        """This probed step's number of units at learning rate ``lr`` (None: unknown, take the cap)."""
        cap = self.cap(args, n_prompts, world_size)
        if self.se_target is None or self.unit_sd is None or lr is None:
            return cap
        return units_for_se(self.se_target, lr, self.unit_sd, cap)

    def step_slice(self, n_prompts: int, m: int, probed_index: int) -> list[int]:
        """Indices of this probed step's ``m`` prompts (``probed_index``: global_step // every)."""
        if self.se_target is None:
            start = probed_index * m
        else:
            start, self.cursor = self.cursor, (self.cursor + m) % n_prompts
        return [(start + j) % n_prompts for j in range(m)]

    def observe(self, se_cond_e: float, n_units: int, lr: float) -> None:
        """Keep the per-unit SD of a probed step's s_n for the next step's size."""
        if n_units >= MIN_UNITS and lr > 0 and math.isfinite(se_cond_e):
            self.unit_sd = se_cond_e * math.sqrt(n_units) / lr
