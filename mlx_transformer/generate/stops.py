"""Stop strings on streamed text: matched across token boundaries, and text that might be the
start of one held back until it is not. Imports no MLX."""

from __future__ import annotations

from collections.abc import Sequence


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index of the earliest occurrence of any stop string in text[start:], or None."""
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def partial_stop_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string (held back)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class StopStrings:
    """Text of one sequence as it grows: what is safe to show, and whether a stop string came."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.shown = 0  # text[:shown] has been returned
        self.stopped = False

    def add(self, piece: str) -> str:
        """Append new text; return the part now safe to show (never any of a stop string)."""
        start = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        hit = find_stop(self.text, self.stops, start) if self.stops else None
        if hit is not None:
            self.text, self.stopped = self.text[:hit], True
            end = hit
        else:
            end = len(self.text) - partial_stop_length(self.text, self.stops)
        out, self.shown = self.text[self.shown : end], max(self.shown, end)
        return out

    def flush(self) -> str:
        """The generation ended without a stop string: show what was held back."""
        out, self.shown = self.text[self.shown :], len(self.text)
        return out
