"""verl's rollout batch (``DataProto``) as the probe's ``RolloutBatch``.

verl's PPO trainer holds a batch of rollouts as a ``DataProto``: tensors in ``data.batch`` with
``prompts`` ``(N, Tp)`` left-padded, ``responses`` ``(N, Tr)`` right-padded, ``input_ids`` and
``attention_mask`` ``(N, Tp + Tr)`` (prompt then response), ``response_mask`` ``(N, Tr)`` (1 on the
response tokens the loss sees), and in ``data.non_tensor_batch["uid"]`` one id per prompt, shared by
that prompt's ``rollout.n`` responses (GRPO's group). A unit of the probe is one uid.
"""

from __future__ import annotations

import torch

from ..batch import RolloutBatch


def dataproto_to_rollout_batch(data, group_key: str = "uid", with_advantages: bool = True) -> RolloutBatch:
    """A ``RolloutBatch`` of the rows of ``data`` (a verl ``DataProto``), one unit per ``group_key`` value.

    ``response_mask`` is verl's (or, when absent, the response part of ``attention_mask``, as verl's
    ``compute_response_mask`` makes it), placed after the prompt columns. ``rewards``: the sum over the
    response of ``token_level_rewards`` (else ``token_level_scores``) when present. ``advantages``:
    verl's ``advantages`` when they are one value per response (GRPO, RLOO, ...); a per-token advantage
    (GAE) is a ValueError naming the row unless ``with_advantages=False``. An evaluation batch needs
    neither. Rows whose response is empty are dropped by ``RolloutBatch`` (counted in ``n_dropped_rows``).
    """
    batch = data.batch
    for key in ("prompts", "responses", "attention_mask"):
        if key not in batch.keys():
            raise ValueError(f"dataproto_to_rollout_batch: data.batch has no {key!r} (verl's rollout layout)")
    prompts, responses, attention = batch["prompts"], batch["responses"], batch["attention_mask"]
    n, tp, tr = prompts.shape[0], prompts.shape[1], responses.shape[1]
    if attention.shape != (n, tp + tr):
        raise ValueError(
            f"dataproto_to_rollout_batch: attention_mask has shape {tuple(attention.shape)}, expected "
            f"(N, Tp + Tr) = ({n}, {tp + tr}) from prompts {tuple(prompts.shape)} and responses "
            f"{tuple(responses.shape)}"
        )
    input_ids = torch.cat([prompts, responses], dim=1)  # (N, Tp + Tr)
    if "input_ids" in batch.keys() and not torch.equal(batch["input_ids"], input_ids):
        row = int((batch["input_ids"] != input_ids).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"dataproto_to_rollout_batch: input_ids row {row} is not prompts then responses")
    resp = batch["response_mask"] if "response_mask" in batch.keys() else attention[:, tp:]
    if resp.shape != (n, tr):
        raise ValueError(
            f"dataproto_to_rollout_batch: response_mask has shape {tuple(resp.shape)}, expected (N, Tr) = "
            f"({n}, {tr})"
        )
    response_mask = torch.cat([torch.zeros_like(attention[:, :tp]), resp.to(attention.dtype)], dim=1)
    return RolloutBatch(
        input_ids,
        attention,
        response_mask,
        _group_ids(data, group_key, n, prompts.device),
        rewards=_rewards(batch, resp),
        advantages=_advantages(batch, resp) if with_advantages else None,
    )


def _group_ids(data, group_key: str, n: int, device) -> torch.Tensor:
    """``(N,)`` integer ids, in order of first appearance of each ``group_key`` value."""
    uids = data.non_tensor_batch.get(group_key)
    if uids is None:
        raise ValueError(
            f"dataproto_to_rollout_batch: data.non_tensor_batch has no {group_key!r}; verl's trainer sets "
            "one uid per prompt, shared by its responses"
        )
    if len(uids) != n:
        raise ValueError(f"dataproto_to_rollout_batch: {group_key!r} has {len(uids)} entries for {n} rows")
    index: dict = {}
    return torch.tensor(
        [index.setdefault(u, len(index)) for u in uids.tolist()], dtype=torch.long, device=device
    )


def _rewards(batch, resp: torch.Tensor) -> torch.Tensor | None:
    for key in ("token_level_rewards", "token_level_scores"):
        if key in batch.keys():
            return (batch[key].float() * resp).sum(dim=1)  # (N,) the sequence's reward
    return None


def _advantages(batch, resp: torch.Tensor) -> torch.Tensor | None:
    if "advantages" not in batch.keys():
        return None
    adv, mask = batch["advantages"].float(), resp.bool()  # (N, Tr)
    first = adv.gather(1, mask.float().argmax(dim=1, keepdim=True))  # (N, 1) at the first response token
    differs = (mask & (adv != first)).any(dim=1)
    if differs.any():
        row = int(differs.nonzero()[0, 0])
        raise ValueError(
            f"dataproto_to_rollout_batch: advantages of row {row} vary over its response tokens (a per-token "
            "advantage, e.g. GAE); the probe takes one advantage per response: pass with_advantages=False"
        )
    return first.reshape(-1)
