"""The demo's synthetic task: answer with the prompt's digits in sorted order.

A prompt is 3 to 5 digits followed by a separator, ``4 1 3 SEP``; the correct answer is
``1 3 4 EOS``. The reward is verifiable and graded: the fraction of answer positions (EOS included)
that hold the right token, so a policy that sorts 2 of 3 digits and stops gets 3/4. A tiny
transformer learns it in a few dozen GRPO steps after a short supervised warm-up.

>>> task = SortingTask(n_digits=6)
>>> task.sep, task.eos, task.vocab_size
(6, 7, 8)
>>> task.target((4, 1, 3, task.sep))
(1, 3, 4, 7)
>>> task.reward((4, 1, 3, task.sep), (1, 3, 5, 7))
0.75
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batch import RolloutBatch


@dataclass(frozen=True)
class SortingTask:
    """Token ids: digits ``0 .. n_digits-1``, then SEP, then EOS."""

    n_digits: int = 6
    min_len: int = 3
    max_len: int = 5

    def __post_init__(self) -> None:
        if self.n_digits < 2:
            raise ValueError(f"SortingTask.n_digits must be >= 2, got {self.n_digits}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"SortingTask: need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")

    @property
    def sep(self) -> int:
        return self.n_digits

    @property
    def eos(self) -> int:
        return self.n_digits + 1

    @property
    def vocab_size(self) -> int:
        return self.n_digits + 2

    @property
    def max_new_tokens(self) -> int:
        """Room for the longest answer and its EOS."""
        return self.max_len + 1

    def prompts(self, n: int, generator: torch.Generator) -> list[tuple[int, ...]]:
        """n random prompts: a length in [min_len, max_len], digits uniform, then SEP."""
        lengths = torch.randint(self.min_len, self.max_len + 1, (n,), generator=generator).tolist()
        return [
            tuple(torch.randint(self.n_digits, (k,), generator=generator).tolist()) + (self.sep,)
            for k in lengths
        ]

    def target(self, prompt: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted(prompt[:-1])) + (self.eos,)

    def reward(self, prompt: tuple[int, ...], response: tuple[int, ...]) -> float:
        """Fraction of the target's positions (EOS included) that the response gets right."""
        target = self.target(prompt)
        return sum(a == b for a, b in zip(target, response)) / len(target)

    def supervised_batch(self, n: int, generator: torch.Generator) -> RolloutBatch:
        """n prompts with their correct answers, left-padded, for the warm-up's cross-entropy.

        All rows form one unit (grouping plays no part in a cross-entropy); n >= 2.
        """
        prompts = self.prompts(n, generator)
        seqs = [p + self.target(p) for p in prompts]
        width = max(map(len, seqs))
        ids = torch.full((n, width), self.eos, dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.long)
        resp = torch.zeros((n, width), dtype=torch.long)
        for row, (p, s) in enumerate(zip(prompts, seqs)):
            start = width - len(s)
            ids[row, start:] = torch.tensor(s)
            attn[row, start:] = 1
            resp[row, start + len(p) :] = 1
        return RolloutBatch(ids, attn, resp, torch.zeros(n, dtype=torch.long), rewards=torch.ones(n))
