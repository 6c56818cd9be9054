"""Adaptive I/J: shift a node's budget between local questions (I) and peers' groups (J) by its reward trend.

The seeds' fork adapts J every round by ``J += alpha * (R - EMA(R))``: when a round's reward beats its
recent average, take more of the swarm's groups; when it falls short, generate more locally. ``I + J``
stays what the config says (the compute per round does not change), J is kept in ``[0, I + J - 1]`` so a
node always publishes at least one group for its peers. J is tracked as a real number and rounded per
round, so small steps add up instead of being lost to rounding. Pure: no I/O, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AdaptiveIJ:
    """The controller of one node. ``total`` = I + J from the config, ``j`` the starting J."""

    total: int
    j: float
    alpha: float = 2.0
    beta: float = 0.9  # EMA(R) <- beta * EMA(R) + (1 - beta) * R
    ema: float | None = None

    def __post_init__(self):
        if self.total < 1:
            raise ValueError(f"I + J must be at least 1, got {self.total}")
        self.j = self._clamp(float(self.j))

    def _clamp(self, j: float) -> float:
        return min(max(j, 0.0), float(self.total - 1))

    @property
    def split(self) -> tuple[int, int]:
        """(I, J) for the next round."""
        j = int(round(self.j))
        return self.total - j, j

    def update(self, reward: float) -> tuple[int, int]:
        """Feed one round's mean training reward; returns the (I, J) for the next round. The first round only
        starts the average (no trend yet)."""
        if self.ema is None:
            self.ema = float(reward)
            return self.split
        self.j = self._clamp(self.j + self.alpha * (float(reward) - self.ema))
        self.ema = self.beta * self.ema + (1.0 - self.beta) * float(reward)
        return self.split

    def state_dict(self) -> dict:
        """What a checkpoint keeps, so a restart continues the same trajectory."""
        return {"j": self.j, "ema": self.ema}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (values out of range are clamped, not trusted)."""
        self.j = self._clamp(float(state.get("j", self.j)))
        ema = state.get("ema")
        self.ema = None if ema is None else float(ema)
