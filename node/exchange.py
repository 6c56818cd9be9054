"""The rollout exchange: our groups -> a rollout file, peers' rollout files -> untrusted SharedGroups.

The shared file keeps the seeds' shape plus the task reference every receiver needs to rebuild and
re-score a question (see node.schemas.RolloutFile). Rewards in it are informational: receivers compare
them with their own scores and never use them.
"""

from __future__ import annotations

import random
import stat
import time
from typing import Iterable

import structlog

from node.layout import ExperimentLayout
from node.schemas import Rollout, RolloutFile
from node.storage import SharedStore
from sapo.rollouts import Group
from sapo.swarm import SharedGroup

log = structlog.get_logger(__name__)

STAGE = 0  # one stage per round (the seeds' layout keeps the stage level)


def rollout_file_for(groups: list[Group], *, node_id: str, round_: int, now: float | None = None) -> RolloutFile:
    """Our groups of one round as the file peers read."""
    rollouts = {}
    for group in groups:
        rollouts[group.batch_id] = tuple(
            Rollout(prompt=group.prompt, response=c.text, reward=float(r), finished=c.finished,
                    task=group.question.ref)
            for c, r in zip(group.completions, group.rewards)
        )
    return RolloutFile(peer_id=node_id, round=round_, stage=STAGE,
                       timestamp=time.time() if now is None else now, rollouts=rollouts)


def shared_groups_from(file: RolloutFile) -> list[SharedGroup]:
    """A validated peer file as SharedGroups for sapo.swarm (still untrusted: re-scored there)."""
    out = []
    for batch_id, group in file.rollouts.items():
        if not group:
            continue
        out.append(SharedGroup(
            peer_id=file.peer_id,
            batch_id=batch_id,
            prompt=group[0].prompt,
            responses=tuple(r.response for r in group),
            finished=tuple(r.finished for r in group),
            task=group[0].task,
            claimed_rewards=tuple(r.reward for r in group),
        ))
    return out


class Publisher:
    """Writes our rollout file for a round at the configured frequency.

    ``generation``: rewrite the file as each question group is done; ``stage``/``round``: once, when the
    round's local groups are complete (one stage per round, so the two coincide).
    """

    def __init__(self, store: SharedStore, layout: ExperimentLayout, node_id: str, frequency: str):
        self.store, self.layout, self.node_id, self.frequency = store, layout, node_id, frequency

    def publish(self, groups: list[Group], round_: int) -> bool:
        """Publish this round's groups; False when they went to the local spool instead."""
        path = self.layout.rollout_file(round_, STAGE, self.node_id)
        if self.frequency == "generation":
            ok = True
            for k in range(1, len(groups) + 1):  # the file grows one group at a time
                ok = self.store.publish(path, rollout_file_for(groups[:k], node_id=self.node_id, round_=round_).to_json(),
                                        durable="later") and ok
            return ok
        # visible now, fsynced just after (node.bgsync): peers are waiting for it
        return self.store.publish(path, rollout_file_for(groups, node_id=self.node_id, round_=round_).to_json(),
                                  durable="later")


def peer_files_present(store: SharedStore, layout: ExperimentLayout, round_: int, peers: Iterable[str]) -> set[str]:
    """Which of ``peers`` have a regular rollout file for ``round_`` (one lstat each, nothing is read; the
    directory is never listed, so junk names in it cost nothing)."""
    present = set()
    for peer in peers:
        st = store.lstat(layout.rollout_file(round_, STAGE, peer))
        if st is not None and stat.S_ISREG(st.st_mode):
            present.add(peer)
    return present


def fetch_shared_groups(store: SharedStore, layout: ExperimentLayout, round_: int, own_id: str,
                        max_peers: int, *, peers: Iterable[str], rng: random.Random) -> tuple[list[SharedGroup], int]:
    """Every valid group of ``round_`` from at most ``max_peers`` of ``peers`` (node ids with a valid peer
    record, never names found in the rollouts directory: junk files there cannot crowd real peers out),
    picked in ``rng``'s order, and the number of files skipped as invalid.

    Each file is checked by SharedStore.read_as + RolloutFile.from_json: signature, size cap, no symlinks,
    JSON depth, schema, finite numbers, and a peer id / round / stage matching the file's path.
    """
    chosen = sorted(peer_files_present(store, layout, round_, set(peers) - {own_id}))
    rng.shuffle(chosen)
    groups: list[SharedGroup] = []
    rejected = 0
    for peer in chosen[:max_peers]:
        file = store.read_as(layout.rollout_file(round_, STAGE, peer), RolloutFile.from_json, expect_round=round_,
                             expect_stage=STAGE, expect_node=peer)
        if file is None:
            rejected += 1
            continue
        groups.extend(shared_groups_from(file))
    return groups, rejected
