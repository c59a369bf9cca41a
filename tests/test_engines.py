"""The "jvp" engine against the "backward" engine (the note's loop), and the probe state around it.

Two methods, one quantity: forward mode gives s_n = sum_i a_i dS_i + e_i dS_w,i from one pass per
microbatch; reverse mode gives X_n by one backward per unit and dots it with v. In fp32 they agree
to 1e-5 relative (DESIGN section 7), measured in the max norm over units: rounding differs only in
the order of the sums, ~1e-7 per op, far below 1e-5 for these depths. Run with
``PYTHONPATH=src python -m pytest -q -n 2 tests/test_engines.py``.
"""

import warnings

import pytest
import torch
from core_support import random_batch, tiny_gpt2, tiny_llama, trainable

import entropy_probe as ep
from entropy_probe.batch import RolloutBatch
from entropy_probe.config import ProbeConfig
from entropy_probe.engines import backward, jvp
from entropy_probe.engines.jvp import directional_logprobs, forward_mode_ready
from entropy_probe.logprobs import sequence_logprobs
from entropy_probe.toy import TabularPolicy, sample_enumerated
from entropy_probe.vectors import dot, grad_of

VOCAB = 48
RTOL = 1e-5  # DESIGN section 7


def tiny_model(kind: str) -> torch.nn.Module:
    """A two-layer HF causal LM from config (no download)."""
    return (tiny_gpt2 if kind == "gpt2" else tiny_llama)(seed=0, vocab=VOCAB)


def padded_batch(n_units: int, group: int, padding: str, seed: int) -> RolloutBatch:
    """Prompts of 1..4 and responses of 1..6 tokens, padded on the ``padding`` side (same rows each side)."""
    return random_batch(n_units, group, vocab=VOCAB, seed=seed, side=padding, max_prompt=4, max_response=6)


def random_direction(params) -> dict:
    gen = torch.Generator().manual_seed(1)
    return {name: torch.randn(p.shape, generator=gen) for name, p in params.items()}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max-norm relative error of a vector."""
    return float((got - want).abs().max() / want.abs().max())


def vector_rel_err(got: dict, want: dict) -> float:
    """Max-norm relative error of a parameter-shaped vector, over all its parameters at once."""
    num = max(float((got[n] - want[n]).abs().max()) for n in want)
    return num / max(float(want[n].abs().max()) for n in want)


def assert_engines_agree(model, batch, microbatch_units: int, temperature: float = 0.9):
    """Both engines, both weightings, both estimators: s_n, S_i, S_w,i and sum_n X_n agree."""
    params = trainable(model)
    v = random_direction(params)
    for weighting in ("token-mean", "sum"):
        for estimator in ("unbiased", "seed"):
            cfg = ProbeConfig(
                entropy="sequence",
                temperature=temperature,
                entropy_weighting=weighting,
                x_estimator=estimator,
                microbatch_units=microbatch_units,
            )
            halves = torch.arange(batch.n_units) % 2  # the two halves of E that se_total projects on
            bwd = backward.eval_projections(model, params, batch, v, cfg, halves)
            fwd = jvp.eval_projections(model, params, batch, v, cfg, halves)
            assert fwd.s.shape == (batch.n_units,)
            assert rel_err(fwd.s, bwd.s) <= RTOL, (weighting, estimator, fwd.s, bwd.s)
            assert rel_err(fwd.seq_logprob, bwd.seq_logprob) <= RTOL
            assert rel_err(fwd.weighted, bwd.weighted) <= RTOL
            for h in (0, 1):
                assert vector_rel_err(fwd.x_half[h], bwd.x_half[h]) <= RTOL, (weighting, estimator, h)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_engines_agree_on_hf_models(kind, padding):
    model = tiny_model(kind).eval()
    # 5 units in microbatches of 2: the last microbatch is short, rows are regrouped per unit.
    assert_engines_agree(model, padded_batch(n_units=5, group=3, padding=padding, seed=2), microbatch_units=2)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_jvp_sees_padding_sides_alike(kind):
    """The same sequences padded left or right give the same s_n: positions come from the mask."""
    model = tiny_model(kind).eval()
    params = trainable(model)
    v = random_direction(params)
    cfg = ProbeConfig(microbatch_units=3)
    left = jvp.eval_projections(model, params, padded_batch(4, 3, "left", seed=5), v, cfg)
    right = jvp.eval_projections(model, params, padded_batch(4, 3, "right", seed=5), v, cfg)
    assert rel_err(left.s, right.s) <= RTOL


def test_engines_agree_on_tabular_policy():
    policy = TabularPolicy(seed=3)
    batch = sample_enumerated(policy, n_units=7, group_size=4, seed=4)
    assert_engines_agree(policy, batch, microbatch_units=3, temperature=1.0)


def test_tangent_takes_the_parameter_dtype():
    """A float64 policy with the probe's fp32 direction: the tangent is cast, the engines agree."""
    policy = TabularPolicy(seed=3).double()
    batch = sample_enumerated(policy, n_units=5, group_size=3, seed=6)
    assert_engines_agree(policy, batch, microbatch_units=2, temperature=1.0)


def test_per_sequence_derivatives_match_a_backward():
    """d_seq and d_weighted are grad S_i . v and grad S_w,i . v: one backward of sum_i r_i S_i gives
    sum_i r_i dS_i for random weights r (a second method, one pass for all rows at once)."""
    model = tiny_model("llama").eval()
    params = trainable(model)
    v = random_direction(params)
    batch = padded_batch(3, 4, "left", seed=7)
    with forward_mode_ready(model):
        lp = directional_logprobs(model, params, batch, v, ProbeConfig())
    r = torch.randn(batch.n_sequences, generator=torch.Generator().manual_seed(8))
    for got, field in ((lp.d_seq, "seq"), (lp.d_weighted, "weighted")):
        surrogate = getattr(sequence_logprobs(model, batch, 1.0, "token-mean"), field)
        want = dot(grad_of((r * surrogate).sum(), params), v)
        # sum_i |r_i dS_i| bounds the rounding of the sum; the relative error is taken against it.
        assert abs(float((r * got).sum() - want)) <= RTOL * float((r * got).abs().sum())


def test_probe_run_engines_agree():
    """EntropyProbe.run: delta_h1, SE, jackknife, se_total (the X half sums of the jvp engine) agree."""
    model = tiny_model("gpt2")
    update, evaluation = padded_batch(4, 3, "left", seed=10), padded_batch(6, 3, "left", seed=11)
    results = {}
    for engine in ("backward", "jvp"):
        cfg = ep.ProbeConfig(entropy="sequence", lr=1e-3, direction="sgd", engine=engine, microbatch_units=4)
        results[engine] = ep.EntropyProbe(model, config=cfg).run(update, evaluation)
    bwd, jvp = results["backward"], results["jvp"]
    assert rel_err(jvp.per_unit, bwd.per_unit) <= RTOL
    # delta_h1 = lr * mean(s) may cancel, so its bound is lr * max|ds| <= lr * RTOL * max|s|; an SE is
    # lr * std(s) / sqrt(B) and |std(s) - std(s')| <= std(s - s') <= max|ds| sqrt(B / (B - 1)).
    scale, n = 1e-3 * RTOL * float(bwd.per_unit.abs().max()), bwd.n_eval_units
    assert abs(jvp.delta_h1 - bwd.delta_h1) <= scale
    for field in ("se_cond_e", "se_jackknife"):
        assert abs(getattr(jvp, field) - getattr(bwd, field)) <= scale / (n - 1) ** 0.5, field
    for field in ("se_total", "var_update", "entropy"):
        assert abs(getattr(jvp, field) - getattr(bwd, field)) <= RTOL * abs(getattr(bwd, field)), field
    # se_total really includes the U term projected on the jvp engine's X half sums.
    assert abs(jvp.var_update) > 1e-3 * jvp.var_cond_e


def test_gradient_checkpointing_survives_and_works():
    """A checkpointed HF model in train mode: the jvp probe runs, and afterwards checkpointing, its
    input hook, the train mode, the parameters and .grad are as the caller left them."""
    model = tiny_model("gpt2").train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable is a deprecated alias
        model.gradient_checkpointing_enable()
    hook_ids = [h.id for h in model._require_grads_hooks]
    embedding_hooks = list(model.get_input_embeddings()._forward_hooks.items())
    assert hook_ids and all(i in dict(embedding_hooks) for i in hook_ids)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    evaluation = padded_batch(4, 3, "right", seed=12)
    v = random_direction(trainable(model))
    results = {}
    for engine in ("backward", "jvp"):
        cfg = ep.ProbeConfig(entropy="sequence", lr=1e-3, engine=engine, microbatch_units=3)
        results[engine] = ep.EntropyProbe(model, config=cfg).run(eval_batch=evaluation, direction=v)
    assert rel_err(results["jvp"].per_unit, results["backward"].per_unit) <= RTOL
    assert model.is_activation_checkpointing and model.training
    assert list(model.get_input_embeddings()._forward_hooks.items()) == embedding_hooks
    assert [h.id for h in model._require_grads_hooks] == hook_ids
    # The hook still fires: the embeddings' output requires grad although no input does.
    assert model.get_input_embeddings()(evaluation.input_ids).requires_grad
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None, n


def test_hooks_restored_after_an_error():
    """A bad batch raises ValueError inside the pass; the lifted hook is back all the same."""
    model = tiny_model("llama").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    embedding_hooks = list(model.get_input_embeddings()._forward_hooks.items())
    params = trainable(model)
    batch = padded_batch(2, 2, "left", seed=13)
    with torch.no_grad():
        model.lm_head.weight[3] = float("nan")  # every logit row gets a NaN entry
    with pytest.raises(ValueError, match=r"model logits are not finite for response 0 of unit"):
        jvp.eval_projections(
            model,
            params,
            batch,
            random_direction(params),
            ProbeConfig(entropy="sequence", microbatch_units=2, entropy_weighting="sum"),
        )
    assert list(model.get_input_embeddings()._forward_hooks.items()) == embedding_hooks
