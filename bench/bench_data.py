"""Benchmark: the parquet loader's read amplification and speed, old order (full shuffle) vs windowed order.

On synthetic Pick-a-Pic-like shards (write_synthetic_pick_a_pic below, also used by the tests: distinct
512-1024 px JPEGs, 100 rows per row group, the real column names and types) three ways of producing the same
training items, timed with the same transform (decode -> resize -> crop -> flip -> [-1, 1], the
per-position RNG of data.PreferencePairs):
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
import math
import os
import platform
import random
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa  # a dev requirement (data.py imports it lazily)
import pyarrow.parquet as pq
import torch
from PIL import Image

import data

RESULTS = Path(__file__).parent / "results" / "bench_data.md"


def synthetic_jpegs(count: int, sizes=(512, 1024), seed=0, quality=90) -> list[bytes]:
    """`count` JPEGs of random width and height in [sizes[0], sizes[1]]: smooth colour fields plus grain
    (about Pick-a-Pic's bytes per pixel)."""
    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(count):
        width, height = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((width, height),
                                                                                        Image.BICUBIC)
        grain = rng.normal(0, 6, (height, width, 3))
        image = Image.fromarray(np.clip(np.asarray(coarse) + grain, 0, 255).astype(np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        jpegs.append(buffer.getvalue())
    return jpegs


def _tagged(jpeg: bytes, tag: str) -> bytes:
    """The JPEG with a comment segment (COM) after its start marker: a distinct cell, as in Pick-a-Pic."""
    comment = tag.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]


def write_synthetic_pick_a_pic(folder, num_rows: int, rows_per_group=100, rows_per_shard=1000,
                               sizes=(512, 1024), tie_every=10, distinct_images=32, seed=0) -> list[Path]:
    """Pick-a-Pic-v2-like parquet shards for tests and benchmarks: its column names and types (caption:
    string, jpg_0/jpg_1: binary JPEG bytes, label_0/label_1: double, model_0/model_1: string),
    `rows_per_group` rows per row group, every `tie_every`-th row a tie (label_0 = 0.5; 0: none), the other
    labels alternating 1/0. The images are drawn from `distinct_images` synthetic JPEGs of sizes[0]..sizes[1]
    px. Returns the shard paths (folder/train-00000-of-NNNNN.parquet ...)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jpegs = synthetic_jpegs(distinct_images, sizes, seed)
    rng = np.random.default_rng(seed + 1)
    num_shards = math.ceil(num_rows / rows_per_shard)
    paths = []
    for shard in range(num_shards):
        rows = range(shard * rows_per_shard, min(num_rows, (shard + 1) * rows_per_shard))
        picks = rng.integers(0, distinct_images, size=(len(rows), 2))
        label_0 = [0.5 if tie_every and row % tie_every == tie_every - 1 else float(row % 2 == 0)
                   for row in rows]
        table = pa.table({
            "caption": pa.array([f"synthetic prompt {row}" for row in rows], pa.string()),
            **{column: pa.array([_tagged(jpegs[i], f"{row}/{side}") for row, i in zip(rows, picks[:, side])],
                                pa.binary()) for side, column in enumerate(data.IMAGE_COLUMNS)},
            "label_0": pa.array(label_0, pa.float64()),
            "label_1": pa.array([1 - label for label in label_0], pa.float64()),
            "model_0": pa.array(["synthetic"] * len(rows), pa.string()),
            "model_1": pa.array(["synthetic"] * len(rows), pa.string()),
        })
        path = folder / f"train-{shard:05d}-of-{num_shards:05d}.parquet"
        pq.write_table(table, path, row_group_size=rows_per_group,
                       use_dictionary=["caption", "model_0", "model_1"])
        paths.append(path)
    return paths


def stream_throughput(pairs: data.PreferencePairs, count: int, batch_size: int) -> tuple[float, float]:
    """(pairs/s, read amplification) of the first `count` positions of the training stream."""
    start = time.perf_counter()
    for _, _batch in zip(range(count // batch_size), data.PairBatches(pairs, batch_size)):
        pass
    seconds = time.perf_counter() - start
    return count / seconds, pairs.stats.bytes_read / pairs.stats.image_bytes


def served_jpegs(pairs: data.PreferencePairs, count: int) -> list[tuple[int, bytes, bytes]]:
    """(position, winner JPEG, loser JPEG) of the first `count` positions (read before timing)."""
    out, read_group = [], functools.cache(pairs._read_group)
    for position in range(count):
        _, ref_0, ref_1, winner = pairs.rows[int(pairs.order(0)[0][position])]
        refs = (ref_0, ref_1)[winner], (ref_0, ref_1)[1 - winner]
        out.append((position, *(read_group(group)[column][offset] for group, offset, column in refs)))
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
        write_synthetic_pick_a_pic(folder, args.rows, rows_per_group=100, rows_per_shard=400,
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
