"""The token-level entropy's truth and second order (DESIGN sections 6, 12 and 20) against exact enumeration.

Run: ``PYTHONPATH=src pytest -q tests/test_token_truth.py``.

The exact ``H_tok = E_x E_y[sum_t m_t H_t] / E_x E_y[sum_t m_t]`` and its derivatives along v are written
out here in float64 (log_softmax over the enumerated responses of the tabular policy, nested jvp in
the step), sharing no code with the estimator. Statistical assertions are seeded and allow K_SE = 4
standard errors of the mean over the draws (two-sided, a correct estimator fails one seed in 16,000);
the errors they guard against (no importance weights, a baseline that depends on the response, a
wrong sign or a missing factor) move the estimate by many SEs.
"""

from __future__ import annotations

import math

import pytest
import torch

from entropy_probe.engines.token_second_order import eval_token_taylor
from entropy_probe.response_tokens import response_tokens_at
from entropy_probe.token_functional import functional_unit_values, unit_value_derivatives
from entropy_probe.token_truth import token_change, unit_rows
from entropy_probe.toy import TabularPolicy, enumerate_responses, sample_enumerated
from entropy_probe.validation.stats import chi2_ratio_interval

K_SE = 4.0  # two-sided P(|z| > 4) = 6e-5 for a correct estimator
TEMPERATURE = 0.8  # not 1: H_t and l_t must both be taken at the sampling temperature


def _policy() -> TabularPolicy:
    return TabularPolicy(seed=1, scale=2.0)


def _direction(policy: TabularPolicy, seed: int = 3) -> dict[str, torch.Tensor]:
    return {"table": torch.randn(policy.table.shape, generator=torch.Generator().manual_seed(seed))}


def hand_token_entropy(policy: TabularPolicy, table: torch.Tensor, ratio: bool = True) -> torch.Tensor:
    """Exact H_tok at ``table`` by enumeration, float64, differentiable (the definition, written out).
    ``ratio`` False: the numerator ``E_x E_y[sum_t m_t H_t]`` alone (entropy="sequence", "sum")."""
    resp = enumerate_responses(policy)
    logits = torch.func.functional_call(policy, {"table": table}, (resp.input_ids, resp.attention_mask))
    logp = torch.log_softmax(logits[:, :-1].double() / TEMPERATURE, dim=-1)  # (R, T-1, V)
    token = logp.gather(-1, resp.input_ids[:, 1:, None]).squeeze(-1)  # (R, T-1) log pi(y_t | y_<t)
    h = -(logp.exp() * logp).sum(dim=-1)  # (R, T-1) entropy of the distribution that drew y_t
    m = resp.response_mask[:, 1:].double()
    prob = torch.exp((token * m).sum(dim=1)).reshape(len(policy.prompts), -1)  # (P, R_x) pi(y | x)
    numerator = (prob * (m * h).sum(dim=1).reshape(prob.shape)).sum(dim=1).mean()
    denominator = (prob * m.sum(dim=1).reshape(prob.shape)).sum(dim=1).mean()
    return numerator / denominator if ratio else numerator


def exact_along(
    policy: TabularPolicy, v: dict, step: float = 0.0, ratio: bool = True
) -> tuple[float, float, float]:
    """(H_tok, d/dt, d2/dt2) at ``theta + step v`` along v, float64, by nested jvp of the enumeration."""
    table, direction = policy.table.detach().double(), v["table"].double()
    one = torch.ones((), dtype=torch.float64)

    def h(t):
        return hand_token_entropy(policy, table + t * direction, ratio)

    def first(t):
        return torch.func.jvp(h, (t,), (one,))

    (value, d1), (_, d2) = torch.func.jvp(first, (torch.tensor(step, dtype=torch.float64),), (one,))
    return float(value), float(d1), float(d2)


def _draws(values: list[float], ses: list[float], exact: float, what: str) -> None:
    """The mean over independent draws equals ``exact`` within K_SE of its SE, and the per-draw SEs are
    calibrated: var(values) / mean(se^2) inside its chi-square band at the same k."""
    x, se = torch.tensor(values, dtype=torch.float64), torch.tensor(ses, dtype=torch.float64)
    k = len(values)
    se_mean = float(x.std()) / math.sqrt(k)
    z = (float(x.mean()) - exact) / se_mean
    assert abs(z) <= K_SE, f"{what}: mean {float(x.mean()):.6g} vs exact {exact:.6g}, z = {z:.2f}"
    lo, hi = chi2_ratio_interval(k - 1, K_SE)
    ratio = float(x.var()) / float((se * se).mean())
    assert lo <= ratio <= hi, f"{what}: variance ratio {ratio:.3f} outside [{lo:.3f}, {hi:.3f}]"


def test_truth_at_alpha_zero_is_exactly_zero_and_at_a_step_moves():
    policy, v = _policy(), _direction(_policy())
    E = sample_enumerated(policy, 6, seed=2, temperature=TEMPERATURE)
    before = response_tokens_at(policy, None, E, TEMPERATURE, 2)
    same = response_tokens_at(policy, {"table": policy.table + 0.0 * v["table"]}, E, TEMPERATURE, 3)
    c = token_change(E, before, same)
    assert c.delta_h == 0.0 and c.se == 0.0 and c.ess == E.n_sequences
    moved = response_tokens_at(policy, {"table": policy.table + 0.3 * v["table"]}, E, TEMPERATURE, 3)
    c = token_change(E, before, moved)
    assert c.delta_h != 0.0 and c.se > 0.0 and c.ess < E.n_sequences


@pytest.mark.parametrize("ratio", [True, False], ids=["token", "sequence-sum"])
def test_truth_is_unbiased_and_calibrated_over_independent_draws_of_e(ratio):
    """The definition: 400 independent E of 8 units (G = 4) at one fixed step; the truths average to the
    exact change of H_tok (or of its numerator, entropy="sequence" with "sum" weighting) and their spread
    is what their SEs say. One forward over all draws at once."""
    policy, v = _policy(), _direction(_policy())
    step, draws, b = 0.4, 400, 8
    big = sample_enumerated(policy, draws * b, seed=11, temperature=TEMPERATURE)
    before = response_tokens_at(policy, None, big, TEMPERATURE, 10_000)
    after = response_tokens_at(policy, {"table": policy.table + step * v["table"]}, big, TEMPERATURE, 10_000)
    exact = exact_along(policy, v, step, ratio)[0] - exact_along(policy, v, 0.0, ratio)[0]
    rows = unit_rows(big, before, after).reshape(draws, b, 7)  # per-unit rows; the draws are blocks of b

    def change(r):  # one draw's per-unit changes, as token_change forms them
        return functional_unit_values(r[:, 0:2], ratio) - functional_unit_values(r[:, 2:4], ratio)

    per_unit = torch.func.vmap(change)(rows)  # (draws, b)
    values, ses = per_unit.mean(dim=1).tolist(), (per_unit.std(dim=1) / math.sqrt(b)).tolist()
    units = list(range(b))  # the first draw through the public function gives the same numbers
    rows0 = big.rows_of_units(units)
    first = token_change(big.select_units(units), before.rows(rows0), after.rows(rows0), ratio=ratio)
    assert abs(first.delta_h - values[0]) <= 1e-12 and abs(first.se - ses[0]) <= 1e-12
    assert abs(exact) > 10 * float(torch.tensor(ses).mean()) / math.sqrt(draws)  # a change many SEs from 0
    _draws(values, ses, exact, "truth")


@pytest.mark.parametrize("ratio", [True, False], ids=["token", "sequence-sum"])
def test_first_and_second_order_are_unbiased_against_exact_enumeration(ratio):
    """mean s_n and mean q_n over 400 independent E (B_E = 8) against the exact first and second
    derivatives of H_tok along v (nested jvp of the enumeration). The ratio's jackknife leaves an
    O(1/B^2) bias, far below the tolerance here."""
    policy, v = _policy(), _direction(_policy())
    draws, b = 400, 8
    big = sample_enumerated(policy, draws * b, seed=12, temperature=TEMPERATURE)
    params = dict(policy.named_parameters())
    taylor = eval_token_taylor(policy, params, big, v, TEMPERATURE, 10_000)  # (draws * b, 3, 2)
    # every draw's s_n and q_n at once: the draws are independent blocks of b units
    per_draw = torch.func.vmap(lambda t: unit_value_derivatives(t, ratio))
    _, s, q = per_draw(taylor.reshape(draws, b, 3, 2))  # (draws, b) each
    s_mean, q_mean = s.mean(dim=1).tolist(), q.mean(dim=1).tolist()
    s_se, q_se = (s.std(dim=1) / math.sqrt(b)).tolist(), (q.std(dim=1) / math.sqrt(b)).tolist()
    _, d1, d2 = exact_along(policy, v, 0.0, ratio)
    assert abs(d1) > 0.05 and abs(d2) > 0.05  # both derivatives are far from 0 on this policy
    _draws(s_mean, s_se, d1, "s_n")
    _draws(q_mean, q_se, d2, "q_n")


@pytest.mark.parametrize("ratio", [True, False], ids=["token", "sequence-sum"])
def test_truth_minus_forecast_is_the_taylor_remainder_on_the_same_e(ratio):
    """On one E the truth, as a function of alpha, has the s_n and q_n of the second-order pass as its
    derivatives at 0: truth - alpha mean(s) shrinks like alpha^2 and truth - alpha mean(s) -
    alpha^2/2 mean(q) like alpha^3; unit by unit, the SE of truth - alpha s_n shrinks like alpha^2.
    Deterministic given E. With a baseline that changed with alpha, or the self-normalised ratio, the
    first remainder would shrink like alpha (log2 ratio 1) and this test fails."""
    policy, v = _policy(), _direction(_policy())
    E = sample_enumerated(policy, 32, seed=6, temperature=TEMPERATURE)
    taylor = eval_token_taylor(policy, dict(policy.named_parameters()), E, v, TEMPERATURE, 4)
    _, s, q = unit_value_derivatives(taylor, ratio)
    before = response_tokens_at(policy, None, E, TEMPERATURE, 4)
    first, second, se_diff = [], [], []
    alphas = (1 / 16, 1 / 8, 1 / 4)
    for a in alphas:
        after = response_tokens_at(policy, {"table": policy.table + a * v["table"]}, E, TEMPERATURE, 4)
        c = token_change(E, before, after, predicted_per_unit=s, lr=a, ratio=ratio)
        first.append(c.delta_h - a * float(s.mean()))
        second.append(first[-1] - 0.5 * a * a * float(q.mean()))
        se_diff.append(c.se_diff)
    # log2 of the ratio per doubling of alpha is the order of the remainder (measured: first 1.92, 1.82;
    # second 3.05, 3.07; se_diff 1.9-2.0)
    for name, seq, lo, hi in (
        ("first", first, 1.7, 2.3),
        ("second", second, 2.7, 3.3),
        ("se_diff", se_diff, 1.7, 2.3),
    ):
        for small, large in zip(seq, seq[1:]):
            assert lo <= math.log2(large / small) <= hi, (name, seq)


def test_second_order_pass_gives_the_forecast_s_n_unit_by_unit():
    """Two routes to the same per-unit s_n on one E: the forecast's (``engines.token``: coefficients of
    dH_t and dl_t, then ``ratio_statistics.ratio_unit_values``) and the alpha-derivative of the truth's
    estimator (``unit_taylor`` + ``unit_value_derivatives``, nested jvp). They share no formula, so their
    agreement says the truth's derivative at 0 is the forecast, unit by unit. Units of G = 2 and 5."""
    from entropy_probe.engines.jvp import forward_mode_ready
    from entropy_probe.engines.token import directional_token_terms, token_unit_pieces
    from entropy_probe.ratio_statistics import ratio_unit_values as forecast_unit_values

    policy, v = _policy(), _direction(_policy())
    params = dict(policy.named_parameters())
    E = _concat(
        sample_enumerated(policy, 5, group_size=2, seed=7, temperature=TEMPERATURE),
        sample_enumerated(policy, 4, group_size=5, seed=8, temperature=TEMPERATURE),
    )
    with forward_mode_ready(policy):
        pieces = token_unit_pieces(
            directional_token_terms(policy, params, E, v, TEMPERATURE), E, "rao-blackwell"
        )
    s_forecast = forecast_unit_values(
        pieces.d_numerator, pieces.d_denominator, pieces.numerator, pieces.denominator
    )
    taylor = eval_token_taylor(policy, params, E, v, TEMPERATURE, 3)
    torch.testing.assert_close(taylor[:, 0, 0], pieces.numerator, rtol=1e-6, atol=0)
    torch.testing.assert_close(taylor[:, 0, 1], pieces.denominator, rtol=1e-6, atol=0)
    _, s, _ = unit_value_derivatives(taylor)
    torch.testing.assert_close(s, s_forecast, rtol=1e-5, atol=1e-6 * float(s_forecast.abs().max()))
    assert float(s_forecast.std()) > 0.01  # the units differ: a per-unit mismatch would show


def _concat(*batches):
    """One batch from several (same width: the enumerated batches all are), group ids kept apart."""
    from entropy_probe import RolloutBatch

    offset, gids = 0, []
    for b in batches:
        gids.append(b.group_ids + offset)
        offset += int(b.group_ids.max()) + 1
    cat = lambda name: torch.cat([getattr(b, name) for b in batches])  # noqa: E731
    return RolloutBatch(
        cat("input_ids"), cat("attention_mask"), cat("response_mask"), torch.cat(gids), rewards=cat("rewards")
    )
