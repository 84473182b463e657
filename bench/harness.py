"""Alternate variants A/B/A/B in one run; report medians, spread and the ratio.

Absolute times on a shared two-core machine are noise; the ratio of two
variants measured in the same run, interleaved, is the figure.  Scenarios
that can also count the CPU time of every process involved (:class:`CPUMeter`:
the web process or the worker, PostgreSQL, Redis) report its ratio beside
the time's: what a variant costs the machine, waits left out.
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
    # CPU milliseconds per operation of every process involved, per round
    # (CPUMeter), where the scenario counts them.
    cpu_ours: list = field(default_factory=list)
    cpu_baseline: list = field(default_factory=list)

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

    @property
    def cpu_ratio(self):
        """As :attr:`ratio`, of the CPU time per operation; None uncounted."""
        if not self.cpu_ours:
            return None
        ours, baseline = map(statistics.median, (self.cpu_ours, self.cpu_baseline))
        return baseline / ours if self.higher_is_better else ours / baseline

    def row(self):
        def fmt(values):
            return (
                f"{statistics.median(values):9.3f} "
                f"[{min(values):.3f} .. {max(values):.3f}]"
            )

        ratio = "    n/a" if self.absolute else f"{self.ratio:7.3f}"
        paired = "" if self.absolute else f" (paired {self.paired:.3f})"
        if self.cpu_ratio is not None:
            paired += f" (cpu {self.cpu_ratio:.3f})"
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


class CPUMeter:
    """CPU time used by the benchmark's services (PostgreSQL's and Redis's
    processes on this machine) and by ``pids``, from :meth:`start` to
    :meth:`stop`: milliseconds per operation.

    Each process's own CPU clock (``clock_getcpuclockid(3)``, all its
    threads), which the time the hypervisor takes away (steal) does not
    advance on this kernel (``CONFIG_PARAVIRT_TIME_ACCOUNTING``); it still
    moves with how fast the cores run.  A process that ends meanwhile counts
    nothing (its CPU since :meth:`start` is lost), and one that begins
    meanwhile is not seen: the scenarios keep their connections open from
    round to round, but PostgreSQL's short-lived workers (autovacuum) go
    uncounted."""

    SERVICES = ("postgres", "redis-server")

    def __init__(self, *pids):
        self.pids = pids

    def start(self):
        pids = [*self.pids, *_processes_named(self.SERVICES)]
        seconds = {pid: _cpu_seconds(pid) for pid in pids}
        self.before = {pid: s for pid, s in seconds.items() if s is not None}

    def stop(self, count):
        used = 0.0
        for pid, before in self.before.items():
            after = _cpu_seconds(pid)
            used += (before if after is None else after) - before
        return used * 1000 / count


def _processes_named(names):
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() in names:
                pids.append(int(comm.parent.name))
        except OSError:  # ended meanwhile
            continue
    return pids


def _cpu_seconds(pid):
    """``pid``'s CPU time in seconds (None: no such process): the clock
    ``clock_getcpuclockid(3)`` names, ``((~pid) << 3) | 2`` on Linux."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)
    except OSError:
        return None


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
            "cpu_ratio": s.cpu_ratio,
        }
        for s in scenarios
    ]
    path.write_text(json.dumps(data, indent=2))
    return path
