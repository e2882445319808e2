"""Where a bench puts its homes and queues, and what file system that is.

Every bench script that makes homes or queues takes ``--dir DIR`` (``add_dir_arg``) and
prints ``describe(DIR)`` before its figures: the file system type, the device and mount
options from /proc/mounts, and for ext2/3/4 whether it has a journal (the
``has_journal`` feature from ``dumpe2fs -h``, and the kernel's /proc/fs/jbd2). Queue
figures depend on it: a journal-less ext4 makes each file creation skip the inodes freed
in the last minutes, and fsync costs differ. ``bench/journalled.sh`` makes a journalled
ext4 to run them on.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path


def add_dir_arg(ap: argparse.ArgumentParser, default: str | None = None) -> None:
    ap.add_argument(
        "--dir",
        default=default,
        help=f"where the bench's homes and queues go (default: {default or 'the temp dir'}); "
        "bench/journalled.sh mounts a journalled ext4 for it",
    )


def make_dir(where: str | None, prefix: str) -> Path:
    """A new directory for one bench's files under ``where`` (None: the temp dir)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=where))


def _mount_of(path: Path) -> tuple[str, str, str, str]:
    """(device, mount point, type, options) of the mount that holds ``path``."""
    real = os.path.realpath(path)
    best = ("?", "/", "?", "")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, typ, opts = line.split()[:4]
            mnt = mnt.replace("\\040", " ")
            inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best[1]):
                best = (dev, mnt, typ, opts)  # the last (innermost, newest) mount wins
    return best


def _journal(dev: str) -> str:
    """Whether the ext file system on ``dev`` has a journal: the kernel lists a mounted
    one's journal as /proc/fs/jbd2/NAME-INO; ``dumpe2fs -h`` (the ``has_journal``
    feature) confirms it where the device can be opened (not in every container)."""
    name = os.path.basename(os.path.realpath(dev))
    try:
        jbd2 = [j for j in os.listdir("/proc/fs/jbd2") if j.startswith(name + "-")]
    except OSError:
        jbd2 = []
    kernel = f"/proc/fs/jbd2/{jbd2[0]}" if jbd2 else f"no /proc/fs/jbd2/{name}-*"
    try:
        out = subprocess.run(
            ["dumpe2fs", "-h", dev], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    features = [x for x in out.splitlines() if x.startswith("Filesystem features:")]
    if features:
        has = "has_journal" in features[0].split()
        by = f"dumpe2fs: {'has_journal' if has else 'no has_journal'}; {kernel}"
    else:
        has, by = bool(jbd2), kernel
    return f"journal: {'yes' if has else 'NO'}, {by}"


def describe(path: Path | str) -> str:
    """One line naming the file system ``path`` is on, e.g.
    ``file system: ext4 (journal: yes) on /dev/loop0 at /mnt/pyqmail-bench, rw,relatime``."""
    dev, mnt, typ, opts = _mount_of(Path(path))
    kind = typ
    if typ in ("ext2", "ext3", "ext4"):
        kind = f"{typ} ({_journal(dev)})"
    return f"file system: {kind} on {dev} at {mnt}, {opts}"


def block_dev(where: str) -> str | None:
    """The /sys/block name of the device holding ``where`` (loop0, vda...), if found."""
    try:
        st = os.stat(where)
    except OSError:
        return None
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    for name in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{name}/dev") as f:
                if f.read().strip() == f"{major}:{minor}":
                    return name
        except OSError:
            continue
    return None


def block_stat(dev: str | None) -> tuple[int, int]:
    """(write requests, flush requests) so far on ``dev``."""
    if dev is None:
        return (0, 0)
    with open(f"/sys/block/{dev}/stat") as f:
        v = [int(x) for x in f.read().split()]
    return v[4], (v[15] if len(v) > 15 else 0)


def jbd2_commits(dev: str | None) -> tuple[int, float]:
    """(transactions committed so far, average commit time in ms) of ``dev``'s journal."""
    try:
        with open(f"/proc/fs/jbd2/{dev}-8/info") as f:
            text = f.read()
    except OSError:
        return (0, 0.0)
    n = int(text.split()[0])
    avg = 0.0
    for line in text.splitlines():
        if "average transaction commit time" in line:
            avg = int(line.split()[0].removesuffix("us")) / 1000
    return n, avg
