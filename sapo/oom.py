"""Running out of device memory without crashing: recognise it, shrink the work, grow back later.

Two things shrink: the training micro-batches (:class:`MicroBatchLimits`, halving the largest one) and
generate's batch (:class:`GenerateSplit`, spreading the prompts over twice as many calls). Each grows back
one step after ``regrow_rounds`` rounds without an out-of-memory error (0 = never), so a transient peak
(another process, a long prompt) does not cost speed for the rest of the run.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

from sapo.batch import padded_tokens, plan_micro_batches

T = TypeVar("T")

# How libraries other than the caching allocator say they could not get memory (cuBLAS creating a handle
# or workspace, cuDNN, cuFFT, cuSOLVER, cuSPARSE): each is a plain RuntimeError, not torch.OutOfMemoryError.
_ALLOC_FAILURES = ("out of memory", "status_alloc_failed", "cufft_alloc_failed", "not_enough_workspace")


def is_out_of_memory(err: BaseException) -> bool:
    """The device ran out of memory (the allocator, or a CUDA library's own allocation): worth a smaller retry."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(marker in text for marker in _ALLOC_FAILURES)


def retry_on_oom(attempt: Callable[[], T], shrink: Callable[[], bool], after_failure: Callable[[], None]) -> T:
    """``attempt()``; after an out-of-memory error, ``shrink()`` and try again, until ``shrink`` returns False
    (then the error is raised). ``after_failure`` runs outside the ``except`` block, once the failed
    attempt's frames (and the tensors they held) are gone: the place to free cached memory."""
    while True:
        try:
            return attempt()
        except RuntimeError as err:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(err) or not shrink():
                raise
        after_failure()


class _Regrowth:
    """Counts clean rounds since the last halving; says when it is time to grow one step back."""

    def __init__(self, regrow_rounds: int):
        self.regrow_rounds = regrow_rounds
        self.clean_rounds = 0

    def round_done(self, had_oom: bool) -> bool:
        """Record a round; True when the size may now grow back one step (the count then restarts)."""
        self.clean_rounds = 0 if had_oom else self.clean_rounds + 1
        if self.regrow_rounds > 0 and self.clean_rounds >= self.regrow_rounds:
            self.clean_rounds = 0
            return True
        return False


class MicroBatchLimits(_Regrowth):
    """The micro-batch limits in force: the configured ones, or smaller after an out-of-memory error."""

    def __init__(self, rows: int, tokens: int, regrow_rounds: int):
        super().__init__(regrow_rounds)
        self.rows = rows  # 0 = no row limit
        self.configured_tokens = tokens  # 0 = no token limit
        self.tokens = tokens
        self._ceiling = 0  # the plan that first failed when no token limit was configured

    def plan(self, lengths: list[int]) -> list[tuple[int, int]]:
        """Row ranges for rows of these lengths (see :func:`sapo.batch.plan_micro_batches`)."""
        return plan_micro_batches(lengths, max_rows=self.rows, max_tokens=self.tokens)

    def shrink(self, lengths: list[int]) -> bool:
        """Halve the largest micro-batch of these rows' plan; False when every micro-batch is one row."""
        ranges = self.plan(lengths)
        if all(stop - start == 1 for start, stop in ranges):
            return False
        largest = padded_tokens(lengths, ranges)
        if not self.tokens:
            self._ceiling = largest
        self.tokens = max(1, largest // 2)
        return True

    def round_done(self, had_oom: bool) -> bool:
        """Record a training round; double the token limit back towards the configured one when due."""
        if not super().round_done(had_oom) or self.tokens == self.configured_tokens:
            return False
        grown = self.tokens * 2
        limit = self.configured_tokens or self._ceiling
        self.tokens = self.configured_tokens if grown >= limit else grown
        return True


class GenerateSplit(_Regrowth):
    """How many ``generate`` calls a round's prompts are spread over (1 unless memory ran out)."""

    def __init__(self, regrow_rounds: int):
        super().__init__(regrow_rounds)
        self.calls = 1

    def chunks(self, items: list[T]) -> list[list[T]]:
        """``items`` in :attr:`calls` consecutive chunks of (almost) equal size."""
        per_call = -(-len(items) // self.calls) if items else 1
        return [items[i:i + per_call] for i in range(0, len(items), per_call)]

    def shrink(self, prompts: int) -> bool:
        """Twice the calls (at most one prompt each); False when already one prompt per call."""
        if self.calls >= prompts:
            return False
        self.calls = min(prompts, self.calls * 2)
        return True

    def round_done(self, had_oom: bool) -> bool:
        """Record a generate; halve the calls when due. True when the split changed."""
        if not super().round_done(had_oom) or self.calls == 1:
            return False
        self.calls //= 2
        return True
