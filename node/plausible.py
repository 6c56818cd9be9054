"""Plausibility of what the coordinator's state file says, on top of its signature.

A signature proves who wrote a file, not that the writer was right: an older version, a bug, or a node
restored from an old backup can still write a state that would stop or skew the run. Every reader checks
a state against what it knows (its own ``max_rounds`` and the last state it accepted) before acting on it;
pure functions, no I/O.
"""

from __future__ import annotations

from node.schemas import RoundState


def state_problem(state: RoundState, *, max_rounds: int, previous: RoundState | None = None) -> str | None:
    """Why ``state`` must not be acted on, or None when it is plausible:

    - a round beyond ``max_rounds`` (no quantity derived from it may be unbounded: skipped-round ranges,
      waits), or a round at ``max_rounds`` that is not final;
    - ``finished`` before ``max_rounds`` (a run that stops early while everything looks successful);
    - a round behind the last accepted one (the coordinator never goes back).
    """
    if state.round > max_rounds:
        return f"round {state.round} is beyond max_rounds {max_rounds}"
    if state.finished and state.round < max_rounds:
        return f"says finished at round {state.round}, before max_rounds {max_rounds}"
    if not state.finished and state.round >= max_rounds:
        return f"round {state.round} is not final but max_rounds is {max_rounds}"
    if previous is not None and state.round < previous.round:
        return f"goes back from round {previous.round} to round {state.round}"
    return None
