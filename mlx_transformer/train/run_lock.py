"""OUT/train.lock: one `train` process per run folder at a time (see `RunLock`)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .. import atomic
from ..errors import UserError

LOCK_FILE = "train.lock"


class RunLock:
    """OUT/train.lock: one `train` process per run folder at a time.

    The file is created with O_CREAT|O_EXCL and holds {"pid", "host", "started"}; the holder
    also keeps an flock on it, which the kernel drops when the process dies however it dies.
    A lock left by a process that no longer runs on this host (killed -9, machine rebooted:
    its flock is free, or without flock its PID is gone) is stale, and the next run takes it
    over and says so. Readers (generate, export, evaluation) never lock.
    """

    def __init__(self, out: Path):
        self.out = out
        self.path = out / LOCK_FILE
        self._fd: int | None = None
        self._created: Path | None = None  # the first folder of `out` this process created

    def acquire(self) -> str | None:
        """Take the lock; a UserError naming the holder if a live process has it. Returns a
        note when a stale lock was taken over."""
        missing = [p for p in [self.out, *self.out.parents] if not p.exists()]
        self._created = missing[-1] if missing else None
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            return self._acquire()
        except OSError as e:
            self._remove_created()
            raise UserError(
                f"cannot write in {self.out} (to lock it for training): {e.strerror}; --out "
                "must be a folder you can write to"
            ) from None
        except BaseException:
            self._remove_created()
            raise

    def _acquire(self) -> str | None:
        for _ in range(100):  # each retry means another process released or took it meanwhile
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:
                    continue
            try:
                locked = _flock(fd)
                if locked is False:
                    raise UserError(self._busy(_read_holder(fd, wait=True)))
                if not _same_file(fd, self.path):  # released and unlinked before our flock
                    os.close(fd)
                    continue
                previous = None if created else _read_holder(fd)
                if previous is not None and _holder_alive(previous, flocked=locked is True):
                    raise UserError(self._busy(previous))
                holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            if previous is None:
                return None
            return (
                f"{self.out}: took over the lock of PID {previous.get('pid')} (started "
                f"{previous.get('started', '?')}), which no longer runs"
            )
        raise UserError(f"could not lock {self.out}: other processes keep taking {self.path}")

    @property
    def created_here(self) -> bool:
        """Whether this process created the run folder (it did not exist before this run)."""
        return self._created is not None

    def release(self) -> None:
        """Drop the lock (and `out` itself if this process created it and nothing was written)."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()  # before closing: a waiter re-checks the name after its flock
        except OSError:
            pass  # e.g. the disk turned read-only: the next run finds the lock stale
        os.close(self._fd)
        self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        if self._created is None:
            return
        for folder in [self.out, *self.out.parents]:
            try:
                folder.rmdir()  # only if empty: a failed start leaves no trace
            except OSError:
                break
            if folder == self._created:
                break
        self._created = None

    def _busy(self, holder: dict | None) -> str:
        who, hint = "another process", ""
        if holder is not None:
            who = f"PID {holder.get('pid')}"
            if holder.get("host") != socket.gethostname():
                who += f" on {holder.get('host')}"
                hint = f"; if it no longer runs there, delete {self.path}"
            who += f", started {holder.get('started', '?')}"
        return (
            f"{self.out} is in use by another training ({who}); wait for it to finish or stop "
            f"it, or choose another --out{hint}"
        )


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _flock(fd: int) -> bool | None:
    """An exclusive flock without waiting: True when taken, False when another process holds
    it, None where there is no flock (the PID check alone decides)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without flock
        return None
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _read_holder(fd: int, wait: bool = False) -> dict | None:
    """The lock's content; with `wait`, give its new holder a moment to write it."""
    for _ in range(20 if wait else 1):
        try:
            holder = json.loads(os.pread(fd, 4096, 0))
        except (OSError, ValueError):
            holder = None
        if isinstance(holder, dict):
            return holder
        if wait:
            time.sleep(0.05)
    return None


def _holder_alive(holder: dict, flocked: bool) -> bool:
    """Whether the process that wrote the lock may still hold it. On this host, an flock we
    took proves it gone (its PID may live on as a zombie or a recycled number); else its PID
    decides. Another host's process cannot be checked from here, so it is assumed to run."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    return not flocked and isinstance(pid, int) and atomic.writer_alive(pid)
