"""A tiny PNG line plot with PIL only (no matplotlib): training curves, reward curves.

    python plot.py out/metrics.jsonl      # train.py's PNGs beside its log (plot_metrics), also mid-run

Polylines on linear axes with round ticks and a legend. `smooth` is an exponential moving average (the
TensorBoard convention: 0 = raw, 0.9 = heavy) drawn over the faint raw points; held-out curves (val_*) are
never smoothed; non-finite points are dropped. Deviations: none (no paper).
"""

import json
import math
import os
import sys
from itertools import accumulate

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _ticks(low: float, high: float) -> list[float]:
    """About 5 round tick values (1, 2, 5 x 10^k steps) covering [low, high]."""
    raw_step = (high - low) / 4
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = min(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def save_line_plot(path: str, curves: dict[str, tuple[list[float], list[float]]], title: str = "",
                   xlabel: str = "step", ylabel: str = "", smooth: float = 0.0) -> str:
    """Draw {label: (xs, ys)} as lines into a PNG at `path`; returns `path`."""
    curves = {label: [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
              for label, (xs, ys) in curves.items()}
    points = [p for pts in curves.values() for p in pts] or [(0.0, 0.0)]
    x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
    y_low, y_high = min(p[1] for p in points), max(p[1] for p in points)
    x_high, y_pad = max(x_high, x_low + 1e-9), max((y_high - y_low) * 0.05, 1e-6 * max(1.0, abs(y_high)))
    y_low, y_high = y_low - y_pad, y_high + y_pad

    width, height = 640, 400
    left, right, top, bottom = 70, 15, 30, 45  # margins in pixels for tick labels and the title
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)  # PIL's default font
    to_px = lambda x, y: (left + (x - x_low) / (x_high - x_low) * (width - left - right),
                          height - bottom - (y - y_low) / (y_high - y_low) * (height - top - bottom))

    for y in _ticks(y_low, y_high):  # horizontal grid lines with y labels
        _, py = to_px(x_low, y)
        draw.line([(left, py), (width - right, py)], fill=(230, 230, 230))
        draw.text((left - 5, py), f"{y:.4g}", fill="black", anchor="rm")
    for x in _ticks(x_low, x_high):
        px, _ = to_px(x, y_low)
        draw.line([(px, height - bottom), (px, height - bottom + 4)], fill="black")
        draw.text((px, height - bottom + 6), f"{x:.4g}", fill="black", anchor="ma")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((width / 2, 8), title, fill="black", anchor="ma")
    draw.text((width / 2, height - 16), xlabel, fill="black", anchor="ma")
    draw.text((8, top - 18), ylabel, fill="black")

    for i, (label, pts) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if smooth > 0 and len(pts) > 1 and not label.startswith("val_"):  # faint raw curve, smoothed on top
            faint = tuple(int(c + (255 - c) * 0.75) for c in colour)
            draw.line([to_px(x, y) for x, y in pts], fill=faint, width=1)
            ys = list(accumulate(ys, lambda running, y: smooth * running + (1 - smooth) * y))  # EMA
        if len(pts) == 1:
            px, py = to_px(xs[0], ys[0])
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        elif pts:
            draw.line([to_px(x, y) for x, y in zip(xs, ys)], fill=colour, width=2, joint="curve")
        legend_y = top + 10 + 14 * i
        draw.line([(left + 8, legend_y), (left + 24, legend_y)], fill=colour, width=3)
        draw.text((left + 30, legend_y), label, fill=colour, anchor="lm")
    image.save(path)
    return path


def plot_metrics(log_path: str) -> list[str]:
    """From a train.py metrics.jsonl: loss.png, implicit_accuracy.png and reward_margin.png, each training
    curve (smoothed) beside its held-out val_ curve, and reward.png (online rewards); returns the paths."""
    with open(log_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    groups = {name: [name, f"val_{name}"] for name in ("loss", "implicit_accuracy", "reward_margin")}
    groups["reward"] = sorted({k for row in rows for k in row if "reward" in k and "reward_margin" not in k})
    paths = []
    for name, names in groups.items():
        curves = {k: ([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r]) for k in names}
        if any(xs for xs, _ in curves.values()):
            path = os.path.join(os.path.dirname(log_path), f"{name}.png")
            paths.append(save_line_plot(path, curves, title=name, smooth=0.0 if name == "reward" else 0.9))
    return paths


if __name__ == "__main__":  # python plot.py out/metrics.jsonl: the training plots on demand, mid-run too
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        raise SystemExit("usage: python plot.py OUT_DIR/metrics.jsonl   (writes the PNGs beside it)")
    print("\n".join(plot_metrics(sys.argv[1])))
