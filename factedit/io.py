"""Atomic output.

- Files: written to a temporary path beside the target, then renamed over it.
- Folders (an edit's output): built in a hidden sibling, ``.NAME.partial-PID-*``, and put in
  place in one step by :func:`commit_dir`. A process killed at any point leaves either the
  old folder (or none) or the complete new one. A killed run may leave its hidden sibling
  behind; the next successful commit to the same folder removes those of dead processes.
- Permissions follow the umask, as any other tool's outputs: files ``0666 & ~umask``, folders
  ``0777 & ~umask`` (``mkstemp``/``mkdtemp`` alone would make them 0600/0700).
- JSON is strict (:func:`dumps_json`): NaN and infinities are written as ``null``.
- Reading (:func:`read_text`, :func:`read_json`): bounded in size (checked before reading),
  UTF-8 only, and every failure (missing, not UTF-8, invalid, nested too deeply) is a one-line
  :class:`FactEditError`.
- Locks (:func:`held_lock`): work done in place on a folder (continuing or undoing a sequence
  of edits, pulling a model) holds an exclusive lock on the file ``.NAME.lock`` beside it; a
  second factedit process is refused at once (exit code 2), never left to lose the first one's work.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from factedit.errors import FactEditError, OutputDirError

_UMASK_LOCK = threading.Lock()
MAX_JSON_BYTES = 256 * 2**20  # request files, datasets, manifests, configs
MAX_RECIPE_BYTES = 2**20  # YAML recipes


def umask() -> int:
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps_json(obj: Any, **kw) -> str:
    """Strict JSON, as other tools read it: NaN and inf become null (``allow_nan=False``)."""
    return json.dumps(_finite(obj), allow_nan=False, **kw)


def atomic_write_json(path: Path, obj: Any, **kw) -> None:
    atomic_write_text(path, dumps_json(obj, **kw))


def read_text(path: str | Path, what: str, limit: int = MAX_JSON_BYTES,
              error: type[FactEditError] = FactEditError) -> str:
    """A UTF-8 text file of at most ``limit`` bytes; anything else is a one-line error naming
    ``what`` (e.g. "recipe file", "--dataset") and the fix, raised as ``error``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist (or is not a file): check the path")
    try:
        if path.stat().st_size > limit:  # refused before a byte is read
            raise error(f"{what} {path} is larger than {_size(limit)}: split it, or check that it is the right file")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror}): check its permissions") from None
    if len(data) > limit:
        raise error(f"{what} {path} is larger than {_size(limit)}: split it, or check that it is the right file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as "
                            "UTF-8") from None


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n // 2**10} KiB"


def parse_json(text: str, what: str) -> Any:
    """``json.loads`` whose failures are one-line errors (invalid, or nested too deeply)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FactEditError(f"{what} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise FactEditError(f"{what} is nested too deeply to be read: check the file") from None


def read_json(path: str | Path, what: str, limit: int = MAX_JSON_BYTES) -> Any:
    return parse_json(read_text(path, what, limit), f"{what} {path}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0600: follow the umask instead
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
    staged = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-{os.getpid()}-"))
    os.chmod(staged, dir_mode())  # mkdtemp makes 0700: follow the umask instead
    return staged


def commit_dir(staged: Path, out: Path, *, own: frozenset[str] = frozenset(), overwrite: bool = False) -> None:
    """Put the folder ``staged`` in place of ``out`` in one step.

    ``out`` absent or empty: a rename. ``out`` holding files (only with ``overwrite``): every
    entry of ``out`` that ``staged`` does not replace and whose name is not in ``own`` (the
    writer's own names, e.g. an old ``merged/``) is carried over into ``staged`` (hard-linked,
    or copied), then the two folders are swapped atomically and the old one is removed. So
    files that are not the writer's own are never lost.
    """
    staged, out = Path(staged), Path(out)
    _follow_umask(staged)
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


def _follow_umask(root: Path) -> None:
    """Give the staged folder and everything written into it (also by other libraries, e.g.
    ``save_pretrained``, which may create files 0600) the modes the umask asks for."""
    fmode, dmode = file_mode(), dir_mode()
    os.chmod(root, dmode)
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            if not os.path.islink(os.path.join(dirpath, d)):
                os.chmod(os.path.join(dirpath, d), dmode)
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, fmode)


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


@contextmanager
def held_lock(target: str | Path, what: str, timeout: float = 0.0,
              waiting: Callable[[], None] | None = None) -> Iterator[Path]:
    """Hold the exclusive lock of ``target`` (a folder worked on in place) for the block: the
    file ``.NAME.lock`` beside it, locked with ``flock`` (released by the system when the
    process ends, even by kill -9). Held by another process: a one-line error, at once or after
    ``timeout`` seconds of waiting (``waiting`` is called once when the wait begins), naming
    ``what`` (e.g. "--out") and the lock file. The lock file itself stays (it is empty)."""
    from filelock import FileLock, Timeout

    target = Path(target)
    lock_path = target.parent / f".{target.name}.lock"
    lock = FileLock(lock_path, timeout=timeout, thread_local=False)
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if timeout <= 0:
                raise
            if waiting is not None:
                waiting()
            lock.acquire(timeout=timeout)
    except Timeout:
        raise FactEditError(f"{what} {target} is in use: another factedit process holds its lock ({lock_path})"
                            + (f" and still did after {timeout:g} s" if timeout > 0 else "")
                            + ": wait until it has finished, then run again") from None
    except OSError as exc:
        raise FactEditError(f"{what} {target}: cannot create its lock file {lock_path} ({exc.strerror}): check that "
                            "its folder is writable") from None
    try:
        yield lock_path
    finally:
        lock.release()


def remove_stale_staging(out: Path) -> None:
    """Remove the staging folders that killed runs left beside ``out`` (their process is gone)."""
    _remove_stale(Path(out))


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
