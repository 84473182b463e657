"""Alternate variants A/B/A/B in one run; report medians, spread and the ratio.

Absolute times on a shared two-core machine are noise; the ratio of two
variants measured in the same run, interleaved, is the figure.
"""

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Scenario:
    """One comparison: ``ours`` against ``baseline``, in seconds per operation."""

    name: str
    target: str
    ours: list = field(default_factory=list)
    baseline: list = field(default_factory=list)
    unit: str = "ms/op"
    higher_is_better: bool = False
    absolute: bool = False  # the target is on our figure alone, not a ratio
    note: str = ""

    def median(self, side):
        return statistics.median(getattr(self, side))

    @property
    def ratio(self):
        """ours / baseline; for throughput scenarios baseline / ours (speed)."""
        if self.higher_is_better:
            return self.median("baseline") / self.median("ours")
        return self.median("ours") / self.median("baseline")

    @property
    def paired(self):
        """The median of each round's ratio to the baseline round run beside
        it (:func:`alternate`): drift across a run moves both rounds of a
        pair, so this moves less than :attr:`ratio` on a noisy machine."""
        pairs = zip(self.ours, self.baseline, strict=True)
        if self.higher_is_better:
            return statistics.median(b / o for o, b in pairs)
        return statistics.median(o / b for o, b in pairs)

    def row(self):
        def fmt(values):
            return (
                f"{statistics.median(values):9.3f} "
                f"[{min(values):.3f} .. {max(values):.3f}]"
            )

        ratio = "    n/a" if self.absolute else f"{self.ratio:7.3f}"
        paired = "" if self.absolute else f" (paired {self.paired:.3f})"
        return (
            f"{self.name:<46} {fmt(self.baseline):>30} {fmt(self.ours):>30} "
            f"{ratio}  {self.target}{paired}"
        )


def alternate(rounds, baseline, ours):
    """Run ``baseline()`` and ``ours()`` interleaved; lists of their results."""
    a, b = [], []
    for number in range(rounds):
        # Alternate who goes first too, so warm-up and drift hit both sides.
        if number % 2:
            b.append(ours())
            a.append(baseline())
        else:
            a.append(baseline())
            b.append(ours())
    return a, b


def timed(operation, count):
    """Milliseconds per call of ``operation`` over ``count`` calls."""
    start = time.perf_counter()
    for _ in range(count):
        operation()
    return (time.perf_counter() - start) * 1000 / count


def header():
    return (
        f"{'scenario':<46} {'baseline: median [min .. max]':>30} "
        f"{'pyramid_tasks: median [min .. max]':>30} {'ratio':>7}  target"
    )


def save(scenarios, quick):
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = RESULTS / f"bench-{stamp}{'-quick' if quick else ''}.json"
    # An absolute scenario's baseline may be 0 (RSS growth): no ratio.
    data = [
        {
            **asdict(s),
            "ratio": None if s.absolute else s.ratio,
            "paired": None if s.absolute else s.paired,
        }
        for s in scenarios
    ]
    path.write_text(json.dumps(data, indent=2))
    return path
