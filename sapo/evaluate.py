"""Held-out evaluation: pass@1 with greedy decoding on a fixed question set per task (the ``eval`` section).

The held-out set
----------------
Per task of the mix, ``questions_per_task`` questions, a pure function of (``eval.seed``, task name): the
same on every worker whatever its node id, and the same for every experiment seed, so runs of a sweep are
scored on the same questions.

Why it never meets training: reasoning-gym builds item ``i`` of a dataset seeded ``s`` from
``Random(s + i)`` (the toy tasks from ``Random(f"{name}:{s}:{i}")``). Training questions, local or taken
from peers, all come from ``dataset_seed(experiment seed, name)`` (:func:`sapo.tasks.dataset_seed`, below
``2**31``) with an index below ``DATASET_SIZE``, so training only ever draws generator seeds in
``[0, 2**31 + DATASET_SIZE)`` (peers' references with any other seed are refused:
:meth:`sapo.tasks.TaskBank.rebuild` with the experiment seed). The held-out set uses dataset seeds in
``[EVAL_SEED_LOW, EVAL_SEED_HIGH)``, above that window whatever the experiment seed, and below
``2**32 - DATASET_SIZE`` so that ``seed + index`` still fits numpy's seeds (``pool_matrix``). Held-out
means "from a generator stream training never uses"; a task with a small question space (``toy_copy``
has 16 words, ``toy_digits`` one instruction) can still repeat a training question's text.

Scoring
-------
One completion per question, greedy (argmax at every step), scored by the task's own reward without the
format bonus; it counts as correct when that reward is 1 (exact match: reasoning-gym's ``score_answer``
gives 1.0 for a correct answer, partial credit below it). ``accuracy`` is the share of correct answers
among the questions evaluated, ``score`` their mean reward.

Greedy through the sampling API: :func:`sapo.rollouts.sample_completions` with ``temperature=0`` takes the
argmax at every step (``generate(do_sample=False)``, or the lean loop's argmax: the same tokens), so the RNG
has nothing to choose. The global RNG state is restored afterwards all the same.

The time budget
---------------
Questions are evaluated in batches, interleaved across tasks (the first question of every task, then the
second...), so a cut eval still covers every task. Before each batch after the first, the eval stops if
the time spent plus the slowest batch so far would pass ``time_budget_s``; what was evaluated is reported
with ``complete: false``. No I/O here: the caller writes the result.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from sapo.oom import retry_on_oom
from sapo.rollouts import encode_prompt, max_positions, sample_completions
from sapo.tasks import DATASET_SIZE, Question, TaskBank, TaskRef, build_prompt, dataset_size

__all__ = ["EVAL_SEED_HIGH", "EVAL_SEED_LOW", "EvalResult", "TaskScore", "evaluate",
           "eval_dataset_seed", "generator_seed", "heldout_questions", "heldout_refs", "is_correct"]

# Training's generator seeds lie below 2**31 + DATASET_SIZE (see the module docstring); ours start above.
EVAL_SEED_LOW = 2**31 + DATASET_SIZE
# seed + index must stay below 2**32 (numpy's seeds).
EVAL_SEED_HIGH = 2**32 - DATASET_SIZE


def eval_dataset_seed(eval_seed: int, name: str) -> int:
    """The held-out dataset seed of task ``name``: in [EVAL_SEED_LOW, EVAL_SEED_HIGH), fixed per (eval seed,
    name), independent of the experiment seed and the node."""
    digest = hashlib.sha256(f"heldout:{eval_seed}:{name}".encode()).digest()
    return EVAL_SEED_LOW + int.from_bytes(digest[:8], "big") % (EVAL_SEED_HIGH - EVAL_SEED_LOW)


def generator_seed(ref: TaskRef) -> int:
    """The seed reasoning-gym generates ``ref``'s item from (``Random(seed + index)``): what must differ
    between held-out and training questions."""
    return ref.seed + ref.index


def heldout_refs(names: Iterable[str], eval_seed: int, per_task: int) -> list[TaskRef]:
    """``per_task`` references per task (fewer when a dataset is smaller), interleaved across tasks in name
    order: item 0 of every task, then item 1, ... (the order the eval runs in, so a cut eval covers every task;
    by name, so workers that list their tasks in another order still evaluate the same batches)."""
    per_name = {name: [TaskRef(name, eval_dataset_seed(eval_seed, name), i)
                       for i in range(min(per_task, dataset_size(name)))] for name in sorted(set(names))}
    longest = max((len(refs) for refs in per_name.values()), default=0)
    return [refs[i] for i in range(longest) for refs in per_name.values() if i < len(refs)]


def heldout_questions(bank: TaskBank, eval_seed: int, per_task: int) -> list[Question]:
    """The held-out questions of ``bank``'s task mix (see :func:`heldout_refs`)."""
    return [bank.rebuild(ref) for ref in heldout_refs(bank.names, eval_seed, per_task)]


def is_correct(score: float) -> bool:
    """Pass@1's rule: the task's own reward (no format bonus) is full marks."""
    return score >= 1.0


@dataclass
class TaskScore:
    """One task's part of an eval."""

    planned: int  # held-out questions of this task
    n: int = 0  # evaluated before the budget ran out
    correct: int = 0
    score_sum: float = 0.0
    seconds: float = 0.0  # its share of the batches' time (by questions)

    @property
    def accuracy(self) -> float | None:
        """Share correct among the evaluated questions; None when none was."""
        return self.correct / self.n if self.n else None

    @property
    def complete(self) -> bool:
        return self.n == self.planned

    def to_json(self) -> dict:
        return {"accuracy": self.accuracy, "score": self.score_sum / self.n if self.n else None, "n": self.n,
                "planned": self.planned, "seconds": round(self.seconds, 4), "complete": self.complete}


@dataclass
class EvalResult:
    """What one eval measured, per task, and the texts it scored (for tests and debugging)."""

    tasks: dict[str, TaskScore]
    seconds: float = 0.0
    batches: int = 0
    completions: list[str] = field(default_factory=list)  # greedy answers, in question order (evaluated only)

    @property
    def complete(self) -> bool:
        return all(t.complete for t in self.tasks.values())

    def to_json(self) -> dict:
        """The fields of an eval line (the caller adds node, round and timestamp)."""
        return {"seconds": round(self.seconds, 4), "complete": self.complete,
                "tasks": {name: score.to_json() for name, score in self.tasks.items()}}


def evaluate(model, tokenizer, bank: TaskBank, questions: Sequence[Question], *, max_new_tokens: int,
             max_prompt_tokens: int, batch_size: int, time_budget_s: float, decode: str = "auto",
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             clock: Callable[[], float] = time.monotonic, on_batch: Callable[[], None] | None = None) -> EvalResult:
    """Greedy pass@1 of ``model`` on ``questions`` in batches of ``batch_size`` prompts, within ``time_budget_s``.

    ``on_batch`` runs before each batch (a heartbeat; it may raise to abort). An out-of-memory error halves
    the batch and retries. The model's mode is left as it was.
    """
    result = EvalResult(tasks={})
    for q in questions:
        result.tasks.setdefault(q.ref.dataset, TaskScore(planned=0)).planned += 1
    limit = max_positions(model)
    if limit:  # prompt + answer must fit the position embeddings
        max_new_tokens = max(1, min(max_new_tokens, limit - 1))
        max_prompt_tokens = max(1, min(max_prompt_tokens, limit - max_new_tokens))
    prompt_ids = [encode_prompt(tokenizer, build_prompt(q.text, tokenizer), max_prompt_tokens) for q in questions]
    size = [max(1, batch_size)]
    start, slowest, done = clock(), 0.0, 0
    with _rng_kept(model):
        while done < len(questions):
            elapsed = clock() - start
            if result.batches and elapsed + slowest > time_budget_s:
                break
            if on_batch is not None:
                on_batch()
            t0 = clock()

            def attempt():
                with autocast():
                    return sample_completions(
                        model, tokenizer, prompt_ids[done:done + size[0]], num_generations=1,
                        max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, decode=decode)

            sampled = retry_on_oom(attempt, lambda: _halve(size), _free_cache)
            batch = questions[done:done + len(sampled)]
            seconds = clock() - t0
            slowest = max(slowest, seconds)
            for q, (completion,) in zip(batch, sampled):
                score = bank.score(q, completion.text)
                task = result.tasks[q.ref.dataset]
                task.n += 1
                task.correct += is_correct(score)
                task.score_sum += score
                task.seconds += seconds / len(batch)
                result.completions.append(completion.text)
            done += len(batch)
            result.batches += 1
    result.seconds = clock() - start
    return result


def _halve(size: list[int]) -> bool:
    """Halve the batch after an out-of-memory error; False at one prompt (then the error is raised)."""
    if size[0] <= 1:
        return False
    size[0] //= 2
    return True


def _free_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _rng_kept(model):
    """Leave torch's RNG as it was (greedy decoding consumes it without using it), so an eval never changes
    what training samples afterwards."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
