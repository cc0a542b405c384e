"""Atomic writes: a reader, or the next run after a crash, finds the old content or the new one,
never half of either.

Everything is first written under a temporary name beside its destination (`.NAME.tmp-PID`: the
same folder, so the same file system, where a rename is atomic) and flushed to disk, then renamed
into place. Standard library only, so every part of the project can use it, MLX or not.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def write_bytes(path: str | Path, data: bytes) -> None:
    """Replace file `path` with `data` in one rename."""
    path = Path(path)
    tmp = _sibling(path, "tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Replace file `path` with `text` (UTF-8) in one rename."""
    write_bytes(path, text.encode("utf-8"))


def write_folder(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Create folder `path` with `fill(tmp_folder)`, then swap it in for whatever was there.

    The only place where an output folder is replaced. An existing folder is moved aside only once
    the new one is complete and on disk; if `fill` fails, its partial folder is removed and `path`
    is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _sibling(path, "tmp")
    tmp.mkdir()
    try:
        fill(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Two renames: a crash between them leaves the old folder whole under its `.old-PID` name,
    # which remove_stale_temporaries puts back.
    old = _sibling(path, "old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def replace_symlink(link: str | Path, target: str | Path) -> None:
    """Point symlink `link` at `target` (stored as given, e.g. relative), in one rename."""
    link = Path(link)
    tmp = _sibling(link, "tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def remove_stale_temporaries(path: str | Path) -> None:
    """Clear what a killed writer of `path` left beside it: its unfinished `.tmp-PID` and, when
    it died between its two renames (no `path`), its `.old-PID` (the previous content) put back."""
    path = Path(path)
    prefix = f".{path.name}."
    for sibling in list(path.parent.iterdir()):  # listed first: we rename in there
        if not sibling.name.startswith(prefix):
            continue
        kind, _, pid = sibling.name[len(prefix) :].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not path.exists():
            sibling.rename(path)
        elif sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, left by an earlier call in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder`, so that after the rename a crash cannot
    leave the new name pointing at files whose data never reached the disk."""
    for root, _, files in os.walk(folder):
        for name in [*files, os.curdir]:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
