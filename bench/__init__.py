"""Benchmarks against the reference implementations, measured in the same run.

Run one with `python -m bench.bench_X`."""

from pathlib import Path


def write_report(text: str, path: str):
    """Print a benchmark's markdown table and write it to `path` (bench/results/ by default)."""
    print(text)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
