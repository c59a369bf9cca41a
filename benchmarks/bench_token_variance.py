"""Variance of the token-level entropy's estimator against the sampled-token one (docs/token_entropy.md).

Both estimate the same derivative of ``H_tok = E[sum_t m_t H_t] / E[sum_t m_t]`` along v on the same
independent draws of B_E units: the Rao-Blackwellised one (exact H_t, pathwise, reward-to-go, baseline per
response index) and the sampled-token one (``-l_t`` for H_t, one score per sequence, sequence-level
leave-one-out baseline), both through the same jackknife-corrected ratio. Reported: the factor
``Var(sampled) / Var(Rao-Blackwellised)`` of the estimate at B_E = 8, the same for the numerator alone
(the sequence-level "sum" functional), the ratio's bias before and after the jackknife correction (in
SDs of one estimate) and the variance ratio ``mean(SE^2) / Var``.

- enumerable: the validation problem (``TabularPolicy``, scale 2, Adam-preconditioned v from U), seeds
  0-2, exact draws, with the exact derivative;
- GPT-2 (random weights, vocab 32, 2 layers, width 32, init std 0.3, random v): responses of up to 16 and
  up to 32 tokens sampled at temperature 1, independent draws (no exact value: the factor only).

    PYTHONPATH=src python benchmarks/bench_token_variance.py --out benchmarks/results/token_variance.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from entropy_probe.sampling import sample_rollouts
from entropy_probe.toy import exact_token_derivative
from entropy_probe.validation.problem import FULL, build_problem
from entropy_probe.validation.token_level import (
    draw_enumerated,
    draw_estimates,
    enumerated_rows,
    parameters_of,
    sampled_rows,
)

UNITS, GROUP = 8, 4


def summary(rb, sampled, exact: float | None) -> dict:
    out = dict(
        factor=float(sampled.jackknife.var() / rb.jackknife.var()),
        factor_numerator=float(sampled.numerator.var() / rb.numerator.var()),
        variance_ratio=float((rb.se**2).mean() / rb.jackknife.var()),
        variance_ratio_sampled=float((sampled.se**2).mean() / sampled.jackknife.var()),
        draws=rb.jackknife.numel(),
    )
    if exact is not None:
        sd = float(rb.jackknife.std())
        out.update(
            exact=exact,
            bias_jackknife_sd=(float(rb.jackknife.mean()) - exact) / sd,
            bias_plug_in_sd=(float(rb.plug_in.mean()) - exact) / float(rb.plug_in.std()),
            se_of_bias_sd=1.0 / rb.jackknife.numel() ** 0.5,
        )
    return out


def enumerable(seed: int, draws: int) -> dict:
    problem = build_problem(seed, FULL)
    rows = enumerated_rows(problem.policy, problem.v)
    index = draw_enumerated(rows.prob, draws, UNITS, GROUP, seed=seed)
    rb, sampled = (draw_estimates(rows, index, UNITS, GROUP, e) for e in ("rao-blackwell", "sampled"))
    return summary(rb, sampled, exact_token_derivative(problem.policy, problem.v))


def gpt2(max_new_tokens: int, draws: int) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=32, n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [
        tuple(torch.randint(1, 32, (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen).tolist())
        for _ in range(draws * UNITS)
    ]
    batch = sample_rollouts(model, prompts, GROUP, max_new_tokens, 0, None, seed=2)
    params = parameters_of(model)
    v = {n: torch.randn(p.shape, generator=gen) * p.detach().abs().mean() for n, p in params.items()}
    rows = sampled_rows(model, batch, v, 1.0)
    index = torch.arange(batch.n_sequences)  # draw k = units 8k..8k+7, each unit its own prompt
    rb, sampled = (draw_estimates(rows, index, UNITS, GROUP, e) for e in ("rao-blackwell", "sampled"))
    lengths = batch.response_lengths.float()
    return dict(
        summary(rb, sampled, None),
        max_new_tokens=max_new_tokens,
        mean_length=float(lengths.mean()),
        share_at_max=float((lengths == max_new_tokens).float().mean()),
        token_entropy=float(rows.d.terms.entropy.sum() / rows.d.terms.mask.sum()),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/token_variance.json")
    p.add_argument("--draws", type=int, default=2000, help="draws of B_E = 8 units, enumerable policy")
    p.add_argument("--gpt2-draws", type=int, default=400, help="draws of B_E = 8 units, GPT-2")
    args = p.parse_args()
    start = time.perf_counter()
    record = dict(units=UNITS, group_size=GROUP, torch=torch.__version__)
    record["enumerable"] = {str(seed): enumerable(seed, args.draws) for seed in (0, 1, 2)}
    record["gpt2"] = {str(n): gpt2(n, args.gpt2_draws) for n in (16, 32)}
    record["runtime_s"] = time.perf_counter() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
