"""Tests for sapo.tasks: sampling determinism, rebuilding from references, scoring, hostile references."""

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sapo.config import DEFAULT_TASKS, TaskSpec
from sapo.tasks import (
    DATASET_SIZE,
    SYSTEM_PROMPT,
    TOY_COPY_WORDS,
    Question,
    TaskBank,
    TaskError,
    TaskRef,
    build_prompt,
    dataset_seed,
    dataset_size,
    extract_answer,
    known_task_names,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bank():
    return TaskBank(DEFAULT_TASKS)


def refs(questions):
    return [q.ref for q in questions]


# -- sampling -----------------------------------------------------------------------------------------


def test_sample_is_deterministic(bank):
    a = bank.sample(7, "node-a", 3, 12)
    b = TaskBank(DEFAULT_TASKS).sample(7, "node-a", 3, 12)
    assert refs(a) == refs(b)
    assert [q.text for q in a] == [q.text for q in b]
    assert [q.answer for q in a] == [q.answer for q in b]


def test_sample_differs_across_nodes_rounds_and_seeds(bank):
    base = refs(bank.sample(7, "node-a", 3, 8))
    assert refs(bank.sample(7, "node-b", 3, 8)) != base
    assert refs(bank.sample(7, "node-a", 4, 8)) != base
    assert refs(bank.sample(8, "node-a", 3, 8)) != base


def test_sample_uses_one_dataset_seed_per_name_and_respects_the_mix(bank):
    questions = bank.sample(11, "n", 0, 60)
    assert len(questions) == 60
    for q in questions:
        assert q.ref.dataset in bank.names
        assert q.ref.seed == dataset_seed(11, q.ref.dataset)
        assert 0 <= q.ref.index < dataset_size(q.ref.dataset)
    assert len({q.ref.dataset for q in questions}) > 3


def test_sample_follows_weights():
    skewed = TaskBank([TaskSpec("toy_copy", 99.0), TaskSpec("basic_arithmetic", 1.0)])
    names = [q.ref.dataset for q in skewed.sample(0, "n", 0, 200)]
    assert names.count("toy_copy") > 180


def test_sample_count_zero_and_bad_args(bank):
    assert bank.sample(1, "n", 0, 0) == []
    with pytest.raises(TaskError):
        bank.sample(1, "n", 0, -1)
    with pytest.raises(TaskError):
        bank.sample(True, "n", 0, 1)
    with pytest.raises(TaskError):
        bank.sample(1, 5, 0, 1)


def test_rebuild_equals_sampled_question(bank):
    fresh = TaskBank(DEFAULT_TASKS)
    for q in bank.sample(3, "node-x", 9, 20):
        again = fresh.rebuild(TaskRef.from_dict(q.ref.to_dict()))
        assert again == q
        assert again.entry == q.entry


# -- every default task ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [t.name for t in DEFAULT_TASKS])
def test_default_task_samples_rebuilds_and_scores(name):
    bank = TaskBank([TaskSpec(name)])
    questions = bank.sample(5, "node", 1, 3)
    assert {q.ref.dataset for q in questions} == {name}
    for q in questions:
        assert isinstance(q.text, str) and q.text
        assert bank.rebuild(q.ref) == q
        wrong = bank.score(q, "<answer>definitely wrong</answer>")
        assert 0.0 <= wrong < 1.0
        assert bank.score(q, "no answer here") == 0.0
        if q.answer is not None:
            assert bank.score(q, f"Let me think.\n<answer>{q.answer}</answer>") == 1.0
        else:
            # propositional_logic has no single answer; its scorer checks the conclusion follows.
            assert name == "propositional_logic"
            example = q.entry["metadata"]["example_answer"]
            assert bank.score(q, f"<answer>{example}</answer>") > 0.0


def test_format_reward_only_for_well_formed_span(bank):
    q = next(q for q in bank.sample(2, "n", 0, 20) if q.answer is not None)
    right = f"<answer>{q.answer}</answer>"
    assert bank.score(q, right, format_reward=0.5) == 1.5
    assert bank.score(q, "<answer>definitely wrong</answer>", format_reward=0.5) >= 0.5
    assert bank.score(q, "<answer>definitely wrong</answer>", format_reward=0.5) < 1.5
    assert bank.score(q, f"<answer>{q.answer}", format_reward=0.5) == 0.0
    assert bank.score(q, f"{q.answer}</answer>", format_reward=0.5) == 0.0
    assert bank.score(q, "<answer>   </answer>", format_reward=0.5) == 0.0
    assert bank.score(q, "plain text", format_reward=0.5) == 0.0


def test_score_survives_a_raising_scorer_and_odd_values(bank, monkeypatch):
    q = bank.sample(2, "n", 0, 1)[0]
    ds = bank._dataset(q.ref.dataset, q.ref.seed)

    def boom(answer, entry):
        raise RuntimeError("scorer bug")

    monkeypatch.setattr(ds, "score_answer", boom)
    assert bank.score(q, "<answer>x</answer>", format_reward=0.25) == 0.25
    for value in (float("nan"), float("inf"), 7.0, -3.0):
        monkeypatch.setattr(ds, "score_answer", lambda a, e, v=value: v)
        result = bank.score(q, "<answer>x</answer>")
        assert math.isfinite(result) and 0.0 <= result <= 1.0
    assert bank.score(q, None) == 0.0


def test_bf_prints_nothing(capsys):
    bank = TaskBank([TaskSpec("bf")])
    q = bank.sample(1, "n", 0, 2)[0]
    bank.score(q, f"<answer>{q.answer}</answer>")
    assert capsys.readouterr().out == ""


# -- toy tasks ---------------------------------------------------------------------------------------


def test_toy_copy():
    bank = TaskBank([TaskSpec("toy_copy")])
    questions = bank.sample(0, "n", 0, 30)
    assert len({q.answer for q in questions}) > 3
    for q in questions:
        word = q.answer
        assert word in TOY_COPY_WORDS
        assert q.text == f"Copy this word: {word}"
        assert bank.rebuild(q.ref) == q
        assert bank.score(q, f"<answer>{word}</answer>") == 1.0
        assert bank.score(q, f" {word} and more words") == 1.0  # no span: the first word
        # Not exact: partial credit, 0.5 x the share of the word's distinct letters present.
        assert bank.score(q, f"{word}.") == 0.5
        assert bank.score(q, f"{word}x") == 0.5
        assert bank.score(q, "zzz") == 0.5 * len(set("zzz") & set(word)) / len(set(word))
        assert bank.score(q, f"{word[0]}") == 0.5 / len(set(word))
        expected = 0.5 * len(set("not it") & set(word)) / len(set(word))
        assert bank.score(q, f"<answer>not it</answer> {word}") == expected  # a span wins over the first word
        assert bank.score(q, "") == 0.0
        assert bank.score(q, f"{word}", format_reward=0.5) == 1.0
        assert bank.score(q, f"<answer>{word}</answer>", format_reward=0.5) == 1.5


def test_toy_copy_is_deterministic_per_seed_and_index():
    a, b = TaskBank([TaskSpec("toy_copy")]), TaskBank([TaskSpec("toy_copy")])
    ref = TaskRef("toy_copy", 123, 456)
    assert a.rebuild(ref) == b.rebuild(ref)
    texts = {a.rebuild(TaskRef("toy_copy", 123, i)).text for i in range(50)}
    assert len(texts) > 5


# -- extract_answer ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<answer>42</answer>", "42"),
        ("think <answer> 41 </answer> no wait <answer>\n42\n</answer> done", "42"),
        ("no tags at all", None),
        ("<answer>42", None),
        ("42</answer>", None),
        ("<answer></answer>", None),
        ("<answer>a <answer>b</answer>", "b"),
        ("<answer>a</answer> trailing <answer>b", "a"),
        ("</answer><answer>x", None),
        ("<ANSWER>42</ANSWER>", None),
        ("<answer>" + "x" * 5000 + "</answer>", None),
        ("<answer>multi\nline</answer>", "multi\nline"),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_extract_answer_is_fast_on_huge_strings():
    hostile = [
        "<answer>" * 200_000,
        "<answer>" + "x" * 1_000_000 + "</answer>",
        ("<answer>a" * 100_000) + "</answer>",
        "x" * 1_000_000 + "<answer>ok</answer>",
    ]
    start = time.perf_counter()
    results = [extract_answer(s) for s in hostile]
    assert time.perf_counter() - start < 0.5
    assert results == [None, None, "a", "ok"]


# -- TaskRef -----------------------------------------------------------------------------------------


def test_taskref_round_trip():
    ref = TaskRef("basic_arithmetic", 12345, 678)
    assert TaskRef.from_dict(ref.to_dict()) == ref


@pytest.mark.parametrize(
    "obj",
    [
        None,
        [],
        "basic_arithmetic",
        ["basic_arithmetic", 1, 2],
        {"dataset": "basic_arithmetic", "seed": 1},
        {"dataset": "basic_arithmetic", "seed": 1, "index": 2, "extra": 3},
        {"dataset": "basic_arithmetic", "seed": True, "index": 2},
        {"dataset": "basic_arithmetic", "seed": 1, "index": False},
        {"dataset": "basic_arithmetic", "seed": -1, "index": 2},
        {"dataset": "basic_arithmetic", "seed": 1, "index": -2},
        {"dataset": "basic_arithmetic", "seed": 1, "index": DATASET_SIZE},
        {"dataset": "basic_arithmetic", "seed": 1, "index": 10**100},
        {"dataset": "basic_arithmetic", "seed": 2**63, "index": 2},
        {"dataset": "basic_arithmetic", "seed": 1.0, "index": 2},
        {"dataset": "basic_arithmetic", "seed": "1", "index": 2},
        {"dataset": "../x", "seed": 1, "index": 2},
        {"dataset": "", "seed": 1, "index": 2},
        {"dataset": "a" * 65, "seed": 1, "index": 2},
        {"dataset": "basic_arithmetic\n", "seed": 1, "index": 2},
        {"dataset": "bäsic", "seed": 1, "index": 2},
        {"dataset": 5, "seed": 1, "index": 2},
        {"dataset": None, "seed": 1, "index": 2},
        {1: 2, "dataset": "x", "seed": 1, "index": 2},
    ],
)
def test_taskref_from_dict_rejects_bad_input(obj):
    with pytest.raises(TaskError):
        TaskRef.from_dict(obj)


def test_taskerror_is_a_valueerror():
    assert issubclass(TaskError, ValueError)


def test_taskref_built_in_code_is_checked_the_same_way():
    with pytest.raises(TaskError, match="task ref dataset: must be 1-64 characters"):
        TaskRef("../x", 1, 2)
    with pytest.raises(TaskError, match="task ref index: must be < 1000000; got 1000000"):
        TaskRef("basic_arithmetic", 1, DATASET_SIZE)
    with pytest.raises(TaskError, match="task ref extra: unknown key"):
        TaskRef.from_dict({"dataset": "bf", "seed": 1, "index": 2, "extra": 3})


# -- the bank's boundaries ---------------------------------------------------------------------------


def test_rebuild_rejects_datasets_outside_the_mix(bank, monkeypatch):
    import reasoning_gym

    def forbidden(*args, **kwargs):
        raise AssertionError("built a dataset a peer named")

    monkeypatch.setattr(reasoning_gym, "create_dataset", forbidden)
    for name in ("leg_counting", "toy_copy", "not_a_dataset"):
        with pytest.raises(TaskError, match="not in this node's task mix"):
            bank.rebuild(TaskRef(name, 1, 0))


def test_rebuild_rejects_bad_refs(bank):
    with pytest.raises(TaskError):
        bank.rebuild({"dataset": "basic_arithmetic", "seed": 1, "index": 0})
    small = TaskBank([TaskSpec("acre")])
    with pytest.raises(TaskError, match="out of range"):
        small.rebuild(TaskRef("acre", 1, dataset_size("acre")))
    ref = bank.sample(4, "n", 0, 1)[0].ref
    assert bank.rebuild(ref, experiment_seed=4) == bank.rebuild(ref)
    with pytest.raises(TaskError, match="not this experiment's seed"):
        bank.rebuild(ref, experiment_seed=5)


def test_rebuild_wraps_generation_failures():
    # pool_matrix seeds numpy with seed + index, which must stay below 2**32.
    bank = TaskBank([TaskSpec("pool_matrix")])
    with pytest.raises(TaskError, match="cannot build"):
        bank.rebuild(TaskRef("pool_matrix", 2**62, 0))


def test_unknown_task_name_lists_known_names():
    with pytest.raises(TaskError) as info:
        TaskBank([TaskSpec("not_a_task")])
    message = str(info.value)
    assert "not_a_task" in message and "basic_arithmetic" in message and "toy_copy" in message


def test_bank_rejects_empty_and_duplicate_mixes():
    with pytest.raises(TaskError):
        TaskBank([])
    with pytest.raises(TaskError):
        TaskBank([TaskSpec("toy_copy"), TaskSpec("toy_copy")])


def test_known_task_names():
    names = known_task_names()
    assert "toy_copy" in names
    assert "composite" not in names  # needs dataset specs, cannot be built from a name
    for spec in DEFAULT_TASKS:
        assert spec.name in names


# -- prompts and imports -----------------------------------------------------------------------------


def test_build_prompt_plain_and_chat():
    plain = build_prompt("What is 2+2?")
    assert plain == build_prompt("What is 2+2?")
    assert SYSTEM_PROMPT in plain and "What is 2+2?" in plain and "<answer>" in plain

    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt is True
            return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    assert build_prompt("Q?", Tok()) == f"system:{SYSTEM_PROMPT}|user:Q?"

    class NoSystem(Tok):
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            if any(m["role"] == "system" for m in messages):
                raise ValueError("System role not supported")
            return super().apply_chat_template(messages, tokenize, add_generation_prompt)

    assert build_prompt("Q?", NoSystem()) == f"user:{SYSTEM_PROMPT}\n\nQ?"

    class NoTemplate:
        chat_template = None

    assert build_prompt("Q?", NoTemplate()) == build_prompt("Q?")


def test_import_does_not_pull_torch():
    code = (
        "import sys, sapo.tasks, sapo.config; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
        "sapo.tasks.TaskBank([sapo.config.TaskSpec('toy_copy')]).sample(0, 'n', 0, 2); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_question_is_hashable_by_ref_and_text(bank):
    q = bank.sample(1, "n", 0, 1)[0]
    assert isinstance(q, Question)
    assert hash(q) == hash(bank.rebuild(q.ref))


# -- toy_digits --------------------------------------------------------------------------------------


def test_toy_digits_questions():
    bank = TaskBank([TaskSpec("toy_digits")])
    questions = bank.sample(0, "n", 0, 30)
    assert len({q.text for q in questions}) > 10  # the example varies with the index
    for q in questions:
        assert q.text == f"Write a number with at least six digits, like {q.answer}."
        assert len(q.answer) == 6 and q.answer.isdigit() and q.answer[0] != "0"
        assert bank.rebuild(q.ref) == q
        assert bank.score(q, q.answer) == 1.0  # the example itself is a correct answer
    assert "toy_digits" in known_task_names()


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("482913", 1.0),
        ("1313131313", 1.0),  # at least six digits
        (" 123456 and more", 1.0),  # leading whitespace; the first word only
        ("123456abc", 1.0),  # only the first six characters count
        ("123", 3 / 6),
        ("12a456", 5 / 6),
        ("abcdef", 0.0),
        ("12 3456", 2 / 6),  # the first word is "12"
        ("x 123456", 0.0),
        ("", 0.0),
        ("   ", 0.0),
        ("<answer>654321</answer>", 1.0),
        ("999999 <answer>12</answer>", 2 / 6),  # a span wins over the first word
        ("<answer> 77 88 </answer>", 2 / 6),  # the span's first word
        ("٣٣٣٣٣٣", 0.0),  # ASCII digits only
    ],
)
def test_toy_digits_scoring(completion, expected):
    bank = TaskBank([TaskSpec("toy_digits")])
    q = bank.sample(3, "n", 0, 1)[0]
    assert bank.score(q, completion) == pytest.approx(expected)


def test_toy_digits_format_bonus_and_determinism():
    a, b = TaskBank([TaskSpec("toy_digits")]), TaskBank([TaskSpec("toy_digits")])
    ref = TaskRef("toy_digits", 123, 456)
    assert a.rebuild(ref) == b.rebuild(ref)
    q = a.rebuild(ref)
    assert a.score(q, "<answer>123456</answer>", format_reward=0.5) == 1.5
    assert a.score(q, "123456", format_reward=0.5) == 1.0
    # Another seed gives other examples.
    assert {a.rebuild(TaskRef("toy_digits", 1, i)).answer for i in range(20)} != {
        a.rebuild(TaskRef("toy_digits", 2, i)).answer for i in range(20)}
