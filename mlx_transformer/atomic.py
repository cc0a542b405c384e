"""Atomic writes: a reader, or the next run after a crash, finds the old content or the new one,
never half of either. And the one policy for what an output folder may replace.

Everything is first written under a temporary name beside its destination (`.NAME.tmp-PID`: the
same folder, so the same file system, where a rename is atomic) and flushed to disk, then renamed
into place. Standard library only, so every part of the project can use it, MLX or not.

Output folders (`write_folder` with a `FolderKind`): a command writes a new or empty folder; it
replaces a folder only when this program wrote it as the same kind and holds nothing else, and
only with `overwrite`; it never replaces a file, another kind, a user's folder, or its own input.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import UserError


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


def write_folder(
    path: str | Path,
    fill: Callable[[Path], None],
    kind: FolderKind | None = None,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | Path | None] = (),
) -> Path:
    """Create folder `path` with `fill(tmp_folder)`, then swap it in for whatever was there.

    The only place where an output folder is replaced. An existing folder is moved aside only once
    the new one is complete and on disk; if `fill` fails, its partial folder is removed and `path`
    is left as it was.

    Without `kind`, whatever is at `path` is replaced: for folders a program manages itself (a
    training run's checkpoints). With `kind`, `path` is a user's output: `check_output(path, kind,
    overwrite, inputs)` decides first, and again before the swap (filling may take minutes); the
    folder gets a marker naming its kind; a full, read-only or forbidden disk is one `UserError`.
    """
    path = Path(path)
    if kind is None:
        return _write_folder(path, fill, None)
    inputs = list(inputs)

    def check() -> None:
        check_output(path, kind, overwrite=overwrite, inputs=inputs)

    with _place_errors(path):
        return _write_folder(path, fill, check, kind)


@contextlib.contextmanager
def _place_errors(path: Path) -> Iterator[None]:
    """A full, read-only or forbidden place is the user's to fix: one line, not a traceback."""
    try:
        yield
    except RuntimeError as e:
        if not failed_write(e):
            raise
        raise UserError(f"cannot write {path}: {_plain(e)}; nothing was changed there") from None
    except OSError as e:
        if not failed_write(e):
            raise
        name = str(e.filename or "")
        if f".{path.name}.tmp-" in name or f".{path.name}.old-" in name:
            name = str(path.parent)  # our temporary name means nothing to the user
        detail = f"{e.strerror} ({name})" if name else e.strerror
        raise UserError(f"cannot write {path}: {detail}; nothing was changed there") from None


def _write_folder(
    path: Path,
    fill: Callable[[Path], None],
    check: Callable[[], None] | None,
    kind: FolderKind | None = None,
) -> Path:
    if path.parent.is_dir():
        remove_stale_temporaries(path)  # may put back the folder a killed writer set aside
    if check is not None:
        check()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    tmp.mkdir()
    try:
        fill(tmp)
        if kind is not None:
            marker = {"kind": kind.name, "format_version": MARKER_VERSION,
                      "written_by": f"mlx-transformer {__version__}"}  # fmt: skip
            (tmp / MARKER).write_text(json.dumps(marker) + "\n")
        _fsync_tree(tmp)
        if check is not None:
            check()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Two renames: a crash between them leaves the old folder whole under its `.old-PID` name,
    # which remove_stale_temporaries puts back.
    old = _sibling(path, "old")
    if path.exists():
        path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        if old.exists():
            old.rename(path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path


# --- output folders: what a command may replace ------------------------------------------------

MARKER = ".mlx-transformer.json"  # written into every output folder: {"kind": ..., ...}
MARKER_VERSION = 1
_MAX_SCHEMA_BYTES = 64 << 20  # a larger "io.json" or "manifest.json" is none of ours; not read
# Errors of the place written to, not of the program: the user gets one line, not a traceback.
_PLACE_ERRORS = {
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
    errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG,
}  # fmt: skip


def failed_write(e: BaseException) -> bool:
    """Whether `e` is the place's fault (full, read-only, forbidden), not the program's. MLX's
    safetensors writer reports a failed write as RuntimeError("[write] Unable to write …") with
    no errno; every other RuntimeError is a bug."""
    if isinstance(e, OSError):
        return e.errno in _PLACE_ERRORS
    return isinstance(e, RuntimeError) and str(e).startswith("[write]")


def _plain(e: BaseException) -> str:
    """A writer's message without MLX's "[write]" prefix, on one line, with the disk's space."""
    text = " ".join(str(e).removeprefix("[write]").split()).rstrip(".")
    return f"{text} (is the disk full?)"


@dataclass(frozen=True)
class FolderKind:
    """A kind of output folder this program writes, e.g. an ONNX export or a dataset.

    A folder is of this kind when its marker says so or, for folders written before the marker
    existed, when `legacy = (file, test)` holds: `file` is a JSON object that `test` accepts (a
    format field of our own, never just a file name). It may hold only names matching `entries`.
    """

    name: str  # in the marker and in messages: "ONNX export", "dataset"
    entries: tuple[str, ...]  # fnmatch patterns of the names such a folder holds
    legacy: tuple[str, Callable[[dict], bool]] | None = None

    @property
    def a_name(self) -> str:
        return _a(self.name)

    def holds(self, folder: str | Path) -> bool:
        """Whether `folder` is one this program wrote as this kind (extra entries or not)."""
        folder = Path(folder)
        marker = _marker(folder)
        if marker is not None:
            return marker == self.name
        if self.legacy is None:
            return False
        file, test = self.legacy
        content = _json_object(folder / file)
        return content is not None and bool(test(content))

    def foreign(self, folder: str | Path) -> list[str]:
        """The entries of `folder` this kind never holds, sorted."""
        return sorted(
            p.name
            for p in Path(folder).iterdir()
            if p.name != MARKER and not any(fnmatch.fnmatchcase(p.name, e) for e in self.entries)
        )


def check_output(
    path: str | Path,
    kind: FolderKind,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | Path | None] = (),
) -> None:
    """Raise a one-line `UserError` unless `path` may be written as `kind`: it is absent or an
    empty folder, or (with `overwrite`) a folder this program wrote as `kind` holding nothing
    else; and it neither is, nor holds, nor lies inside any of `inputs` (symlinks resolved)."""
    path = Path(path)
    with _place_errors(path):
        _check_output(path, kind, overwrite, inputs)


def _check_output(
    path: Path, kind: FolderKind, overwrite: bool, inputs: Iterable[str | Path | None]
) -> None:
    target = path.resolve()
    for given in filter(None, inputs):
        source = Path(given).resolve()
        if target == source:
            raise UserError(f"the output {path} is the input {given}; choose another output folder")
        if target in source.parents:
            raise UserError(
                f"the output {path} holds the input {given}, which replacing it would delete; "
                "choose another output folder"
            )
        if source in target.parents:
            raise UserError(
                f"the output {path} is inside the input {given}; choose a folder outside it"
            )
    if path.is_symlink():
        raise UserError(
            f"{path} is a symbolic link; give a new folder path (or the folder it points to)"
        )
    if not path.exists():
        return
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; choose a folder path for the {kind.name}")
    entries = sorted(p.name for p in path.iterdir() if p.name != MARKER)
    if not entries and not (path / MARKER).exists():
        return
    if kind.holds(path):
        extra = kind.foreign(path)
        if extra:
            raise UserError(
                f"{path} holds {kind.a_name} with more in it ({_few(extra)}); choose another "
                f"folder (--overwrite replaces only {kind.a_name} holding nothing else)"
            )
        if not overwrite:
            raise UserError(
                f"{path} already holds {kind.a_name}; pass --overwrite to replace it, or choose "
                "another folder"
            )
        return
    other = _marker(path)
    if other is not None:
        raise UserError(
            f"{path} holds {_a(other)} written by mlx-transformer, not {kind.a_name}; choose "
            "another folder"
        )
    raise UserError(
        f"{path} is not empty and is not {kind.a_name} written by mlx-transformer (it holds "
        f"{_few(entries)}); choose a new or empty folder (--overwrite replaces only "
        f"{kind.a_name} it wrote)"
    )


def _a(name: str) -> str:
    return f"{'an' if name[:1] in tuple('aeiouAEIOU') else 'a'} {name}"


def _marker(folder: Path) -> str | None:
    """The kind named by `folder`'s marker; None without a (readable) one."""
    marker = _json_object(folder / MARKER)
    kind = marker.get("kind") if marker is not None else None
    return kind if isinstance(kind, str) and kind else None


def _few(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown if len(names) <= 3 else f"{shown}, … {len(names)} entries"


def _json_object(file: Path) -> dict | None:
    """The JSON object in `file`; None when it is absent, unreadable, not JSON or not an object."""
    try:
        if file.stat().st_size > _MAX_SCHEMA_BYTES:
            return None
        content = json.loads(file.read_bytes())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def replace_symlink(link: str | Path, target: str | Path) -> None:
    """Point symlink `link` at `target` (stored as given, e.g. relative), in one rename."""
    link = Path(link)
    tmp = _sibling(link, "tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def remove_folder(path: str | Path) -> None:
    """Delete folder `path` so that nobody ever sees it half-deleted: it is renamed out of the
    way (`.NAME.del-PID`) first; remove_stale_temporaries finishes a deletion a kill cut short."""
    path = Path(path)
    doomed = _sibling(path, "del")
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def writer_alive(pid: int) -> bool:
    """Whether process `pid` on this machine (a writer, or a lock's holder) still runs."""
    return _alive(pid)


def remove_stale_temporaries(path: str | Path) -> None:
    """Clear what a killed writer of `path` left beside it: its unfinished `.tmp-PID`, the
    `.del-PID` of a `remove_folder` it did not finish, and, when it died between its two renames
    (no `path`), its `.old-PID` (the previous content) put back."""
    path = Path(path)
    prefix = f".{path.name}."
    for sibling in list(path.parent.iterdir()):  # listed first: we rename in there
        if not sibling.name.startswith(prefix):
            continue
        kind, _, pid = sibling.name[len(prefix) :].partition("-")
        if kind not in ("tmp", "old", "del") or not pid.isdigit() or _alive(int(pid)):
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
