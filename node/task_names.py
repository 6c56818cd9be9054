"""The task names a config may use, without importing reasoning-gym in processes that only check a config.

:func:`sapo.tasks.known_task_names` imports reasoning-gym to list its datasets: ~1 s of CPU (sympy,
cellpylib, ...) that the supervisor and the coordinator otherwise never need, paid again by every
``swarm`` command and every node start. Here reasoning-gym's dataset names are kept in a small JSON file
under ``~/.cache/sapo-swarm/`` (``$SWARM_CACHE_DIR`` wins), keyed by the installed package (its directory,
version, and the size and mtime of its ``__init__.py`` and ``factory.py``): the first check after an install
imports it once and writes the file, later ones read ~2 KB. A missing, unreadable, foreign or stale file
falls back to the import; a cache that cannot be written is not an error. Workers import reasoning-gym
anyway (to build questions), once.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata, util
from pathlib import Path

from node.fsio import write_atomic
from sapo.tasks import _UNBUILDABLE, TOY_TASKS  # the filter known_task_names applies (one definition)

CACHE_DIR_ENV = "SWARM_CACHE_DIR"
MAX_CACHE_BYTES = 256 * 1024


def cache_dir() -> Path:
    """``$SWARM_CACHE_DIR``, else ``~/.cache/sapo-swarm`` (beside the default runtime dirs)."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "sapo-swarm")


def installed_key() -> str | None:
    """What identifies the installed reasoning-gym (None when it is not installed)."""
    spec = util.find_spec("reasoning_gym")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    try:
        version = metadata.version("reasoning-gym")
    except metadata.PackageNotFoundError:
        version = "?"
    parts = [str(root), version]
    for name in ("__init__.py", "factory.py"):
        try:
            st = (root / name).stat()
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{name}:-")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def registered_datasets(*, directory: Path | None = None) -> list[str]:
    """reasoning-gym's dataset names, from the cache when it matches the installed package, else by import."""
    key = installed_key()
    path = (directory or cache_dir()) / f"reasoning-gym-datasets-{key}.json"
    if key is not None:
        names = _read(path, key)
        if names is not None:
            return names
    from reasoning_gym.factory import DATASETS  # the authoritative list: ~1 s

    names = sorted(DATASETS)
    if key is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps({"key": key, "datasets": names}).encode(), durable=False)
        except OSError:
            pass  # a read-only home: every check imports, as before
    return names


def known_task_names(*, directory: Path | None = None) -> list[str]:
    """What :func:`sapo.tasks.known_task_names` returns, without importing reasoning-gym when cached."""
    return sorted(set(registered_datasets(directory=directory)) - _UNBUILDABLE) + sorted(TOY_TASKS)


def _read(path: Path, key: str) -> list[str] | None:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_CACHE_BYTES + 1))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    names = data.get("datasets")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return None
    return names
