"""Strict JSON: what we publish, and what we accept from untrusted bytes (DESIGN.md §3, validation).

Python's ``json`` accepts ``NaN``/``Infinity`` and ``1e999`` (which parses to inf), and a deeply nested
document makes it raise RecursionError. Here both directions refuse non-finite numbers, and parsing caps
the nesting depth and turns every failure into a ValueError with a short reason.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_JSON_DEPTH = 64


def encode_json(obj: Any) -> bytes:
    """Compact, strict JSON bytes (NaN/Infinity refused with ValueError), as everything we publish."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=True).encode("ascii")


def parse_json_bytes(data: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON from untrusted bytes: UTF-8, no NaN/Infinity, finite numbers, depth <= ``max_depth``.
    Raises ValueError with a short reason (never RecursionError). Every number is checked as it is parsed
    (``1e999`` would parse to inf); the depth is measured over the parsed containers."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8: {err.reason} at byte {err.start}") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except ValueError as err:  # parse_constant, parse_float, int digit limits
        raise ValueError(f"invalid JSON: {str(err)[:200]}") from None
    if nesting_depth(obj) > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels")
    return obj


def nesting_depth(obj: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (0 for a scalar), without recursion; only
    containers are visited (numbers were checked while parsing)."""
    deepest, stack = 0, ([(obj, 1)] if type(obj) in (dict, list) else [])
    while stack:
        value, depth = stack.pop()
        if depth > deepest:
            deepest = depth
        children = value.values() if type(value) is dict else value
        stack.extend((child, depth + 1) for child in children if type(child) in (dict, list))
    return deepest


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed (numbers must be finite)")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # 1e999 parses to inf
        raise ValueError("numbers must be finite")
    return value
