"""Worker checkpoints: model, optimizer, RNG states and round, written atomically, listed in a signed
index, inspected before loading, restored all or nothing.

``checkpoints/round_R/<node>.pt`` holds tensors and plain containers only and is loaded with
``torch.load(weights_only=True)``, so a hostile file cannot run code. The shared directory is untrusted,
so a ``.pt`` file is only as good as our own record of it: ``checkpoints/<node>.index.json``
(:class:`CheckpointIndex`, signed by the store like every file we write) lists the checkpoints this node
wrote, with size and sha256.

- save: the ``.pt`` atomically, then the index (new entry added, pruned ones dropped), then the pruned
  files are deleted: only files our index listed, through directory fds (:mod:`node.fdtree`) inside the
  experiment, never anything else. A file planted at ``round_999999999/<node>.pt`` is not ours: it never
  counts as the newest, and is never deleted or loaded.
- load: newest index entry first; the bytes are read (capped), checked against the listed size and
  sha256, the zip archive is inspected before ``torch.load`` (:func:`check_torch_zip`: stored members
  only, their sizes adding up to at most the archive, not too many), then the model, optimizer and RNG
  are restored all or nothing: a snapshot is taken first and put back on any failure, and the previous
  entry is tried. A ``.pt`` not in the index (planted, or from a crash between the ``.pt`` and the index
  write) is reported once and left alone.
- an experiment from before the index (``.pt`` files, no index file at all; only with
  ``exchange.require_signatures: false``, which such an experiment needs anyway) loads as it did, newest
  first, bounded by the coordinator's round; the first save creates the index. With signatures required a
  missing index was deleted by someone: nothing unlisted is loaded. An index that is present but
  invalid (bad signature, bad schema) lists nothing: nothing is loaded from it or deleted because of it.
"""

from __future__ import annotations

import hashlib
import io
import random
import stat
import struct
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Mapping

import structlog
import torch
from pydantic import Field, field_validator

from node import fdtree
from node.config import PlainName
from node.layout import ExperimentLayout, check_node_id
from node.schemas import Count, FileFormat, RoundState, Time, Version, schema_error
from node.storage import SharedStore
from sapo.validation import Int, Str, model

log = structlog.get_logger(__name__)

CHECKPOINT_VERSION = 1
MAX_INDEX_ENTRIES = 1000
MAX_INDEX_BYTES = 1 << 20
MAX_ZIP_MEMBERS = 50_000  # torch.save writes about 3 per parameter tensor (weights, two Adam moments)

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip member's local header (30 bytes)
_LOCAL_SIGNATURE = b"PK\x03\x04"
_CENTRAL_SIGNATURE = b"PK\x01\x02"


# -- the index ----------------------------------------------------------------------------------------
@model(extra="ignore", error=schema_error)
class CheckpointEntry:
    """One checkpoint this node wrote: ``checkpoints/round_<round>/<node>.pt``."""

    round: Annotated[Int, Field(ge=0, le=999_999_999)]
    size: Count
    sha256: Annotated[Str, Field(pattern=r"^[0-9a-f]{64}$")]
    written_at: Time


@model(extra="ignore", error=schema_error)
class CheckpointIndex(FileFormat):
    """``checkpoints/<node>.index.json``: the checkpoints a node wrote, oldest first, one per round."""

    WHERE: ClassVar[str] = "checkpoint_index"
    PATH_FIELDS: ClassVar[Mapping[str, str]] = {"expect_node": "node_id"}

    node_id: PlainName
    checkpoints: Annotated[tuple[CheckpointEntry, ...], Field(max_length=MAX_INDEX_ENTRIES)] = ()
    schema_version: Version = 1

    @field_validator("checkpoints")
    @classmethod
    def _one_per_round(cls, entries: tuple[CheckpointEntry, ...]) -> tuple[CheckpointEntry, ...]:
        rounds = [e.round for e in entries]
        if rounds != sorted(set(rounds)):
            raise ValueError("rounds must be increasing, one entry per round")
        return entries


@dataclass(frozen=True)
class IndexRead:
    """Our index as found: ``state`` is "valid", "missing" (no file: an experiment from before the index)
    or "invalid" (present but refused: it then lists nothing); ``entries`` maps round -> entry."""

    state: str
    entries: Mapping[int, CheckpointEntry]


def index_path(layout: ExperimentLayout, node_id: str) -> Path:
    """``checkpoints/<node>.index.json``."""
    return layout.root / "checkpoints" / f"{check_node_id(node_id)}.index.json"


def read_index(store: SharedStore, layout: ExperimentLayout, node_id: str) -> IndexRead:
    """Our index (see :class:`IndexRead`), verified by the store; raises the OSError when the shared
    directory does not answer (then "missing" and "invalid" cannot be told apart)."""
    path = index_path(layout, node_id)
    if store.lstat(path, raise_unreachable=True) is None:
        return IndexRead("missing", {})
    index = store.read_as(path, CheckpointIndex.from_json, max_bytes=MAX_INDEX_BYTES, raise_unreachable=True,
                          expect_node=node_id)
    if index is None:  # the store warned why (bad signature, schema...)
        log.warning("checkpoint_index_invalid", path=layout.relative(path),
                    reason="present but refused: it lists nothing, nothing is loaded from it or pruned")
        return IndexRead("invalid", {})
    return IndexRead("valid", {e.round: e for e in index.checkpoints})


def _write_index(store: SharedStore, layout: ExperimentLayout, node_id: str,
                 entries: Mapping[int, CheckpointEntry]) -> None:
    index = CheckpointIndex(node_id=node_id, checkpoints=tuple(entries[r] for r in sorted(entries)))
    store.write_json_atomic(index_path(layout, node_id), index.to_json(), retries=True)


# -- saving and pruning -------------------------------------------------------------------------------
@dataclass
class Restored:
    """What a loaded checkpoint gave back."""

    round: int  # the last round whose training step is inside the weights
    path: str
    extra: dict = field(default_factory=dict)  # what save_checkpoint's ``extra`` held ({} for older files)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(_as_tuple(x) for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(x) if isinstance(x, list) else x


def save_checkpoint(store: SharedStore, layout: ExperimentLayout, node_id: str, round_: int, model, optimizer,
                    *, keep_last: int, extra: dict | None = None) -> bool:
    """Write this node's checkpoint for ``round_`` atomically, list it in our index, and prune to the last
    ``keep_last`` listed ones (the one just written always stays). ``extra``: plain values (numbers, strings,
    dicts, lists) a learner wants back on resume (:attr:`Restored.extra`), e.g. adaptive I/J's state.

    Returns False when the shared directory refused it (the previous checkpoints and the index are intact
    and the error is logged); training goes on and the next checkpoint tries again.
    """
    store.sync(timeout=30)  # the results and metrics the checkpoint covers are durable before it is
    payload = {
        "version": CHECKPOINT_VERSION,
        "node_id": node_id,
        "round": round_,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(),
        "extra": dict(extra or {}),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    path = layout.checkpoint_file(round_, node_id)
    entry = CheckpointEntry(round=round_, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                            written_at=time.time())
    try:
        index = read_index(store, layout, node_id)  # first: an index we cannot read means no save at all
        store.makedirs(path.parent)
        store.write_bytes_atomic(path, data, retries=True)
        kept, dropped = _split(index.entries, keep_last, new=entry)
        _write_index(store, layout, node_id, kept)
    except (OSError, ValueError) as err:  # ValueError: a path the store refuses (a planted symlink)
        log.error("checkpoint_failed", round=round_, path=layout.relative(path), error=str(err))
        return False
    log.info("checkpoint_saved", round=round_, bytes=len(data))
    _delete(store, layout, node_id, dropped)
    return True


def _split(entries: Mapping[int, CheckpointEntry], keep_last: int,
           new: CheckpointEntry | None = None) -> tuple[dict[int, CheckpointEntry], list[int]]:
    """(entries kept, rounds dropped): the newest ``keep_last``. With ``new``, it is kept and counts as the
    newest: listed rounds after it are from weights we did not resume from (they were unusable), dropped."""
    rounds = sorted((r for r in entries if new is None or r < new.round), reverse=True)
    if new is not None:
        rounds = [new.round, *rounds]
    keep = rounds[:max(1, int(keep_last))]
    kept = {r: (new if new is not None and r == new.round else entries[r]) for r in keep}
    return kept, sorted(r for r in entries if r not in kept)


def _delete(store: SharedStore, layout: ExperimentLayout, node_id: str, rounds: list[int]) -> None:
    """Delete our files of ``rounds`` (and their round dirs once empty); errors are only logged (the files
    are no longer listed: never loaded, and left in place)."""
    for round_ in rounds:
        path = layout.checkpoint_file(round_, node_id)
        try:
            store.check_inside(path)
            fdtree.unlink_path(store.root, path, call=store._retry)  # never through a symlinked dir
        except (OSError, ValueError) as err:
            log.warning("checkpoint_prune_failed", round=round_, error=str(err))
            continue
        try:
            fdtree.rmdir_path(store.root, path.parent, call=store._retry)  # only once every node's file is gone
        except OSError:
            pass


def prune_checkpoints(store: SharedStore, layout: ExperimentLayout, node_id: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints listed in our index (nothing else, ever; errors
    are only logged)."""
    try:
        index = read_index(store, layout, node_id)
        if index.state != "valid" or len(index.entries) <= max(1, keep_last):
            return
        kept, dropped = _split(index.entries, keep_last)
        _write_index(store, layout, node_id, kept)
    except (OSError, ValueError) as err:
        log.warning("checkpoint_prune_failed", error=str(err))
        return
    _delete(store, layout, node_id, dropped)


def checkpoint_rounds(store: SharedStore, layout: ExperimentLayout, node_id: str) -> list[int]:
    """Rounds that hold a regular checkpoint file of ``node_id`` (listed in our index or not), newest first."""
    rounds = layout.rounds_present("checkpoints", listdir=lambda p: store.listdir(p))
    found = []
    for r in rounds:
        try:
            st = store.lstat(layout.checkpoint_file(r, node_id))
        except ValueError:  # a round dir planted as a symlink out of the experiment
            continue
        if st is not None and stat.S_ISREG(st.st_mode):
            found.append(r)
    return sorted(found, reverse=True)


# -- loading ------------------------------------------------------------------------------------------
def check_torch_zip(data: bytes, *, max_total: int, max_members: int = MAX_ZIP_MEMBERS) -> None:
    """Refuse (ValueError) a checkpoint archive ``torch.load`` should not inflate: not a zip, more than
    ``max_members`` members, a compressed member (torch.save stores; a DEFLATE member could inflate a
    thousandfold), a member whose local header disagrees with the directory or runs past the end, or
    members adding up to more than the archive itself (overlapping members) or ``max_total``. Nothing is
    decompressed here."""
    if data.count(_CENTRAL_SIGNATURE) > max_members:  # each directory entry starts so: a cheap upper bound
        raise ValueError(f"more than {max_members} zip members")
    try:
        infos = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, ValueError, EOFError, struct.error) as err:
        raise ValueError(f"not a valid zip archive: {err}") from None
    total = 0
    for info in infos:
        name = info.filename[:80]
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise ValueError(f"member {name!r} is compressed (method {info.compress_type}); torch.save stores")
        offset = info.header_offset
        if offset < 0 or offset + _LOCAL_HEADER.size > len(data):
            raise ValueError(f"member {name!r}: local header outside the archive")
        header = _LOCAL_HEADER.unpack_from(data, offset)
        signature, method, name_len, extra_len = header[0], header[3], header[9], header[10]
        start = offset + _LOCAL_HEADER.size + name_len + extra_len
        if signature != _LOCAL_SIGNATURE or method != zipfile.ZIP_STORED or start + info.file_size > len(data):
            raise ValueError(f"member {name!r}: local header disagrees with the directory")
        total += info.file_size
    if total > min(len(data), max_total):
        raise ValueError(f"members add up to {total} bytes, more than the archive ({len(data)}) or the cap "
                         f"({max_total})")


def _read_checked(store: SharedStore, path: Path, entry: CheckpointEntry | None, max_bytes: int) -> bytes:
    """The bytes of a checkpoint, capped; for a listed one, exactly the size and sha256 our index says."""
    if entry is None:
        return store.read_bytes_strict(path, max_bytes=max_bytes)
    if entry.size > max_bytes:
        raise ValueError(f"listed size {entry.size} is over the cap of {max_bytes} bytes")
    data = store.read_bytes_strict(path, max_bytes=entry.size)
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ValueError("size or sha256 differs from our index (replaced or damaged)")
    return data


def _load_payload(data: bytes, node_id: str, round_: int, max_bytes: int) -> dict:
    check_torch_zip(data, max_total=max_bytes)
    payload = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    if not isinstance(payload, dict) or payload.get("node_id") != node_id or payload.get("round") != round_:
        raise ValueError("checkpoint does not belong to this node and round")
    if not all(isinstance(payload.get(k), dict) for k in ("model", "optimizer", "rng")):
        raise ValueError("checkpoint lacks model, optimizer or rng state")
    return payload


def _check_shapes(payload: dict, model, optimizer) -> None:
    """Refuse (ValueError) weights or optimizer moments whose names or shapes are not the model's, before
    anything is loaded."""
    ours = model.state_dict()
    theirs = payload["model"]
    if set(theirs) != set(ours):
        missing, extra = sorted(set(ours) - set(theirs))[:3], sorted(set(theirs) - set(ours))[:3]
        raise ValueError(f"model keys differ (missing {missing}, unexpected {extra})")
    for key, value in theirs.items():
        if not isinstance(value, torch.Tensor) or value.shape != ours[key].shape:
            raise ValueError(f"model.{key}: shape {getattr(value, 'shape', type(value).__name__)} is not "
                             f"{tuple(ours[key].shape)}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = payload["optimizer"].get("state", {})
    if not isinstance(state, dict):
        raise ValueError("optimizer state is not a mapping")
    for index, values in state.items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(values, dict):
            raise ValueError(f"optimizer state for unknown parameter {index!r}")
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                raise ValueError(f"optimizer state {index}.{name}: shape {tuple(value.shape)} is not "
                                 f"{tuple(params[index].shape)}")


def _cpu_copy(obj: Any) -> Any:
    """A deep copy of a state dict with every tensor copied to the CPU (no second copy on the GPU)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def _snapshot(model, optimizer) -> dict:
    return {"model": _cpu_copy(model.state_dict()), "optimizer": _cpu_copy(optimizer.state_dict()),
            "rng": _rng_state()}


def _restore(model, optimizer, state: dict) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])


def _apply(model, optimizer, payload: dict, snapshot: dict) -> None:
    """Load ``payload`` into model, optimizer and RNG, or leave all three as ``snapshot`` says they were."""
    _check_shapes(payload, model, optimizer)
    try:
        _restore(model, optimizer, payload)
    except BaseException:
        _restore(model, optimizer, snapshot)
        raise


def _candidates(store: SharedStore, layout: ExperimentLayout, node_id: str,
                index: IndexRead) -> list[tuple[int, CheckpointEntry | None]]:
    """(round, index entry) to try, newest first; the entry is None for an experiment from before the index."""
    present = checkpoint_rounds(store, layout, node_id)
    if index.state == "missing" and store.signer.required:
        # Signatures are required, so this experiment was started by a version that writes the index: a
        # missing one was deleted. Loading unlisted files then would load whatever someone planted.
        if present:
            log.warning("checkpoint_unlisted", rounds=present[:20], count=len(present),
                        reason="our index is missing: unlisted checkpoints are never loaded while signatures "
                        "are required (exchange.require_signatures)")
        return []
    if index.state == "missing":
        state = store.read_as(layout.state_file(), RoundState.from_json, expect_experiment=layout.name)
        bound = state.round if state is not None else None  # a checkpoint is never ahead of the swarm's round
        rounds = [r for r in present if bound is None or r <= bound]
        if len(rounds) < len(present):
            log.warning("checkpoint_ahead_of_round", rounds=[r for r in present if r not in rounds][:20],
                        current_round=bound, reason="no index; a checkpoint past the current round is not ours")
        return [(r, None) for r in rounds]
    unlisted = [r for r in present if r not in index.entries]
    if unlisted:
        log.warning("checkpoint_unlisted", rounds=unlisted[:20], count=len(unlisted),
                    reason="not in our index: never loaded, never deleted")
    return sorted(index.entries.items(), reverse=True)


def load_latest_checkpoint(store: SharedStore, layout: ExperimentLayout, node_id: str, model, optimizer,
                           *, max_bytes: int) -> Restored | None:
    """Restore the newest checkpoint listed in our index that is intact and loads cleanly (model, optimizer
    and RNG together, or none of them); None when there is none (a fresh start). ``max_bytes`` caps the
    file read and what its zip members may add up to."""
    try:
        index = read_index(store, layout, node_id)
    except (OSError, ValueError) as err:  # unreachable, or checkpoints/ itself leads out of the experiment
        log.warning("checkpoint_index_unreachable", error=str(err))
        return None
    candidates = _candidates(store, layout, node_id, index)
    snapshot = _snapshot(model, optimizer) if candidates else None
    for round_, entry in candidates:
        path = layout.checkpoint_file(round_, node_id)
        try:
            data = _read_checked(store, path, entry, max_bytes)
            payload = _load_payload(data, node_id, round_, max_bytes)
            _apply(model, optimizer, payload, snapshot)
        except Exception as err:  # noqa: BLE001 - any failure means: try the previous checkpoint
            log.warning("checkpoint_unusable", round=round_, path=layout.relative(path),
                        error=f"{type(err).__name__}: {err}"[:300])
            continue
        log.info("checkpoint_restored", round=round_)
        extra = payload.get("extra")
        return Restored(round=round_, path=str(path), extra=extra if isinstance(extra, dict) else {})
    return None
