"""Attribution by parameter group (DESIGN section 13): ``result.by_group``.

Second method: X_n of every unit written out literally (``core_support.brute_force_x``, per-sequence
backward passes, numpy), restricted to each group's slice of the flat parameter vector and dotted
with v there. The default partition is read off real Hugging Face classes built from config.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
from core_support import brute_force_x, random_batch, tiny_gpt2, tiny_llama, trainable

import entropy_probe as ep
from entropy_probe.attribution import default_group, parameter_groups
from entropy_probe.distributed import call_fingerprint, fingerprint_hash

VOCAB = 11


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
        )
    )


@pytest.mark.parametrize("build,layers", [(tiny_gpt2, 2), (tiny_llama, 2), (tiny_qwen2, 3)])
def test_default_groups_partition_hf_models(build, layers):
    """embeddings, one group per block, the final norm with the head; nothing in "other"."""
    model = build()
    names, index = parameter_groups(trainable(model), None)
    assert names == ["embeddings", *[f"block.{i}" for i in range(layers)], "head"]
    assert index.shape == (len(trainable(model)),)
    for pname, g in zip(trainable(model), index.tolist()):
        if ".h." in pname or ".layers." in pname:
            assert names[g] == f"block.{pname.split('.')[2]}", pname
        elif "norm" in pname or "ln_f" in pname or "lm_head" in pname:
            assert names[g] == "head", pname


def group_values_by_hand(model, batch, v, lr, groups):
    """{group: (eta mean_n X_n^(g) . v^(g), eta sd / sqrt(B))} from the literal X_n."""
    params = trainable(model)
    x = brute_force_x(model, batch)  # (B, P) in params order
    flat_v = np.concatenate([v[n].double().reshape(-1).numpy() for n in params])
    owner = np.concatenate([[groups(n)] * p.numel() for n, p in params.items()])
    out = {}
    for g in dict.fromkeys(owner):
        s = x[:, owner == g] @ flat_v[owner == g]  # (B,)
        out[g] = (lr * s.mean(), lr * s.std(ddof=1) / math.sqrt(len(s)))
    return out


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_by_group_against_literal_x_n_and_sums_exactly(build):
    model = build(vocab=VOCAB)
    params = trainable(model)
    gen = torch.Generator().manual_seed(2)
    v = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
    batch = random_batch(5, 3, vocab=VOCAB, seed=3, max_prompt=3, max_response=4)
    lr = 1e-2
    r = ep.EntropyProbe(
        model, config=ep.ProbeConfig(entropy="sequence", lr=lr, unconditional_se=False, engine="backward")
    ).run(eval_batch=batch, direction=v)
    want = group_values_by_hand(model, batch, v, lr, default_group)
    assert list(r.by_group) == list(want)
    scale = max(abs(value) for value, _ in want.values())
    for g, (value, se) in r.by_group.items():
        # fp32 gradients against float64 numpy: 1e-5 of the largest group value (DESIGN section 7's bound)
        assert abs(value - want[g][0]) <= 1e-5 * scale, g
        assert abs(se - want[g][1]) <= 1e-5 * max(s for _, s in want.values()), g
    # the groups split s_n in float64: they add up to delta_h1 to float64 rounding
    total = sum(value for value, _ in r.by_group.values())
    assert abs(total - r.delta_h1) <= 1e-14 * sum(abs(value) for value, _ in r.by_group.values())
    flat = r.to_dict()
    assert flat["entropy_probe/group/block.1"] == r.by_group["block.1"][0]
    assert flat["entropy_probe/group/block.1/se"] == r.by_group["block.1"][1]
    assert all(not isinstance(x, torch.Tensor) for x in flat.values())  # flat and small: no per-unit arrays


def attention_or_mlp(name: str) -> str:
    return "attention" if ".attn." in name or "self_attn" in name else "rest"


def test_custom_groups_replace_the_default():
    model = tiny_gpt2(vocab=VOCAB)
    v = {
        n: torch.randn(p.shape, generator=torch.Generator().manual_seed(4))
        for n, p in trainable(model).items()
    }
    batch = random_batch(4, 3, vocab=VOCAB, seed=5)
    cfg = ep.ProbeConfig(
        entropy="sequence", lr=1e-2, unconditional_se=False, groups=attention_or_mlp, engine="backward"
    )
    r = ep.EntropyProbe(model, config=cfg).run(eval_batch=batch, direction=v)
    want = group_values_by_hand(model, batch, v, 1e-2, attention_or_mlp)
    assert set(r.by_group) == {"attention", "rest"}
    for g, (value, _) in r.by_group.items():
        assert abs(value - want[g][0]) <= 1e-5 * max(abs(x) for x, _ in want.values())


def test_jvp_engine_by_group_on_and_off():
    """Default: off with the jvp engine (it would cost a backward pass); on when asked, same numbers."""
    model = tiny_llama(vocab=VOCAB)
    v = {
        n: torch.randn(p.shape, generator=torch.Generator().manual_seed(6))
        for n, p in trainable(model).items()
    }
    batch = random_batch(4, 3, vocab=VOCAB, seed=7)
    base = ep.ProbeConfig(lr=1e-2, unconditional_se=False, engine="backward")
    off = ep.EntropyProbe(model, config=dataclasses.replace(base, engine="jvp")).run(
        eval_batch=batch, direction=v
    )
    on = ep.EntropyProbe(model, config=dataclasses.replace(base, engine="jvp", by_group=True)).run(
        eval_batch=batch, direction=v
    )
    bwd = ep.EntropyProbe(model, config=base).run(eval_batch=batch, direction=v)
    assert off.by_group is None and "entropy_probe/group/head" not in off.to_dict()
    assert on.by_group == bwd.by_group
    assert abs(off.delta_h1 - bwd.delta_h1) <= 1e-5 * float(bwd.per_unit.abs().max()) * 1e-2


def test_bad_group_function_is_a_clear_error():
    model = tiny_gpt2(vocab=VOCAB)
    cfg = ep.ProbeConfig(lr=1e-2, unconditional_se=False, groups=lambda name: None, by_group=True)
    v = {n: torch.zeros(p.shape) for n, p in trainable(model).items()}
    with pytest.raises(
        ValueError, match="ProbeConfig.groups returned None for parameter 'transformer.wte.weight'"
    ):
        ep.EntropyProbe(model, config=cfg).run(eval_batch=random_batch(2, 3, vocab=VOCAB), direction=v)
    with pytest.raises(ValueError, match="ProbeConfig.groups"):
        ep.ProbeConfig(groups="block")


def test_groups_callable_enters_the_ddp_fingerprint_by_name():
    """A function's repr holds its address, different in every process: the fingerprint uses its name."""
    cfg = ep.ProbeConfig(groups=attention_or_mlp)
    assert cfg.to_dict()["groups"] == f"{__name__}.attention_or_mlp"
    fields = call_fingerprint("run", cfg, 1e-3, None, None, None)
    assert "0x" not in repr(fields["ProbeConfig"])
    assert fingerprint_hash(fields["ProbeConfig"]) != fingerprint_hash(
        call_fingerprint("run", ep.ProbeConfig(), 1e-3, None, None, None)["ProbeConfig"]
    )
