"""The one progress bar of every long loop: a labelled tqdm, readable in a terminal and in a log.

    for batch in progress.bar(batches, desc="train", total=max_steps, unit="step"):
        ...

In a terminal it is tqdm's bar, 80 columns wide, whose postfix keeps only the metrics that fit.
When stderr is not a terminal (a redirected run, a job log) it prints a whole line about every 5%
of the loop (every 30 seconds when the total is unknown), and set_postfix does not print, so a log
holds about twenty lines per loop instead of one per step.
"""

import math
import sys

from tqdm import tqdm

WIDTH = 80
LINES_PER_LOOP = 20
SECONDS_PER_LINE_WITHOUT_TOTAL = 30.0


class LineWriter:
    """A file for tqdm that turns its carriage-return redraws into whole lines, one per count."""

    def __init__(self, stream):
        self.stream = stream
        self.last_count = ""

    def write(self, text: str):
        line = text.replace("\r", "").strip()
        count = line.partition(" [")[0]  # The label, the percentage, the bar and n/total.
        if line and count != self.last_count:
            self.stream.write(line + "\n")
            self.last_count = count

    def flush(self):
        self.stream.flush()


class Bar(tqdm):
    """tqdm whose postfix fits the line width and, in a log, does not print by itself."""

    def __init__(self, *args, redraw_on_postfix: bool, **kwargs):
        self.redraw_on_postfix = redraw_on_postfix
        super().__init__(*args, **kwargs)

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)
        self.postfix = fit_postfix(self.postfix or "", self.room_for_postfix())
        if refresh and self.redraw_on_postfix:
            self.refresh()

    def room_for_postfix(self) -> int:
        """Columns left for the postfix on an 80-column line with a 10-column bar."""
        meter = self.format_meter(**{**self.format_dict, "postfix": None, "ncols": None})
        return WIDTH - len(meter) - len(", ") - 1


def fit_postfix(postfix: str, room: int) -> str:
    """The leading "key=value" items of a tqdm postfix that fit in `room` columns, whole."""
    kept = []
    for item in postfix.split(", "):
        if len(", ".join([*kept, item])) > room:
            break
        kept.append(item)
    return ", ".join(kept)


def bar(iterable=None, *, desc: str, total=None, unit: str = "it", disable: bool = False,
        initial: int = 0) -> tqdm:
    """A progress bar labelled `desc` over `iterable` (or updated by hand with .update(n)); a
    resumed loop passes the count it starts from as `initial`."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if sys.stderr.isatty():
        return Bar(iterable, desc=desc, total=total, unit=unit, disable=disable, initial=initial,
                   ncols=WIDTH, redraw_on_postfix=True)
    if total:
        every = max(1, math.ceil(total / LINES_PER_LOOP))
        timing = {"miniters": every, "mininterval": 0.0}
    else:
        timing = {"mininterval": SECONDS_PER_LINE_WITHOUT_TOTAL}
    return Bar(iterable, desc=desc, total=total, unit=unit, disable=disable, initial=initial,
               ncols=WIDTH, file=LineWriter(sys.stderr), maxinterval=float("inf"), ascii=True,
               redraw_on_postfix=False, **timing)
