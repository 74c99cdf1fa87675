"""Writing files so that nothing half-written is ever read, shipped or resumed from.

Every file or folder kto_lite leaves for later (status.json, checkpoints, the adapter, reference
caches, merged models, GGUF files, sample files) is written to a hidden temporary sibling, flushed to
disk (fsync), then renamed over its final name: a reader, a resume or a killed process sees the old
version or the new one, never a mix. A full disk is reported with the path, the space the write needs
and the space that was free (`DiskFullError`), and leaves the previous version in place.

Fault injection (tests/test_faults.py, tests/kill_campaign.py): with KTO_LITE_KILL_AT=NAME in the
environment, the process kills itself (SIGKILL) when a write whose final name is NAME is complete but not
yet renamed into place (e.g. `checkpoint-4`, `adapter_config.json`): the worst moment for a writer to die.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

KIB, MIB, GIB = 1024, 1024**2, 1024**3
KILL_AT = "KTO_LITE_KILL_AT"  # see the module docstring


def format_bytes(n: float) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.0f} MiB" if n >= MIB else f"{n / KIB:.0f} KiB"


class DiskFullError(OSError):
    """No space left while writing `path`; the message says what the write needs, how much was free and
    what to do. `path` and `needed` (bytes, None when unknown) are kept as attributes."""

    def __init__(self, path: Path, message: str, needed: int | None = None):
        super().__init__(errno.ENOSPC, message)
        self.path, self.needed = Path(path), needed

    def __str__(self) -> str:
        return self.strerror


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


def _disk_full(path: Path, written: Path, needed: int | None) -> DiskFullError:
    free = free_bytes(path.parent)
    so_far = _size(written) if written.exists() else 0
    need = f"needs about {format_bytes(needed)}" if needed else f"needs more than the {format_bytes(so_far)} written"
    return DiskFullError(path, f"no space left on the disk of {path}: writing it {need}, and "
                         f"{format_bytes(free or 0)} {'is' if free is not None else 'may be'} free there. Free some "
                         f"space or choose another folder. Nothing was replaced: what was at {path} is intact.", needed)


def kill_point(name: str) -> None:
    """Fault injection (module docstring): die here, without cleanup, if KTO_LITE_KILL_AT names this write."""
    if os.environ.get(KILL_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _writing(final: Path, tmp: Path, needed: int | None) -> Iterator[None]:
    """Around a write into `tmp`: flushed to disk at the end, a full disk reported as DiskFullError."""
    try:
        yield
        _fsync(tmp)
    except OSError as e:
        if e.errno == errno.ENOSPC and not isinstance(e, DiskFullError):
            raise _disk_full(final, tmp, needed) from e
        raise


def _user_modes(tmp: Path) -> None:
    for p in [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]:
        user_mode(p, folder=p.is_dir())


@contextlib.contextmanager
def atomic_path(path: str | Path, *, folder: bool = False, keep_mode: bool = False,
                needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write (a file, or with folder=True a folder); on success it is
    flushed to disk and renamed to `path` (replacing what was there), on any error it is removed.

    keep_mode False: the result gets the permissions a plain open / mkdir would give (the user's umask).
    needed: the bytes the write takes, for the message of a full disk (None: unknown).
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
        with _writing(path, tmp, needed):
            yield tmp
        if not keep_mode:
            _user_modes(tmp)
        kill_point(path.name)
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


@contextlib.contextmanager
def atomic_files(folder: str | Path, *, last: Sequence[str] = (), needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder inside `folder` to write several files into; on success each is flushed to disk
    and renamed into `folder`, those named in `last` after the others (a reader checks those: the adapter's
    config after its weights). Each file is whole at every moment; other files of `folder` stay as they are.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".files.partial-", dir=folder))
    try:
        with _writing(folder, tmp, needed):
            yield tmp
        _user_modes(tmp)
        for f in sorted((f for f in tmp.iterdir() if f.is_file()), key=lambda f: (f.name in last, f.name)):
            kill_point(f.name)
            os.replace(f, folder / f.name)
        _fsync(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def remove_partials(folder: str | Path) -> None:
    """Clean up after a killed writer in `folder`: delete `atomic_path`'s hidden temporary siblings, and put back
    a folder's previous version that was moved aside (`.NAME.old-PID`) when the new one never took its place."""
    for stale in Path(folder).glob(".*.partial-*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    for old in Path(folder).glob(".*.old-*"):
        name = old.name[1:].rsplit(".old-", 1)[0]
        if not (Path(folder) / name).exists():
            os.replace(old, Path(folder) / name)
        else:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
