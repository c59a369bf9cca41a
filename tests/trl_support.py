"""A real TRL ``GRPOTrainer`` small enough for the test suite (imported by tests/test_trl.py and the example).

Tiny Qwen2 built from ``Qwen2Config`` (random weights), a word-level tokenizer built locally with the
``tokenizers`` library and wrapped in ``PreTrainedTokenizerFast`` (with a chat template), prompts from
``datasets.Dataset.from_dict``; no download, no vLLM, CPU, fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "user:", "assistant:"]
SPECIAL = ["<pad>", "<eos>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


def word_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_qwen2(tokenizer, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def prompt_dataset(n: int = 8, seed: int = 0, conversational: bool = False):
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    letters = WORDS[:8]
    texts = [" ".join(letters[int(i)] for i in torch.randint(0, 8, (3,), generator=gen)) for _ in range(n)]
    if conversational:
        return Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts]})
    return Dataset.from_dict({"prompt": texts})


def reward_a(completions, **kwargs) -> list[float]:
    """Reward: the share of the word "a" in the completion (a conversational completion is a message list)."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [t.split().count("a") / max(len(t.split()), 1) for t in texts]


def grpo_trainer(output_dir, callbacks=(), seed: int = 0, steps: int = 2, **overrides):
    """A ``GRPOTrainer`` on the tiny model: ``steps`` optimizer steps, 2 prompts x 4 completions per step."""
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = word_tokenizer()
    conversational = overrides.pop("conversational", False)
    opts = {
        "output_dir": str(output_dir),
        "max_steps": steps,
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 4,
        "temperature": 1.0,
        "bf16": False,
        "use_cpu": True,
        "gradient_checkpointing": False,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "seed": seed,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "beta": 0.0,
    }
    opts.update(overrides)
    args = GRPOConfig(**opts)
    model = tiny_qwen2(tokenizer, seed)
    if args.beta != 0:  # TRL builds the reference model from the policy's config path: save it locally
        path = Path(output_dir) / "initial_model"
        model.save_pretrained(path)
        model.config._name_or_path = str(path)
    return GRPOTrainer(
        model=model,
        reward_funcs=reward_a,
        args=args,
        train_dataset=prompt_dataset(16, seed, conversational),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
