"""How a run stops on request: SIGINT/SIGTERM finish the current step, save, and exit with
130 / 143 (the shell's codes for those signals)."""

from __future__ import annotations

import signal
from typing import Any

EXIT_CODES = {"completed": 0, "SIGINT": 130, "SIGTERM": 143}


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and exits. A second
    signal gets the default behaviour (KeyboardInterrupt / termination)."""

    def __init__(self):
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signal.Signals(signum).name
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
