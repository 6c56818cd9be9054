"""The human view of ``status.json``: a header, one row per node, the whole swarm, then what went wrong.

:func:`status_view` turns the status dict into a :class:`StatusView` (lines of styled segments and the
table's cells, every value escaped); :func:`render_status` prints it as plain text (``swarm status`` into
a pipe or a file, the tests) and :func:`status_renderable` as a rich table (a terminal, and the live
display of :mod:`supervisor.live`). Under this host's table, every node of the experiment found in the
shared dir (:class:`supervisor.status.SwarmScan`: host, role, round, age of its record, reward, whether its
signature was checked), an age by the writer's clock marked ``*``.

``status.json`` lives in the runtime dir, so it is read like any other untrusted file: a field of the
wrong type shows as ``-`` (:func:`_dict`, :func:`_list`), a number out of bounds (a 401-digit integer) as
``?`` (:func:`supervisor.terminal.finite_number`), and a node's stderr is tailed through
:func:`supervisor.logview.tail_text` (a FIFO there is a "skipped" line, never a hang).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table

from node.fsio import BadFile
from supervisor.logview import log_lines, tail_text
from supervisor.status import swarm_age
from supervisor.terminal import Line, Segment, escape_controls, finite_number, plain, styled

STALE_STATUS_S = 60.0  # a running supervisor rewrites status.json at least every 5 s (supervisor.status)
HEADER = ("NODE", "STATE", "PID", "ROUND", "PHASE", "BEAT", "RESTARTS", "REWARD", "RSS", "CPU%", "GPU MEM",
          "LAST EXIT")
STATE_STYLES = {"RUNNING": "green", "STARTING": "cyan", "BACKOFF": "yellow", "STOPPING": "yellow",
                "FATAL": "bold red", "EXITED": "dim", "STOPPED": "dim"}
SWARM_HEADER = ("NODE", "HOST", "ROLE", "ROUND", "STATUS", "BEAT", "REWARD", "SIGNATURE")
WRITER_CLOCK_NOTE = ("* age by the writer's clock (the record's heartbeat_at): this host has not yet seen the record "
                     "change; a host with a skewed clock shows a wrong (even negative) age")
GPU_UNKNOWN_NOTE = ("GPU MEM ?: NVML does not report this process's memory here (MIG, some containers, or it "
                    "cannot list the processes); the budget is not checked")


def fmt_bytes(value: object) -> str:
    """``300.0M``; ``-`` for None, ``?`` for anything that is not a bounded number."""
    if value is None:
        return "-"
    n = finite_number(value)
    if n is None:
        return "?"
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit in ("B", "K") else f"{n:.1f}{unit}"
        n /= 1024
    return "-"


def fmt_age(value: object) -> str:
    """``4.2s``, ``3.0m``, ``1.5h``; ``-`` for None, ``?`` for anything that is not a bounded number."""
    if value is None:
        return "-"
    seconds = finite_number(value)
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


@dataclass
class StatusView:
    """What is shown: ``head`` lines, then (when there is a status) the node table, then (when the shared dir
    was scanned) ``swarm_head``, the swarm's table and ``swarm_tail``, then ``tail`` lines."""

    head: list[Line] = field(default_factory=list)
    rows: list[list[Segment]] | None = None
    tail: list[Line] = field(default_factory=list)
    swarm_head: list[Line] = field(default_factory=list)
    swarm_rows: list[list[Segment]] | None = None
    swarm_tail: list[Line] = field(default_factory=list)


def _text(value: object, style: str = "") -> Line:
    return [(escape_controls(value), style)]


def _dict(value: object) -> dict:
    """``value`` when it is a dict, else ``{}`` (a field of the wrong type reads as absent)."""
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list:
    return value if isinstance(value, list) else []


def _fixed(value: object, fmt: str) -> str:
    """``value`` formatted with ``fmt`` (``.3f``); ``-`` for None, ``?`` when it is not a bounded number."""
    if value is None:
        return "-"
    number = finite_number(value)
    return "?" if number is None else format(number, fmt)


def _age(st: dict, now: float) -> float | None:
    """Seconds since ``updated_at`` (None: absent or not a bounded number)."""
    updated = finite_number(st.get("updated_at"))
    return None if updated is None else now - updated


def _head(st: dict | None, running_pid: int | None, runtime_dir: Path, experiment: str, now: float) -> list[Line]:
    """Who runs (or ran) and in what state; a warning when status.json is stale."""
    if running_pid is None:
        out = [_text(f"No supervisor is running for experiment {experiment!r} (runtime dir {runtime_dir}).", "bold")]
        if st is None:
            return out + [_text("No status file either: it was never launched from this machine, or with another "
                                "$SWARM_RUNTIME_DIR / experiment.root.")]
        age, code = _age(st, now), st.get("exit_code")
        return out + [_text(f"Last status, written {fmt_age(age)} ago by pid {_dict(st.get('supervisor')).get('pid')}: "
                            f"{st.get('state')}" + (f", exit code {code}" if code is not None else
                                                    " (it did not exit cleanly: killed, or the machine went down)"))]
    sup = _dict((st or {}).get("supervisor"))
    out = [_text(f"Supervisor pid {running_pid} for experiment {experiment!r}: {(st or {}).get('state', '?')}"
                 f"  (supervisor cpu {_fixed(sup.get('cpu_percent'), '.1f')}%, rss {fmt_bytes(sup.get('rss_bytes'))})",
                 "bold")]
    if st is None:
        return out + [_text("(no status file yet)")]
    age = _age(st, now)
    if age is not None and age > STALE_STATUS_S:
        out.append(_text(f"WARNING: status.json was last written {fmt_age(age)} ago: the supervisor's loop may be "
                         f"stuck (py-spy dump --pid {running_pid})", "bold yellow"))
    return out


def _summary(st: dict) -> list[Line]:
    launch, gpu = _dict(st.get("launch")), _dict(st.get("gpu"))
    utilisation = f"; GPU utilisation {_fixed(gpu['utilization'], '.0f')}%" if gpu.get("utilization") is not None else ""
    return [_text(st.get("summary", "")), _text(f"{launch.get('describe', '')}{utilisation}", "dim")]


def _ms(value: object) -> str:
    text = _fixed(value, ".1f")
    return text if text in ("-", "?") else f"{text} ms"


def _switch(st: dict) -> list[Line]:
    """The last round switch and the percentiles over the last ones (:mod:`supervisor.switches`); nothing
    before the first switch (or from a supervisor that did not record it)."""
    sw = _dict(st.get("round_switch"))
    last = _dict(sw.get("last"))
    if not last:
        return []
    total = _dict(sw.get("switch_ms"))
    text = (f"round switch: {_ms(last.get('switch_ms'))} into round {_fixed(last.get('round'), '.0f')} "
            f"(detect {_ms(last.get('detect_ms'))}, start {_ms(last.get('start_ms'))}); "
            f"p50 {_ms(total.get('p50'))}, p99 {_ms(total.get('p99'))} over the last {_fixed(sw.get('rounds'), '.0f')}")
    missing = [str(m) for m in _list(last.get("missing"))]
    if missing:
        more = (finite_number(last.get("missing_count")) or 0) - len(missing)
        text += "; not started in time: " + ", ".join(missing) + (f" (+{more:.0f} more)" if more > 0 else "")
    return [_text(text)]


def _row(name: str, n: dict) -> list[Segment]:
    gpu_mem = "?" if n.get("gpu_unknown") else fmt_bytes(n.get("gpu_bytes"))  # unknown is never 0
    if n.get("gpu_budget_bytes"):
        gpu_mem += f"/{fmt_bytes(n['gpu_budget_bytes'])}"
    if n.get("over_budget"):
        gpu_mem += " OVER"
    state = str(n.get("state", "?"))
    cells = [
        (name, "bold"), (state, STATE_STYLES.get(state, "")), (_fixed(n.get("pid"), ".0f"), ""),
        (_fixed(n.get("round"), ".0f"), ""), (str(n.get("phase") or "-"), ""),
        (fmt_age(n.get("heartbeat_age_s")), ""), (_fixed(n.get("restarts", 0), ".0f"), ""),
        (_fixed(n.get("reward"), ".3f"), ""), (fmt_bytes(n.get("rss_bytes")), ""),
        (_fixed(n.get("cpu_percent"), ".0f"), ""),
        (gpu_mem, "bold red" if n.get("over_budget") else ""), (str(n.get("last_exit_line") or "-")[:60], "dim"),
    ]
    return [(escape_controls(text), style) for text, style in cells]


def _failed(n: dict) -> bool:
    last = _dict(n.get("last_exit"))
    return n.get("state") in ("FATAL", "BACKOFF") or bool(
        last and last.get("reason") not in (None, "stopped") and not (last.get("returncode") == 0))


def _failure(name: str, n: dict) -> list[Line]:
    """A failed node: its state and reason, last exit, restart countdown, last log lines."""
    reason = f" — {n['fatal_reason']}" if n.get("fatal_reason") else ""
    out = [[], _text(f"{name}: {n.get('state')}{reason}", "bold red")]
    if n.get("last_exit_line"):
        out.append(_text(f"  last exit: {n['last_exit_line']}"))
    if n.get("backoff_left_s") is not None:
        out.append(_text(f"  restarting in {_fixed(n['backoff_left_s'], '.1f')} s"))
    logs = _dict(n.get("logs"))
    tail = _list(n.get("log_tail"))
    if not tail and isinstance(logs.get("stderr"), str):
        try:
            tail = tail_text(Path(logs["stderr"]), lines=5).splitlines()
        except (BadFile, OSError, ValueError) as err:  # ValueError: a NUL in the path
            out.append(_text(f"  skipped {logs['stderr']}: {getattr(err, 'reason', None) or err}"))
    if tail:
        out.append(_text(f"  last log lines ({logs.get('stderr', 'stderr')}):"))
        out.extend([("    ", ""), *part] for line in tail[-8:] for part in log_lines(str(line))[:6])
    return out


def _notes(st: dict, nodes: dict, recent: Iterable[str]) -> list[Line]:
    out: list[Line] = []
    if any(n.get("gpu_unknown") for n in nodes.values()):
        out += [[], _text(GPU_UNKNOWN_NOTE, "dim")]
    if _list(st.get("over_budget")):
        out += [[], _text("over GPU memory budget: " + ", ".join(map(str, st["over_budget"])), "bold red")]
    if st.get("stop_reason"):
        out.append(_text(f"stop reason: {st['stop_reason']}"))
    recent = [log_lines(line)[0] for line in recent]
    if recent:
        out += [[], _text("recent events:")]
        out.extend([("  ", ""), *_cut(line, 200)] for line in recent)
    return out


def _cut(line: Line, limit: int) -> Line:
    """The first ``limit`` characters of a line of segments."""
    out: Line = []
    for text, style in line:
        if limit <= 0:
            break
        out.append((text[:limit], style))
        limit -= len(text)
    return out


def _swarm(view: StatusView, section: Mapping, now: float) -> None:
    """The swarm's heading, table and notes into ``view`` (a :meth:`supervisor.status.SwarmScan.scan` section
    from status.json or from our own scan: untrusted like the rest)."""
    nodes = [_dict(n) for n in _list(section.get("nodes"))]
    view.swarm_head = [[], _text(f"Swarm (shared dir {section.get('experiment_dir', '?')}): {len(nodes)} node(s) on "
                                 f"{_fixed(section.get('hosts'), '.0f')} host(s); {section.get('key', '')}", "bold")]
    view.swarm_rows, writer = [], False
    for n in nodes:
        age, clock = swarm_age(n, now)
        writer = writer or clock == "writer"
        status = str(n.get("status", "?"))
        cells = [(str(n.get("node", "?")), "bold"), (str(n.get("host", "?")), ""), (str(n.get("role", "?")), ""),
                 (_fixed(n.get("round"), ".0f"), ""), (status, "dim" if status == "finished" else ""),
                 (fmt_age(age) + ("*" if clock == "writer" else ""), "yellow" if clock == "writer" else ""),
                 (_fixed(n.get("reward"), ".3f"), ""),
                 ("checked", "green") if n.get("verified") is True else ("unverified", "yellow")]
        view.swarm_rows.append([(escape_controls(text)[:64], style) for text, style in cells])
    notes = [f"peers/ could not be listed ({section['unreachable']}): the nodes seen before"] if section.get(
        "unreachable") else []
    more, unread = finite_number(section.get("more")) or 0, finite_number(section.get("not_looked_at")) or 0
    if more > 0:
        notes.append(f"+{more:.0f} more node(s) not listed")
    if unread > 0:
        notes.append(f"peers/ lists {_fixed(section.get('listed'), '.0f')} name(s): {unread:.0f} not looked at in this "
                     f"scan (the next scans take them)")
    refused = _dict(section.get("refused"))
    if refused:
        notes.append("peer files refused: " + ", ".join(f"{k} {_fixed(v, '.0f')}" for k, v in list(refused.items())[:8]))
    view.swarm_tail = [_text(line, "dim") for line in notes + ([WRITER_CLOCK_NOTE] if writer else [])]


def status_view(st: dict | None, *, running_pid: int | None, runtime_dir: Path, experiment: str,
                recent: Iterable[str] = (), now: float | None = None, swarm: Mapping | None = None) -> StatusView:
    """The status dict (None: no file) as a :class:`StatusView`; ``recent``: raw log lines to list last;
    ``swarm``: the whole swarm (a :meth:`supervisor.status.SwarmScan.scan` section; default: status.json's)."""
    now = time.time() if now is None else now
    view = StatusView(head=_head(st, running_pid, runtime_dir, experiment, now))
    section = swarm if swarm is not None else (st or {}).get("swarm")
    if isinstance(section, Mapping):
        _swarm(view, section, now)
    if st is None:
        return view
    nodes = {name: _dict(n) for name, n in _dict(st.get("nodes")).items()}
    view.head += _summary(st) + _switch(st)
    view.rows = [_row(str(name), n) for name, n in nodes.items()]
    for name, n in nodes.items():
        if _failed(n):
            view.tail += _failure(name, n)
    view.tail += _notes(st, nodes, recent)
    return view


def _plain_table(header: tuple[str, ...], rows: list[list[Segment]]) -> list[str]:
    widths = [max([len(h), *(len(r[i][0]) for r in rows)]) for i, h in enumerate(header)]
    return (["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
            + ["  ".join(text.ljust(w) for (text, _), w in zip(r, widths)).rstrip() for r in rows])


def plain_view(view: StatusView) -> str:
    lines = [plain(line) for line in view.head]
    if view.rows is not None:
        lines += _plain_table(HEADER, view.rows)
    lines += [plain(line) for line in view.swarm_head]
    if view.swarm_rows:
        lines += _plain_table(SWARM_HEADER, view.swarm_rows)
    return "\n".join(lines + [plain(line) for line in view.swarm_tail + view.tail])


def _rich_table(header: tuple[str, ...], rows: list[list[Segment]]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", show_edge=False, padding=(0, 1, 0, 0))
    for h in header:
        table.add_column(h, no_wrap=True, overflow="ellipsis", max_width=60 if h == "LAST EXIT" else None)
    for r in rows:
        table.add_row(*(styled([cell]) for cell in r))
    return table


def rich_view(view: StatusView) -> RenderableType:
    parts: list[RenderableType] = [styled(line) for line in view.head]
    if view.rows is not None:
        parts.append(_rich_table(HEADER, view.rows))
    parts += [styled(line) for line in view.swarm_head]
    if view.swarm_rows:
        parts.append(_rich_table(SWARM_HEADER, view.swarm_rows))
    parts += [styled(line) for line in view.swarm_tail + view.tail]
    return Group(*parts)


def render_status(st: dict | None, **kwargs) -> str:
    """The plain-text status (see :func:`status_view` for the arguments)."""
    return plain_view(status_view(st, **kwargs))


def status_renderable(st: dict | None, **kwargs) -> RenderableType:
    """The status as a rich table (see :func:`status_view` for the arguments)."""
    return rich_view(status_view(st, **kwargs))
