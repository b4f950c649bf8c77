"""``Payoff``: which of two ways of decoding the same tokens runs faster here, measured as the
engine runs (drafting or plain passes; experts routed on the device or on the host)."""

from __future__ import annotations


class Payoff:
    """Decode tokens per second of mode ``tried`` against mode ``fallback``, both measured.

    It measures ``window`` passes of ``tried``, then ``probe`` of ``fallback``, runs the faster
    for a hold while measuring it again, then re-measures the other, and so on. The hold starts
    at ``hold`` passes and doubles, up to ``longest``, each time the same mode wins again, so a
    clear winner is rarely interrupted by probes and a change of conditions is still noticed.
    Both modes must give the same output; only their speed is compared.
    """

    def __init__(self, tried: str, fallback: str, window: int = 16, probe: int = 16,
                 hold: int = 64, longest: int = 1024) -> None:  # fmt: skip
        self.tried, self.fallback = tried, fallback
        self.window, self.probe, self.hold, self.longest = window, probe, hold, longest
        self.mode = tried
        self.left = window
        self.rates: dict[str, float | None] = {tried: None, fallback: None}
        self._tokens, self._seconds = 0, 0.0
        self._winner: str | None = None
        self._hold = hold

    @property
    def trying(self) -> bool:
        """Whether the mode to run now is ``tried``."""
        return self.mode == self.tried

    def _other(self, mode: str) -> str:
        return self.fallback if mode == self.tried else self.tried

    def record(self, tokens: int, seconds: float) -> None:
        """One pass of the current mode: tokens committed and the seconds it took."""
        self._tokens += tokens
        self._seconds += seconds
        self.left -= 1
        if self.left > 0:
            return
        self.rates[self.mode] = self._tokens / self._seconds if self._seconds > 0 else 0.0
        self._tokens, self._seconds = 0, 0.0
        other = self._other(self.mode)
        if self.rates[other] is None:
            self.mode, self.left = other, self.window if other == self.tried else self.probe
            return
        best = max((self.tried, self.fallback), key=lambda m: self.rates[m] or 0.0)
        self._hold = min(2 * self._hold, self.longest) if best == self._winner else self.hold
        self._winner = best
        self.rates[self._other(best)] = None  # measured again after the hold
        self.mode, self.left = best, self._hold
