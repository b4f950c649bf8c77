"""Stop strings over streamed text, holding back what might become a stop string."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed text deltas; get back text that is safe to emit and whether a stop string hit.

    Text that could be the start of a stop string is held until it either completes the stop
    (and is dropped, with everything after it) or turns out not to be one.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        text = self._held + delta
        hits = [(text.find(s), s) for s in self.stops if s in text]
        if hits:
            self.stopped = True
            self._held = ""
            return text[: min(pos for pos, _ in hits)]
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """At the end of a stream, what was held back is ordinary text."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
