"""The swarm part of SAPO: turning peers' shared rollouts into external training groups.

Peers are untrusted. A shared group carries only text and a task reference; we rebuild the question from
the reference, check the peer's prompt is exactly the prompt we would have built, re-tokenise the
completions with our tokenizer and score them with our own scorer. A peer's reward is never read.

Selection follows the paper's controlled setting (SAPO §4): drop groups without signal (all rewards equal,
so every advantage is 0), then take J uniformly at random with a seeded RNG.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from sapo.rollouts import Group, encode_completion, encode_prompt
from sapo.tasks import TaskBank, TaskError, TaskRef


@dataclass(frozen=True)
class SharedGroup:
    """One question group as a peer published it (already schema-checked, still untrusted)."""

    peer_id: str
    batch_id: str
    prompt: str
    responses: tuple[str, ...]
    finished: tuple[bool, ...]
    task: TaskRef | None  # None: the peer gave no usable reference (dropped as bad_reference)
    claimed_rewards: tuple[float, ...] = ()  # what the peer says it scored; compared, never used


@dataclass
class Selection:
    """The chosen external groups and why the others were not used."""

    groups: list[Group]
    candidates: int
    dropped: Counter = field(default_factory=Counter)
    reward_disagreements: int = 0  # used groups whose peer-claimed rewards differ from ours (a lying peer?)
    # (peer_id, batch_id, reason) of every group a peer got wrong: a drop other than own/no_signal, or
    # "reward_disagreement" for a used group whose claimed rewards differ from ours (for one warning each)
    suspicious: list = field(default_factory=list)


DROP_REASONS = ("own", "bad_reference", "unknown_task", "prompt_mismatch", "wrong_size", "no_signal")


def rebuild_group(
    shared: SharedGroup,
    *,
    bank: TaskBank,
    experiment_seed: int,
    tokenizer,
    build_prompt: Callable[[str], str],
    num_generations: int,
    max_new_tokens: int,
    max_prompt_tokens: int,
    format_reward: float,
) -> Group | str:
    """A locally re-scored Group from a peer's group, or the drop reason (one of DROP_REASONS).

    Only references into this experiment's own datasets are rebuilt (``experiment_seed``), so a peer cannot
    make us build arbitrary datasets.
    """
    if len(shared.responses) != num_generations or len(shared.finished) != num_generations:
        return "wrong_size"
    if not isinstance(shared.task, TaskRef):
        return "bad_reference"
    try:
        question = bank.rebuild(shared.task, experiment_seed=experiment_seed)
    except TaskError:
        return "unknown_task"
    prompt = build_prompt(question.text)
    if prompt != shared.prompt:
        return "prompt_mismatch"
    completions = [
        encode_completion(tokenizer, text, done, max_new_tokens)
        for text, done in zip(shared.responses, shared.finished)
    ]
    rewards = [bank.score(question, c.text, format_reward) for c in completions]
    return Group(
        question=question,
        prompt=prompt,
        prompt_ids=encode_prompt(tokenizer, prompt, max_prompt_tokens),
        completions=completions,
        rewards=rewards,
        source=shared.peer_id,
        batch_id=shared.batch_id,
    )


def select_external(
    shared_groups: list[SharedGroup],
    *,
    own_id: str,
    count: int,
    rng: random.Random,
    rebuild: Callable[[SharedGroup], Group | str],
) -> Selection:
    """Re-score every peer group, keep those with signal, take ``count`` uniformly at random.

    Groups are examined in a seeded shuffled order and the first ``count`` usable ones are kept, which is
    a uniform sample of the usable set without re-scoring groups we would never use.
    """
    selection = Selection(groups=[], candidates=len(shared_groups))
    if count <= 0:
        return selection
    order = sorted(shared_groups, key=lambda s: (s.peer_id, s.batch_id))  # stable before shuffling
    rng.shuffle(order)
    for shared in order:
        if len(selection.groups) == count:
            break
        if shared.peer_id == own_id:
            selection.dropped["own"] += 1
            continue
        result = rebuild(shared)
        if isinstance(result, str):
            selection.dropped[result] += 1
            selection.suspicious.append((shared.peer_id, shared.batch_id, result))
        elif not result.is_informative:
            selection.dropped["no_signal"] += 1
        else:
            selection.groups.append(result)
            if shared.claimed_rewards and _disagree(shared.claimed_rewards, result.rewards):
                selection.reward_disagreements += 1
                selection.suspicious.append((shared.peer_id, shared.batch_id, "reward_disagreement"))
    return selection


def _disagree(claimed: tuple[float, ...], ours: list[float], tol: float = 1e-6) -> bool:
    return len(claimed) != len(ours) or any(abs(a - b) > tol for a, b in zip(claimed, ours))


def share_group(group: Group, peer_id: str) -> SharedGroup:
    """What a peer would receive for one of our groups: text and the task reference, no tokens, no reward."""
    return SharedGroup(
        peer_id=peer_id,
        batch_id=group.batch_id,
        prompt=group.prompt,
        responses=tuple(c.text for c in group.completions),
        finished=tuple(c.finished for c in group.completions),
        task=group.question.ref if group.question is not None else None,
        claimed_rewards=tuple(group.rewards),
    )
