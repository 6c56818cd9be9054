"""Toy tasks with the interface of reasoning-gym datasets (``ds[i] -> dict``, ``score_answer(answer, entry)``).

Built in, deterministic in (seed, index), and learnable by the built-in tiny model on a CPU, so smoke runs
and tests train on something real without downloads. :data:`TOY_TASKS` maps each name to its class.
"""

from __future__ import annotations

import random
from typing import Mapping

from sapo.prompts import extract_answer

TOY_COPY_WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "green", "bread", "light",
    "music", "chair", "ocean", "plant", "robot", "sugar", "train", "water",
)  # fmt: skip


class _ToyDataset:
    """What the toy datasets share with reasoning-gym's: ``size`` items, each deterministic in (seed, index)."""

    name = ""

    def __init__(self, seed: int, size: int):
        self.seed = seed
        self.size = size

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int) -> random.Random:
        if not 0 <= index < self.size:
            raise IndexError(index)
        return random.Random(f"{self.name}:{self.seed}:{index}")


class ToyCopyDataset(_ToyDataset):
    """``toy_copy``: "Copy this word: <w>", answer ``w`` from :data:`TOY_COPY_WORDS`.

    Learnable by a tiny random GPT-2 with GRPO. Its answer is the extracted ``<answer>`` span when the
    completion has one, else the completion's first whitespace-delimited word (a tiny model will not
    learn tags quickly). The score is 1.0 for an exact match; otherwise partial credit of up to 0.5 for
    the share of the word's letters the answer contains, so a random policy already sees a gradient.
    """

    name = "toy_copy"

    def __getitem__(self, index: int) -> dict:
        word = self._rng(index).choice(TOY_COPY_WORDS)
        return {
            "question": f"Copy this word: {word}",
            "answer": word,
            "metadata": {"source_dataset": self.name, "source_index": index, "word": word},
        }

    @staticmethod
    def answer_from_completion(completion: str) -> str | None:
        """The ``<answer>`` span if present, else the first whitespace-delimited word (bounded)."""
        answer = extract_answer(completion)
        if answer is not None:
            return answer
        words = completion[:256].split(maxsplit=1)
        return words[0] if words else None

    def score_answer(self, answer: str | None, entry: Mapping) -> float:
        """1.0 for the exact word, else 0.5 x the share of its distinct letters found in the answer."""
        word = entry["answer"]
        if not isinstance(answer, str) or not answer:
            return 0.0
        if answer == word:
            return 1.0
        return 0.5 * len(set(answer[:32]) & set(word)) / len(set(word))


TOY_DIGITS_LENGTH = 6


class ToyDigitsDataset(_ToyDataset):
    """``toy_digits``: "Write a number with at least six digits, like 482913." (the example varies).

    The task the built-in tiny model masters on a CPU within about a hundred rounds (see
    ``docs/RESULTS.md``). Its answer is the first whitespace-delimited word of the ``<answer>`` span when
    the completion has one, else of the completion. The score is the share of that word's first six
    characters that are ASCII digits: 1.0 for ``"482913"`` or ``"1313131"``, 0.5 for ``"123"``, 0 for no
    word. Only the first six characters count, so ``"123456abc"`` scores 1.0 too.

    Why this task: a randomly initialised 200k-parameter GPT-2 barely conditions on the question (its
    next-token distribution for "...letter a..." and "...letter b..." differs by a KL of ~1e-6), so tasks
    whose answer depends on the question (copy this word, repeat this letter, count to N) stall after the
    policy collapses onto one output. Here the best policy is the same for every question, the random
    model already scores about 0.1 (the tiny tokenizer has many digit tokens), and each extra digit
    raises the reward, so GRPO has a signal from round 0 and a smooth path to 1.0.
    """

    name = "toy_digits"

    def __getitem__(self, index: int) -> dict:
        example = str(self._rng(index).randrange(10 ** (TOY_DIGITS_LENGTH - 1), 10**TOY_DIGITS_LENGTH))
        return {
            "question": f"Write a number with at least six digits, like {example}.",
            "answer": example,  # one correct answer among many
            "metadata": {"source_dataset": self.name, "source_index": index, "example": example},
        }

    @staticmethod
    def answer_from_completion(completion: str) -> str | None:
        """The first word of the ``<answer>`` span if present, else of the completion (bounded)."""
        answer = extract_answer(completion)
        text = answer if answer is not None else completion[:256]
        words = text.split(maxsplit=1)
        return words[0] if words else None

    def score_answer(self, answer: str | None, entry: Mapping) -> float:
        """The share of the first six characters of the answer's first word that are ASCII digits (0.0 for none)."""
        words = answer.split(maxsplit=1) if isinstance(answer, str) else []
        if not words:
            return 0.0
        head = words[0][:TOY_DIGITS_LENGTH]
        return sum(c in "0123456789" for c in head) / TOY_DIGITS_LENGTH


TOY_TASKS = {ToyCopyDataset.name: ToyCopyDataset, ToyDigitsDataset.name: ToyDigitsDataset}
