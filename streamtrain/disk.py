"""What a failed write says about its disk: which disk (its mount point), how much space is left, whether it is
read-only, and the process's file-size limit, in one message for the trainer (journal, checkpoints, lock, metrics)
and the embedded server (its 507 answers, and a server that cannot start).

A full disk, a quota, a file-size limit (``ulimit -f``) and a read-only disk or folder are conditions of the
machine, not of the run: the message names the file, the disk and what to do, and the run resumes exactly once
the disk is fixed (the last good checkpoint is never touched by a failed write).
"""

from __future__ import annotations

import errno
import os
import resource
from pathlib import Path

from .errors import DiskError

#: The errors of a write that say the disk (or the process's limit on it) is the problem, not the data.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})

_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file-size limit of this process is reached (ulimit -f)",
    errno.EROFS: "the disk is read-only",
    errno.EACCES: "the folder is not writable (no permission)",
    errno.EPERM: "the folder is not writable (no permission)",
}


def is_storage_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an OSError of the disk: full, over quota or a file-size limit, read-only, no permission."""
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (a file not yet created is on its folder's disk)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_point(path: str | os.PathLike[str]) -> Path:
    """The mount point of the disk that holds ``path`` (or would hold it)."""
    here = Path(os.path.realpath(_existing(Path(path))))
    while not os.path.ismount(here) and here != here.parent:
        here = here.parent
    return here


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def file_size_limit() -> int | None:
    """This process's RLIMIT_FSIZE in bytes (``ulimit -f``), or None when there is none."""
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes an unprivileged writer may still use on the disk of ``path``, or None when it cannot be read."""
    try:
        st = os.statvfs(_existing(Path(path)))
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def describe_disk(path: str | os.PathLike[str]) -> str:
    """"the disk mounted at /data (12.3 MiB free of 1.0 GiB, read-only)", plus the file-size limit when one is set."""
    mount = mount_point(path)
    try:
        st = os.statvfs(_existing(Path(path)))
        space = f"{_size(st.f_bavail * st.f_frsize)} free of {_size(st.f_blocks * st.f_frsize)}"
        if st.f_flag & os.ST_RDONLY:
            space += ", read-only"
    except OSError as exc:
        space = f"its free space unknown: {exc.strerror or exc}"
    text = f"the disk mounted at {mount} ({space})"
    limit = file_size_limit()
    if limit is not None:
        text += f"; this process may write files of at most {_size(limit)}"
    return text


def storage_message(exc: OSError, path: str | os.PathLike[str], action: str, remedy: str) -> str:
    """One message for a failed write: what was being done to which file, why (the errno's meaning), the disk, and
    ``remedy`` (what to do). ``action`` reads "cannot <action> <path>", e.g. "append to the journal"."""
    cause = _CAUSES.get(exc.errno or 0, exc.strerror or str(exc))
    return f"cannot {action} {path}: {cause} ({describe_disk(path)}). {remedy}"


#: What to do when a file of a run cannot be written.
RUN_REMEDY = ("What to do: free space on that disk or make it writable (or point checkpoint_dir at another disk and "
              "move the run folder there), then run the same command again: the run resumes from its last good "
              "checkpoint, which a failed write never touches.")


def disk_error(exc: OSError, path: str | os.PathLike[str], action: str, remedy: str = RUN_REMEDY) -> DiskError:
    """The DiskError of a failed write of a run's file (see :func:`storage_message`)."""
    return DiskError(storage_message(exc, path, action, remedy), path=str(path), mount=str(mount_point(path)))
