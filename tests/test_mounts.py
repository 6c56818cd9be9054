"""Which kind of filesystem the shared directory is on (node.mounts), from real and sample /proc/mounts."""

from __future__ import annotations

from node.mounts import LOCAL, NETWORK, default_poll_interval, kind_of, mount_of

SAMPLE = """\
/dev/vda / ext4 rw,relatime 0 0
tmpfs /dev/shm tmpfs rw 0 0
drive /content/drive fuse.drive rw,nosuid 0 0
server:/export /mnt/nfs nfs4 rw 0 0
/dev/sdb1 /mnt/usb fuseblk rw 0 0
/dev/vdb /mnt/my\\040data ext4 rw 0 0
"""


def test_the_longest_mount_point_decides():
    assert mount_of("/content/drive/MyDrive/rl-swarm/experiments/e", SAMPLE) == ("/content/drive", "fuse.drive")
    assert mount_of("/content/other", SAMPLE) == ("/", "ext4")
    assert mount_of("/mnt/nfs/x", SAMPLE)[1] == "nfs4"
    assert mount_of("/mnt/my data/exp", SAMPLE) == ("/mnt/my data", "ext4")  # \\040 is a space


def test_network_and_fuse_mounts_poll_local_disks_rely_on_events():
    assert kind_of("fuse.drive") == kind_of("fuse.gcsfuse") == kind_of("nfs4") == kind_of("cifs") == NETWORK
    assert kind_of("ext4") == kind_of("tmpfs") == kind_of("fuseblk") == kind_of("overlay") == LOCAL
    assert default_poll_interval(LOCAL, True) > default_poll_interval(NETWORK, True) > default_poll_interval(LOCAL, False)


def test_this_machines_tmp_is_found_in_the_real_proc_mounts(tmp_path):
    point, fstype = mount_of(tmp_path / "not" / "there" / "yet")
    assert fstype != "unknown" and str(tmp_path).startswith(point)
