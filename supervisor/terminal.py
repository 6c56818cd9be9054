"""What a person reads: rich on a terminal, plain text otherwise, and every shown value escaped.

The status table, ``swarm logs`` and ``swarm validate`` build their output as lines of ``(text, style)``
segments. :func:`plain` joins a line's text (what a pipe or a file gets, no escape codes at all);
:func:`styled` turns it into a rich ``Text`` (never parsed as markup) for a :func:`console_for` terminal.

Values come from files other processes wrote (node ids, log fields, file names, error messages), so each
passes through :func:`escape_controls`: a control character is shown as ``\\x1b``, ``\\n``... instead of
moving the cursor, recolouring or retitling the terminal, in plain text too.
"""

from __future__ import annotations

import re
from typing import TextIO

from rich.console import Console
from rich.text import Text

Segment = tuple[str, str]  # (text, rich style; "" for none)
Line = list[Segment]

# C0 controls but tab, DEL, and C1 controls (some terminals take U+009B as CSI).
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r"}


def escape_controls(value: object) -> str:
    """``str(value)`` with its control characters written out (``\\x1b``), so it is shown, not obeyed."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), str(value))


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
