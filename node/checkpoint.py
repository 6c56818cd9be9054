"""Worker checkpoints: model, optimizer, RNG states and round, written atomically, loaded safely.

``checkpoints/round_R/<node>.pt`` holds tensors and plain containers only and is loaded with
``torch.load(weights_only=True)``, so a hostile file cannot run code. A checkpoint that does not load
(truncated by a kill, corrupt, wrong shapes) is skipped with a warning and the previous one is used.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import structlog
import torch

from node.layout import ExperimentLayout
from node.storage import SharedStore

log = structlog.get_logger(__name__)

CHECKPOINT_VERSION = 1


@dataclass
class Restored:
    """What a loaded checkpoint gave back."""

    round: int  # the last round whose training step is inside the weights
    path: str


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
                    *, keep_last: int) -> bool:
    """Write this node's checkpoint for ``round_`` atomically, then prune to the last ``keep_last``.

    Returns False when the shared directory refused it (the previous checkpoints are intact and the
    error is logged); training goes on and the next checkpoint tries again.
    """
    payload = {
        "version": CHECKPOINT_VERSION,
        "node_id": node_id,
        "round": round_,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path = layout.checkpoint_file(round_, node_id)
    try:
        store.makedirs(path.parent)
        store.write_bytes_atomic(path, buffer.getvalue(), retries=True)
    except OSError as err:
        log.error("checkpoint_failed", round=round_, path=layout.relative(path), error=str(err))
        return False
    log.info("checkpoint_saved", round=round_, bytes=len(buffer.getvalue()))
    prune_checkpoints(store, layout, node_id, keep_last)
    return True


def checkpoint_rounds(store: SharedStore, layout: ExperimentLayout, node_id: str) -> list[int]:
    """Rounds that hold a checkpoint file of ``node_id``, newest first."""
    rounds = layout.rounds_present("checkpoints", listdir=lambda p: store.listdir(p))
    return sorted((r for r in rounds if store.lstat(layout.checkpoint_file(r, node_id)) is not None), reverse=True)


def prune_checkpoints(store: SharedStore, layout: ExperimentLayout, node_id: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints of this node (errors are only logged)."""
    for round_ in checkpoint_rounds(store, layout, node_id)[keep_last:]:
        path = layout.checkpoint_file(round_, node_id)
        try:
            store.fs.unlink(path)
        except OSError as err:
            log.warning("checkpoint_prune_failed", round=round_, error=str(err))
            continue
        try:
            store.fs.rmdir(path.parent)  # only succeeds once every node's file of that round is gone
        except OSError:
            pass


def load_latest_checkpoint(store: SharedStore, layout: ExperimentLayout, node_id: str, model, optimizer,
                           *, max_bytes: int) -> Restored | None:
    """Restore the newest checkpoint that loads cleanly; None when there is none (a fresh start)."""
    for round_ in checkpoint_rounds(store, layout, node_id):
        path = layout.checkpoint_file(round_, node_id)
        try:
            data = store.read_bytes_strict(path, max_bytes=max_bytes)
            payload = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
            if not isinstance(payload, dict) or payload.get("node_id") != node_id or payload.get("round") != round_:
                raise ValueError("checkpoint does not belong to this node and round")
            model.load_state_dict(payload["model"])
            optimizer.load_state_dict(payload["optimizer"])
            _set_rng_state(payload["rng"])
        except Exception as err:  # noqa: BLE001 - any failure means: try the previous checkpoint
            log.warning("checkpoint_unusable", round=round_, path=layout.relative(path),
                        error=f"{type(err).__name__}: {err}"[:300])
            continue
        log.info("checkpoint_restored", round=round_)
        return Restored(round=round_, path=str(path))
    return None
