"""The probe's settings in verl's own config, for the Ray path (``verl_ray``): one block under
``actor_rollout_ref`` (hydra overrides ``+actor_rollout_ref.entropy_probe.every=1`` and so on):

    entropy_probe:
      prompts_file: held_out.json  # a JSON list of prompts: strings, chat conversations or {"prompt": ...}
      every: 1                     # probe optimizer steps 0, every, 2 * every, ...
      group_size: 8                # responses sampled per held-out prompt (E)
      max_new_tokens: null         # default: rollout.response_length
      seed: 0
      direction: optimizer-step    # the probe's direction rule (ProbeConfig.direction)
      entropy: token               # the functional (ProbeConfig.entropy): token = verl's actor/entropy
      entropy_budget: null         # nats: an EntropyGuard shrinks each probed step to this forecast drop
      level: 0.95

``prompt_ids`` (token id lists) may replace ``prompts_file``; ``eos_token_id`` / ``pad_token_id`` override
the tokenizer's. The probe's temperature is ``rollout.temperature``, the policy verl trains.
"""

from __future__ import annotations

import json

from ..config import ProbeConfig
from ..guard import EntropyGuard
from .verl import EngineProbe, HeldOutPrompts, attach

KEYS = {
    "prompts_file", "prompt_ids", "every", "group_size", "max_new_tokens", "seed", "direction", "entropy",
    "entropy_budget", "level", "eos_token_id", "pad_token_id",
}  # fmt: skip


def check_actor_strategy(config) -> None:
    """A ValueError unless ``config`` (verl's ``actor_rollout_ref``) trains the actor with FSDP2."""
    strategy = config.actor.strategy
    if strategy != "fsdp2":
        raise ValueError(
            f"entropy_probe: actor_rollout_ref.actor.strategy is {strategy!r}; the probe supports verl's "
            "FSDP2 engine only: set actor.strategy=fsdp2 (verl's default 'fsdp' is FSDP1)"
        )


def probe_settings(config) -> dict | None:
    """The ``entropy_probe`` block of ``config`` as a dict (None when there is none); unknown keys raise."""
    block = config.get("entropy_probe")
    if block is None:
        return None
    settings = dict(block)
    unknown = set(settings) - KEYS
    if unknown:
        raise ValueError(f"entropy_probe: unknown setting(s) {sorted(unknown)}; known: {sorted(KEYS)}")
    if (settings.get("prompts_file") is None) == (settings.get("prompt_ids") is None):
        raise ValueError("entropy_probe: give exactly one of prompts_file and prompt_ids")
    return settings


def held_out_prompts(settings: dict, config, tokenizer) -> HeldOutPrompts:
    """E's source from the settings: the prompts tokenised as verl's dataset does (chat template)."""
    eos = settings.get("eos_token_id", getattr(tokenizer, "eos_token_id", None))
    if eos is None:
        raise ValueError("entropy_probe: no eos_token_id (no tokenizer): set entropy_probe.eos_token_id")
    pad = settings.get("pad_token_id", getattr(tokenizer, "pad_token_id", None))
    ids = settings.get("prompt_ids")
    if ids is None:
        if tokenizer is None:
            raise ValueError(
                "entropy_probe.prompts_file needs the model's tokenizer: give prompt_ids instead"
            )
        from .trl import tokenise_prompt  # TRL's tokenisation: the chat template for a conversation

        with open(settings["prompts_file"]) as f:
            prompts = [p["prompt"] if isinstance(p, dict) else p for p in json.load(f)]
        ids = [tokenise_prompt(tokenizer, p) for p in prompts]
    max_new = settings.get("max_new_tokens") or config.rollout.response_length
    return HeldOutPrompts(
        [list(p) for p in ids], int(settings.get("group_size", 8)), int(max_new), int(eos),
        None if pad is None else int(pad), int(settings.get("seed", 0)),
    )  # fmt: skip


def attach_from_config(engine, config, tokenizer=None) -> EngineProbe | None:
    """``attach`` the probe to the actor's ``engine`` as ``config.entropy_probe`` says; None without it."""
    settings = probe_settings(config)
    if settings is None:
        return None
    check_actor_strategy(config)
    probe_config = ProbeConfig(
        direction=settings.get("direction", "optimizer-step"),
        temperature=float(config.rollout.temperature),
        entropy=settings.get("entropy", "token"),
    )
    budget = settings.get("entropy_budget")
    guard = None if budget is None else EntropyGuard(float(budget), float(settings.get("level", 0.95)))
    source = held_out_prompts(settings, config, tokenizer)
    return attach(engine, source, every=int(settings.get("every", 1)), config=probe_config, guard=guard)
