"""Writing files and folders a user keeps, atomically and without predictable temporary names.

Every file or folder hfpatch writes for a user (a saved or pulled recipe, a transplanted model, a built asset)
goes through this module, so that:

- a reader only ever sees the old complete output or the new complete one, never a mix: the new content is
  written under a temporary name in the target's own folder (same filesystem) and renamed over the target;
- the temporary name is unpredictable and created exclusively (``mkstemp``/``mkdtemp``), so a symbolic link
  planted at a name hfpatch would use cannot redirect the write somewhere else;
- an error or an interrupt (``KeyboardInterrupt``, or any exception) leaves the target as it was and removes
  the temporary file or folder; replacing a folder moves the old one aside first, so no file of an earlier
  output (an old ``chat_template.jinja``, ``added_tokens.json`` or shard index) survives next to the new ones.

Only ``hfpatch.errors`` is imported: this sits at the bottom of the house, usable by the library and the apps.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from .errors import HfpatchError

__all__ = [
    "OutputError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_folder",
    "check_folder_target",
    "remove_folder",
    "apply_umask",
    "TEMP_TAG",
    "ASIDE_TAG",
]

#: A temporary file or folder for target ``name`` is called ``.<name>.tmp-<random>`` (…``.old-<random>`` for a
#: replaced folder on its way out), so a leftover one is recognisable and hidden from a plain ``ls``.
TEMP_TAG = "tmp-"
ASIDE_TAG = "old-"


class OutputError(HfpatchError, OSError):
    """An output path cannot be written: it is not a folder, is not empty, is a link, or the disk refused.

    ``path`` is the output concerned and ``reason`` the message without it (for callers that name the path
    their own way, e.g. a command-line option).
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = Path(path)
        self.reason = reason


# --------------------------------------------------------------------------------------------------
# permissions


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (``os.umask`` is process-wide and racy)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: str | os.PathLike) -> None:
    """Give ``folder`` and everything in it the permissions a plain ``mkdir``/``open`` would have.

    ``mkdtemp`` creates a folder only its owner can read (0700); once renamed into place, an output should be
    as readable as if it had been created normally under the user's umask.
    """
    mask = _umask()
    folder = Path(folder)
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


# --------------------------------------------------------------------------------------------------
# one file


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Produce file ``path`` by calling ``write(tmp)`` on a fresh temporary file beside it, then renaming it over.

    ``tmp`` already exists (empty, created exclusively with an unpredictable name in ``path``'s folder), so
    ``write`` may open it by name (``safetensors.save_file``, ``shutil.copyfile``). The content is flushed to
    disk before the rename. An existing regular file at ``path`` keeps its permission bits; a new file gets
    the umask's. A symbolic link at ``path`` is replaced by the file, never followed. On any error or
    interrupt the temporary file is removed and ``path`` is left as it was. Returns ``path``.
    """
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.{TEMP_TAG}", dir=path.parent)
    except OSError as exc:
        raise OutputError(path, f"cannot write in {path.parent}: {exc.strerror or exc}") from exc
    tmp = Path(name)
    try:
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the rename must not land before the data it names
        try:
            old = os.lstat(path)
            mode = old.st_mode & 0o7777 if stat.S_ISREG(old.st_mode) else 0o666 & ~_umask()
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see `atomic_write`). Returns ``path``."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see `atomic_write`). Returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


# --------------------------------------------------------------------------------------------------
# a whole folder


def check_folder_target(target: str | os.PathLike, *, force: bool = False) -> Path:
    """Check, before any work, that folder ``target`` may be (re)written; returns it as an absolute path.

    Refused with `OutputError`: a path that exists and is not a folder, a symbolic link (replacing it would
    replace the link, not the folder it points to), a non-empty folder unless ``force``, and a path below
    something that is not a folder. Whether the disk accepts the write is only known by writing: see
    `atomic_folder`, which creates its temporary folder at once.
    """
    target = Path(os.path.abspath(os.path.expanduser(os.fspath(target))))
    if not target.name:
        raise OutputError(target, "cannot replace the root folder; name a folder to create")
    if target.is_symlink():
        raise OutputError(target, f"is a symbolic link; give the folder it points to "
                                  f"({os.path.realpath(target)}) or another path")
    if target.exists():
        if not target.is_dir():
            raise OutputError(target, "exists and is not a folder")
        if not force and any(target.iterdir()):
            raise OutputError(target, "already exists and is not empty (replacing it needs force)")
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(target, f"{ancestor} is not a folder")
    return target


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Build folder ``target`` as a whole: yield a fresh temporary folder, and move it into place on success.

    On entry ``target`` is checked (`check_folder_target`) and the temporary folder ``.<name>.tmp-<random>`` is
    created beside it (missing parent folders are created), so an unwritable path fails before any work.
    When the block ends normally the folder is renamed to ``target``; with ``force`` an existing ``target`` is
    first moved aside and deleted after the new folder is in place, so none of its files survive. The two
    renames run with SIGINT/SIGTERM held back, so an interrupt cannot fall between them. If the block raises
    (an error, ``KeyboardInterrupt``, ``SystemExit``) ``target`` is left as it was and the temporary folder
    is removed.

    Example:
        >>> with atomic_folder("out/", force=True) as tmp:
        ...     model.save_pretrained(tmp)
        ...     tokenizer.save_pretrained(tmp)
    """
    target = check_folder_target(target, force=force)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{TEMP_TAG}", dir=target.parent))
    except OSError as exc:
        raise OutputError(target, f"cannot write in {target.parent}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        apply_umask(tmp)
        _move_into_place(tmp, target, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, target: Path, *, force: bool) -> None:
    aside: Path | None = None
    try:
        with _signals_held():
            if force and os.path.lexists(target):
                check_folder_target(target, force=True)  # still a folder, not swapped for a link meanwhile
                aside = _aside_name(target)
                os.rename(target, aside)  # onto the empty folder mkdtemp made: atomic, and no one else's name
            try:
                os.rename(tmp, target)  # onto a missing or empty folder only; a non-empty one raises
            except OSError as exc:
                if aside is not None:
                    os.rename(aside, target)
                    aside = None
                raise OutputError(target, f"cannot move the new folder into place: {exc.strerror or exc} (created "
                                          "by someone else while writing? nothing was replaced)") from exc
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def _aside_name(target: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{ASIDE_TAG}", dir=target.parent))


def remove_folder(folder: str | os.PathLike) -> None:
    """Delete ``folder``, first renaming it to an unpredictable hidden name so no reader sees it half deleted."""
    folder = Path(folder)
    aside = _aside_name(folder)
    os.rename(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block ends, then deliver them to the handlers they had.

    Python runs signal handlers in the main thread between bytecodes whichever thread the OS chose, so the
    Python-level handlers are swapped for a recorder (blocking the signal in this thread alone would not stop
    a worker thread from taking it). Outside the main thread handlers cannot be changed, and nothing is held.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler is not None:  # None: installed outside Python, and could not be put back
            previous[signum] = signal.signal(signum, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in caught:
            signal.raise_signal(signum)
