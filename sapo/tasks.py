"""Questions, task references and rewards: the reasoning-gym side of SAPO.

A node samples questions from a weighted mix of reasoning-gym datasets (and a few built-in ``toy_*``
tasks), generates completions, and shares them with peers as *text* together with a :class:`TaskRef`.
A peer never trusts the question or answer a sender attaches: it rebuilds both from the reference with
:meth:`TaskBank.rebuild` and re-scores the completion itself with :meth:`TaskBank.score`.

How a reference maps to a question
----------------------------------
``TaskRef(dataset, seed, index)`` means
``reasoning_gym.create_dataset(dataset, size=dataset_size(dataset), seed=seed)[index]``.
reasoning-gym datasets are virtual: item ``i`` is generated from ``Random(seed + i)``, so building a
dataset costs nothing for most tasks and any node can rebuild any reference. The bank derives one dataset
seed per (experiment seed, dataset name) (:func:`dataset_seed`) and draws only the index at random, so it
keeps one dataset object per name and every node of an experiment shares the same question space of
``DATASET_SIZE`` items per dataset. Dataset seeds are kept below 2**31 and sizes at most 10**6 because
some datasets (``pool_matrix``) seed numpy with ``seed + index``, which must stay below 2**32. A few
datasets precompute work proportional to ``size`` or cap it, so they get a smaller size
(``_SIZE_OVERRIDES``); every node must run the same table, which is part of the code version.

Rewards
-------
reward = ``score_answer(extracted answer, entry)`` clamped to [0, 1] (0 when nothing was extracted or the
scorer raised) + ``format_reward`` when the completion holds a well-formed ``<answer>…</answer>`` span.

The prompt text and answer extraction live in :mod:`sapo.prompts`, the toy tasks in :mod:`sapo.toy_tasks`
(both re-exported here). This module imports neither torch nor transformers (the supervisor imports it to
validate task names), and it imports reasoning-gym only when first needed.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import math
import random
from dataclasses import dataclass, field
from typing import Annotated, Any, Iterable

from pydantic import Field, ValidationError

from sapo.prompts import MAX_ANSWER_CHARS, SYSTEM_PROMPT, build_prompt, extract_answer
from sapo.toy_tasks import TOY_COPY_WORDS, TOY_TASKS
from sapo.validation import Int, Str, explain, model, one_message, to_plain, validate

__all__ = ["DATASET_SIZE", "MAX_ANSWER_CHARS", "MAX_SEED", "SYSTEM_PROMPT", "TOY_COPY_WORDS", "Question", "TaskBank",
           "TaskError", "TaskRef", "build_prompt", "dataset_seed", "dataset_size", "extract_answer",
           "known_task_names"]

# Largest dataset size: the exclusive upper bound of ``TaskRef.index`` (10**6 builds instantly for every
# default task; see the module docstring for why it must stay small next to 2**32).
DATASET_SIZE = 1_000_000
# Datasets that precompute O(size) work or refuse large sizes (measured with reasoning-gym 0.1.25:
# ``acre`` takes ~0.16 s at 1,000 and ~1.9 s at 10,000; ``word_ladder`` rejects size > 20,000).
_SIZE_OVERRIDES = {"acre": 1_000, "word_ladder": 20_000}
# reasoning-gym registry entries that cannot be built from a name alone.
_UNBUILDABLE = frozenset({"composite"})
# Dataset seeds the bank derives lie in [0, _DATASET_SEED_RANGE).
_DATASET_SEED_RANGE = 2**31
# Peers may name any seed in [0, MAX_SEED); one that a dataset cannot use raises TaskError on rebuild.
MAX_SEED = 2**63
# Datasets built for seeds other than the experiment's own (peer references) are kept in a small LRU.
_CACHE_SIZE = 64


class TaskError(ValueError):
    """A bad task name, task reference or sampling argument (often from an untrusted peer)."""


# --------------------------------------------------------------------------------------------------
# Task references and questions
# --------------------------------------------------------------------------------------------------


def _task_error(err: ValidationError, cls: type) -> TaskError:
    path, message = explain(err, cls)
    return TaskError(f"task ref {path}: {message}" if path else f"task ref {message}")


@model(extra="forbid", error=_task_error)
class TaskRef:
    """A question as ``create_dataset(dataset, size=dataset_size(dataset), seed=seed)[index]``.

    The one task reference: built by the bank, written into rollout files, parsed from peers' files
    (exact keys, strict types and ranges) and rebuilt by the receiver. A mistake raises TaskError.
    """

    dataset: Annotated[Str, Field(pattern=r"^[A-Za-z0-9_]{1,64}$"), one_message("1-64 characters of [A-Za-z0-9_]")]
    seed: Annotated[Int, Field(ge=0, lt=MAX_SEED)]
    index: Annotated[Int, Field(ge=0, lt=DATASET_SIZE)]

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_dict(cls, obj: Any) -> "TaskRef":
        """Parse a reference received from a peer: exact keys, strict types and ranges, else TaskError."""
        try:
            return validate(cls, obj)
        except ValidationError as err:
            raise _task_error(err, cls) from None


@dataclass(frozen=True)
class Question:
    """A rebuilt question; ``entry`` is the dataset item that ``score_answer`` needs."""

    ref: TaskRef
    text: str
    answer: str | None
    entry: dict = field(hash=False, repr=False)


# --------------------------------------------------------------------------------------------------
# Names, sizes, seeds
# --------------------------------------------------------------------------------------------------


def _reasoning_gym():
    import reasoning_gym  # ~1 s import; only when a bank first needs it

    return reasoning_gym


def known_task_names() -> list[str]:
    """Every task name a mix may use: reasoning-gym's buildable datasets plus the ``toy_*`` tasks."""
    from reasoning_gym.factory import DATASETS

    return sorted(set(DATASETS) - _UNBUILDABLE) + sorted(TOY_TASKS)


def dataset_size(name: str) -> int:
    """The ``size`` every node builds dataset ``name`` with (also the bound on its indices)."""
    return _SIZE_OVERRIDES.get(name, DATASET_SIZE)


def dataset_seed(experiment_seed: int, name: str) -> int:
    """The dataset seed an experiment uses for ``name``: fixed per (experiment, name), in [0, 2**31)."""
    digest = hashlib.sha256(f"{experiment_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % _DATASET_SEED_RANGE


def _quiet(fn, *args):
    """Call a reasoning-gym function with stdout swallowed (``bf`` prints while building and scoring)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


# --------------------------------------------------------------------------------------------------
# The bank
# --------------------------------------------------------------------------------------------------


class TaskBank:
    """A weighted mix of tasks: samples questions, rebuilds them from references, scores completions."""

    def __init__(self, tasks: Iterable[Any]):
        """``tasks``: TaskSpec-like objects with ``name`` and ``weight`` (unique names, weights > 0)."""
        specs = list(tasks)
        if not specs:
            raise TaskError("the task mix must list at least one task")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise TaskError(f"task names must be unique; got {names}")
        known = set(known_task_names())
        unknown = [n for n in names if n not in known]
        if unknown:
            raise TaskError(f"unknown task(s) {unknown}; known tasks: {', '.join(known_task_names())}")
        weights = [s.weight for s in specs]
        if not all(type(w) in (int, float) and math.isfinite(w) and w > 0 for w in weights):
            raise TaskError(f"task weights must be finite numbers > 0; got {weights}")
        self.names: tuple[str, ...] = tuple(names)
        self.weights: tuple[float, ...] = tuple(float(w) for w in weights)
        self._datasets: collections.OrderedDict[tuple[str, int], Any] = collections.OrderedDict()

    # -- building ------------------------------------------------------------------------------------

    def _dataset(self, name: str, seed: int) -> Any:
        key = (name, seed)
        ds = self._datasets.get(key)
        if ds is not None:
            self._datasets.move_to_end(key)
            return ds
        size = dataset_size(name)
        if name in TOY_TASKS:
            ds = TOY_TASKS[name](seed, size)
        else:
            ds = _quiet(lambda: _reasoning_gym().create_dataset(name, size=size, seed=seed))
        self._datasets[key] = ds
        while len(self._datasets) > _CACHE_SIZE:
            self._datasets.popitem(last=False)
        return ds

    def rebuild(self, ref: TaskRef, experiment_seed: int | None = None) -> Question:
        """The exact question and answer for ``ref``.

        Raises TaskError when the dataset is not in this bank's mix (datasets a peer names that we did not
        configure are never built), the index is out of range for it, the dataset cannot be built for that
        seed, or — when ``experiment_seed`` is given — the seed is not the one that experiment uses.
        """
        if not isinstance(ref, TaskRef):
            raise TaskError(f"expected a TaskRef, got {type(ref).__name__}")
        if ref.dataset not in self.names:
            raise TaskError(f"dataset {ref.dataset!r} is not in this node's task mix {list(self.names)}")
        size = dataset_size(ref.dataset)
        if ref.index >= size:
            raise TaskError(f"index {ref.index} out of range for {ref.dataset} (size {size})")
        if experiment_seed is not None and ref.seed != dataset_seed(experiment_seed, ref.dataset):
            raise TaskError(f"seed {ref.seed} is not this experiment's seed for {ref.dataset}")
        try:
            ds = self._dataset(ref.dataset, ref.seed)
            entry = _quiet(ds.__getitem__, ref.index)
            text = entry["question"]
            answer = entry["answer"]
        except Exception as err:  # noqa: BLE001 - any failure of third-party generation code
            raise TaskError(f"cannot build {ref.to_dict()}: {type(err).__name__}: {err}"[:300]) from err
        if not isinstance(text, str):
            raise TaskError(f"{ref.dataset} produced a non-text question")
        return Question(ref=ref, text=text, answer=None if answer is None else str(answer), entry=entry)

    # -- sampling ------------------------------------------------------------------------------------

    def sample(self, experiment_seed: int, node_id: str, round_: int, count: int) -> list[Question]:
        """``count`` questions, a pure function of (experiment_seed, node_id, round_) and the mix.

        Each question picks a dataset by weight, then an index uniformly in [0, dataset_size); the
        dataset seed is :func:`dataset_seed` of the experiment seed and the dataset name.
        """
        for label, value in (("experiment_seed", experiment_seed), ("round_", round_), ("count", count)):
            if type(value) is not int:
                raise TaskError(f"{label} must be an integer, got {type(value).__name__}")
        if count < 0:
            raise TaskError(f"count must be >= 0, got {count}")
        if not isinstance(node_id, str):
            raise TaskError(f"node_id must be a string, got {type(node_id).__name__}")
        key = f"{experiment_seed}:{node_id}:{round_}".encode()
        rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
        questions = []
        for _ in range(count):
            name = rng.choices(self.names, weights=self.weights)[0]
            index = rng.randrange(dataset_size(name))
            ref = TaskRef(name, dataset_seed(experiment_seed, name), index)
            questions.append(self.rebuild(ref))
        return questions

    # -- scoring -------------------------------------------------------------------------------------

    def score(self, question: Question, completion: str, format_reward: float = 0.0) -> float:
        """Reward for ``completion``: the dataset's score of the extracted answer, clamped to [0, 1], plus
        ``format_reward`` when the completion has a well-formed answer span (:func:`extract_answer`).

        Any exception from the scorer counts as 0.0; the result is always a finite float.
        """
        if question.ref.dataset not in self.names:
            raise TaskError(f"dataset {question.ref.dataset!r} is not in this node's task mix")
        if not isinstance(completion, str):
            return 0.0
        ds = self._dataset(question.ref.dataset, question.ref.seed)
        well_formed = extract_answer(completion) is not None
        extract = getattr(ds, "answer_from_completion", extract_answer)
        correctness = 0.0
        try:
            answer = extract(completion)
            if answer is not None:
                correctness = float(_quiet(ds.score_answer, answer, question.entry))
        except Exception:  # noqa: BLE001 - third-party scorers raise anything on odd answers
            correctness = 0.0
        if not math.isfinite(correctness):
            correctness = 0.0
        correctness = min(1.0, max(0.0, correctness))
        bonus = float(format_reward) if well_formed and math.isfinite(format_reward) else 0.0
        return correctness + bonus
