"""What kind of filesystem the shared directory is on, and the poll interval that fits it.

Nodes wake on inotify events for files written on this host (:mod:`node.wakeup`); polling is the fallback
for writes the kernel cannot report: another host writing through its own mount of a network filesystem
or a FUSE mount (Google Drive, gcsfuse, rclone, sshfs). So the poll interval that fits depends on where the
experiment lives:

============================  =========  ===================================================================
shared dir                    poll       why
============================  =========  ===================================================================
local disk, events on         1.0 s      every write is local and wakes the waiter; the poll only backs up
local disk, events off        0.1 s      the poll is all there is, and a local stat costs microseconds
network / FUSE mount          0.5 s      other hosts' writes arrive only by polling; each poll is a round trip
                                         per file through the mount (Drive rate-limits them)
============================  =========  ===================================================================

The kind comes from ``/proc/mounts``: the mount with the longest mount point containing the directory.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

LOCAL = "local"
NETWORK = "network"

# Filesystem types whose contents other hosts can change behind the kernel's back (no inotify for those).
_NETWORK_TYPES = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "gpfs",
                            "afs", "beegfs", "davfs", "virtiofs"})
POLL_S = {(LOCAL, True): 1.0, (LOCAL, False): 0.1, (NETWORK, True): 0.5, (NETWORK, False): 0.5}


def _unescape(field: str) -> str:
    """/proc/mounts writes a space in a mount point as ``\\040`` (also tab, newline, backslash)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mount_of(path: str | os.PathLike, mounts_text: str | None = None) -> tuple[str, str]:
    """(mount point, filesystem type) of the mount holding ``path`` (resolved; a missing path is looked up
    through its nearest existing parent). ("/", "unknown") when /proc/mounts cannot be read."""
    p = Path(os.path.realpath(path))
    if mounts_text is None:
        try:
            mounts_text = Path("/proc/mounts").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "/", "unknown"
    best = ("/", "unknown")
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point, fstype = _unescape(fields[1]), fields[2]
        if (p == Path(point) or Path(point) in p.parents) and len(point) >= len(best[0]):
            best = (point, fstype)
    return best


def kind_of(fstype: str) -> str:
    """:data:`NETWORK` for network filesystems and FUSE mounts (``fuse.*``, e.g. Drive, gcsfuse, rclone;
    not ``fuseblk``, a local disk driven through FUSE), else :data:`LOCAL`."""
    if fstype in _NETWORK_TYPES or (fstype.startswith("fuse") and fstype != "fuseblk"):
        return NETWORK
    return LOCAL


@functools.lru_cache(maxsize=16)
def shared_dir_kind(path: str) -> str:
    """:func:`kind_of` the filesystem holding ``path`` (cached per process: mounts do not change under a run)."""
    return kind_of(mount_of(path)[1])


def default_poll_interval(kind: str, events: bool) -> float:
    """The poll interval for a shared dir of ``kind`` (see the module table)."""
    return POLL_S[(kind, bool(events))]


def poll_interval(config) -> float:
    """``coordinator.poll_interval_s`` of an experiment config, ``auto`` decided for its shared dir and for
    whether file events are on (``SWARM_NO_INOTIFY``)."""
    configured = config.coordinator.poll_interval_s
    if configured != "auto":
        return float(configured)
    from node.wakeup import events_available

    return default_poll_interval(shared_dir_kind(str(config.experiment_dir)), events_available())
