"""The checks of ``entropy-probe validate`` for the second order and the attribution (docs/design.md
sections 8 and 9).

- delta_h2 unbiased: the mean of delta_h2 over the K shards of ``run_shards`` against the exact
  ``(eta^2/2) v^T grad^2 H v`` (float64 double backward through the enumerated entropy), both weightings;
- the order of the error: on a log-log fit over small alpha, ``|H(theta + alpha eta v) - H - forecast|``
  falls with slope 3 for ``forecast = alpha eta Dh + (alpha eta)^2/2 D2h`` and slope 2 for the first
  order alone. Deterministic, in float64 (fp32 rounding, ~1e-7 nats, would swamp the cubic term);
  the forecast here is the probe's expectation, whose terms the unbiasedness checks pin down;
- by_group sums exactly to delta_h1, on a tiny GPT-2 built from config (the tabular policy has one
  parameter tensor, hence one group).
"""

from __future__ import annotations

import math

import torch

from ..batch import RolloutBatch
from ..config import ProbeConfig
from ..probe import EntropyProbe
from ..toy import exact_directional_derivatives, exact_entropy_f64
from .problem import Check, Problem
from .stats import fit_slope

ORDER_ALPHAS = tuple(2.0**-j for j in range(8, 2, -1))  # 1/256 ... 1/8: the asymptotic regime


def exact_second_terms(problem: Problem, weighting: str) -> tuple[float, float]:
    """``(eta Dh, (eta^2/2) D2h)`` exactly, float64."""
    d1, d2 = exact_directional_derivatives(problem.policy, problem.v, weighting)
    return problem.lr * d1, 0.5 * problem.lr**2 * d2


def order_check(problem: Problem) -> Check:
    """Slopes of log |truth - forecast| against log alpha: first order ~2, with the second-order term ~3.

    Taylor: the first-order error is (alpha eta)^2/2 D2h + O(alpha^3), the second-order one
    (alpha eta)^3/6 D3h + O(alpha^4); over 1/256 <= alpha <= 1/8 the next terms move the fitted slope by
    O(alpha). The check passes when each slope is nearer its order than either neighbouring order
    (|slope - p| < 1/2), the decision between the hypotheses "order p" and "order p -+ 1".
    """
    h1, h2 = exact_second_terms(problem, "token-mean")
    table, v = problem.policy.table.detach().double(), problem.v["table"].double()
    with torch.no_grad():
        h0 = float(exact_entropy_f64(problem.policy, table))
        truth = [
            float(exact_entropy_f64(problem.policy, table + a * problem.lr * v)) - h0 for a in ORDER_ALPHAS
        ]
    err1 = [abs(t - a * h1) for a, t in zip(ORDER_ALPHAS, truth)]
    err2 = [abs(t - a * h1 - a * a * h2) for a, t in zip(ORDER_ALPHAS, truth)]
    x = [math.log(a) for a in ORDER_ALPHAS]
    zeros = [0.0] * len(x)
    slope1 = fit_slope(x, [math.log(e) for e in err1], zeros).slope
    slope2 = fit_slope(x, [math.log(e) for e in err2], zeros).slope
    passed = abs(slope1 - 2.0) < 0.5 and abs(slope2 - 3.0) < 0.5
    return Check(
        "order: |truth - forecast| vs alpha (log-log)",
        passed,
        f"slope {slope2:.2f} (2nd order), {slope1:.2f} (1st)",
        "3 -+ 0.5, 2 -+ 0.5",
        dict(
            alphas=list(ORDER_ALPHAS),
            error_first=err1,
            error_second=err2,
            slope_first=slope1,
            slope_second=slope2,
            eta_dh=h1,
            half_eta2_d2h=h2,
        ),
    )


def forecast_at_full_step(problem: Problem, forecasts: list[float], delta_h1: list[float]) -> dict:
    """Figures, not a check: the mean forecasts over the shards against the exact change at alpha = 1."""
    table, v = problem.policy.table.detach().double(), problem.v["table"].double()
    with torch.no_grad():
        exact = float(
            exact_entropy_f64(problem.policy, table + problem.lr * v)
            - exact_entropy_f64(problem.policy, table)
        )
    n = len(forecasts)
    mean2, mean1 = sum(forecasts) / n, sum(delta_h1) / n
    return dict(
        exact_change=exact,
        mean_forecast=mean2,
        mean_delta_h1=mean1,
        truth_over_forecast=exact / mean2,
        truth_over_delta_h1=exact / mean1,
    )


def by_group_check(seed: int) -> Check:
    """``sum_g delta_h1_g == delta_h1`` to float64 rounding on a 2-layer GPT-2 (groups: embeddings,
    block.0, block.1, head), and each group's SE is finite."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=16,
                n_positions=16,
                n_embd=16,
                n_layer=2,
                n_head=2,
                bos_token_id=None,
                eos_token_id=None,
            )
        )
    n_units, g, length = 6, 4, 8
    ids = torch.randint(0, 16, (n_units * g, length), generator=gen)
    resp = torch.zeros_like(ids)
    resp[:, 3:] = 1
    batch = RolloutBatch(
        ids,
        torch.ones_like(ids),
        resp,
        torch.arange(n_units).repeat_interleave(g),
        rewards=torch.rand(n_units * g, generator=gen),
    )
    v = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    r = EntropyProbe(model, config=ProbeConfig(lr=1e-3, unconditional_se=False, by_group=True)).run(
        eval_batch=batch, direction=v
    )
    total = sum(value for value, _ in r.by_group.values())
    scale = sum(abs(value) for value, _ in r.by_group.values())
    bound = 8 * len(r.by_group) * 2.0**-52 * scale  # float64 rounding of a sum of the group means
    gap = abs(total - r.delta_h1)
    passed = gap <= bound and all(math.isfinite(se) for _, se in r.by_group.values())
    return Check(
        "by_group sums to delta_h1",
        passed,
        f"|sum - dH1| = {gap:.1e} ({len(r.by_group)} groups)",
        f"<= {bound:.1e}",
        dict(by_group=r.by_group, delta_h1=r.delta_h1),
    )
