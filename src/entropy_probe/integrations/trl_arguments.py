"""The arguments of ``EntropyProbeCallback``, checked when it is built (a ValueError naming each), so that
a bad one fails at construction rather than at the first probed step (docs/design.md section 20)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..config import ProbeConfig
from ..guard import EntropyGuard
from ..inputs import is_number


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_arguments(eval_prompts, **kw) -> None:
    """Every argument of ``EntropyProbeCallback``, when it is built (a ValueError naming it)."""
    name = "EntropyProbeCallback."
    every, group_size, max_new_tokens = kw["every"], kw["group_size"], kw["max_new_tokens"]
    config, seed, budget, level = kw["config"], kw["seed"], kw["budget"], kw["level"]
    if (
        eval_prompts is None
        or isinstance(eval_prompts, (str, dict))
        or not isinstance(eval_prompts, Sequence)
    ):
        raise ValueError(
            f"{name}eval_prompts: give a non-empty list of prompts, got {type(eval_prompts).__name__}"
        )
    if len(eval_prompts) == 0:
        raise ValueError(f"{name}eval_prompts: give a non-empty list of prompts")
    for i, p in enumerate(eval_prompts):
        p = p.get("prompt") if isinstance(p, dict) else p
        if not (
            isinstance(p, str)
            or (isinstance(p, list) and all(isinstance(m, dict) and "role" in m for m in p))
        ):
            raise ValueError(
                f"{name}eval_prompts[{i}]: a prompt must be a string, a list of {{'role', 'content'}} "
                f"messages, or a row {{'prompt': ...}} holding one; got {type(p).__name__}"
            )
    if not (is_int(every) and every >= 1):
        raise ValueError(f"{name}every must be an integer >= 1, got {every!r}")
    if not (is_int(group_size) and group_size >= 2):
        raise ValueError(f"{name}group_size must be an integer >= 2, got {group_size!r}")
    if max_new_tokens is not None and not (is_int(max_new_tokens) and max_new_tokens >= 1):
        raise ValueError(f"{name}max_new_tokens must be None or an integer >= 1, got {max_new_tokens!r}")
    if config is not None and not isinstance(config, ProbeConfig):
        raise ValueError(f"{name}config must be an entropy_probe.ProbeConfig or None, got {config!r}")
    if not is_int(seed):
        raise ValueError(f"{name}seed must be an integer, got {seed!r}")
    if not (is_number(level) and 0 < level < 1):  # checked with or without a budget
        raise ValueError(f"{name}level must be in (0, 1) (a number), got {level!r}")
    if budget is not None:
        EntropyGuard(budget, level)  # a ValueError naming max_drop (the budget)
    units = kw["max_eval_units"]
    if units is not None and not (is_int(units) and units >= 1):
        raise ValueError(f"{name}max_eval_units must be None or an integer >= 1, got {units!r}")
    target = kw.get("se_target")
    if target is not None and not (is_number(target) and math.isfinite(target) and target > 0):
        raise ValueError(f"{name}se_target must be None or a finite number > 0 (nats), got {target!r}")
