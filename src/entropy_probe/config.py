"""``ProbeConfig``: every option of the probe, one documented field each (docs/design.md section 14)."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Literal, get_args

from .inputs import is_integer, is_number

# The values each option takes: the Literal types are the lists (the modules that implement them import
# these, so the config never imports them back).
Weighting = Literal["token-mean", "sum"]
XEstimator = Literal["unbiased", "seed"]
Direction = Literal["adam-preconditioned", "optimizer-step", "optimizer-copy", "sgd"]
LossAggregation = Literal[
    "seq-mean-token-mean", "seq-mean-token-sum", "token-mean", "seq-mean-token-sum-norm"
]
AdvantageEstimator = Literal["grpo", "rloo", "dr-grpo", "given"]
Engine = Literal["backward", "jvp"]
Lookahead = Literal["auto", "always", "never"]

Entropy = Literal["token", "sequence"]

WEIGHTINGS: tuple[str, ...] = get_args(Weighting)
X_ESTIMATORS: tuple[str, ...] = get_args(XEstimator)
DIRECTIONS: tuple[str, ...] = get_args(Direction)
LOSS_AGGREGATIONS: tuple[str, ...] = get_args(LossAggregation)
ADVANTAGE_ESTIMATORS: tuple[str, ...] = get_args(AdvantageEstimator)
ENGINES: tuple[str, ...] = get_args(Engine)
LOOKAHEADS: tuple[str, ...] = get_args(Lookahead)
ENTROPIES: tuple[str, ...] = get_args(Entropy)


@dataclass(frozen=True)
class ProbeConfig:
    """Options of ``EntropyProbe``. Defaults follow GRPO with Adam and the founding note.

    Frozen and validated once, here: change a field with ``dataclasses.replace(config, lr=...)``,
    which validates the new value.

    >>> import dataclasses
    >>> cfg = dataclasses.replace(ProbeConfig(), engine="jvp")
    >>> cfg.engine
    'jvp'
    >>> try:
    ...     dataclasses.replace(cfg, engine="jvpp")
    ... except ValueError as e:
    ...     print(e)
    ProbeConfig.engine: must be one of ('backward', 'jvp'), got 'jvpp'
    """

    lr: float | None = None
    """Learning rate eta of the step being forecast. None: the optimizer's (first group's) lr."""
    temperature: float = 1.0
    """Sampling temperature; the policy is softmax(logits / temperature)."""
    microbatch_units: int = 4
    """Units per forward in passes that batch units (U gradient, truth, jvp engine)."""
    entropy: Entropy = "token"
    """Which entropy is forecast: "token", the mean over all response tokens of the full-vocabulary
    entropy H_t, as TRL, verl, OpenRLHF and prime-rl log it (docs/token_entropy.md); or "sequence",
    ``E[-S_w]`` with ``entropy_weighting`` (docs/design.md section 2)."""
    entropy_weighting: Weighting = "token-mean"
    """entropy="sequence" only: how S_w weights a response's tokens: "token-mean" (w = m / L, the default)
    or "sum" (w = m, estimated with the exact H_t as the token-level numerator)."""
    x_estimator: XEstimator = "unbiased"
    """entropy="sequence" only: X_n "unbiased" (with the pathwise term) or "seed" (the note's L_X)."""
    direction: Direction = "adam-preconditioned"
    """Update direction v: "adam-preconditioned" (the note), "optimizer-step" (Adam/AdamW, closed form),
    "optimizer-copy" (any torch.optim optimizer: its step taken by a copy) or "sgd". With from_grad, "sgd"
    on an optimizer that takes another step is refused, and "adam-preconditioned" past Adam's first step
    warns and flags the result (``reliable=False``)."""
    loss_aggregation: LossAggregation = "seq-mean-token-mean"
    """Policy loss aggregation of the run: "seq-mean-token-mean" (GRPO), "seq-mean-token-sum",
    "token-mean" (DAPO), "seq-mean-token-sum-norm" (Dr. GRPO)."""
    advantage_estimator: AdvantageEstimator | None = None
    """"grpo", "rloo", "dr-grpo" (from rewards) or "given" (batch.advantages). None: "given" when the
    batch carries advantages, else "grpo"."""
    engine: Engine = "jvp"
    """How the s_n are computed: "jvp" (forward mode, a microbatch of units per pass; its exact dS_i are the
    large-step diagnostic) or "backward" (one backward per E unit, two through the exact H_t). "jvp" is the
    default because it measured faster on every model and functional, at lower memory (docs/performance.md,
    issue 24); "backward" gives ``by_group`` for free."""
    max_grad_norm: float | None = None
    """The run's clip_grad_norm_ threshold, applied by direction="optimizer-step". None: no clipping."""
    norm_length: int | None = None
    """Dr. GRPO's constant length, required by "seq-mean-token-sum-norm": TRL's ``max_completion_length``
    (its dr_grpo loss divides by ``N * max_completion_length``). Unused by the other aggregations."""
    unconditional_se: bool = True
    """Also compute se_total, var_update and update_influence: a jackknife over U through the direction
    map (delete-one-unit for "sgd", delete-a-group of four blocks for the other rules; one more backward
    per U unit, the X sums over two halves of E)."""
    truth_alphas: tuple[float, ...] = (1.0,)
    """Step fractions alpha at which run(truth=True) measures the entropy after theta + alpha*eta*v."""
    second_order: bool = False
    """Also estimate delta_h2 = (eta^2/2) v^T (grad^2 H) v and forecast = delta_h1 + delta_h2 (one nested
    forward-mode pass over E; off by default: it costs more than half the E pass, docs/performance.md).
    Through the exact H_t (``token_pieces``) without ``by_group`` (the default engine's default), that
    pass gives the s_n too and is the only pass over E (``shares_second_order_pass``)."""
    by_group: bool | None = None
    """Compute result.by_group (delta_h1 split by parameter group). None: on with engine="backward", where it
    is free; off with "jvp" (the default), where it makes the call run the backward engine's per-unit loop
    instead (docs/performance.md: 1.7-1.9x the time of the jvp call on the token level). Off, with
    ``second_order`` through the exact H_t: one pass over E (``shares_second_order_pass``)."""
    groups: Callable[[str], str] | None = None
    """f(parameter name) -> group name for by_group. None: embeddings, block.<i>, head, other
    (``attribution.default_group``). Enters the DDP agreement check by its qualified name."""
    step_in_hook: bool = True
    """from_grad: form each parameter's step in the reverse hook, chunk by chunk, for every E unit
    (``step_view``; peak extra memory about 0.5x the fp32 parameter bytes, but the step's arithmetic is
    repeated per unit). False: form every step once and keep it (1x the parameter bytes more, no
    repetition; faster where sequences are short, docs/performance.md)."""
    keep_halves: bool = False
    """Keep the mean X of the two halves of E in ``result.halves`` (``EvalHalves``: two fp32
    parameter-sized vectors) for ``EntropyController(mode="steer")``; the E pass forms their sums anyway
    when ``unconditional_se`` has a U batch, else it adds them (the backward engine: no extra pass)."""
    lookahead: Lookahead = "auto"
    """The step applied functionally on E before it is taken (``result.lookahead``, one forward):
    "auto" when the before-the-step diagnostic says the Taylor forecast cannot be trusted at this step
    size (``result.reliable`` False), "always", or "never" (docs/large_steps.md)."""

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"ProbeConfig.{name}: {msg}, got {getattr(self, name)!r}")

        need(
            self.lr is None or (is_number(self.lr) and math.isfinite(self.lr) and self.lr > 0),
            "lr",
            "must be a finite number > 0 (not a boolean) or None",
        )
        need(
            is_number(self.temperature) and math.isfinite(self.temperature) and self.temperature > 0,
            "temperature",
            "must be a finite number > 0",
        )
        need(
            is_integer(self.microbatch_units) and self.microbatch_units >= 1,
            "microbatch_units",
            "must be an integer >= 1",
        )
        need(self.entropy in ENTROPIES, "entropy", f"must be one of {ENTROPIES}")
        need(self.entropy_weighting in WEIGHTINGS, "entropy_weighting", f"must be one of {WEIGHTINGS}")
        need(self.x_estimator in X_ESTIMATORS, "x_estimator", f"must be one of {X_ESTIMATORS}")
        for name, default in (("entropy_weighting", "token-mean"), ("x_estimator", "unbiased")):
            need(
                self.entropy == "sequence" or getattr(self, name) == default,
                name,
                f"applies only with ProbeConfig.entropy='sequence' (ProbeConfig.entropy={self.entropy!r} "
                "counts every response token once, with its exact entropy H_t)",
            )
        need(self.direction in DIRECTIONS, "direction", f"must be one of {DIRECTIONS}")
        need(
            self.loss_aggregation in LOSS_AGGREGATIONS,
            "loss_aggregation",
            f"must be one of {LOSS_AGGREGATIONS}",
        )
        need(
            self.advantage_estimator is None or self.advantage_estimator in ADVANTAGE_ESTIMATORS,
            "advantage_estimator",
            f"must be None or one of {ADVANTAGE_ESTIMATORS}",
        )
        need(self.engine in ENGINES, "engine", f"must be one of {ENGINES}")
        need(isinstance(self.step_in_hook, bool), "step_in_hook", "must be True or False")
        need(
            self.max_grad_norm is None
            or (
                is_number(self.max_grad_norm) and math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0
            ),
            "max_grad_norm",
            "must be a finite number > 0 or None",
        )
        need(
            self.norm_length is None or (is_integer(self.norm_length) and self.norm_length >= 1),
            "norm_length",
            "must be an integer >= 1 or None",
        )
        need(
            self.loss_aggregation != "seq-mean-token-sum-norm" or self.norm_length is not None,
            "norm_length",
            "is required with loss_aggregation='seq-mean-token-sum-norm' (TRL: max_completion_length)",
        )
        alphas = tuple(self.truth_alphas) if isinstance(self.truth_alphas, (list, tuple)) else ()
        need(
            len(alphas) > 0 and all(is_number(a) and math.isfinite(a) for a in alphas),
            "truth_alphas",
            "must be a non-empty sequence of finite numbers (not booleans)",
        )
        object.__setattr__(self, "truth_alphas", tuple(float(a) for a in alphas))  # frozen: set once
        need(isinstance(self.unconditional_se, bool), "unconditional_se", "must be True or False")
        need(isinstance(self.second_order, bool), "second_order", "must be True or False")
        need(isinstance(self.keep_halves, bool), "keep_halves", "must be True or False")
        need(self.lookahead in LOOKAHEADS, "lookahead", f"must be one of {LOOKAHEADS}")
        need(
            self.by_group is None or isinstance(self.by_group, bool),
            "by_group",
            "must be None, True or False",
        )
        need(
            self.groups is None or callable(self.groups), "groups", "must be None or a callable name -> group"
        )
        if self.engine == "jvp" and self.by_group:
            warnings.warn(
                'ProbeConfig: by_group=True runs the E pass on the backward engine, not engine="jvp" '
                "(attribution by group needs one backward per unit); set by_group=None or False to keep jvp",
                UserWarning,
                stacklevel=3,
            )

    @property
    def token_pieces(self) -> bool:
        """Whether E is read through the exact H_t (``token_entropy``): the token-level entropy, and the
        sequence-level "sum" functional, whose numerator it is (``E[sum_t m_t H_t] = E[-S]``). The note's
        ``x_estimator="seed"`` keeps its own sampled-token form."""
        return self.entropy == "token" or (self.entropy_weighting == "sum" and self.x_estimator == "unbiased")

    @property
    def shares_second_order_pass(self) -> bool:
        """second_order through the exact H_t without ``by_group``: the s_n are the first derivatives of the
        nested forward-mode pass that gives the q_n (``forecast.shared_token_pass``), one pass over E. The
        default with ``engine="jvp"`` (forward mode either way, equal to fp32 rounding); with the backward
        engine only when ``by_group=False`` asks for it, so that its call keeps its own s_n."""
        return self.second_order and self.token_pieces and not self.computes_groups

    @property
    def computes_groups(self) -> bool:
        """Whether a call computes ``by_group``: ``by_group``, or by default only where it is free (the
        backward engine; with ``engine="jvp"`` it needs the backward engine's per-unit loop instead)."""
        return self.by_group if self.by_group is not None else self.engine == "backward"

    @property
    def eval_engine(self) -> Engine:
        """The engine the E pass runs: ``engine``, except "backward" when by_group is computed (the jvp
        engine would need one forward-mode pass per group, docs/performance.md)."""
        return "backward" if self.computes_groups else self.engine

    def to_dict(self) -> dict:
        """Every field, JSON-ready: ``groups`` by its qualified name (a function's repr holds its address,
        which differs between processes and would break the DDP agreement check)."""
        out = asdict(self)
        if self.groups is not None:
            f = self.groups
            out["groups"] = (
                f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', type(f).__qualname__)}"
            )
        return out
