"""Preference pairs for Diffusion-DPO: (caption, preferred image x_0^w, dis-preferred image x_0^l).

The pairs come from pairs.jsonl or parquet (Pick-a-Pic v2, Diffusion-DPO Sec. 5, or another set's
columns mapped onto its fields: pair_files.py). As the official train.py: ties are dropped (~12%),
the winner comes first, each image is resized (shorter side to R, bilinear), center- (or random-)
cropped and flipped, independently for x_0^w and x_0^l; 20% of the captions become "". Images stay
uint8 until dpo.model_pixels scales them on the device.

Stream position p holds row order_e[p mod N] of epoch e = p // N (N usable pairs), augmented by an
RNG seeded by (seed, p), so a run resumes exactly from the samples consumed (start_sample), with any
batch size. pairs.jsonl: order_e = randperm(N, seed + e) in one global stream: N processes x batch
B see what one process sees with batch N x B.

Deviations from the official code:
  1. Bad data never stops a run (officially a corrupt image crashes it): ties, malformed rows and
     missing files are counted when indexing; an undecodable image or a null cell is counted and its
     pair replaced by the next readable row of its row group, then of the epoch's order.
  2. A per-position RNG, not torchvision's global one. Draw order per pair: winner crop, winner
     flip, loser crop, loser flip, prompt dropout.
  3. AI feedback scores batches of any size (official: 1) of augmented images; human ties drop.
  4. Parquet is read by row groups (~100 rows), so a full shuffle reads ~100 pairs to use one
     (official: a ~335 GB Arrow copy first). order_e shuffles the row groups, then the rows within
     windows of `window` groups (default 4; 0: a full shuffle): each group is read once per epoch
     by one DataLoader worker, a process holds <= window groups (~130 MB), and a group's rows land
     < window x ~100 positions apart.
  5. Parquet under DDP: each rank owns whole row groups (shard(): balanced by pairs, fixed for the
     run) and streams them alone, so each group is read by one rank per epoch; in one global stream
     every rank would read every group (world x the bytes). Rank r's position l has the key
     l x world + r (the augmentation RNG's and dpo's noise key). Given up: the jsonl equality above,
     and a resume on another world size (resume_problem refuses it); the ranks' epochs differ by at
     most one row group's pairs.
"""

import copy
import hashlib
import io
import itertools
import math
import operator
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

import config
import pair_files
import progress
from pair_files import DataError, parse_columns, to_pil, write_pairs_jsonl  # noqa: F401 (re-exports)

VALIDATION_POSITIONS = 1 << 40  # validation pairs' keys lie beyond any training position


class UnreadableImage(Exception):
    """args: (kind: "missing" | "corrupt" | "null", the image: a path or "file[row N].jpg_0")."""


@dataclass
class PairStats:
    """What was dropped or skipped and why (each bad image once), and the I/O of the batches."""
    rows: int = 0  # rows read
    ties: int = 0
    malformed: int = 0  # unparsable line, missing field, label not in {0, 0.5, 1}
    missing: set = field(default_factory=set)  # image files that do not exist
    corrupt: set = field(default_factory=set)  # images that do not decode
    null: set = field(default_factory=set)  # null parquet image cells
    bytes_read: int = 0  # bytes read from files (whole parquet column chunks)
    image_bytes: int = 0  # bytes of the served pairs' own images

    def __str__(self) -> str:
        ratio = f", read amplification {self.bytes_read / max(self.image_bytes, 1):.2f}x"
        return (f"{self.rows} rows read: {self.ties} ties dropped, {self.malformed} malformed rows "
                f"dropped, {len(self.missing)} missing, {len(self.corrupt)} corrupt and "
                f"{len(self.null)} null images skipped{ratio if self.image_bytes else ''}")


def preprocess(image: Image.Image, resolution: int, rng: random.Random | None, random_crop=False,
               hflip=True) -> torch.Tensor:
    """PIL image -> uint8 [3,R,R]: resize shorter side (bilinear), crop, flip; rng None: center
    crop. uint8: a quarter of float32's bytes to stack, pass between processes and copy to a GPU."""
    image = image.convert("RGB")
    short = min(image.size)  # as torchvision: the short side becomes R, the long R * long / short
    image = image.resize([int(resolution * side / short) for side in image.size], Image.BILINEAR)
    width, height = image.size
    if random_crop and rng is not None:
        top = rng.randint(0, height - resolution)
        left = rng.randint(0, width - resolution)
    else:  # center crop, rounded as torchvision's CenterCrop
        top = int(round((height - resolution) / 2.0))
        left = int(round((width - resolution) / 2.0))
    image = image.crop((left, top, left + resolution, top + resolution))
    if hflip and rng is not None and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # HWC -> CHW


class PreferencePairs(torch.utils.data.Dataset):
    """Map-style dataset indexed by stream position; len(): the usable pairs. rows: (caption, ref_0,
    ref_1, winner: 0 if jpg_0 is preferred else 1), refs image paths or (row group, row, field).
    columns: {field: column} (parse_columns); a mapping without label_0 reads none (jpg_0 wins)."""

    def __init__(self, path, resolution=512, random_crop=False, hflip=True, prompt_dropout=0.2,
                 seed=0, columns=None, window=4):
        self.path = Path(path)
        files = pair_files.data_files(self.path)
        self.columns = pair_files.mapped_columns(columns)  # {field: column}
        self.groups = []
        if files[0].suffix == ".jsonl":
            records = pair_files.read_jsonl(files[0], self.columns)
        else:
            records, self.groups = pair_files.read_parquet(files, self.columns)
        self.stats = PairStats(rows=len(records))
        self.rows = []
        for caption, *refs, label in records:
            absent = {str(ref) for ref in refs if isinstance(ref, Path) and not ref.is_file()}
            if label not in (0, 0.5, 1):
                self.stats.malformed += 1
            elif label == 0.5:
                self.stats.ties += 1
            elif absent:
                self.stats.missing |= absent
            else:
                self.rows.append((caption or "", *refs, 0 if label == 1 else 1))
        if not self.rows:
            raise DataError(f"{self.path}: no usable pairs ({self.stats})")
        self.resolution = resolution
        self.random_crop = random_crop
        self.hflip = hflip
        self.prompt_dropout = prompt_dropout
        self.seed = seed
        self.window = window
        self.split = (0, 1)  # (rank, world size) of a shard()
        self._reindex()

    def _reindex(self):
        """The rows of each row group (parquet), for the windowed order; empty caches."""
        self.members = {}  # row group -> its rows, ascending
        for row, (_, ref, _, _) in enumerate(self.rows if self.groups else []):
            self.members.setdefault(ref[0], []).append(row)
        self._orders = {}
        self._group_cells = {}
        self._bytes_read = 0

    def _subset(self, rows) -> "PreferencePairs":
        """These rows (indices into self.rows) as a dataset of their own, sharing stats."""
        subset = copy.copy(self)
        subset.rows = [self.rows[row] for row in rows]
        subset._reindex()
        return subset

    def __len__(self):
        return len(self.rows)

    def identity(self, world_size=1) -> dict:
        """What defines the stream (JSON), for a checkpoint; resume_problem compares it. world_size:
        the run's (parquet's shards depend on it)."""
        text = "\n".join(f"{caption}\t{winner}" for caption, _, _, winner in self.rows)
        identity = {"path": str(self.path), "pairs": len(self.rows), "seed": self.seed,
                    "rows_sha1": hashlib.sha1(text.encode()).hexdigest()}
        if self.groups:
            identity.update(window=self.window, row_groups=len(self.members), world_size=world_size)
        return identity

    def shard(self, rank: int, world_size: int) -> "PreferencePairs":
        """Rank `rank`'s pairs (deviation 5): parquet row groups, each dealt whole (largest first,
        ties in a seeded order) to the rank with the fewest pairs; jsonl or one process: self."""
        if not self.groups or world_size == 1:
            return self
        if len(self.members) < world_size:
            raise DataError(f"{self.path}: {len(self.members)} row groups cannot be split over "
                            f"{world_size} ranks (each rank reads whole row groups)")
        shuffled = np.random.default_rng([self.seed, world_size]).permutation(list(self.members))
        dealt = [0] * world_size  # pairs per rank
        mine = []
        for group in sorted(shuffled.tolist(), key=lambda group: -len(self.members[group])):
            owner = dealt.index(min(dealt))
            dealt[owner] += len(self.members[group])
            if owner == rank:
                mine += self.members[group]
        view = self._subset(sorted(mine))
        view.split = (rank, world_size)
        return view

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, slots) [N]: the epoch's rows in stream order, and the slot of each row's row group
        in the epoch's group order (pairs.jsonl and window=0: the index itself)."""
        if epoch not in self._orders:
            # Keep the previous epoch's order only: a batch can straddle two epochs.
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            if not self.members or self.window == 0:  # a full shuffle
                generator = torch.Generator().manual_seed(self.seed + epoch)
                rows = torch.randperm(len(self.rows), generator=generator).numpy()
                self._orders[epoch] = rows, np.arange(len(self.rows))
            else:  # deviation 4: shuffle the row groups, then the rows within each window of groups
                rng = np.random.default_rng([self.seed, epoch, *self.split])
                groups = np.array(list(self.members))[rng.permutation(len(self.members))]
                rows = np.concatenate([self.members[group] for group in groups])
                slots = np.repeat(np.arange(len(groups)), [len(self.members[g]) for g in groups])
                shuffle = np.lexsort((rng.random(len(rows)), slots // self.window))  # by window
                self._orders[epoch] = rows[shuffle], slots[shuffle]
        return self._orders[epoch]

    def _read_group(self, group: int) -> dict:
        """{field: list of cells} of a row group's image columns: one read of its column chunks."""
        file, index, _, _ = self.groups[group]
        names = [self.columns[column] for column in pair_files.IMAGE_COLUMNS]
        table = pair_files.parquet_module().ParquetFile(file).read_row_group(index, columns=names)
        return {column: table.column(name).to_pylist()
                for column, name in zip(pair_files.IMAGE_COLUMNS, names)}

    def _encoded(self, ref) -> tuple[bytes | None, str, str]:
        """(encoded image or None, why None, the image's name) of an image ref."""
        if isinstance(ref, Path):
            encoded = ref.read_bytes() if ref.is_file() else None
            self._bytes_read += len(encoded or b"")
            return encoded, "missing", str(ref)
        group, offset, column = ref
        file, _, first_row, nbytes = self.groups[group]
        if group not in self._group_cells:
            self._group_cells[group] = self._read_group(group)
            self._bytes_read += nbytes
            while len(self._group_cells) > max(self.window, 1):  # evict the oldest (deviation 4)
                del self._group_cells[next(iter(self._group_cells))]
        encoded, kind = pair_files.cell_bytes(self._group_cells[group][column][offset], file.parent)
        return encoded, kind, f"{file}[row {first_row + offset}].{column}"

    def _load(self, ref) -> tuple[Image.Image, int]:
        """(decoded image, encoded size) of an image ref; raises UnreadableImage."""
        encoded, kind, name = self._encoded(ref)
        if encoded is None:
            raise UnreadableImage(kind, name)
        try:
            image = Image.open(io.BytesIO(encoded))
            image.load()  # decode now, so that a truncated file fails here
        except (OSError, ValueError, SyntaxError, TypeError, Image.DecompressionBombError) as error:
            raise UnreadableImage("corrupt", name) from error
        return image, len(encoded)

    def _item(self, key: int, rows, rng: random.Random | None) -> dict | None:
        """The item of stream key `key` from the first readable row of `rows` (deviation 1), else
        None; rng None: center crop, no flip, no prompt dropout."""
        failures = []
        bytes_before = self._bytes_read
        for row in rows:
            caption, *refs, winner = self.rows[row]
            try:
                loaded = [self._load(ref) for ref in (refs[winner], refs[1 - winner])]
            except UnreadableImage as error:
                failures.append(error.args)
                getattr(self.stats, error.args[0]).add(error.args[1])  # in a worker: PairBatches
                continue
            pixels = [preprocess(image, self.resolution, rng, self.random_crop, self.hflip)
                      for image, _ in loaded]
            dropped = rng is not None and rng.random() < self.prompt_dropout
            return dict(pixels_w=pixels[0], pixels_l=pixels[1], prompt="" if dropped else caption,
                        caption=caption, row=int(row), position=key, failures=failures,
                        bytes_read=self._bytes_read - bytes_before,
                        image_bytes=sum(size for _, size in loaded))

    def __getitem__(self, position: int) -> dict:
        """The item at this (shard's) stream position, keyed position x world + rank (dev. 5)."""
        epoch, index = divmod(int(position), len(self.rows))
        rows = self.order(epoch)[0]
        candidates = itertools.chain(rows[index:], rows[:index])  # deviation 1: the epoch's next
        if self.members:  # parquet: first the next rows of the row group
            members = self.members[self.rows[rows[index]][1][0]]
            candidates = itertools.chain(np.roll(members, -members.index(rows[index])), candidates)
        key = int(position) * self.split[1] + self.split[0]
        item = self._item(key, candidates, random.Random(f"{self.seed}/{key}"))  # deviation 2
        if item is None:
            raise RuntimeError(f"no readable pair at all ({self.stats})")
        return item

    def split_validation(self, n: int) -> tuple["PreferencePairs", "PreferencePairs"]:
        """(train_pairs, val_pairs): val_pairs has n rows fixed by the seed (whole row groups for
        parquet). Nothing is decoded: call val_pairs.batches() where validation runs (rank 0)."""
        if not 0 < n < len(self.rows):
            raise DataError(f"--val_pairs={n}: must be between 1 and {len(self.rows) - 1} "
                            f"(the data has {len(self.rows)} usable pairs)")
        groups = list(self.members.values()) or [[row] for row in range(len(self.rows))]  # jsonl
        shuffled = np.random.default_rng([self.seed, 0x7A1]).permutation(len(groups))  # own stream
        held_out = set(np.concatenate([groups[i] for i in shuffled])[:n].tolist())
        kept = [row for row in range(len(self.rows)) if row not in held_out]
        return self._subset(kept), self._subset(sorted(held_out))

    def batches(self, batch_size: int) -> list[dict]:
        """Validation batches: every readable pair once, unaugmented, keyed VALIDATION_POSITIONS +
        row. This decodes them all: call it on the rank that validates only."""
        items = [self._item(VALIDATION_POSITIONS + row, [row], None) for row in range(len(self))]
        items = [item for item in items if item is not None]
        starts = range(0, len(items), batch_size)
        return [collate(items[start:start + batch_size]) for start in starts]


def collate(items: list[dict]) -> dict:
    """-> {"pixels_w", "pixels_l": uint8 [B,3,R,R], "prompts" (after dropout), "captions",
    "positions" (stream keys): lists, "rows": [B] (dataset rows)}."""
    stacked = {key: torch.stack([item[key] for item in items]) for key in ("pixels_w", "pixels_l")}
    lists = {f"{key}s": [item[key] for item in items] for key in ("prompt", "caption", "position")}
    return {**stacked, **lists, "rows": torch.tensor([item["row"] for item in items])}


def batch_positions(step: int, batch_size: int, rank=0, world_size=1, start_sample=0) -> list[int]:
    """Stream positions of micro-batch `step` (counted since this process started) of rank `rank`:
    start_sample + (step x world_size + rank) x B + [0, B); start_sample: consumed before."""
    start = start_sample + (step * world_size + rank) * batch_size
    return list(range(start, start + batch_size))


def resume_problem(saved_identity: dict, pairs: PreferencePairs, world_size: int) -> str | None:
    """One line: why this run cannot continue the stream of a checkpoint whose data had
    `saved_identity` (PreferencePairs.identity); None if it can. The data may have moved."""
    current = pairs.identity(world_size)
    for key in ("pairs", "seed", "window", "row_groups", "rows_sha1"):
        if saved_identity.get(key) != current.get(key):
            return (f"the data differ from the checkpoint's ({key} {saved_identity.get(key)} -> "
                    f"{current.get(key)}): its stream cannot be continued")
    saved_world = saved_identity.get("world_size", world_size)
    if saved_world != world_size:
        return (f"the checkpoint's parquet row groups are split over {saved_world} ranks (each "
                f"owns its groups): resume with {saved_world} processes, not {world_size}")
    return None


class PairBatches:
    """Endless collate batches of this rank's pairs from `start_sample` (consumed by all ranks) on.
    Task step x K + k holds the step's positions whose group slot (order()) is k mod K: an in-order
    DataLoader gives it to worker k of K, so no two workers read one group; the workers' failures
    and I/O go to stats. `.step`: micro-batches served."""

    def __init__(self, pairs: PreferencePairs, batch_size, start_sample=0, rank=0, world_size=1,
                 num_workers=0):
        self.pairs = pairs.shard(rank, world_size)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.step = 0
        self.stream = (rank, world_size, start_sample)  # (rank, ranks, start) in batch_positions
        if self.pairs.split[1] > 1:  # deviation 5: the rank streams its own row groups alone
            if start_sample % world_size:
                raise DataError(f"start_sample {start_sample}: not a multiple of the {world_size} "
                                "ranks, which consume equal shares")
            self.stream = (0, 1, start_sample // world_size)

    def _tasks(self, step: int, shares: int) -> list[list[int]]:
        """The step's positions in `shares` tasks by the slot of their row group: one per worker."""
        count = len(self.pairs)
        tasks = [[] for _ in range(shares)]
        rank, ranks, start = self.stream
        for position in batch_positions(step, self.batch_size, rank, ranks, start):
            slot = self.pairs.order(position // count)[1][position % count]
            tasks[slot % shares].append(position)
        return tasks

    def __iter__(self):
        shares = max(self.num_workers, 1)  # tasks per step
        tasks = (task for step in itertools.count(self.step) for task in self._tasks(step, shares))
        prefetch = max(2, math.ceil(4 * shares / self.batch_size))  # keeps every worker busy
        loader = iter(DataLoader(self.pairs, batch_sampler=tasks, collate_fn=list,
                                 num_workers=self.num_workers,
                                 prefetch_factor=prefetch if self.num_workers else None))
        while True:
            items = [item for _ in range(shares) for item in next(loader)]  # the step's tasks
            for item in items:
                for kind, ref in item["failures"]:
                    getattr(self.pairs.stats, kind).add(ref)
                self.pairs.stats.bytes_read += item["bytes_read"]
                self.pairs.stats.image_bytes += item["image_bytes"]
            self.step += 1
            yield collate(sorted(items, key=operator.itemgetter("position")))


def unit_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images [B,3,H,W] -> float32 in [0, 1], where they are: what a reward model takes."""
    return pixels.float() / 255


@torch.no_grad()
def relabel_with_reward(batch: dict, reward_fn) -> tuple[dict, int]:
    """AI feedback (deviation 3): the image with the higher reward_fn(images [B,3,H,W] in [0,1],
    captions, not the dropped-out prompts) becomes the winner (a tie keeps the order)
    -> (batch, number of swaps)."""
    score_w = reward_fn(unit_pixels(batch["pixels_w"]), batch["captions"])
    score_l = reward_fn(unit_pixels(batch["pixels_l"]), batch["captions"])
    swap = (score_l > score_w).view(-1, 1, 1, 1)
    pixels_w = torch.where(swap, batch["pixels_l"], batch["pixels_w"])
    pixels_l = torch.where(swap, batch["pixels_w"], batch["pixels_l"])
    return {**batch, "pixels_w": pixels_w, "pixels_l": pixels_l}, int(swap.sum())


def check_data(path: str, columns: dict, world_size=1) -> int:
    """The number of usable pairs at `path`, no image read; DataError in one line for data that
    cannot be trained on (also: fewer parquet row groups than ranks)."""
    pairs = PreferencePairs(path, columns=columns)
    pairs.shard(0, world_size)
    return len(pairs)


def main(argv=None):
    parser = config.Parser(description=__doc__.split("\n")[0])
    inspect = parser.add_subparsers(dest="command", required=True).add_parser(
        "inspect", help="count the bad rows and measure the loader before a long run")
    inspect.add_argument("path", help="pairs.jsonl folder, .parquet file or .parquet folder")
    inspect.add_argument("--pairs", type=int, default=1000, help="pairs to scan (0: one epoch)")
    inspect.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    inspect.add_argument("--resolution", type=int, default=512, help="pixels after resize and crop")
    inspect.add_argument("--seed", type=int, default=0, help="of the order and the augmentation")
    inspect.add_argument("--data_columns", default="", help="KEY=COLUMN,...: KEY in "
                         + ", ".join(pair_files.FIELDS))
    inspect.add_argument("--world", type=int, default=1, help="show the split over this many ranks")
    args = parser.parse_args(argv)
    if min(args.pairs, args.num_workers) < 0 or min(args.resolution, args.world) < 1:
        parser.error("--pairs and --num_workers must be >= 0, --resolution and --world >= 1")
    pairs = PreferencePairs(args.path, args.resolution, seed=args.seed,
                            columns=parse_columns(args.data_columns))
    shards = [pairs.shard(rank, args.world) for rank in range(args.world)]
    total = min(args.pairs or len(pairs), len(pairs))
    steps = total // math.gcd(total, 8)  # batches that cover positions 0..total-1
    start = time.perf_counter()
    batches = PairBatches(pairs, total // steps, num_workers=args.num_workers)
    for _ in progress.bar(zip(range(steps), batches), desc="inspect", total=steps, unit="batch"):
        pass
    speed = total / (time.perf_counter() - start)
    stats = pairs.stats
    groups = f" in {len(pairs.groups)} row groups" if pairs.groups else ""
    partial = "" if total == len(pairs) else " (a partial scan reads whole windows of row groups)"
    where = f"{speed / args.num_workers:.1f} per worker" if args.num_workers else "in one process"
    print(f"{args.path}: {len(pairs)} usable pairs{groups}; scanned {total} in the training order\n"
          f"  {stats}{partial}\n  {speed:.1f} pairs/s ({where}) through the training transform at "
          f"{args.resolution} px; read {stats.bytes_read / total / 1e3:.0f} kB per pair for "
          f"{stats.image_bytes / total / 1e3:.0f} kB of its own images")
    for rank, shard in enumerate(shards if pairs.groups and args.world > 1 else []):
        print(f"  rank {rank} of {args.world}: {len(shard.members)} row groups, {len(shard)} pairs "
              "per epoch (deviation 5)")
    if args.world > 1 and not pairs.groups:
        print(f"  {args.world} ranks share one stream (pairs.jsonl): rank r serves positions "
              "(step x world + r) x B + [0, B)")


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # config.ConfigError and DataError: one line
        raise SystemExit(f"data.py inspect: {error}") from None
