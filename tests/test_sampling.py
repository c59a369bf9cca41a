"""``sample_rollouts``: the batches it builds, and that it samples exactly from the policy.

Run: ``PYTHONPATH=src python -m pytest -q tests/test_sampling.py``.

Distribution tests are seeded chi-square goodness-of-fit tests at a fixed significance
``ALPHA = 1e-3``: under the hypothesis "samples come from softmax(logits / T)" the statistic is
chi-square with (cells - 1) degrees of freedom per prompt, so a correct sampler fails with
probability 1e-3 over seeds, and with the seed fixed the outcome is deterministic. Every cell has
an expected count >= 5 (asserted), the usual condition for the chi-square approximation. A negative
control (the same counts against the policy at another temperature) shows each test can fail.
"""

import math

import pytest
import torch
from scipy import stats
from transformers import GPT2Config, GPT2LMHeadModel

from entropy_probe.batch import RolloutBatch
from entropy_probe.logprobs import model_logits, sequence_logprobs, token_logprobs
from entropy_probe.sampling import pure_sampling_config, sample_rollouts
from entropy_probe.toy import EOS, TabularPolicy, default_reward, enumerate_responses

ALPHA = 1e-3


def tiny_gpt2(vocab: int = 6, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=vocab - 1,
    )
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # spread the logits so the distributions are far from uniform
        model.transformer.wte.weight.mul_(3.0)
    return model


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic summed over prompts and its degrees of freedom; counts, probs ``(P, R)``."""
    n = counts.sum(dim=1, keepdim=True).double()
    expected = probs.double() * n  # (P, R)
    assert float(expected.min()) >= 5, "a cell with expected count < 5: raise the sample size"
    stat = float(((counts.double() - expected) ** 2 / expected).sum())
    return stat, counts.shape[0] * (counts.shape[1] - 1)


def assert_same_batch(a: RolloutBatch, b: RolloutBatch) -> None:
    for name in ("input_ids", "attention_mask", "response_mask", "group_ids", "rewards"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ---- batch layout --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make", [lambda: TabularPolicy(seed=1), lambda: tiny_gpt2()], ids=["loop", "generate"]
)
def test_reproducible_and_rng_and_mode_untouched(make):
    model = make()
    model.train()
    prompts, eos = [[1, 2], [2], [1, 1, 2]], (0 if isinstance(model, TabularPolicy) else 5)
    kw = dict(group_size=3, max_new_tokens=3, eos_token_id=eos, reward_fn=lambda p, r: float(len(r)))
    state = torch.get_rng_state()
    a = sample_rollouts(model, prompts, seed=7, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is where it was
    assert all(m.training for m in model.modules())  # train mode restored on every submodule
    assert_same_batch(a, sample_rollouts(model, prompts, seed=7, **kw))
    other = [sample_rollouts(model, prompts, seed=s, **kw).input_ids for s in range(8, 12)]
    assert any(o.shape != a.input_ids.shape or not torch.equal(o, a.input_ids) for o in other)


def test_evaluation_batch_without_reward_fn():
    model, prompts = tiny_gpt2(), [[1, 2], [2]]
    kw = {"group_size": 3, "max_new_tokens": 3, "eos_token_id": 5, "seed": 4}
    scored = sample_rollouts(model, prompts, reward_fn=lambda p, r: 1.0, **kw)
    plain = sample_rollouts(model, prompts, reward_fn=None, **kw)
    assert plain.rewards is None and plain.advantages is None
    for name in ("input_ids", "attention_mask", "response_mask", "group_ids"):  # the same draw, only unscored
        assert torch.equal(getattr(plain, name), getattr(scored, name)), name


def test_left_padding_group_ids_and_rewards():
    model = tiny_gpt2()
    prompts = [[3], [1, 2, 3], [4, 4]]
    seen = []

    def reward(prompt, response):
        seen.append((prompt, response))
        return 10.0 * prompt[0] + len(response)

    b = sample_rollouts(
        model,
        prompts,
        group_size=4,
        max_new_tokens=4,
        eos_token_id=5,
        reward_fn=reward,
        seed=0,
        pad_token_id=0,
    )
    width = 3
    assert b.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for row in range(12):
        p = prompts[row // 4]
        pad = width - len(p)
        assert b.attention_mask[row, :width].tolist() == [0] * pad + [1] * len(p)
        assert b.input_ids[row, :width].tolist() == [0] * pad + p
        assert b.response_mask[row, :width].sum() == 0  # responses start right after the prompt column
        length = int(b.response_mask[row].sum())
        assert b.response_mask[row, width : width + length].all()
        assert float(b.rewards[row]) == 10.0 * p[0] + length  # the reward saw this row's prompt and response
    assert [s[0] for s in seen] == [tuple(prompts[r // 4]) for r in range(12)]


def test_eos_ends_a_response_and_padding_follows():
    model = TabularPolicy(seed=2)
    b = sample_rollouts(
        model,
        [[1], [2, 2]],
        group_size=200,
        max_new_tokens=3,
        eos_token_id=EOS,
        reward_fn=default_reward,
        seed=0,
        pad_token_id=7,
    )
    width = 2
    n_eos = 0
    for ids, attn, resp in zip(b.input_ids.tolist(), b.attention_mask.tolist(), b.response_mask.tolist()):
        body = [t for t, m in zip(ids, resp) if m]
        assert EOS not in body[:-1]  # nothing after the first EOS belongs to the response
        assert body[-1] == EOS or len(body) == 3  # a response without EOS was cut at max_new_tokens
        n_eos += body[-1] == EOS
        after = list(range(width + len(body), len(ids)))
        assert all(attn[t] == 0 and resp[t] == 0 and ids[t] == 7 for t in after)  # padding after EOS
        assert attn[width : width + len(body)] == [1] * len(body)
    assert 0 < n_eos < b.n_sequences  # both cases occurred


def test_a_policy_that_always_stops_gives_one_token_responses():
    model = TabularPolicy(seed=0)
    with torch.no_grad():
        model.table[..., EOS] += 100.0
    b = sample_rollouts(
        model, [[1], [2]], group_size=2, max_new_tokens=3, eos_token_id=EOS, reward_fn=default_reward, seed=0
    )
    assert b.response_lengths.tolist() == [1, 1, 1, 1]
    assert b.input_ids.shape[1] == 2  # no column left over after the longest response


# ---- the sampled distribution is the policy ---------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_loop_samples_the_enumerated_distribution(temperature):
    policy = TabularPolicy(seed=3, scale=0.5)
    resp = enumerate_responses(policy)
    n_resp = len(resp.responses)
    with torch.no_grad():
        probs = torch.exp(resp.seq_logprobs(policy, temperature)).reshape(
            len(policy.prompts), n_resp
        )  # (P, R)
    g = 6000
    b = sample_rollouts(
        policy,
        [list(p) for p in policy.prompts],
        group_size=g,
        max_new_tokens=policy.max_len,
        eos_token_id=EOS,
        reward_fn=default_reward,
        temperature=temperature,
        seed=11,
    )
    index = {r: k for k, r in enumerate(resp.responses)}
    counts = torch.zeros_like(probs)
    for row, (ids, m) in enumerate(zip(b.input_ids.tolist(), b.response_mask.tolist())):
        counts[row // g, index[tuple(t for t, keep in zip(ids, m) if keep)]] += 1
    stat, dof = chi_square(counts, probs)
    assert stats.chi2.sf(stat, dof) > ALPHA, (stat, dof)
    # Negative control: the policy at another temperature is rejected by the same counts.
    with torch.no_grad():
        wrong = torch.exp(resp.seq_logprobs(policy, 1.6 * temperature)).reshape(probs.shape)
    assert stats.chi2.sf(chi_square(counts, wrong)[0], dof) < ALPHA


def all_two_token_responses(vocab: int, eos: int) -> list[tuple[int, ...]]:
    return [(eos,)] + [(a, b) for a in range(vocab) if a != eos for b in range(vocab)]


def test_generate_samples_the_policy_over_whole_responses():
    """max_new_tokens=2: every response can be listed; exact probabilities from sequence_logprobs."""
    vocab, eos, temperature = 6, 5, 1.3
    model = tiny_gpt2(vocab)
    prompts = [[1, 2, 0], [3]]  # different lengths: the second is left-padded
    responses = all_two_token_responses(vocab, eos)
    # Exact probabilities: score every (prompt, response) pair, right-padded (no left padding here,
    # so this is a second, independent layout from the sampler's).
    rows, attn, rmask, gids = [], [], [], []
    width = max(map(len, prompts)) + 2
    for pi, p in enumerate(prompts):
        for r in responses:
            seq = p + list(r)
            rows.append(seq + [0] * (width - len(seq)))
            attn.append([1] * len(seq) + [0] * (width - len(seq)))
            rmask.append([0] * len(p) + [1] * len(r) + [0] * (width - len(seq)))
            gids.append(pi)
    t = lambda x: torch.tensor(x)  # noqa: E731
    exact = RolloutBatch(t(rows), t(attn), t(rmask), t(gids), rewards=torch.zeros(len(rows)))
    with torch.no_grad():
        probs = torch.exp(sequence_logprobs(model, exact, temperature, "sum").seq).reshape(len(prompts), -1)
    assert torch.allclose(probs.sum(dim=1), torch.ones(2), atol=1e-5)  # the list is complete
    g = 6000
    b = sample_rollouts(
        model,
        prompts,
        group_size=g,
        max_new_tokens=2,
        eos_token_id=eos,
        reward_fn=lambda p, r: 0.0,
        temperature=temperature,
        seed=5,
    )
    index = {r: k for k, r in enumerate(responses)}
    counts = torch.zeros_like(probs)
    for row, (ids, m) in enumerate(zip(b.input_ids.tolist(), b.response_mask.tolist())):
        counts[row // g, index[tuple(tok for tok, keep in zip(ids, m) if keep)]] += 1
    stat, dof = chi_square(counts, probs)
    assert stats.chi2.sf(stat, dof) > ALPHA, (stat, dof)
    with torch.no_grad():  # negative control
        wrong = torch.exp(sequence_logprobs(model, exact, 1.0, "sum").seq).reshape(probs.shape)
    assert stats.chi2.sf(chi_square(counts, wrong)[0], dof) < ALPHA


def hub_like_defaults(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """A generation_config like a Hub model's, every field of which would reshape the distribution."""
    g = model.generation_config
    g.do_sample, g.top_k, g.top_p, g.temperature = True, 2, 0.5, 0.3
    g.no_repeat_ngram_size, g.suppress_tokens, g.repetition_penalty, g.min_new_tokens = 1, [0], 1.5, 3
    return model


@pytest.mark.parametrize("defaults", ["blank", "hub-like"])
def test_generate_first_token_matches_softmax_of_the_logits(defaults):
    vocab, eos = 6, 5
    model = tiny_gpt2(vocab, seed=1)
    if defaults == "hub-like":  # the model's own generation defaults must not leak into the sampler
        hub_like_defaults(model)
        before = model.generation_config.to_dict()
    prompts = [[2], [0, 1, 4, 4]]
    g = 4000
    b = sample_rollouts(
        model, prompts, group_size=g, max_new_tokens=1, eos_token_id=eos, reward_fn=lambda p, r: 0.0, seed=9
    )
    counts = torch.stack(
        [torch.bincount(b.input_ids[i * g : (i + 1) * g, -1], minlength=vocab) for i in range(2)]
    )
    with torch.no_grad():  # each prompt alone, unpadded: the sampler's left padding must not matter
        probs = torch.stack(
            [
                torch.softmax(model_logits(model, torch.tensor([p]), torch.ones(1, len(p)))[0, -1], -1)
                for p in prompts
            ]
        )
    stat, dof = chi_square(counts, probs)
    assert stats.chi2.sf(stat, dof) > ALPHA, (stat, dof)
    if defaults == "hub-like":
        assert model.generation_config.to_dict() == before  # put back as it was


def test_generate_is_scored_consistently_by_sequence_logprobs():
    """generate's own per-step scores (KV cache) equal the teacher-forced log-probs of the batch."""
    vocab, eos, temperature = 6, 5, 0.8
    model = tiny_gpt2(vocab, seed=2)
    prompts = [[1, 2, 3], [4], [0, 0]]
    g, new = 3, 5
    b = sample_rollouts(
        model,
        prompts,
        group_size=g,
        max_new_tokens=new,
        eos_token_id=eos,
        reward_fn=lambda p, r: 0.0,
        temperature=temperature,
        seed=3,
    )
    # The same call generate makes, asked for its scores: same seed, so the same sequences.
    ids, attn = b.input_ids[:, :3], b.attention_mask[:, :3]
    torch.manual_seed(3)
    with torch.no_grad():
        out = model.eval().generate(
            input_ids=ids,
            attention_mask=attn,
            generation_config=pure_sampling_config(
                new, eos, eos, temperature, return_dict_in_generate=True, output_scores=True
            ),
        )
    steps = out.sequences.shape[1] - 3
    assert steps == b.input_ids.shape[1] - 3
    resp = b.response_mask.bool()
    assert torch.equal(out.sequences[resp], b.input_ids[resp])
    scores = torch.stack(out.scores, dim=1)  # (N, steps, V): processed logits, logits / T
    gen_lp = (
        torch.log_softmax(scores.float(), -1).gather(-1, out.sequences[:, 3:, None]).squeeze(-1)
    )  # (N, steps)
    with torch.no_grad():
        tf_lp = token_logprobs(model_logits(model, b.input_ids, b.attention_mask), b.input_ids, temperature)[
            :, 3:
        ]
    assert torch.allclose(gen_lp[resp[:, 3:]], tf_lp[resp[:, 3:]], atol=1e-4)
    lp = sequence_logprobs(model, b, temperature, "sum").seq
    assert torch.allclose(lp, (gen_lp * resp[:, 3:]).sum(1), atol=1e-4)


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(group_size=1), "group_size"),
        (dict(prompts=[]), "prompts is empty"),
        (dict(prompts=[[1], []]), r"prompts\[1\]"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(reward_fn=lambda p, r: 1 / 0), "reward_fn raised ZeroDivisionError.*row 0"),
        (dict(reward_fn=lambda p, r: float("nan") if p == (2,) else 0.0), "reward_fn returned nan on row 2"),
        (dict(reward_fn=lambda p, r: math.inf), "reward_fn returned inf on row 0"),
    ],
)
def test_bad_input_is_a_value_error_naming_it(kw, match):
    args = (
        dict(
            prompts=[[1], [2]],
            group_size=2,
            max_new_tokens=2,
            eos_token_id=EOS,
            reward_fn=default_reward,
            seed=0,
        )
        | kw
    )
    with pytest.raises(ValueError, match=match):
        sample_rollouts(TabularPolicy(seed=0), **args)
