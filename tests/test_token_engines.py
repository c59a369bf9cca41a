"""The token-level pieces from a real model by both engines, and the entropy against the trainers' formula.

- backward (two reverse passes per unit, projected on v) and jvp (forward mode, microbatches of units)
  give the same ``(N_n, D_n, dN_n, dD_n)`` on GPT-2 and Llama, ragged units, left and right padding;
- by parameter group the pieces add up to the whole; the half sums of the surrogates' gradients projected
  on v give back the per-unit derivatives of each half;
- the entropy from the pieces equals ``sum(m H_t) / sum(m)`` over the same rows, written out here from the
  model's logits (log_softmax in float64), to 1e-6 relative; s_n average to the jackknife-corrected ratio.

Run: ``PYTHONPATH=src pytest -q tests/test_token_engines.py``.
"""

from __future__ import annotations

import pytest
import torch
from core_support import random_batch, tiny_gpt2, tiny_llama

from entropy_probe.attribution import parameter_groups
from entropy_probe.distributed import SingleProcess
from entropy_probe.engines.token import backward_token_projections, jvp_token_projections
from entropy_probe.ratio_statistics import ratio_jackknife
from entropy_probe.token_statistics import token_values

VOCAB = 11


def _direction(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}


def trainer_entropy(model, batch, temperature: float) -> float:
    """TRL's logged formula written out: H_t of softmax(logits[t-1] / T) over every response token,
    ``sum(m H) / sum(m)``, float64 from the model's own logits."""
    pos = (batch.attention_mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos)
    logits = logits.logits
    logp = torch.log_softmax(logits.double()[:, :-1] / temperature, dim=-1)  # (N, T-1, V)
    h = -(logp.exp() * logp).sum(-1)
    m = batch.response_mask[:, 1:].double()
    return float((h * m).sum() / m.sum())


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
@pytest.mark.parametrize("side", ["left", "right"])
def test_engines_agree(make, side):
    model = make(seed=0, vocab=VOCAB).eval()
    params = dict(model.named_parameters())
    batch = random_batch(5, group_size=[2, 3, 4, 2, 3], vocab=VOCAB, seed=1, side=side)
    v = _direction(model)
    halves = torch.arange(batch.n_units) % 2
    index = parameter_groups(params, None)[1]
    back = backward_token_projections(model, params, batch, v, 0.8, halves, index)
    fwd = jvp_token_projections(model, params, batch, v, 0.8, microbatch_units=2, halves=halves)
    torch.testing.assert_close(back.pieces, fwd.pieces, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(back.sums, fwd.sums)
    torch.testing.assert_close(back.groups.sum(-1), back.pieces[:, 2:], rtol=1e-10, atol=1e-10)
    assert back.pieces[:, 2:].abs().min() > 1e-6  # v moves every unit's pieces
    for h in (0, 1):  # sum_n in half h of grad(surrogate) . v = sum of that half's dN_n (dD_n)
        for j, x in enumerate((back.x_num[h], back.x_den[h])):
            dot = sum(float((x[n].double() * v[n].double()).sum()) for n in v)
            want = float(back.pieces[halves == h, 2 + j].sum())
            assert abs(dot - want) <= 1e-4 * abs(want) + 1e-6, (h, j)
            for n in v:  # the jvp engine's reverse passes give the same sums
                torch.testing.assert_close(x[n], (fwd.x_num, fwd.x_den)[j][h][n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_is_the_trainers_formula(temperature):
    model = tiny_gpt2(seed=2, vocab=VOCAB).eval()
    params = dict(model.named_parameters())
    batch = random_batch(4, group_size=[2, 3, 4, 2], vocab=VOCAB, seed=3)  # ragged: unit means != pooled
    proj = backward_token_projections(model, params, batch, _direction(model), temperature)
    values = token_values(SingleProcess(), proj, [batch.n_units], ratio=True)
    entropy = float(values.entropy_sum) / batch.n_units  # as eval_statistics reports it
    want = trainer_entropy(model, batch, temperature)
    assert abs(entropy - want) <= 1e-6 * want, (entropy, want)
    n, d, dn, dd = proj.pieces.unbind(1)
    assert abs(float(values.s.double().mean()) - float(ratio_jackknife(dn, dd, n, d))) < 1e-6


def test_sequence_sum_uses_the_numerator_alone():
    model = tiny_gpt2(seed=4, vocab=VOCAB).eval()
    params = dict(model.named_parameters())
    batch = random_batch(3, vocab=VOCAB, seed=5)
    proj = backward_token_projections(model, params, batch, _direction(model), 1.0)
    values = token_values(SingleProcess(), proj, [batch.n_units], ratio=False)
    torch.testing.assert_close(values.s.double(), proj.pieces[:, 2], rtol=1e-6, atol=0.0)
    torch.testing.assert_close(values.entropy_sum, proj.pieces[:, 0].sum())
