"""Per-phase wall-clock timings, owned by the loop that measures them (no module globals)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class PhaseTimer:
    """Accumulates seconds and call counts per named phase, in first-seen order."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.calls[name] = self.calls.get(name, 0) + 1

    def total(self) -> float:
        return sum(self.seconds.values())

    def table(self) -> str:
        """A fixed-width table: phase, calls, seconds, share of the total."""
        total = self.total() or 1.0
        lines = [f"{'phase':<22}{'calls':>6}{'seconds':>10}{'share':>8}"]
        for name, sec in self.seconds.items():
            lines.append(f"{name:<22}{self.calls[name]:>6}{sec:>10.2f}{100 * sec / total:>7.1f}%")
        lines.append(f"{'total':<22}{'':>6}{self.total():>10.2f}")
        return "\n".join(lines)
