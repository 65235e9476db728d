"""A tiny PNG line plot with PIL only (no matplotlib): training curves, reward curves.

    python plot.py out/metrics.jsonl    # train.py's PNGs beside its log (plot_metrics), mid-run too

Polylines on linear axes with round ticks and a legend of the curves drawn. `smooth` is a
bias-corrected exponential moving average (0 = raw, 0.9 = heavy; TensorBoard's convention): each
smoothed point is a weighted mean of the points seen so far, so the curve does not start from a
fake value. It is drawn over the faint raw points. Held-out and evaluation curves (val_*, eval_*)
are never smoothed; non-finite points are dropped. reward.png gives every reward series its own
panel, because the series live on different scales. Deviations: none (no paper).
"""

import json
import math
import os

from PIL import Image, ImageDraw

from config import ConfigError, Parser

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75)]
WIDTH = 640
HEIGHT = 400  # One plot's height in pixels.
PANEL_HEIGHT = 220  # One panel's height in a stack of panels (reward.png).
MARGINS = {"left": 70, "right": 15, "top": 30, "bottom": 45}  # Room for tick labels and titles.
UNSMOOTHED_PREFIXES = ("val_", "eval_")  # Few points each, and each one is already a mean.


def ticks(low: float, high: float) -> list[float]:
    """About 5 round tick values (1, 2, 5 x 10^k steps) covering [low, high]."""
    raw_step = (high - low) / 4
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = min(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
    first = math.ceil(low / step) * step
    count = int((high - first) / step + 1e-9) + 1
    return [first + i * step for i in range(count)]


def smoothed(ys: list[float], smooth: float) -> list[float]:
    """Bias-corrected EMA: m_t = smooth * m_(t-1) + (1 - smooth) * y_t with m_0 = 0, divided by
    1 - smooth^t, the total weight of the points seen so far (Adam's bias correction)."""
    average = 0.0
    curve = []
    for t, y in enumerate(ys, start=1):
        average = smooth * average + (1 - smooth) * y
        curve.append(average / (1 - smooth**t))
    return curve


def finite_points(xs: list[float], ys: list[float]) -> list[tuple[float, float]]:
    return [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]


class Axes:
    """A pixel box with data ranges: maps (x, y) to pixels; draws the frame, ticks and labels."""

    def __init__(self, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], points: list):
        self.draw = draw
        self.left, self.top, self.right, self.bottom = box
        points = points or [(0.0, 0.0)]
        self.x_low = min(x for x, _ in points)
        self.x_high = max(max(x for x, _ in points), self.x_low + 1e-9)
        y_low = min(y for _, y in points)
        y_high = max(y for _, y in points)
        y_pad = max((y_high - y_low) * 0.05, 1e-6 * max(1.0, abs(y_high)))
        self.y_low = y_low - y_pad
        self.y_high = y_high + y_pad

    def pixel(self, x: float, y: float) -> tuple[float, float]:
        x_fraction = (x - self.x_low) / (self.x_high - self.x_low)
        y_fraction = (y - self.y_low) / (self.y_high - self.y_low)
        return (self.left + x_fraction * (self.right - self.left),
                self.bottom - y_fraction * (self.bottom - self.top))

    def frame(self, title: str, xlabel: str):
        for y in ticks(self.y_low, self.y_high):  # Horizontal grid lines with the y labels.
            _, py = self.pixel(self.x_low, y)
            self.draw.line([(self.left, py), (self.right, py)], fill=(230, 230, 230))
            self.draw.text((self.left - 5, py), f"{y:.4g}", fill="black", anchor="rm")
        for x in ticks(self.x_low, self.x_high):
            px, _ = self.pixel(x, self.y_low)
            self.draw.line([(px, self.bottom), (px, self.bottom + 4)], fill="black")
            self.draw.text((px, self.bottom + 6), f"{x:.4g}", fill="black", anchor="ma")
        self.draw.rectangle([self.left, self.top, self.right, self.bottom], outline="black")
        centre = (self.left + self.right) / 2
        self.draw.text((centre, self.top - 22), title, fill="black", anchor="ma")
        self.draw.text((centre, self.bottom + 26), xlabel, fill="black", anchor="ma")

    def curve(self, label: str, points: list, colour: tuple, smooth: float, legend_row: int):
        """One curve (a dot if it has one point) and its legend entry."""
        xs = [x for x, _ in points]
        ys = [y for _, y in points]
        if smooth > 0 and len(points) > 1 and not label.startswith(UNSMOOTHED_PREFIXES):
            faint = tuple(int(c + (255 - c) * 0.75) for c in colour)
            self.draw.line([self.pixel(x, y) for x, y in points], fill=faint, width=1)
            ys = smoothed(ys, smooth)
        if len(points) == 1:
            px, py = self.pixel(xs[0], ys[0])
            self.draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        else:
            line = [self.pixel(x, y) for x, y in zip(xs, ys)]
            self.draw.line(line, fill=colour, width=2, joint="curve")
        legend_y = self.top + 10 + 14 * legend_row
        swatch = [(self.left + 8, legend_y), (self.left + 24, legend_y)]
        self.draw.line(swatch, fill=colour, width=3)
        self.draw.text((self.left + 30, legend_y), label, fill=colour, anchor="lm")


def draw_panel(draw, box, curves: dict, title: str, xlabel: str, smooth: float):
    """The curves that have points, on shared axes inside `box`; an empty curve has no legend."""
    curves = {label: finite_points(xs, ys) for label, (xs, ys) in curves.items()}
    curves = {label: points for label, points in curves.items() if points}
    axes = Axes(draw, box, [point for points in curves.values() for point in points])
    axes.frame(title, xlabel)
    for row, (label, points) in enumerate(curves.items()):
        axes.curve(label, points, COLOURS[row % len(COLOURS)], smooth, row)


def inner_box(top: int, height: int) -> tuple[int, int, int, int]:
    """The axes' pixel box of a plot or panel whose top edge is `top`."""
    return (MARGINS["left"], top + MARGINS["top"], WIDTH - MARGINS["right"],
            top + height - MARGINS["bottom"])


def save_line_plot(path: str, curves: dict[str, tuple[list[float], list[float]]], title: str = "",
                   xlabel: str = "step", smooth: float = 0.0) -> str:
    """Draws {label: (xs, ys)} as lines on one pair of axes into a PNG at `path`; returns `path`."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw_panel(ImageDraw.Draw(image), inner_box(0, HEIGHT), curves, title, xlabel, smooth)
    image.save(path)
    return path


def save_panels(path: str, curves: dict[str, tuple[list[float], list[float]]],
                xlabel: str = "step", smooth: float = 0.0) -> str:
    """Draws each {label: (xs, ys)} on its own axes, the panels stacked; returns `path`."""
    image = Image.new("RGB", (WIDTH, PANEL_HEIGHT * len(curves)), "white")
    draw = ImageDraw.Draw(image)
    for i, (label, xs_ys) in enumerate(curves.items()):
        box = inner_box(i * PANEL_HEIGHT, PANEL_HEIGHT)
        draw_panel(draw, box, {label: xs_ys}, label, xlabel, smooth)
    image.save(path)
    return path


def read_metrics(log_path: str) -> list[dict]:
    """The rows of a metrics.jsonl; ConfigError for a folder, a missing file or a bad row."""
    if os.path.isdir(log_path):
        raise ConfigError(f"{log_path} is a folder; give its metrics.jsonl (train.py's log)")
    if not os.path.isfile(log_path):
        raise ConfigError(f"{log_path}: no such file")
    rows = []
    with open(log_path) as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise ConfigError(f"{log_path}, line {number}: not a JSON row") from None
    return rows


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric, from the rows that have it."""
    logged = [row for row in rows if key in row]
    return [row["step"] for row in logged], [row[key] for row in logged]


def plot_metrics(log_path: str) -> list[str]:
    """From a train.py metrics.jsonl: loss.png, implicit_accuracy.png and reward_margin.png, each
    training curve (smoothed) beside its held-out val_ curve, and reward.png (a panel per reward
    series, training rewards smoothed); returns the paths written."""
    rows = read_metrics(log_path)
    folder = os.path.dirname(log_path)
    paths = []
    for name in ("loss", "implicit_accuracy", "reward_margin"):
        curves = {key: series(rows, key) for key in (name, f"val_{name}")}
        if any(xs for xs, _ in curves.values()):
            path = os.path.join(folder, f"{name}.png")
            paths.append(save_line_plot(path, curves, title=name, smooth=0.9))
    keys = sorted({key for row in rows for key in row})
    reward_keys = [key for key in keys if "reward" in key and "reward_margin" not in key]
    if reward_keys:
        curves = {key: series(rows, key) for key in reward_keys}
        paths.append(save_panels(os.path.join(folder, "reward.png"), curves, smooth=0.9))
    return paths


def main(argv=None) -> list[str]:
    parser = Parser(description="Draw train.py's PNGs beside its metrics.jsonl (mid-run too).")
    parser.add_argument("log", help="a metrics.jsonl, or a folder that holds one")
    try:
        args = parser.parse_args(argv)
        log = args.log
        if os.path.isfile(os.path.join(log, "metrics.jsonl")):
            log = os.path.join(log, "metrics.jsonl")
        paths = plot_metrics(log)
    except ConfigError as error:
        raise SystemExit(f"plot.py: {error}") from None
    print("\n".join(paths))
    return paths


if __name__ == "__main__":
    main()
