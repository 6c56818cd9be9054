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

This module imports neither torch nor transformers (the supervisor imports it to validate task names),
and it imports reasoning-gym only when first needed.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import math
import random
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

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
# An answer span longer than this is not an answer (it would only feed slow parsers in some scorers).
MAX_ANSWER_CHARS = 4096
# Datasets built for seeds other than the experiment's own (peer references) are kept in a small LRU.
_CACHE_SIZE = 64

_NAME_RE = re.compile(r"[A-Za-z0-9_]{1,64}")
_OPEN, _CLOSE = "<answer>", "</answer>"

SYSTEM_PROMPT = (
    "Given a problem, think about it step by step in a clear and specific manner. Once you have "
    "reasoned it through, give the final answer inside answer tags, like this:\n"
    "<answer>answer here</answer>\n"
    "Put only the final answer inside the tags, without explanation. When an example is provided, "
    "follow the format of the answer in that example exactly."
)


class TaskError(ValueError):
    """A bad task name, task reference or sampling argument (often from an untrusted peer)."""


# --------------------------------------------------------------------------------------------------
# Task references and questions
# --------------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if type(value) is not int:  # rejects bool and int subclasses
        raise TaskError(f"task ref {name} must be an integer, got {type(value).__name__}")
    if not lo <= value < hi:
        raise TaskError(f"task ref {name} must be in [{lo}, {hi}), got {value}")


@dataclass(frozen=True)
class TaskRef:
    """A question as ``create_dataset(dataset, size=dataset_size(dataset), seed=seed)[index]``."""

    dataset: str
    seed: int
    index: int

    def __post_init__(self):
        if type(self.dataset) is not str or not _NAME_RE.fullmatch(self.dataset):
            raise TaskError(
                f"task ref dataset must be 1-64 characters of [A-Za-z0-9_], got {self.dataset!r:.80}"
            )
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("index", self.index, 0, DATASET_SIZE)

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "seed": self.seed, "index": self.index}

    @classmethod
    def from_dict(cls, obj: Any) -> "TaskRef":
        """Parse a reference received from a peer: exact keys, strict types and ranges, else TaskError."""
        if type(obj) is not dict:
            raise TaskError(f"task ref must be a JSON object, got {type(obj).__name__}")
        keys = set(obj)
        expected = {"dataset", "seed", "index"}
        if keys != expected:
            missing = sorted(str(k) for k in expected - keys)
            extra = sorted(repr(k)[:40] for k in keys - expected)[:5]
            raise TaskError(f"task ref keys must be exactly {sorted(expected)}; missing {missing}, extra {extra}")
        return cls(obj["dataset"], obj["seed"], obj["index"])


@dataclass(frozen=True)
class Question:
    """A rebuilt question; ``entry`` is the dataset item that ``score_answer`` needs."""

    ref: TaskRef
    text: str
    answer: str | None
    entry: dict = field(hash=False, repr=False)


# --------------------------------------------------------------------------------------------------
# Answer extraction and prompts
# --------------------------------------------------------------------------------------------------


def extract_answer(completion: str) -> str | None:
    """The content of the LAST ``<answer>…</answer>`` span, stripped; None when there is none.

    The prompt (as in the SAPO paper's reasoning-gym setup and Gensyn's reference trainer) asks for the
    final answer inside answer tags; models often restate or draft an answer before the final one, so the
    last span wins. The span is the last ``</answer>`` and the last ``<answer>`` before it, so it never
    contains a tag itself: ``"<answer>a <answer>b</answer>"`` gives ``"b"``. Tags are exact and
    lowercase. No span, an unclosed tag, an empty (all-whitespace) span or one longer than
    ``MAX_ANSWER_CHARS`` all give None. Two ``rfind`` calls: linear time, no regex backtracking.
    """
    if not isinstance(completion, str):
        return None
    end = completion.rfind(_CLOSE)
    if end < 0:
        return None
    start = completion.rfind(_OPEN, 0, end)
    if start < 0:
        return None
    start += len(_OPEN)
    if end - start > MAX_ANSWER_CHARS:
        return None
    answer = completion[start:end].strip()
    return answer or None


def build_prompt(question_text: str, tokenizer: Any = None) -> str:
    """The prompt text for a question: the tokenizer's chat template if it has one, else a plain format.

    Templates that reject a system role get the system prompt folded into the user message.
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": question_text},
        ]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - e.g. jinja "System role not supported"
            merged = [{"role": "user", "content": f"{SYSTEM_PROMPT}\n\n{question_text}"}]
            return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
    return f"{SYSTEM_PROMPT}\n\nQuestion: {question_text}\nAnswer:"


# --------------------------------------------------------------------------------------------------
# Toy tasks: same interface as reasoning-gym datasets (ds[i] -> dict, score_answer(answer, entry))
# --------------------------------------------------------------------------------------------------

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


_TOY_TASKS = {ToyCopyDataset.name: ToyCopyDataset, ToyDigitsDataset.name: ToyDigitsDataset}


# --------------------------------------------------------------------------------------------------
# Names, sizes, seeds
# --------------------------------------------------------------------------------------------------


def _reasoning_gym():
    import reasoning_gym  # ~1 s import; only when a bank first needs it

    return reasoning_gym


def known_task_names() -> list[str]:
    """Every task name a mix may use: reasoning-gym's buildable datasets plus the ``toy_*`` tasks."""
    from reasoning_gym.factory import DATASETS

    return sorted(set(DATASETS) - _UNBUILDABLE) + sorted(_TOY_TASKS)


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
        if name in _TOY_TASKS:
            ds = _TOY_TASKS[name](seed, size)
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
