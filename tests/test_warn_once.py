"""node.warn_once: one warning per file version, and a budget per reason per window (no log floods)."""

from __future__ import annotations

from structlog.testing import capture_logs

from node.warn_once import DEFAULT_BUDGET, DEFAULT_CAP, DEFAULT_WINDOW_S, MAX_REASONS, WarnOnce, reason_kind


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_thrashing_cache_does_not_flood_the_log():
    """10 000 junk names (more than the cache holds) polled 50 times, 2 s apart: a bounded number of lines."""
    clock = Clock()
    warn = WarnOnce(clock=clock)
    names = [f"/shared/rollouts/junk-{i}.json" for i in range(10_000)]
    assert len(names) > DEFAULT_CAP  # the cache thrashes: every poll is a "new" warning for every name
    polls, step = 50, 2.0
    with capture_logs() as logs:
        for _ in range(polls):
            for name in names:
                warn(name, (1, 0), "peer_file_rejected", reason="is not a regular file")
            clock.t += step
        warn("/shared/one-more.json", (1,), "peer_file_rejected", reason="is not a regular file")  # ends the window
    windows = int(polls * step // DEFAULT_WINDOW_S) + 1
    rejected = [e for e in logs if e["event"] == "peer_file_rejected"]
    summaries = [e for e in logs if e["event"] == "warnings_suppressed"]
    assert len(rejected) <= windows * DEFAULT_BUDGET and len(summaries) <= windows
    assert len(logs) <= windows * (DEFAULT_BUDGET + 1)  # 2 windows here: 42 lines, not 500 000
    # the first window held 30 polls: all but the budget counted in its summary
    assert [s["counts"] for s in summaries] == [{"peer_file_rejected: is not a regular file": 30 * 10_000 - 20}]


def test_budget_per_reason_then_one_summary_line():
    clock = Clock()
    warn = WarnOnce(budget=3, window_s=60.0, clock=clock)
    with capture_logs() as logs:
        for i in range(10):
            warn(f"a{i}", (1,), "peer_file_rejected", reason=f"size {i} bytes exceeds the cap of 8")
            warn(f"b{i}", (1,), "peer_file_rejected", reason="schema: bad field")
            warn(f"c{i}", (1,), "spool_flush_failed", error="EIO")  # no reason: the event's own budget
        clock.t += 59.0
        warn("a-late", (1,), "peer_file_rejected", reason="size 1 bytes exceeds the cap of 8")  # still spent
        clock.t += 1.0
        warn("a-next", (1,), "peer_file_rejected", reason="size 2 bytes exceeds the cap of 8")
    events = [e["event"] for e in logs]
    assert events[:9] == ["peer_file_rejected", "peer_file_rejected", "spool_flush_failed"] * 3
    assert events[9:] == ["warnings_suppressed", "peer_file_rejected"]
    summary = logs[9]
    assert summary["counts"] == {"peer_file_rejected: size N bytes exceeds the cap of N": 8,
                                 "peer_file_rejected: schema": 7, "spool_flush_failed": 7}
    assert summary["total"] == 22 and summary["window_s"] == 60.0
    assert logs[-1]["path"] == "a-next"


def test_hostile_reasons_cannot_mint_budgets():
    warn = WarnOnce(budget=2, clock=Clock())
    with capture_logs() as logs:
        for i in range(1000):
            warn(f"p{i}", (1,), "peer_file_rejected", reason=f"kind-{chr(65 + i % 26)}{chr(65 + i // 26 % 26)}")
    assert len(logs) <= (MAX_REASONS + 1) * 2


def test_reason_kind():
    assert reason_kind("size 123 bytes exceeds the cap of 64") == "size N bytes exceeds the cap of N"
    assert reason_kind("schema: 1 validation error for X") == "schema"
    assert reason_kind(None) == "" and len(reason_kind("x" * 500)) == 60
