"""A complete TRL GRPO run on CPU with the entropy probe watching every optimizer step (well under a minute).

    python examples/trl_grpo.py [--out runs/trl_grpo] [--steps 30]

Everything is built locally (no download): a word-level tokenizer (``tokenizers``), a tiny Qwen2 from
``Qwen2Config`` with random weights, prompts from ``datasets.Dataset.from_dict``. The policy is
rewarded for saying "a". Before each optimizer step the callback forecasts the step's entropy change
on 8 held-out prompts (from the gradient the trainer computed), and after the step it measures what
really happened on the same samples. Output: ``entropy_probe.jsonl`` (one line per step) and
``forecast_vs_measured.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h"]


def build_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_model(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def prompts(n: int, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    return [
        " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (3,), generator=gen)) for _ in range(n)
    ]


def reward_a(completions, **kwargs) -> list[float]:
    """The share of the word "a" in the completion."""
    return [c.split().count("a") / max(len(c.split()), 1) for c in completions]


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.errorbar(
        steps,
        [r["delta_h1"] for r in records],
        yerr=[1.96 * r["se_cond_e"] for r in records],
        fmt="o",
        color="tab:blue",
        capsize=2,
        label="forecast before the step (± 95%)",
    )
    ax.plot(
        steps,
        [r["measured/delta_h"] for r in records],
        "x",
        color="tab:red",
        markersize=8,
        label="measured after the real step (same E)",
    )
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("entropy change (nats per token)")
    ax.set_title("TRL GRPOTrainer + EntropyProbeCallback")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def grpo_args(out: Path, steps: int, seed: int, **extra):
    """The run's ``GRPOConfig``: tiny CPU GRPO (DAPO loss, no KL), one log line per step."""
    from trl import GRPOConfig

    base = dict(
        output_dir=str(out),
        max_steps=steps,
        learning_rate=3e-3,
        per_device_train_batch_size=32,
        num_generations=8,
        max_completion_length=8,
        temperature=1.0,
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        beta=0.0,
        loss_type="dapo",
        seed=seed,
    )
    return GRPOConfig(**{**base, **extra})


def main() -> None:
    from trl import GRPOTrainer

    from entropy_probe import ProbeConfig
    from entropy_probe.integrations.trl import EntropyProbeCallback, attach

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/trl_grpo")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--record", type=Path, help="also save the figures as a record (docs/records/)")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "entropy_probe.jsonl").unlink(missing_ok=True)  # the callback appends

    from datasets import Dataset

    tokenizer = build_tokenizer()
    args = grpo_args(out, opts.steps, seed=0, disable_tqdm=False)
    trainer = GRPOTrainer(
        model=build_model(tokenizer),
        reward_funcs=reward_a,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts(256, seed=1)}),
        processing_class=tokenizer,
    )
    callback = attach(
        trainer,
        EntropyProbeCallback(
            prompts(8, seed=2),
            every=1,
            group_size=8,
            max_new_tokens=8,
            config=ProbeConfig(direction="optimizer-step"),
            max_eval_units=8,  # all 8 prompts every step (the default: the trainer's 4 per step)
        ),
    )
    start = time.time()
    trainer.train()
    records = [json.loads(line) for line in (out / "entropy_probe.jsonl").read_text().splitlines()]
    plot(records, out / "forecast_vs_measured.png")
    forecast = torch.tensor([r["delta_h1"] for r in records])
    measured = torch.tensor([r["measured/delta_h"] for r in records])
    corr = float(torch.corrcoef(torch.stack([forecast, measured]))[0, 1])
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    summary = {
        "steps": len(records),
        "runtime_s": time.time() - start,
        "correlation": corr,
        "sum_forecast": float(forecast.sum()),
        "sum_measured": float(measured.sum()),
        "reward_start": rewards[0],
        "reward_end": rewards[-1],
    }
    print(
        f"{len(records)} steps in {summary['runtime_s']:.0f} s; forecast vs measured: correlation "
        f"{corr:.3f}, "
        f"summed over the run {summary['sum_forecast']:+.3f} vs {summary['sum_measured']:+.3f} nats"
    )
    print(
        f"reward {rewards[0]:.2f} -> {rewards[-1]:.2f}; wrote {out / 'entropy_probe.jsonl'} and "
        f"{out / 'forecast_vs_measured.png'}"
    )
    if opts.record:
        from entropy_probe.records import write_record

        command = ["python", "examples/trl_grpo.py", *sys.argv[1:]]
        write_record(opts.record, command, {"summary": summary, "steps": records})
    assert callback.records == records


if __name__ == "__main__":
    main()
