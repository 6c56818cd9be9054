"""Round switch lines as the operator tools read them: one line checked, percentiles, a summary.

The coordinator appends one line per round to ``logs/<coordinator>/round_switches.jsonl``
(:mod:`node.round_switch`): ``switch_ms`` from the last round result written to every worker having
started the next round, split into ``detect_ms`` (until the coordinator wrote the next state) and
``start_ms`` (from then until the last worker started); each may be null (an advance on a timer has no
last result; a round that timed out before any worker started has no start). ``swarm status`` (through the
supervisor's :class:`supervisor.watch.SharedPoller`) shows the last line and the percentiles of the last
:data:`STATUS_WINDOW`; ``swarm report`` the percentiles of every round. The file is untrusted like the
rest of the shared dir: :func:`switch_line` checks what is used and ignores the rest (the ``hmac`` key
included: the tools read without the experiment key, as they read the metrics).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from node.strict_json import parse_json_bytes
from supervisor.terminal import finite_number, short_value

FILE_NAME = "round_switches.jsonl"
SWITCH_FIELDS = ("switch_ms", "detect_ms", "start_ms")
STATUS_WINDOW = 50  # swarm status: the percentiles of the last this many switches
MAX_COUNT = 2 ** 63 - 1
MAX_MISSING = 8  # workers named as missing in a summary (a line may name many)


def switch_line(obj: Any, *, expect_node: str | None = None) -> dict:
    """The fields of one round switch line the tools use (``round``, ``reason``, the three figures in ms,
    ``workers``, ``missing``); ValueError naming the first problem. Other keys (``hmac``) are ignored."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if expect_node is not None and obj.get("node_id") != expect_node:
        raise ValueError(f"not a round switch of {expect_node} (node_id {short_value(obj.get('node_id'))})")
    rnd = obj.get("round")
    if type(rnd) is not int or not 0 <= rnd <= MAX_COUNT:
        raise ValueError(f"round: not an integer in [0, 2**63 - 1] ({short_value(rnd)})")
    out: dict = {"round": rnd}
    for key in SWITCH_FIELDS:
        value = obj.get(key)
        number = finite_number(value)
        if value is not None and (number is None or number < 0):
            raise ValueError(f"{key}: not a number >= 0 or null ({short_value(value)})")
        out[key] = number
    reason, workers, missing = obj.get("reason"), obj.get("workers"), obj.get("missing", [])
    if reason is not None and not isinstance(reason, str):
        raise ValueError(f"reason: not a string ({short_value(reason)})")
    if workers is not None and (type(workers) is not int or not 0 <= workers <= MAX_COUNT):
        raise ValueError(f"workers: not an integer in [0, 2**63 - 1] ({short_value(workers)})")
    if not isinstance(missing, list) or not all(isinstance(m, str) for m in missing):
        raise ValueError(f"missing: not a list of names ({short_value(missing)})")
    return out | {"reason": reason, "workers": workers, "missing": missing}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values``, interpolated linearly between the closest ranks
    (numpy's default); None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarise_switches(lines: Sequence[dict]) -> dict | None:
    """p50/p99 of each figure over checked ``lines`` (nulls left out), how many lines (``rounds``), how many
    had a switch figure (``measured``) and how many timed out before every worker started (``incomplete``:
    their figure covers the workers that did); None for no lines."""
    if not lines:
        return None
    out: dict = {"rounds": len(lines), "measured": sum(x["switch_ms"] is not None for x in lines),
                 "incomplete": sum(bool(x["missing"]) for x in lines)}
    for key in SWITCH_FIELDS:
        values = [x[key] for x in lines if x[key] is not None]
        out[key] = {"p50": _round(percentile(values, 50)), "p99": _round(percentile(values, 99))}
    return out


def status_summary(lines: Sequence[dict]) -> dict | None:
    """What ``swarm status`` shows: the last line (``last``; at most :data:`MAX_MISSING` missing workers
    named) and :func:`summarise_switches` of ``lines``; None for no lines."""
    summary = summarise_switches(lines)
    if summary is None:
        return None
    last = dict(lines[-1])
    last["missing_count"] = len(last["missing"])
    last["missing"] = last["missing"][:MAX_MISSING]
    return {"last": last, **summary}


def parse_tail(data: bytes, *, mid_line: bool, window: int = STATUS_WINDOW,
               expect_node: str | None = None) -> tuple[list[dict], int, str]:
    """(checked lines, bad lines, the first bad one's reason) among the last ``window`` complete lines of
    ``data``, the end of a round switch file: its first piece is dropped when the read began ``mid_line``,
    its last when it has no newline yet (a line being appended is not a bad line)."""
    pieces = data.split(b"\n")
    pieces = pieces[1:-1] if mid_line else pieces[:-1]
    raw = [p for p in pieces if p.strip()][-window:] if window > 0 else []
    lines, bad, first = [], 0, ""
    for piece in raw:
        try:
            lines.append(switch_line(parse_json_bytes(piece), expect_node=expect_node))
        except ValueError as err:
            bad += 1
            first = first or str(err)
    return lines, bad, first


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
