"""Bad input gets a ValueError that names the field (or call) and the offending unit or row.

Every case is data: what to break, and a regex the message must match. Nothing may pass silently
or surface later as a NaN. Run: ``PYTHONPATH=src pytest -q tests/test_core_bad_input.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from core_support import TinyLM, random_batch
from torch import nn

import entropy_probe as ep
from entropy_probe import RolloutBatch

# 4 sequences, 2 units (group ids 7 and 3), left-padded row 2
IDS = torch.tensor([[5, 1, 2], [5, 2, 1], [0, 6, 1], [6, 2, 2]])
ATTN = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1]])
RESP = torch.tensor([[0, 1, 1], [0, 1, 1], [0, 0, 1], [0, 1, 1]])
GROUPS = torch.tensor([7, 7, 3, 3])
REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.25])


def batch_with(**change) -> RolloutBatch:
    fields = dict(input_ids=IDS, attention_mask=ATTN, response_mask=RESP, group_ids=GROUPS, rewards=REWARDS)
    fields.update(change)
    return RolloutBatch(**fields)


def _row(t: torch.Tensor, row: int, values) -> torch.Tensor:
    t = t.clone()
    t[row] = torch.as_tensor(values, dtype=t.dtype)
    return t


BATCH_CASES = [
    (
        "attention_mask shape",
        dict(attention_mask=ATTN[:, :2]),
        r"RolloutBatch\.attention_mask has shape \(4, 2\), "
        r"expected \(4, 3\)",
    ),
    ("response_mask shape", dict(response_mask=RESP[:3]), r"RolloutBatch\.response_mask has shape \(3, 3\)"),
    (
        "group_ids shape",
        dict(group_ids=GROUPS[:3]),
        r"RolloutBatch\.group_ids has shape \(3,\), expected \(4,\)",
    ),
    (
        "rewards shape",
        dict(rewards=torch.zeros(5)),
        r"RolloutBatch\.rewards has shape \(5,\), expected \(4,\)",
    ),
    ("advantages shape", dict(advantages=torch.zeros(4, 1)), r"RolloutBatch\.advantages has shape \(4, 1\)"),
    ("input_ids 1-D", dict(input_ids=IDS[0]), r"RolloutBatch\.input_ids must be \(N, T\)"),
    ("input_ids float", dict(input_ids=IDS.float()), r"RolloutBatch\.input_ids must hold integer token ids"),
    ("input_ids list", dict(input_ids=IDS.tolist()), r"RolloutBatch\.input_ids must be a torch\.Tensor"),
    (
        "negative token",
        dict(input_ids=_row(IDS, 2, [0, -1, 1])),
        r"RolloutBatch\.input_ids: row 2 has a negative",
    ),
    (
        "mask not 0/1",
        dict(attention_mask=_row(ATTN, 1, [1, 2, 1])),
        r"RolloutBatch\.attention_mask: row 1 holds",
    ),
    (
        "response on padding",
        dict(response_mask=_row(RESP, 2, [1, 0, 1])),
        r"RolloutBatch\.response_mask: row 2 marks",
    ),
    (
        "response at position 0",
        dict(response_mask=_row(RESP, 3, [1, 1, 1])),
        r"RolloutBatch\.response_mask: row 3 marks position 0",
    ),
    (
        "empty response leaves a unit of one",
        dict(response_mask=_row(RESP, 1, [0, 0, 0])),
        r"RolloutBatch\.group_ids: unit 7 has 1 response\(s\) \(1 row\(s\) with an empty response",
    ),
    (
        "every response empty",
        dict(response_mask=torch.zeros_like(RESP)),
        r"RolloutBatch\.response_mask: every row has an empty response",
    ),
    (
        "response after padding",
        dict(attention_mask=_row(ATTN, 0, [1, 0, 1]), response_mask=_row(RESP, 0, [0, 0, 1])),
        r"RolloutBatch\.response_mask: row 0 has a response token right after padding",
    ),
    (
        "unit of one response",
        dict(group_ids=torch.tensor([7, 7, 7, 9])),
        r"RolloutBatch\.group_ids: unit 9 has 1 response",
    ),
    ("float group ids", dict(group_ids=GROUPS.float()), r"RolloutBatch\.group_ids must be integers"),
    ("nan reward", dict(rewards=_row(REWARDS, 3, math.nan)), r"RolloutBatch\.rewards: row 3 is nan"),
    ("inf reward", dict(rewards=_row(REWARDS, 0, math.inf)), r"RolloutBatch\.rewards: row 0 is inf"),
    (
        "nan advantage",
        dict(rewards=None, advantages=_row(REWARDS, 2, math.nan)),
        r"RolloutBatch\.advantages: row 2 is nan",
    ),
    (
        "integer rewards",
        dict(rewards=torch.tensor([1, 0, 1, 0])),
        r"RolloutBatch\.rewards must be a floating",
    ),
]


@pytest.mark.parametrize("change,match", [c[1:] for c in BATCH_CASES], ids=[c[0] for c in BATCH_CASES])
def test_bad_rollout_batch(change, match):
    with pytest.raises(ValueError, match=match):
        batch_with(**change)


CONFIG_CASES = [
    ("lr", 0.0),
    ("lr", -1e-3),
    ("lr", math.nan),
    ("lr", math.inf),
    ("temperature", 0.0),
    ("temperature", math.nan),
    ("microbatch_units", 0),
    ("microbatch_units", 1.5),
    ("entropy_weighting", "mean"),
    ("x_estimator", "note"),
    ("direction", "adam"),
    ("loss_aggregation", "mean"),
    ("advantage_estimator", "ppo"),
    ("engine", "forward"),
    ("max_grad_norm", 0.0),
    ("max_grad_norm", math.inf),
    ("norm_length", 0),
    ("truth_alphas", ()),
    ("truth_alphas", (1.0, math.nan)),
]


@pytest.mark.parametrize("field,value", CONFIG_CASES, ids=[f"{f}={v!r}" for f, v in CONFIG_CASES])
def test_bad_probe_config(field, value):
    with pytest.raises(ValueError, match=rf"ProbeConfig\.{field}"):
        ep.ProbeConfig(**{field: value})


# ---- the probe's own inputs ---------------------------------------------------------------------------
class NaNRow(nn.Module):
    """TinyLM whose logits are NaN (or inf) at one position of the rows holding a marker token."""

    def __init__(self, marker: int, value: float = math.nan, at_padding: bool = False):
        super().__init__()
        self.lm, self.marker, self.value, self.at_padding = TinyLM(seed=0), marker, value, at_padding

    def forward(self, input_ids, attention_mask, position_ids=None):
        logits = self.lm(input_ids, attention_mask, position_ids)
        if self.at_padding:  # poison every padding position (the probe must ignore them)
            return torch.where(attention_mask.bool()[..., None], logits, torch.full_like(logits, self.value))
        hit = (input_ids == self.marker).any(dim=1)  # (N,)
        poisoned = logits.clone()
        poisoned[hit, -1] = self.value
        return poisoned


def _marked_batch(unit: int, response: int, marker: int = 6, n_units: int = 3) -> RolloutBatch:
    """A left-padded batch where only ``response`` of ``unit`` holds the marker token."""
    b = random_batch(n_units, group_size=3, vocab=6, seed=4)  # tokens 0..5: the marker 6 appears nowhere
    ids = b.input_ids.clone()
    row = [i for i, u in enumerate(b.unit_index.tolist()) if u == unit][response]
    ids[row, -1] = marker  # the last position is a real response token (left padding)
    return RolloutBatch(ids, b.attention_mask, b.response_mask, b.group_ids, rewards=b.rewards)


@pytest.mark.parametrize("where", ["update", "eval"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_logits_name_the_unit_and_response(where, value):
    model = NaNRow(marker=6, value=value)
    bad = _marked_batch(unit=2, response=1)  # group id 100 + 7 * 2 = 114
    good = random_batch(3, vocab=6, seed=5)
    probe = ep.EntropyProbe(model, config=ep.ProbeConfig(lr=1e-2, direction="sgd", microbatch_units=2))
    with pytest.raises(ValueError, match=r"logits are not finite for response 1 of unit 114"):
        probe.run(bad, good) if where == "update" else probe.run(good, bad)


def test_non_finite_logits_at_padding_are_ignored():
    """Padding logits may hold anything (masked attention can give inf): no error, no NaN."""
    model = NaNRow(marker=6, value=-math.inf, at_padding=True)
    u, e = random_batch(3, vocab=6, seed=1), random_batch(3, vocab=6, seed=2)
    assert (e.attention_mask == 0).any()
    r = ep.EntropyProbe(model, config=ep.ProbeConfig(lr=1e-2, direction="sgd")).run(u, e)
    assert math.isfinite(r.delta_h1) and math.isfinite(r.se_total) and r.delta_h1 != 0


def _probe(model=None, optimizer=None, **cfg):
    model = model or TinyLM(seed=0)
    return ep.EntropyProbe(model, optimizer, ep.ProbeConfig(**({"lr": 1e-2} | cfg)))


def _v(model, **change):
    v = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    v.update(change)
    return {k: t for k, t in v.items() if t is not None}


U = random_batch(3, seed=1)
E = random_batch(3, seed=2)
M = TinyLM(seed=0)

PROBE_CASES = [
    (
        "direction missing a name",
        lambda: _probe(M).run(eval_batch=E, direction=_v(M, **{"head.bias": None})),
        r"direction does not match the model's trainable parameters: missing \['head\.bias'\], unknown \[\]",
    ),
    (
        "direction with an unknown name",
        lambda: _probe(M).run(eval_batch=E, direction=_v(M, extra=torch.zeros(2))),
        r"direction does not match .*missing \[\], unknown \['extra'\]",
    ),
    (
        "direction of the wrong shape",
        lambda: _probe(M).run(eval_batch=E, direction=_v(M, tok=torch.zeros(7, 9))),
        r"direction\['tok'\] has shape \(7, 9\), the parameter has \(7, 8\)",
    ),
    (
        "direction not finite",
        lambda: _probe(M).run(eval_batch=E, direction=_v(M, pos=torch.full((16, 8), math.nan))),
        r"direction\['pos'\] is not finite",
    ),
    (
        "direction not a dict",
        lambda: _probe(M).run(eval_batch=E, direction=[torch.zeros(1)]),
        r"direction must be a dict",
    ),
    (
        "optimizer holds a foreign parameter",
        lambda: _probe(M, torch.optim.Adam([M.tok, nn.Parameter(torch.zeros(3))])).run(U, E),
        r"optimizer\.param_groups\[0\]\['params'\]\[1\] \(shape \(3,\)\) "
        r"is not a trainable parameter of the model",
    ),
    (
        "optimizer foreign parameter in group 1",
        lambda: _probe(
            M,
            torch.optim.AdamW([{"params": [M.tok]}, {"params": [M.pos, nn.Parameter(torch.zeros(2))]}]),
            direction="optimizer-step",
        ).update_direction(U),
        r"optimizer\.param_groups\[1\]\['params'\]\[1\]",
    ),
    (
        "maximize=True",
        lambda: _probe(M, torch.optim.Adam(M.parameters(), maximize=True)).run(U, E),
        r"optimizer\.param_groups\[0\] has maximize=True",
    ),
    (
        "optimizer-step without an optimizer",
        lambda: _probe(M, direction="optimizer-step").run(U, E),
        r"direction='optimizer-step' needs an optimizer",
    ),
    (
        "optimizer-step with SGD",
        lambda: _probe(M, torch.optim.SGD(M.parameters(), lr=0.1), direction="optimizer-step").run(U, E),
        r"direction='optimizer-step' supports torch\.optim\.Adam and AdamW; got SGD",
    ),
    (
        "given advantages missing",
        lambda: _probe(M, advantage_estimator="given").run(U, E),
        r"advantage_estimator='given' needs RolloutBatch\.advantages",
    ),
    (
        "rewards missing",
        lambda: _probe(M, advantage_estimator="rloo").run(random_batch(2, advantages=True), E),
        r"advantage_estimator='rloo' needs RolloutBatch\.rewards",
    ),
    (
        "update batch without rewards or advantages",
        lambda: _probe(M).run(batch_with(rewards=None), E),
        r"update_batch: the RolloutBatch has neither rewards",
    ),
    ("no eval batch", lambda: _probe(M).run(U), r"run: eval_batch is required"),
    ("update batch and direction", lambda: _probe(M).run(U, E, direction=_v(M)), r"run: give exactly one of"),
    ("neither update batch nor direction", lambda: _probe(M).run(eval_batch=E), r"run: give exactly one of"),
    (
        "eval batch of the wrong type",
        lambda: _probe(M).run(U, {"input_ids": 1}),
        r"run: eval_batch must be an entropy_probe\.RolloutBatch, got dict",
    ),
    ("update batch of the wrong type", lambda: _probe(M).run((1, 2), E), r"run: update_batch must be"),
    (
        "no lr anywhere",
        lambda: ep.EntropyProbe(M, None, ep.ProbeConfig()).run(U, E),
        r"ProbeConfig\.lr is None and no optimizer",
    ),
    (
        "no trainable parameter",
        lambda: _probe(TinyLM().requires_grad_(False)).run(U, E),
        r"the model has no parameter with requires_grad=True",
    ),
    ("logits of the wrong shape", lambda: _probe(_Flat()).run(U, E), r"model logits have shape \(\d+, 7\)"),
    (
        "model output without logits",
        lambda: _probe(_NoLogits()).run(U, E),
        r"model returned dict; expected logits",
    ),
]


class _Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.lm = TinyLM()

    def forward(self, input_ids, attention_mask, position_ids=None):
        return self.lm(input_ids, attention_mask, position_ids).sum(1)  # (N, V): not (N, T, V)


class _NoLogits(_Flat):
    def forward(self, input_ids, attention_mask, position_ids=None):
        return {"scores": self.lm(input_ids, attention_mask, position_ids)}


@pytest.mark.parametrize("call,match", [c[1:] for c in PROBE_CASES], ids=[c[0] for c in PROBE_CASES])
def test_bad_probe_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- issue 23: ids against the vocabulary, id dtypes, lists, booleans ---------------------------------
def _gpt2_batch(vocab: int, bad_row: int | None = None, bad_at_padding: bool = False) -> RolloutBatch:
    b = random_batch(3, group_size=2, vocab=vocab, seed=3)
    ids = b.input_ids.clone()
    if bad_row is not None:
        pad = (b.attention_mask[bad_row] == 0).nonzero()
        col = int(pad[0, 0]) if bad_at_padding else ids.shape[1] - 1
        ids[bad_row, col] = vocab  # one past the embedding
    return RolloutBatch(ids, b.attention_mask, b.response_mask, b.group_ids, rewards=b.rewards)


@pytest.mark.parametrize("at_padding", [False, True])
@pytest.mark.parametrize("where", ["update_batch", "eval_batch"])
def test_token_id_outside_the_vocabulary_names_the_row(where, at_padding):
    from core_support import tiny_gpt2

    model = tiny_gpt2(vocab=11)
    good = _gpt2_batch(11)
    row = int((good.attention_mask == 0).any(dim=1).nonzero()[0, 0]) if at_padding else 4
    bad = _gpt2_batch(11, bad_row=row, bad_at_padding=at_padding)
    probe = ep.EntropyProbe(model, config=ep.ProbeConfig(lr=1e-2, direction="sgd"))
    with pytest.raises(ValueError, match=rf"{where}\.input_ids: row {row} holds token id 11 .*size 11"):
        probe.run(bad, good) if where == "update_batch" else probe.run(good, bad)
    if where == "update_batch":
        with pytest.raises(ValueError, match=rf"update_batch\.input_ids: row {row} holds token id 11"):
            probe.update_direction(bad)


def test_vocab_size_from_an_attribute():
    from core_support import tiny_gpt2

    from entropy_probe.inputs import model_vocab_size
    from entropy_probe.toy import TabularPolicy

    assert model_vocab_size(TabularPolicy(vocab_size=3)) == 3
    assert model_vocab_size(tiny_gpt2(vocab=11)) == 11
    assert model_vocab_size(TinyLM()) is None  # nothing to tell: not checked


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_small_integer_ids_are_converted_and_give_the_same_forecast(dtype):
    u, e = random_batch(3, seed=1), random_batch(3, seed=2)
    as_dtype = RolloutBatch(e.input_ids.to(dtype), e.attention_mask, e.response_mask, e.group_ids)
    assert as_dtype.input_ids.dtype in (torch.int32, torch.int64)
    probe = ep.EntropyProbe(TinyLM(seed=0), config=ep.ProbeConfig(lr=1e-2, direction="sgd"))
    assert probe.run(u, as_dtype).delta_h1 == probe.run(u, e).delta_h1


@pytest.mark.parametrize("name", ["rewards", "advantages"])
def test_scalars_given_as_lists_are_tensors(name):
    values = [1.0, 0.0, 0.5, 0.25]
    b = batch_with(**({"rewards": None} | {name: values}))
    assert torch.equal(getattr(b, name), torch.tensor(values))
    assert torch.equal(batch_with(rewards=(1, 0, 1, 0)).rewards, torch.tensor([1.0, 0.0, 1.0, 0.0]))


BOOL_CASES = [
    ("rewards list of booleans", dict(rewards=[True, False, True, False]), r"RolloutBatch\.rewards must be"),
    ("rewards a string", dict(rewards="1,0,1,0"), r"RolloutBatch\.rewards must be"),
    (
        "bool group ids",
        dict(group_ids=torch.tensor([True, True, False, False])),
        r"group_ids must be integers",
    ),
    ("bool input ids", dict(input_ids=IDS.bool()), r"input_ids must hold integer token ids"),
]


@pytest.mark.parametrize("change,match", [c[1:] for c in BOOL_CASES], ids=[c[0] for c in BOOL_CASES])
def test_booleans_and_strings_are_not_batch_values(change, match):
    with pytest.raises(ValueError, match=match):
        batch_with(**change)


NOT_NUMBERS = [
    ("lr", True),
    ("lr", "1e-3"),
    ("temperature", "1.0"),
    ("temperature", True),
    ("microbatch_units", True),
    ("max_grad_norm", True),
    ("norm_length", True),
    ("truth_alphas", (True,)),
    ("truth_alphas", 1.0),
    ("unconditional_se", 1),
]


@pytest.mark.parametrize("field,value", NOT_NUMBERS, ids=[f"{f}={v!r}" for f, v in NOT_NUMBERS])
def test_probe_config_refuses_booleans_and_strings_by_name(field, value):
    with pytest.raises(ValueError, match=rf"ProbeConfig\.{field}"):
        ep.ProbeConfig(**{field: value})


@pytest.mark.parametrize("kw", [dict(max_drop=True), dict(max_drop="0.1"), dict(max_drop=0.1, level=True)])
def test_guard_refuses_booleans(kw):
    with pytest.raises(ValueError, match=r"EntropyGuard: (max_drop|level)"):
        ep.EntropyGuard(**kw)


# ---- issue 23: identical E units, direction rules that are not the optimizer's step -------------------
def test_identical_eval_units_warn_and_flag():
    one = random_batch(1, group_size=3, seed=2)
    ids = one.input_ids.repeat(4, 1)  # the same unit four times, as four group ids
    groups = torch.arange(4).repeat_interleave(3)
    same = RolloutBatch(ids, one.attention_mask.repeat(4, 1), one.response_mask.repeat(4, 1), groups)
    probe = _probe(TinyLM(seed=0), direction="sgd")
    with pytest.warns(RuntimeWarning, match=r"all 4 evaluation units give the same s_n"):
        r = probe.run(random_batch(3, seed=1), same)
    assert r.se_cond_e == 0 and r.delta_h1 != 0
    assert r.reliable is False and "identical units" in r.caveats[0]
    assert r.to_dict()["entropy_probe/reliable"] is False
    ok = probe.run(random_batch(3, seed=1), random_batch(4, seed=2))
    assert ok.reliable is True and ok.caveats == ()
