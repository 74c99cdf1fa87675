"""Writing files so that nothing half-written is ever read, shipped or resumed from.

Every file or folder kto_lite leaves for later (status.json, checkpoints, the adapter, reference
caches, merged models, GGUF files, sample files) is written to a hidden temporary sibling, flushed to
disk (fsync), then renamed over its final name: a reader, a resume or a killed process sees the old
version or the new one, never a mix. A full disk is reported with the path and the space that was
free, and leaves the previous version in place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

KIB, MIB, GIB = 1024, 1024**2, 1024**3


def format_bytes(n: float) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.0f} MiB" if n >= MIB else f"{n / KIB:.0f} KiB"


class DiskFullError(OSError):
    """No space left while writing `path`; the message says how much was free and what to do."""


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def user_mode(path: str | Path, folder: bool = False) -> None:
    """The permissions a plain `open` / `mkdir` would give (mkstemp / mkdtemp make them owner-only)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


def free_bytes(path: str | Path) -> int | None:
    """Free space on the disk that holds `path` (or its nearest existing parent); None if unknown."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _fsync(path: Path) -> None:
    """Flush a file, or every file of a folder and the folder itself, to disk."""
    for p in ([*path.rglob("*"), path] if path.is_dir() else [path]):
        flags = os.O_RDONLY | (os.O_DIRECTORY if p.is_dir() else 0)
        with contextlib.suppress(OSError):  # some file systems refuse fsync on folders: nothing to do then
            fd = os.open(p, flags)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _disk_full(path: Path, written: Path, error: OSError) -> DiskFullError:
    free = free_bytes(path.parent)
    so_far = _size(written) if written.exists() else 0
    return DiskFullError(
        errno.ENOSPC, f"no space left on the disk of {path} after writing {format_bytes(so_far)} of it "
        f"({format_bytes(free or 0)} free now); free some space or choose another folder. Nothing was "
        f"replaced: what was at {path} before is intact")


@contextlib.contextmanager
def atomic_path(path: str | Path, *, folder: bool = False, keep_mode: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write (a file, or with folder=True a folder); on success it is
    flushed to disk and renamed to `path` (replacing what was there), on any error it is removed.

    keep_mode False: the result gets the permissions a plain open / mkdir would give (the user's umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        try:
            yield tmp
            _fsync(tmp)
        except OSError as e:
            if e.errno == errno.ENOSPC and not isinstance(e, DiskFullError):
                raise _disk_full(path, tmp, e) from e
            raise
        if not keep_mode:
            for p in ([tmp, *tmp.rglob("*")] if folder else [tmp]):
                user_mode(p, folder=p.is_dir())
        if folder and path.is_dir():  # a folder cannot be renamed over a non-empty one: move the old one aside
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def remove_partials(folder: str | Path) -> None:
    """Delete what a killed writer left behind in `folder` (`atomic_path`'s hidden temporary siblings)."""
    for stale in Path(folder).glob(".*.partial-*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
