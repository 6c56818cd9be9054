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
    Raises ValueError with a short reason (never RecursionError)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8: {err.reason} at byte {err.start}") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except ValueError as err:  # parse_constant, int digit limits
        raise ValueError(f"invalid JSON: {str(err)[:200]}") from None
    _check_json_tree(obj, max_depth)
    return obj


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed (numbers must be finite)")


def _check_json_tree(obj: Any, max_depth: int) -> None:
    """Iteratively: nesting depth <= max_depth and every float finite (``1e999`` parses to inf)."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > max_depth:
                raise ValueError(f"nested deeper than {max_depth} levels")
            children = value.values() if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in children if isinstance(v, (dict, list, float)))
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError("numbers must be finite")
