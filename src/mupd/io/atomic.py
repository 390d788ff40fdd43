"""Atomic outputs: write under a temporary sibling name, then rename onto the final name.

A crash mid-write leaves no half file under the final name; the temporary is removed. A run
killed outright (SIGKILL, OOM) cannot remove its temporaries, so each one is named after its
owner (host and pid) and the next run into the same place removes those of dead owners. Every
temporary name is unique (owner plus a random part), so concurrent writers of one output never
share one: the last to finish wins, whole.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
import uuid
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import OutputExistsError

#: `<prefix><host>-<pid>.<rest>`: how a temporary names the run that owns it.
_OWNED = re.compile(r"(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)\.")


def _host() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def owner_tag() -> str:
    """`<host>-<pid>` of this process, put in the names of its temporaries."""
    return f"{_host()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this host; True when unsure (a temporary is kept, never
    removed under a live run)."""
    if pid == os.getpid():
        return True
    if os.name != "posix":
        try:
            import psutil
        except ImportError:
            return True
        return bool(psutil.pid_exists(pid))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_stale(folder: Path, prefix: str) -> list[Path]:
    """Remove the temporaries `<prefix><host>-<pid>.*` in `folder` whose run died on this host.

    An `.old` (the previous output, moved aside for the final rename) goes back in place when
    its run died before the new output arrived; otherwise it is removed like a `.partial`."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        owner = _OWNED.match(entry.name, len(prefix))
        if owner is None or owner["host"] != _host() or _alive(int(owner["pid"])):
            continue
        final = folder / prefix[1:-1] if entry.name.endswith(".old") else None
        if final is not None and not (final.exists() or final.is_symlink()):
            os.replace(entry, final)
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def owned_tempdir(prefix: str, parent: str | os.PathLike | None = None) -> Path:
    """`tempfile.mkdtemp` named after this run, after removing those of dead runs in `parent`."""
    folder = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    remove_stale(folder, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{owner_tag()}.", dir=folder))


def fsync_path(path: Path) -> None:
    """Flush one file or folder entry (a folder: the names in it, e.g. after a rename)."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0))
    except OSError:  # a folder cannot be opened on Windows: nothing to flush there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush a file, or every file and folder under `path`, to the disk (a power cut after the
    rename then finds the data, not empty or truncated files)."""
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            fsync_path(p)


def _link_tree(source: Path, target: Path) -> None:
    """`source` at `target` as hard links (no data copied), copies where links are impossible."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, target, symlinks=True, copy_function=link)
    elif source.is_symlink():
        os.symlink(os.readlink(source), target)
    else:
        link(str(source), str(target))


@contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False, fsync: bool = False,
                  keep_others: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path to write to; on success it replaces `path`.

    `fsync`: the new output is flushed to disk before the rename, and the folder after it.
    `keep_others`: entries of an existing folder `path` that the new output lacks (a fine-tune's
    checkpoints beside a model) are carried over as hard links before the swap, so none is lost."""
    final = Path(path)
    prefix = f".{final.name}."
    remove_stale(final.parent, prefix)  # first: it may put back an output a killed run moved aside
    if final.exists() and not overwrite:
        raise OutputExistsError(f"{final} already exists; pass overwrite=True to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{prefix}{owner_tag()}.{uuid.uuid4().hex[:8]}"
    tmp = final.with_name(f"{tag}.partial")
    try:
        yield tmp
        is_folder = final.is_dir() and not final.is_symlink()
        if keep_others and is_folder and tmp.is_dir():
            for entry in final.iterdir():
                if not (tmp / entry.name).exists():
                    _link_tree(entry, tmp / entry.name)
        if fsync:
            fsync_tree(tmp)
        _swap_in(tmp, final, final.with_name(f"{tag}.old"))
        if fsync:
            fsync_path(final.parent)  # the rename itself
    finally:
        _remove(tmp)


def _swap_in(tmp: Path, final: Path, old: Path) -> None:
    """Rename `tmp` onto `final`. os.replace cannot replace a non-empty folder, so an existing
    folder is moved aside to `old` first (a run killed in between is undone by the next one: see
    `remove_stale`); when another writer's output lands between the two renames, it is moved
    aside in turn and the rename tried again."""
    while True:
        if final.is_dir() and not final.is_symlink():
            _remove(old)
            try:
                os.replace(final, old)
            except FileNotFoundError:  # another writer moved it aside first
                pass
        try:
            os.replace(tmp, final)
            break
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    _remove(old)


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> Path:
    """Replace the file `path` by `text` atomically and (with `fsync`) durably, flushed before
    and after the rename: a crash or power cut leaves the old content or the new, never a
    truncated file."""
    final = Path(path)
    with atomic_output(final, overwrite=True, fsync=fsync) as tmp:
        tmp.write_text(text)
    return final
