"""``swarm export``: one node's checkpoint as a Hugging Face model directory.

The checkpoint is found and checked exactly as a worker resuming from it would (:mod:`node.checkpoint`):
the node's index (``checkpoints/<node>.index.json``) is read through a store holding the experiment key,
so an index that is unsigned or signed with another key is refused; the chosen ``.pt`` must have the
size and sha256 that index lists, pass the zip inspection (:func:`node.checkpoint.check_torch_zip`) and
load with ``torch.load(weights_only=True)`` (tensors and plain containers only). Its weights go into the
model a worker builds (:func:`node.models.load_model`: ``model.name`` of the config, its dtype), after
every name, shape and dtype matched, and ``save_pretrained`` writes model and tokenizer: for a built-in
model the tokenizer trained in-process is saved as ``tokenizer.json``, so ``AutoTokenizer.from_pretrained``
loads it like any other. ``sapo_export.json`` beside them says where the weights came from.

Every refusal is one :class:`ExportError` line (the CLI exits 2 with it). Nothing in the experiment is
written; the output appears complete or not at all (built in a temporary sibling, then moved in).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from node.checkpoint import (MAX_INDEX_BYTES, CheckpointEntry, CheckpointIndex, check_torch_zip, checkpoint_rounds,
                             index_path)
from node.checkpoint import _load_payload as load_payload  # the payload checks a resuming worker makes
from node.config import plain_name_problem
from node.heartbeat import default_runtime_dir
from node.layout import ExperimentLayout, check_node_id
from node.models import ModelLoadError, load_model
from node.runtime import IDENTITY_FIELDS
from node.schemas import ConfigSnapshot
from node.signing import KEY_ENV, KEY_FILE_NAME, KeyProblem, Signer, fingerprint, resolve_key
from node.storage import SharedStore
from node.strict_json import encode_json

EXPORT_FILE = "sapo_export.json"
EXPORT_VERSION = 1


class ExportError(ValueError):
    """A checkpoint that cannot be exported; the message is one line saying why."""


@dataclass(frozen=True)
class Exported:
    """What was written: ``out`` holds the model of ``node`` at ``round`` (the checkpoint's sha256)."""

    out: Path
    node: str
    round: int
    sha256: str
    model: str
    dtype: str


# -- the key and the store -----------------------------------------------------------------------------
def experiment_signer(config, key_file: str | None) -> tuple[Signer, str]:
    """The experiment key resolved as a node resolves it (``--key-file``, ``$SWARM_KEY``, ``$SWARM_KEY_FILE``,
    ``<runtime dir>/swarm.key``) but never created: (signer, where the key came from)."""
    runtime_dir = default_runtime_dir(config.experiment_dir)
    try:
        key, source = resolve_key(key_file=key_file, runtime_dir=runtime_dir, create=False)
    except KeyProblem as err:
        raise ExportError(f"experiment key: {err}") from None
    required = config.exchange.require_signatures
    if key is None and required:
        raise ExportError(f"no experiment key: give --key-file PATH or ${KEY_ENV} (the supervisor keeps it in "
                          f"its runtime dir: {runtime_dir / KEY_FILE_NAME})")
    return Signer(key, required=required), source or "none"


# -- finding the checkpoint ----------------------------------------------------------------------------
def _listed_nodes(store: SharedStore, layout: ExperimentLayout, limit: int = 20) -> list[str]:
    """Nodes with an index file (plain names only: the directory is shared, its names are not ours to print)."""
    suffix = ".index.json"
    names = [n[:-len(suffix)] for n in store.listdir(layout.root / "checkpoints") if n.endswith(suffix)]
    return sorted(n for n in names if not plain_name_problem(n))[:limit]


def find_checkpoint(store: SharedStore, layout: ExperimentLayout, node_id: str, round_: int | None,
                    key_source: str) -> CheckpointEntry:
    """The index entry to export: ``round_`` (which the node's verified index must list) or its newest."""
    try:
        check_node_id(node_id)
    except ValueError as err:
        raise ExportError(f"no such node {node_id!r}: {err}") from None
    path = index_path(layout, node_id)
    index, why = store.read_as_or_reason(path, CheckpointIndex.from_json, max_bytes=MAX_INDEX_BYTES,
                                         expect_node=node_id)
    if why == "missing":
        present = checkpoint_rounds(store, layout, node_id)
        if present:
            raise ExportError(f"{layout.relative(path)} is missing: {node_id}'s checkpoint files (rounds "
                              f"{', '.join(map(str, present[:5]))}) are listed in no signed index and are never "
                              "exported")
        if store.lstat(layout.peer_file(node_id)) is None:
            known = ", ".join(_listed_nodes(store, layout)) or "none"
            raise ExportError(f"no such node {node_id!r} in experiment {layout.name!r} (nodes with a checkpoint "
                              f"index: {known})")
        raise ExportError(f"{node_id} has no checkpoint yet: {layout.relative(path)} does not exist (a worker "
                          "writes it at its first checkpoint; checkpoint.every_rounds)")
    if index is None:
        hint = (f"; was it written with this key ({key_source})? Give the experiment's with --key-file"
                if why == "bad signature" else "")
        raise ExportError(f"{layout.relative(path)} refused ({why}){hint}")
    entries = {e.round: e for e in index.checkpoints}
    if not entries:
        raise ExportError(f"{node_id} has no checkpoint: its index lists none")
    if round_ is None:
        return entries[max(entries)]
    if round_ not in entries:
        raise ExportError(f"round {round_} is not in {node_id}'s checkpoint index (listed: "
                          f"{', '.join(map(str, sorted(entries)))})")
    return entries[round_]


def read_weights(store: SharedStore, layout: ExperimentLayout, node_id: str,
                 entry: CheckpointEntry) -> dict[str, torch.Tensor]:
    """The model tensors of the checkpoint ``entry`` lists, after its size, sha256, zip inspection and
    payload checks; ExportError naming the check that failed."""
    path = layout.checkpoint_file(entry.round, node_id)
    where = layout.relative(path)
    st = store.lstat(path)
    if st is None:
        raise ExportError(f"{where}: missing, though the index lists it")
    if not stat.S_ISREG(st.st_mode):
        raise ExportError(f"{where}: not a regular file")
    if st.st_size != entry.size:
        raise ExportError(f"{where} fails validation: size {st.st_size} bytes, the index lists {entry.size}")
    try:
        data = store.read_bytes_strict(path, max_bytes=entry.size)
    except (OSError, ValueError) as err:  # BadFile is an OSError: changed under us, or the mount went away
        raise ExportError(f"{where}: cannot read it: {err}") from None
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ExportError(f"{where} fails validation: sha256 differs from the index (replaced or damaged)")
    try:
        check_torch_zip(data, max_total=entry.size)
    except ValueError as err:
        raise ExportError(f"{where} fails validation: zip inspection: {err}") from None
    try:
        payload = load_payload(data, node_id, entry.round, entry.size)
    except Exception as err:  # noqa: BLE001 - torch.load's refusals come in several types
        raise ExportError(f"{where} fails validation: payload: {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}"[:300]) from None
    return payload["model"]


# -- the model -----------------------------------------------------------------------------------------
def weights_dtype(configured: str, weights: dict[str, torch.Tensor]) -> str:
    """The dtype the worker built its model in: the configured one, or for ``auto`` (bfloat16 on a capable
    GPU, else float32) the one the checkpoint's floating tensors show."""
    if configured != "auto":
        return configured
    found = {t.dtype for t in weights.values() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return "bfloat16" if torch.bfloat16 in found else "float32"


def check_weights(weights: dict[str, torch.Tensor], model: torch.nn.Module, where: str) -> None:
    """ExportError unless ``weights`` has exactly the model's tensor names, each of its shape and dtype."""
    ours = model.state_dict()
    if set(weights) != set(ours):
        missing, extra = sorted(set(ours) - set(weights))[:3], sorted(set(weights) - set(ours))[:3]
        raise ExportError(f"{where} fails validation: shapes: tensor names differ from the model's (missing "
                          f"{missing}, unexpected {extra}); is model.name the experiment's?")
    for key, value in weights.items():
        if not isinstance(value, torch.Tensor) or value.shape != ours[key].shape:
            raise ExportError(f"{where} fails validation: shapes: {key} is "
                              f"{tuple(getattr(value, 'shape', ()))}, the model's is {tuple(ours[key].shape)}")
        if value.dtype != ours[key].dtype:
            raise ExportError(f"{where} fails validation: dtype: {key} is {value.dtype}, the model's is "
                              f"{ours[key].dtype} (model.dtype)")


def _snapshot_model(store: SharedStore, layout: ExperimentLayout, config) -> str:
    """``verified`` when the experiment's config snapshot names our ``model.name`` (ExportError when it
    names another), else why it could not be read."""
    snapshot, why = store.read_as_or_reason(layout.config_file(), ConfigSnapshot.from_json,
                                            expect_experiment=config.experiment.name)
    if snapshot is None:
        return why or "unreadable"
    section = snapshot.config.get("model")
    theirs = section.get("name") if isinstance(section, dict) else None
    if theirs != config.model.name:
        raise ExportError(f"model.name: experiment {config.experiment.name!r} trained {theirs!r}, this config "
                          f"says {config.model.name!r}")
    return "verified"


# -- the output directory ------------------------------------------------------------------------------
def check_out_dir(out: Path, force: bool) -> None:
    """ExportError for an ``out`` that is not a directory, or one with files in it (unless ``force``)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out}: not empty (--force writes over it)")


def _previous_files(out: Path) -> list[str]:
    """Files a previous export into ``out`` listed (plain names only)."""
    try:
        listed = json.loads((out / EXPORT_FILE).read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [n for n in listed if isinstance(n, str) and n and "/" not in n and n not in (".", "..")]


def _move_into(tmp: Path, out: Path) -> None:
    """Put the finished export ``tmp`` at ``out``: a rename when ``out`` is new, else file by file (``force``),
    and files the previous export listed that this one did not write are removed (a stale weight file
    would otherwise be loaded instead of ours)."""
    if not out.exists():
        os.rename(tmp, out)
        return
    stale = set(_previous_files(out)) - {p.name for p in tmp.iterdir()}
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    tmp.rmdir()
    for name in stale:
        try:
            (out / name).unlink()
        except (FileNotFoundError, IsADirectoryError):
            pass


def _write(loaded, out: Path, force: bool, record: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # ours, from a run that died with this pid
    try:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        record["files"] = sorted([p.name for p in tmp.iterdir()] + [EXPORT_FILE])
        (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        check_out_dir(out, force)  # again: something may have appeared meanwhile
        _move_into(tmp, out)
    except OSError as err:
        raise ExportError(f"--out {out}: {err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- the whole export ----------------------------------------------------------------------------------
def export_checkpoint(config, node_id: str, *, out: Path | str, round_: int | None = None,
                      key_file: str | None = None, force: bool = False) -> Exported:
    """Write node ``node_id``'s newest checkpoint (or ``round_``) of ``config``'s experiment to ``out`` as a
    Hugging Face directory plus ``sapo_export.json``; ExportError (one line) for anything refused."""
    out = Path(out).expanduser()
    check_out_dir(out, force)
    layout = ExperimentLayout.from_config(config)
    if not layout.root.is_dir():
        raise ExportError(f"no experiment at {layout.root}")
    signer, key_source = experiment_signer(config, key_file)
    store = SharedStore.from_config(config, signer=signer)
    try:
        entry = find_checkpoint(store, layout, node_id, round_, key_source)
        snapshot = _snapshot_model(store, layout, config)
        weights = read_weights(store, layout, node_id, entry)
    except ExportError:
        raise
    except (OSError, ValueError) as err:  # the mount did not answer, or a path led out of the experiment
        raise ExportError(f"shared directory: {err}") from None
    own = config.for_node(node_id)  # a worker of a heterogeneous swarm (workers:) may have its own model
    dtype = weights_dtype(own.model.dtype, weights)
    try:
        loaded = load_model(own.model.name, device="cpu", dtype=dtype, seed=own.model_seed(),
                            attn_implementation=own.model.attn_implementation)
    except ModelLoadError as err:
        raise ExportError(str(err)) from None
    where = layout.relative(layout.checkpoint_file(entry.round, node_id))
    check_weights(weights, loaded.model, where)
    loaded.model.load_state_dict(weights)
    resolved = config.to_dict()
    record = {
        "schema_version": EXPORT_VERSION,
        "experiment": config.experiment.name,
        "experiment_dir": str(layout.root),
        "node": node_id,
        "round": entry.round,
        "checkpoint": where,
        "size": entry.size,
        "sha256": entry.sha256,
        "checkpoint_written_at": entry.written_at,
        "model": {"name": own.model.name, "dtype": dtype, "init_seed": own.model_seed()},
        # What the experiment is (the fields every node must agree on), and the whole resolved config's hash.
        "config_identity": {f"{section}.{field}": resolved[section][field] for section, field in IDENTITY_FIELDS},
        "config_sha256": hashlib.sha256(encode_json(resolved)).hexdigest(),
        "config_snapshot": snapshot,
        "key_fingerprint": fingerprint(signer.key) if signer.key is not None else None,
        "exported_at": time.time(),
    }
    _write(loaded, out, force, record)
    return Exported(out=out, node=node_id, round=entry.round, sha256=entry.sha256, model=own.model.name,
                    dtype=dtype)
