"""What a person reads: rich on a terminal, plain text otherwise, and every shown value escaped.

The status table, ``swarm logs`` and ``swarm validate`` build their output as lines of ``(text, style)``
segments. :func:`plain` joins a line's text (what a pipe or a file gets, no escape codes at all);
:func:`styled` turns it into a rich ``Text`` (never parsed as markup) for a :func:`console_for` terminal.

Values come from files other processes wrote (node ids, log fields, file names, error messages), so each
passes through :func:`escape_controls`: a control character is shown as ``\\x1b``, ``\\n``... instead of
moving the cursor, recolouring or retitling the terminal, in plain text too. Numbers from such files pass
through :func:`finite_number` (bounded to ``|x| <= 2**63``, so ``float()``, formats, sums and plots never raise or
overflow on a 401-digit integer); :func:`number_problem` names the first one out of bounds in a JSON
value and :func:`short_value` shows an untrusted value in a one-line note.
"""

from __future__ import annotations

import math
import re
import reprlib
from typing import Any, TextIO

from rich.console import Console
from rich.text import Text

Segment = tuple[str, str]  # (text, rich style; "" for none)
Line = list[Segment]

# C0 controls but tab, DEL, and C1 controls (some terminals take U+009B as CSI).
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r"}
MAX_MAGNITUDE = 2 ** 63  # the largest number (either sign) taken from a file: an int64 still fits
_SHORT = reprlib.Repr()  # a short repr of any value, however big (a 512 MiB list is not rendered whole)
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 36
_SHORT.maxlist = _SHORT.maxdict = 4


def escape_controls(value: object) -> str:
    """``str(value)`` with its control characters written out (``\\x1b``), so it is shown, not obeyed."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), str(value))


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a JSON number (not a bool), finite, with ``|x| <= MAX_MAGNITUDE``;
    None otherwise (a string, NaN, a 401-digit integer, ``1e300``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int):  # compared as an int: float() of a 401-digit integer raises OverflowError
        return float(value) if -MAX_MAGNITUDE <= value <= MAX_MAGNITUDE else None
    return value if math.isfinite(value) and abs(value) <= MAX_MAGNITUDE else None


def short_value(value: Any) -> str:
    """An untrusted value for a one-line note: a huge integer as its digit count, anything else as a short
    escaped repr (never the whole of a big value)."""
    if type(value) is int and abs(value) > MAX_MAGNITUDE:
        try:
            return f"a {len(str(abs(value)))}-digit integer"
        except ValueError:  # beyond Python's int-to-str digit limit (JSON parsing refuses those already)
            return f"a {value.bit_length()}-bit integer"
    return escape_controls(_SHORT.repr(value))


def number_problem(value: Any) -> str | None:
    """``"<where>: <value> is out of range (|x| <= 2**63)"`` for the first number in a parsed JSON value that
    :func:`finite_number` refuses (``where`` is its key path, e.g. ``timings.round_s``); None when every
    number is fine. Iterative: any nesting depth is safe."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, dict):
            stack.extend(reversed([(f"{where}.{k}" if where else str(k), x) for k, x in v.items()]))
        elif isinstance(v, list):
            stack.extend(reversed([(f"{where}[{i}]", x) for i, x in enumerate(v)]))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and finite_number(v) is None:
            return f"{short_where(where)}: {short_value(v)} is out of range (|x| <= 2**63)"
    return None


def short_where(where: str, limit: int = 80) -> str:
    """A key path (or file name) from a file, escaped and cut to ``limit`` characters."""
    text = escape_controls(where) or "value"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def console_for(stream: TextIO) -> Console | None:
    """A rich Console writing to ``stream`` when it is a terminal; None when plain text is wanted."""
    try:
        if not stream.isatty():
            return None
    except (AttributeError, ValueError):  # a closed or unusual stream
        return None
    return Console(file=stream, highlight=False)


def plain(line: Line) -> str:
    return "".join(text for text, _ in line)


def styled(line: Line) -> Text:
    return Text.assemble(*line)


def pad(text: str, width: int, style: str = "") -> Segment:
    """A left-aligned cell of at least ``width`` characters."""
    return (text.ljust(width), style)
