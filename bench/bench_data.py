"""Benchmark: the parquet loader's read amplification and speed, old order (full shuffle) vs windowed order.

On synthetic Pick-a-Pic-like shards (data.write_synthetic_pick_a_pic: distinct 512-1024 px JPEGs, 100 rows per
row group, the real column names and types) three ways of producing the same training items, timed with the
same transform (decode -> resize -> crop -> flip -> [-1, 1], the per-position RNG of data.PreferencePairs):
  * from memory: the JPEG bytes of the pairs are already in a Python list (the ceiling: decode + transform);
  * new order: PreferencePairs(window=4), one epoch of the training stream (or the first `--pairs`);
  * old order: PreferencePairs(window=0), a full shuffle that reads one whole row group per pair.
read amplification = bytes read from the shards (whole jpg_0/jpg_1 column chunks) / bytes of the served
pairs' own images; over an epoch the new order's is about rows / usable pairs (the ties' images are read
too: 10% ties here, 1.11x) plus the parquet headers. The shards were just written, so they sit in the OS
page cache: "reading" costs a copy and the parquet decoding, not a disk seek; on a disk or a network
filesystem the old order's ~100x more bytes cost far more time than here.
Best of `--repeats` interleaved runs (the machine is shared). One process, no DataLoader workers, 1 thread.
Deviations: none (a benchmark, not a method).

    python -m bench.bench_data [--rows 600] [--old_pairs 60]     # writes bench/results/bench_data.md
"""

import argparse
import functools
import io
import os
import platform
import random
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import data

RESULTS = Path(__file__).parent / "results" / "bench_data.md"


def stream_throughput(pairs: data.PreferencePairs, count: int, batch_size: int) -> tuple[float, float]:
    """(pairs/s, read amplification) of the first `count` positions of the training stream."""
    start = time.perf_counter()
    for _, _batch in zip(range(count // batch_size), data.PairBatches(pairs, batch_size)):
        pass
    seconds = time.perf_counter() - start
    return count / seconds, pairs.stats.bytes_read / pairs.stats.image_bytes


def served_jpegs(pairs: data.PreferencePairs, count: int) -> list[tuple[int, bytes, bytes]]:
    """(position, winner JPEG, loser JPEG) of the first `count` positions (read before timing)."""
    out = []
    for position in range(count):
        _, ref_0, ref_1, winner = pairs.rows[int(pairs.order(0)[0][position])]
        refs = (ref_0, ref_1)[winner], (ref_0, ref_1)[1 - winner]
        out.append((position, *(pairs._image_bytes(ref) for ref in refs)))
    return out


def memory_throughput(jpegs, pairs: data.PreferencePairs) -> float:
    """pairs/s of the same transform on JPEG bytes in memory (PreferencePairs.__getitem__ without I/O)."""
    start = time.perf_counter()
    for position, jpeg_w, jpeg_l in jpegs:
        rng = random.Random(f"{pairs.seed}/{position}")
        for jpeg in (jpeg_w, jpeg_l):
            image = Image.open(io.BytesIO(jpeg))
            image.load()
            data.preprocess(image, pairs.resolution, rng, pairs.random_crop, pairs.hflip)
        rng.random()  # the prompt-dropout draw
    return len(jpegs) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=0, help="pairs timed for memory and the new order "
                        "(default 0: one epoch)")
    parser.add_argument("--old_pairs", type=int, default=60, help="pairs timed for the old order (slow)")
    parser.add_argument("--rows", type=int, default=600, help="rows in the synthetic shards")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        data.write_synthetic_pick_a_pic(folder, args.rows, rows_per_group=100, rows_per_shard=400,
                                        distinct_images=48)
        print(f"wrote {args.rows} rows in {time.perf_counter() - start:.1f} s")
        pairs = functools.partial(data.PreferencePairs, folder, args.resolution, seed=0)  # pairs(window=...)
        count = args.pairs or len(pairs(window=4)) // args.batch_size * args.batch_size
        jpegs = served_jpegs(pairs(window=4), count)
        image_kb = sum(len(w) + len(l) for _, w, l in jpegs) / len(jpegs) / 2e3
        memory, new, old = [], [], []
        for repeat in range(args.repeats):
            memory.append(memory_throughput(jpegs, pairs(window=4)))
            new.append(stream_throughput(pairs(window=4), count, args.batch_size))
            old.append(stream_throughput(pairs(window=0), args.old_pairs, args.batch_size))
            print(f"repeat {repeat}: memory {memory[-1]:.1f}, new {new[-1][0]:.1f} ({new[-1][1]:.2f}x), "
                  f"old {old[-1][0]:.1f} pairs/s ({old[-1][1]:.2f}x)")
        num_groups = len(pairs(window=4).groups)
    best_memory = max(memory)
    best_new, best_old = max(new), max(old)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"# bench_data: parquet loader, {args.rows} synthetic Pick-a-Pic rows ({num_groups} row groups of "
        f"100), {args.resolution} px, 1 process, 1 thread, best of {args.repeats}",
        "",
        f"torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs; command: "
        f"`python -m bench.bench_data --pairs {args.pairs} --old_pairs {args.old_pairs} --rows {args.rows} "
        f"--repeats {args.repeats}`; images {image_kb:.0f} kB on average; shards in the OS page cache",
        f"machine load (`uptime` at the end): {load}",
        "",
        "| order | pairs timed | pairs/s | vs from memory | read amplification |",
        "|---|---|---|---|---|",
        f"| JPEGs from memory (ceiling) | {count} | {best_memory:.1f} | 100% | - |",
        f"| new: row groups shuffled, rows within windows of 4 groups | {count} | {best_new[0]:.1f} | "
        f"{best_new[0] / best_memory:.0%} | {best_new[1]:.2f}x |",
        f"| old: full shuffle, one row group read per pair | {args.old_pairs} | {best_old[0]:.1f} | "
        f"{best_old[0] / best_memory:.0%} | {best_old[1]:.2f}x |",
        "",
        "Targets (issue 14): new order read amplification <= 1.2, throughput >= 80% of from memory.",
    ]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
