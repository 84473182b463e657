"""The overview's charts, drawn by the server as inline SVG.

:func:`charts` turns the figures of :func:`.stats.throughput` into what the
template draws: bars in the units of the data (an inner ``<svg>`` stretched
to the width of the page), axis labels in pixels and percentages of the
width (the text keeps its size at any width), a title and a description
for screen readers, and the rows of the table that says the same.
"""

import math

__all__ = ["charts", "count_text", "nice_max", "rate_text", "seconds_text"]

#: Pixels: the chart's height, the plot's top and height (labels below),
#: the gutter left of it for the labels of the lines (the CSS's too).
HEIGHT, TOP, PLOT, GUTTER = 170, 8, 136, 40

# Per unit of the buckets: which get a label on the axis, the label, and
# the longer label of the table and of a bar's tooltip.
_AXIS = {
    "minute": (lambda s: s.minute % 10 == 0, "%H:%M", "%H:%M"),
    "hour": (lambda s: s.hour % 4 == 0, "%H:00", "%b %d, %H:00"),
    "day": (lambda s: s.toordinal() % 5 == 0, "%b %d", "%a %b %d"),
}
_PER = {"minute": "minute", "hour": "hour", "day": "day"}
_NONE = "\N{EN DASH}"  # no figure


def nice_max(value):
    """The top of an axis showing ``value``: 1, 2 or 5 times a power of
    ten, at least ``value`` (1 for nothing)."""
    if value <= 0:
        return 1
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= value)


def seconds_text(seconds):
    """A run time: ``850 ms``, ``2.35 s``, ``42.1 s``, ``3.5 min``, ``1.2 h``;
    a dash for None."""
    if seconds is None:
        return _NONE
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def count_text(number):
    """A count on an axis: ``500``, ``2.5k``, ``1M``."""
    for size, suffix in ((1_000_000, "M"), (1000, "k")):
        if number >= size:
            return f"{number / size:g}{suffix}"
    return f"{number:g}"


def rate_text(failed, finished):
    return f"{100 * failed / finished:.1f} %" if finished else _NONE


def _ticks(top, text, whole=False):
    """Lines at 0, half the top (unless a count's half is a fraction) and
    the top."""
    half = top / 2
    values = (0, top) if whole and half != int(half) else (0, half, top)
    return [
        {"y": round(TOP + PLOT * (1 - v / top), 1), "label": text(v)} for v in values
    ]


def _labels(starts, unit):
    chosen, short, _ = _AXIS[unit]
    count = len(starts)
    labels = []
    for index, start in enumerate(starts):
        if not chosen(start):
            continue
        x, anchor = (index + 0.5) * 100 / count, "middle"
        if x < 4:
            x, anchor = index * 100 / count, "start"
        elif x > 96:
            x, anchor = (index + 1) * 100 / count, "end"
        labels.append(
            {"x": round(x, 2), "anchor": anchor, "text": start.strftime(short)}
        )
    return labels


def charts(figures):
    """``{"throughput", "rate", "rows"}``: the two charts and the table."""
    unit, buckets = figures["unit"], figures["buckets"]
    long = _AXIS[unit][2]
    rows = []
    for index, bucket in enumerate(buckets):
        finished = bucket["succeeded"] + bucket["failed"]
        rows.append(
            {
                "index": index,
                "label": bucket["start"].strftime(long),
                "succeeded": bucket["succeeded"],
                "failed": bucket["failed"],
                "finished": finished,
                "rate": bucket["failed"] / finished if finished else None,
                "rate_text": rate_text(bucket["failed"], finished),
            }
        )
    starts = [bucket["start"] for bucket in buckets]
    labels = _labels(starts, unit)
    span = f"{figures['start'].strftime(long)} to {figures['end'].strftime(long)} UTC"
    top = nice_max(max((row["finished"] for row in rows), default=0))
    most = max((row["finished"] for row in rows), default=0)
    throughput = {
        "id": "chart-finished",
        "title": f"Jobs finished per {_PER[unit]}",
        "description": (
            f"Jobs finished per {_PER[unit]}, {span}: "
            f"{figures['succeeded']:,} succeeded, {figures['failed']:,} failed "
            f"or dead; at most {most:,} in a {_PER[unit]}."
        ),
        "top": top,
        "ticks": _ticks(top, count_text, whole=True),
        "bars": [
            {
                "x": row["index"] + 0.1,
                "title": f"{row['label']}: {row['succeeded']:,} succeeded, "
                f"{row['failed']:,} failed",
                "parts": [
                    ("succeeded", top - row["succeeded"], row["succeeded"]),
                    ("failed", top - row["finished"], row["failed"]),
                ],
            }
            for row in rows
            if row["finished"]
        ],
    }
    total = figures["succeeded"] + figures["failed"]
    rates = [row["rate"] for row in rows if row["rate"] is not None]
    worst = max(rates, default=0)
    top = nice_max(100 * worst) / 100 if worst else 0.01
    rate = {
        "id": "chart-rate",
        "title": f"Failure rate per {_PER[unit]}",
        "description": (
            f"Share of the finished jobs that failed or died per {_PER[unit]}, "
            f"{span}: {rate_text(figures['failed'], total)} overall,"
            f" at most {100 * worst:.1f} % in a {_PER[unit]}."
        ),
        "top": top,
        "ticks": _ticks(top, lambda v: f"{100 * v:g} %"),
        "bars": [
            {
                "x": row["index"] + 0.1,
                "title": f"{row['label']}: {row['rate_text']} of {row['finished']:,}",
                "parts": [("failed", top - row["rate"], row["rate"])],
            }
            for row in rows
            if row["rate"]
        ],
    }
    for chart in (throughput, rate):
        chart.update(count=len(rows), labels=labels, height=HEIGHT, y=TOP, plot=PLOT)
        chart["gutter"] = GUTTER
    return {"throughput": throughput, "rate": rate, "rows": rows}
