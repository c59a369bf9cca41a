"""Attribution of delta_h1 by parameter group (DESIGN section 13).

v and X_n split over any partition of the trainable parameters, so ``s_n = sum_g s_n^(g)`` with
``s_n^(g) = X_n^(g) . v^(g)`` and ``delta_h1 = sum_g eta mean_n s_n^(g)`` exactly. The default
partition reads Hugging Face parameter names (GPT-2, Llama, Qwen2, Mistral, and PEFT-wrapped ones):

>>> [default_group(n) for n in ("transformer.wte.weight", "transformer.h.3.attn.c_attn.weight",
...                             "model.layers.11.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight",
...                             "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
...                             "table")]
['embeddings', 'block.3', 'block.11', 'head', 'head', 'block.0', 'other']
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor

from .vectors import Params

_BLOCK = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block)\.(\d+)\.")
_EMBEDDING = re.compile(
    r"(?:^|\.)(?:wte|wpe|embed_tokens|embed_positions|embeddings|word_embeddings)(?:\.|$)"
)
_HEAD = re.compile(r"(?:^|\.)(?:ln_f|norm|final_layernorm|final_layer_norm|lm_head)(?:\.|$)")


def default_group(name: str) -> str:
    """ "embeddings", "block.<i>" (transformer block i), "head" (final norm and LM head) or "other"."""
    block = _BLOCK.search(name)
    if block:
        return f"block.{int(block.group(1))}"
    if _EMBEDDING.search(name):
        return "embeddings"
    if _HEAD.search(name):
        return "head"
    return "other"


def parameter_groups(params: Params, groups: Callable[[str], str] | None) -> tuple[list[str], Tensor]:
    """(group names by first appearance, ``(K,)`` group index of each parameter in ``params`` order)."""
    f = groups or default_group
    names: list[str] = []
    index = []
    for pname in params:
        g = f(pname)
        if not isinstance(g, str) or not g:
            raise ValueError(
                f"ProbeConfig.groups returned {g!r} for parameter {pname!r}; it must return a "
                "non-empty str (the group name)"
            )
        if g not in names:
            names.append(g)
        index.append(names.index(g))
    return names, torch.tensor(index, dtype=torch.long, device=next(iter(params.values())).device)


def group_values(per_unit: Tensor, lr: float) -> tuple[list[float], list[float]]:
    """From ``(B_E, n_groups)`` float64 s_n^(g): ``eta mean_n s_n^(g)`` and its SE ``eta sqrt(var / B_E)``."""
    b = per_unit.shape[0]
    means = (lr * per_unit.mean(dim=0)).tolist()
    if b < 2:
        return means, [0.0] * per_unit.shape[1]
    ses = (lr * (per_unit.var(dim=0) / b).sqrt()).tolist()
    return means, ses


def group_statistics(
    params: Params, groups, s_groups: Tensor | None, lr: float
) -> dict[str, tuple[float, float]] | None:
    """``{group: (eta mean_n s_n^(g), its SE over E)}`` from every rank's ``(B_E, n_groups)`` float64 s_n^(g),
    gathered in rank order (``eval_statistics``); None when the call computed no groups."""
    if s_groups is None:
        return None
    names = parameter_groups(params, groups)[0]
    means, ses = group_values(s_groups, lr)
    return dict(zip(names, zip(means, ses)))
