"""Benchmark: pairs/s of the parquet loader against decoding the same JPEGs from memory.

On synthetic Pick-a-Pic-like shards (write_synthetic_pick_a_pic below, also used by the tests:
distinct 512-1024 px JPEGs, 100 rows per row group, the real column names and types):
  * decode-only: the served pairs' JPEG bytes already in a list; decode, resize, crop, flip (the
    per-position RNG of data.PreferencePairs), nothing else: the ceiling;
  * loader: data.PairBatches over the shards, one epoch: reading the row groups, decoding,
    transforming and collating uint8 batches (the float conversion happens on the device).
Each is timed at two loads: as the machine is, and with `--busy` background processes spinning
(started and stopped by the benchmark); /proc/loadavg is printed with each. The shards were just
written, so they sit in the OS page cache. Best of `--repeats` interleaved runs. One process, no
DataLoader workers, 1 torch thread. Deviations: none (a benchmark, not a method).

    python -m bench.bench_data [--rows 400] [--busy 2]     # writes bench/results/bench_data.md
"""

import argparse
import functools
import io
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa  # a dev requirement (data.py imports it lazily)
import pyarrow.parquet as pq
import torch
from PIL import Image

import data
import pair_files

RESULTS = Path(__file__).parent / "results" / "bench_data.md"


def synthetic_jpegs(count: int, sizes=(512, 1024), seed=0, quality=90) -> list[bytes]:
    """`count` JPEGs of random width and height in [sizes[0], sizes[1]]: smooth colour fields plus
    grain (about Pick-a-Pic's bytes per pixel)."""
    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(count):
        width, height = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
        colours = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        coarse = colours.resize((width, height), Image.BICUBIC)
        grain = rng.normal(0, 6, (height, width, 3))
        image = Image.fromarray(np.clip(np.asarray(coarse) + grain, 0, 255).astype(np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        jpegs.append(buffer.getvalue())
    return jpegs


def _tagged(jpeg: bytes, tag: str) -> bytes:
    """The JPEG with a comment segment (COM) after its start marker: a distinct cell, as in
    Pick-a-Pic."""
    comment = tag.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]


def image_column(jpegs: list[bytes], rows, picks, side: int):
    """The binary column of one side: row r holds jpegs[picks[r]], tagged with (r, side)."""
    cells = [_tagged(jpegs[i], f"{row}/{side}") for row, i in zip(rows, picks)]
    return pa.array(cells, pa.binary())


def write_synthetic_pick_a_pic(folder, num_rows: int, rows_per_group=100, rows_per_shard=1000,
                               sizes=(512, 1024), tie_every=10, distinct_images=32,
                               seed=0) -> list[Path]:
    """Pick-a-Pic-v2-like parquet shards for tests and benchmarks: its column names and types
    (caption: string, jpg_0/jpg_1: binary JPEG bytes, label_0/label_1: double, model_0/model_1:
    string), `rows_per_group` rows per row group, every `tie_every`-th row a tie (label_0 = 0.5; 0:
    none), the other labels alternating 1/0. The images are drawn from `distinct_images` synthetic
    JPEGs of sizes[0]..sizes[1] px. Returns the shard paths (folder/train-00000-of-NNNNN.parquet
    ...)."""
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
            **{column: image_column(jpegs, rows, picks[:, side], side)
               for side, column in enumerate(pair_files.IMAGE_COLUMNS)},
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


def loader_throughput(pairs: data.PreferencePairs, count: int, batch_size: int) -> float:
    """pairs/s of the first `count` positions of the training stream, collated into batches."""
    start = time.perf_counter()
    for _, batch in zip(range(count // batch_size), data.PairBatches(pairs, batch_size)):
        assert batch["pixels_w"].dtype == torch.uint8
    return count / (time.perf_counter() - start)


def served_jpegs(pairs: data.PreferencePairs, count: int) -> list[tuple[int, bytes, bytes]]:
    """(position, winner JPEG, loser JPEG) of the first `count` positions (read before timing)."""
    out = []
    read_group = functools.cache(pairs._read_group)
    rows = pairs.order(0)[0]
    for position in range(count):
        _, ref_0, ref_1, winner = pairs.rows[int(rows[position])]
        refs = ((ref_0, ref_1)[winner], (ref_0, ref_1)[1 - winner])
        jpegs = [read_group(group)[column][offset] for group, offset, column in refs]
        out.append((position, *jpegs))
    return out


def decode_only_throughput(jpegs, pairs: data.PreferencePairs) -> float:
    """pairs/s of decoding and transforming the JPEG bytes in memory (no I/O, no batching)."""
    start = time.perf_counter()
    for position, jpeg_w, jpeg_l in jpegs:
        rng = random.Random(f"{pairs.seed}/{position}")
        for jpeg in (jpeg_w, jpeg_l):
            image = Image.open(io.BytesIO(jpeg))
            image.load()
            data.preprocess(image, pairs.resolution, rng, pairs.random_crop, pairs.hflip)
        rng.random()  # the prompt-dropout draw
    return len(jpegs) / (time.perf_counter() - start)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def spinners(count: int) -> list[subprocess.Popen]:
    """`count` background processes that keep one CPU busy each until killed."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def measure(pairs, jpegs, count: int, args) -> tuple[float, float, str]:
    """(best decode-only pairs/s, best loader pairs/s, the load average after)."""
    decode_only = []
    loader = []
    for repeat in range(args.repeats):
        decode_only.append(decode_only_throughput(jpegs, pairs(window=4)))
        loader.append(loader_throughput(pairs(window=4), count, args.batch_size))
        print(f"  repeat {repeat}: decode-only {decode_only[-1]:.1f}, loader {loader[-1]:.1f} "
              f"pairs/s (load {load_average()})")
    return max(decode_only), max(loader), load_average()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=0, help="pairs timed (default 0: one epoch)")
    parser.add_argument("--rows", type=int, default=400, help="rows in the synthetic shards")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--busy", type=int, default=os.cpu_count(),
                        help="background processes spinning in the loaded measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        write_synthetic_pick_a_pic(folder, args.rows, rows_per_group=100, rows_per_shard=400,
                                   distinct_images=48)
        pairs = functools.partial(data.PreferencePairs, folder, args.resolution, seed=0)
        count = args.pairs or len(pairs()) // args.batch_size * args.batch_size
        jpegs = served_jpegs(pairs(window=4), count)
        image_kb = sum(len(w) + len(l) for _, w, l in jpegs) / len(jpegs) / 2e3
        for busy in (0, args.busy):
            before = load_average()
            print(f"{busy} busy background processes (load {before})")
            background = spinners(busy)
            try:
                rows.append((busy, before, *measure(pairs, jpegs, count, args)))
            finally:
                for process in background:
                    process.kill()
                    process.wait()
    lines = [
        f"# bench_data: loader vs decode-only, {count} synthetic Pick-a-Pic pairs, "
        f"{args.resolution} px, 1 process, 1 thread, best of {args.repeats}",
        "",
        f"torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs; "
        f"command: `python -m bench.bench_data --rows {args.rows} --repeats {args.repeats} "
        f"--busy {args.busy}`; images {image_kb:.0f} kB on average; shards in the OS page cache",
        "",
        "| background processes | load before -> after (1, 5, 15 min) | decode-only pairs/s | "
        "loader pairs/s | loader / decode-only |",
        "|---|---|---|---|---|",
    ]
    for busy, before, decode_only, loader, after in rows:
        lines.append(f"| {busy} | {before} -> {after} | {decode_only:.1f} | {loader:.1f} | "
                     f"{loader / decode_only:.2f}x |")
    lines += ["", "Target (issue 22): loader >= 0.8x decode-only at load <= 1."]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
