"""What the trackers are fed: a node's JSONL lines, read incrementally and checked, as (step, scalars) entries.

- :class:`JsonlTail`: the complete lines appended to one shared-dir file since the last read. It keeps
  (inode, offset); a file replaced (another inode) or cut (shorter than the offset) is read again from its
  start (the trackers' last steps keep that from duplicating anything); a partial last line (a write in
  progress) waits for its newline. Every read goes through :func:`node.fsio.read_end`, the checked open
  (no symlink, FIFO or device is ever opened, nothing blocks), at most :data:`READ_CAP_BYTES` at a time.
- :func:`parse_line`: one raw line -> :class:`Entry`, or ValueError with the reason: its signature checked
  first (``verify``), then strict JSON, then the line's schema (a metrics line is a
  :func:`node.schemas.validate_metrics_line` of its node; an eval line, whose format is still settling, only
  needs its node id and a round), then :func:`flatten_scalars`.
- :func:`flatten_scalars`: the numeric leaves of a line, nested keys joined with ``/``
  (``timings/generate_s``). Booleans, strings, lists, non-finite or out-of-range numbers are not scalars.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from node import fsio
from node.schemas import validate_metrics_line
from node.strict_json import parse_json_bytes
from supervisor.terminal import finite_number

READ_CAP_BYTES = 32 * 1024 * 1024  # one read's bound; a metrics line is ~1 KiB, so 2000 rounds are ~2.5 MiB
MAX_LINE_BYTES = 1024 * 1024  # a longer line is refused without being parsed
MAX_SCALARS = 1000  # scalars taken from one line (a hostile line cannot flood the trackers)
MAX_NEST = 8  # nested objects followed below the line itself
LINE_KEYS = frozenset({"node_id", "round", "timestamp", "hmac"})  # the line's identity, not measurements
KINDS = {"metrics": "", "evals": "eval/"}  # file kind -> the prefix of its tags
_TAG_PART = re.compile(r"[A-Za-z0-9_.\-]{1,100}")  # a key that becomes part of a tag; others are left out
MAX_ROUND = 2 ** 63 - 1


@dataclass(frozen=True)
class Entry:
    """One line as the trackers see it: the node's scalars at ``step`` (the round), logged at ``wall_time``."""

    node: str
    kind: str
    step: int
    wall_time: float
    scalars: dict[str, float]

    @property
    def stream(self) -> str:
        return stream_key(self.node, self.kind)


def stream_key(node: str, kind: str) -> str:
    """``worker_1/metrics``: one node's file of one kind (a tracker's steps are kept per stream)."""
    return f"{node}/{kind}"


def flatten_scalars(obj: dict, *, prefix: str = "", skip: frozenset = LINE_KEYS) -> dict[str, float]:
    """The numeric leaves of ``obj`` as ``{tag: value}``, nested keys joined with ``/`` after ``prefix``
    (``{"timings": {"generate_s": 0.1}}`` -> ``{"timings/generate_s": 0.1}``). Top-level keys in ``skip``,
    keys that are not plain names, booleans, strings, lists and numbers :func:`finite_number` refuses are
    left out; at most :data:`MAX_SCALARS`, at most :data:`MAX_NEST` levels deep."""
    out: dict[str, float] = {}

    def walk(d: dict, path: str, depth: int) -> None:
        for key, value in d.items():
            if (depth == 0 and key in skip) or not _TAG_PART.fullmatch(key):
                continue
            tag = path + key
            if isinstance(value, dict):
                if depth < MAX_NEST:
                    walk(value, tag + "/", depth + 1)
            elif (number := finite_number(value)) is not None and len(out) < MAX_SCALARS:
                out[tag] = number

    walk(obj, prefix, 0)
    return out


def check_eval_line(obj: Any, node: str) -> dict:
    """An eval line of ``node``: a JSON object with its node id and a round; ValueError otherwise. The
    rest of its format is not relied on (its numeric leaves are what is tracked)."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if obj.get("node_id") != node:
        raise ValueError("node_id is not the node of this file")
    r = obj.get("round")
    if type(r) is not int or not 0 <= r <= MAX_ROUND:
        raise ValueError("round is not a count")
    return obj


def parse_line(raw: bytes, *, node: str, kind: str, verify: Callable[[bytes], bytes]) -> Entry:
    """``raw`` (one line of ``node``'s file of ``kind``) as an :class:`Entry`; ValueError with the reason
    when it is refused (too long, its signature, not strict JSON, not its schema)."""
    if len(raw) > MAX_LINE_BYTES:
        raise ValueError(f"line over {MAX_LINE_BYTES} bytes")
    obj = parse_json_bytes(verify(raw))
    if kind == "metrics":
        validate_metrics_line(obj, expect_node=node)
    else:
        check_eval_line(obj, node)
    wall = finite_number(obj.get("timestamp"))
    return Entry(node, kind, obj["round"], wall if wall is not None and wall > 0 else time.time(),
                 flatten_scalars(obj, prefix=KINDS[kind]))


class JsonlTail:
    """The complete lines appended to ``path`` since the last :meth:`read` (see the module docstring);
    ``ino``/``offset`` resume where an earlier reader stopped."""

    def __init__(self, path: Path, *, ino: int | None = None, offset: int = 0):
        self.path = Path(path)
        self.ino = ino
        self.offset = offset
        self.skipped_bytes = 0  # bytes passed over because more than READ_CAP_BYTES were waiting

    def read(self) -> list[bytes]:
        """The new complete lines (without their newline); [] when the file is missing or has none.
        A refused file raises :class:`node.fsio.BadFile`, an unreadable one its OSError."""
        try:
            st = os.lstat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return []
        problem = fsio.entry_problem(st)
        if problem is not None:  # a symlink or FIFO planted there: refused before any open
            raise fsio.BadFile(problem, (st.st_ino,))
        if st.st_ino != self.ino or st.st_size < self.offset:  # replaced or cut: read it again from its start
            self.ino, self.offset = st.st_ino, 0
        if st.st_size == self.offset:
            return []
        data, begin, _ = fsio.read_end(self.path, max_bytes=READ_CAP_BYTES, start=self.offset)
        mid_line = begin > self.offset
        if mid_line:
            self.skipped_bytes += begin - self.offset
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) >= READ_CAP_BYTES:  # one line longer than a whole read: never parsed, passed over
                self.skipped_bytes += len(data)
                self.offset = begin + len(data)
            return []
        lines = data[:end].split(b"\n")
        self.offset = begin + end + 1
        return lines[1:] if mid_line else lines
