"""Atomic output.

- Files: written to a temporary path beside the target, then renamed over it.
- Folders (an edit's output): built in a hidden sibling, ``.NAME.partial-PID-*``, and put in
  place in one step by :func:`commit_dir`. A process killed at any point leaves either the
  old folder (or none) or the complete new one. A killed run may leave its hidden sibling
  behind; the next successful commit to the same folder removes those of dead processes.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import shutil
import tempfile
from pathlib import Path

from factedit.errors import OutputDirError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def staging_dir(out: Path) -> Path:
    """A new hidden folder beside ``out`` (same file system, so it can be renamed into place)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-{os.getpid()}-"))


def commit_dir(staged: Path, out: Path, *, own: frozenset[str] = frozenset(), overwrite: bool = False) -> None:
    """Put the folder ``staged`` in place of ``out`` in one step.

    ``out`` absent or empty: a rename. ``out`` holding files (only with ``overwrite``): every
    entry of ``out`` that ``staged`` does not replace and whose name is not in ``own`` (the
    writer's own names, e.g. an old ``merged/``) is carried over into ``staged`` (hard-linked,
    or copied), then the two folders are swapped atomically and the old one is removed. So
    files that are not the writer's own are never lost.
    """
    staged, out = Path(staged), Path(out)
    _fsync_tree(staged)
    try:
        os.rename(staged, out)  # out absent, or an empty folder
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if not overwrite:
            raise OutputDirError(f"--out {out} exists and is not empty: choose a new folder or pass --overwrite") \
                from None
        for entry in out.iterdir():
            if entry.name not in own and not os.path.lexists(staged / entry.name):
                _link_or_copy(entry, staged / entry.name)
        if not _exchange(staged, out):
            # no atomic swap on this system: two renames; between them the old folder is at `old`
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.rename(out, old / "x")
            os.rename(staged, out)
            staged = old
        _fsync_dir(out.parent)
        shutil.rmtree(staged)  # the old contents: the files kept live on in `out`
    else:
        _fsync_dir(out.parent)
    _remove_stale(out)


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_file)
    else:
        _link_file(src, dst)


def _link_file(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale(out: Path) -> None:
    """Remove the staging folders that killed runs left beside ``out`` (their process is gone)."""
    for p in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        pid = p.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
