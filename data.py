"""Preference pairs for Diffusion-DPO: (caption, preferred image x_0^w, dis-preferred image x_0^l).

Pick-a-Pic v2 (Diffusion-DPO Sec. 5): `caption`, `jpg_0`, `jpg_1` (JPEG bytes), `label_0` (1: jpg_0 preferred,
0: jpg_1, 0.5: a tie), in parquet shards or a pairs.jsonl folder. As the official train.py: ties are dropped
(~12%), the winner comes first, each image is resized (shorter side to R, bilinear), center- (or random-)
cropped and flipped, independently for x_0^w and x_0^l; 20% of the captions become "".

Stream position p holds row order_e[p mod N] of epoch e = p // N (N usable pairs), augmented by an RNG seeded
by (seed, p): a pure function of (seed, p), so a run resumes exactly and DDP ranks see what one process sees
with a larger batch (batch_positions). pairs.jsonl: order_e = randperm(N, seed + e); parquet: deviation 4.

Deviations from the official code:
  1. Bad data never stops a run (officially a corrupt image crashes it): ties, malformed rows and missing
     files are counted when indexing; an undecodable image or a null cell is counted and its pair replaced
     by the next readable row of its row group, then of the epoch's order.
  2. A per-position RNG, not torchvision's global one. Draw order per pair: winner crop, winner flip, loser
     crop, loser flip, prompt dropout.
  3. AI feedback scores batches of any size (official: 1) of augmented images; human ties are still dropped.
  4. Parquet is read by row groups (~100 rows), so a full shuffle reads ~100 pairs to use one (official: a
     ~335 GB Arrow copy first). order_e shuffles the row groups, then the rows within windows of `window`
     groups (default 4; 0: a full shuffle): each group is read once per epoch by one DataLoader worker, a
     process holds <= window groups (~130 MB), and a group's rows land < window x ~100 positions apart.
"""

import argparse
import copy
import io
import itertools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

IMAGE_COLUMNS = ("jpg_0", "jpg_1")
VALIDATION_POSITIONS = 1 << 40  # validation pairs' positions (batches) lie beyond any training position


class UnreadableImage(Exception):
    """args: (kind: "missing" | "corrupt" | "null", the image: its path or "shard.parquet[row N].jpg_0")."""


@dataclass
class PairStats:
    """What was dropped or skipped and why (each bad image once), and the I/O of the batches served."""
    rows: int = 0  # rows read
    ties: int = 0
    malformed: int = 0  # unparsable line, missing field, label not in {0, 0.5, 1}
    missing: set = field(default_factory=set)  # image files that do not exist
    corrupt: set = field(default_factory=set)  # images that do not decode
    null: set = field(default_factory=set)  # null parquet image cells
    bytes_read: int = 0  # bytes read from files (whole parquet column chunks)
    image_bytes: int = 0  # bytes of the served pairs' own images

    def __str__(self) -> str:  # the counts, one line
        ratio = f", read amplification {self.bytes_read / self.image_bytes:.2f}x" if self.image_bytes else ""
        return (f"{self.rows} rows read: {self.ties} ties dropped, {self.malformed} malformed rows dropped, "
                f"{len(self.missing)} missing, {len(self.corrupt)} corrupt and {len(self.null)} null images "
                f"skipped{ratio}")


def _read_jsonl(path: Path) -> list[tuple]:
    """-> records (caption, ref_0, ref_1, label_0), refs image paths; an unreadable line has label None."""
    records = []
    for line in filter(str.strip, path.read_text().splitlines()):
        try:
            item = json.loads(line)
            images = (path.parent / item[column] for column in IMAGE_COLUMNS)
            records.append((item.get("caption"), *images, item["label_0"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            records.append((None, None, None, None))
    return records


def _read_parquet(files: list[Path]) -> tuple[list[tuple], list[tuple]]:
    """-> (records with refs (row group id, row in group, column), row groups (file, index in the file, first
    row in the file, compressed bytes of its image column chunks: what reading it costs)); no image read."""
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError("reading Pick-a-Pic parquet shards needs pyarrow: pip install pyarrow") from error
    records, groups = [], []
    for file in files:
        parquet = pq.ParquetFile(file)
        missing = {"caption", "label_0", *IMAGE_COLUMNS} - set(parquet.schema_arrow.names)
        if missing:
            raise ValueError(f"{file}: not a Pick-a-Pic shard, no column(s) {sorted(missing)}")
        rows = parquet.read(columns=["caption", "label_0"]).to_pylist()  # [{"caption", "label_0"}]
        first_row = 0
        for index in range(parquet.num_row_groups):
            meta = parquet.metadata.row_group(index)
            nbytes = sum(meta.column(c).total_compressed_size for c in range(meta.num_columns)
                         if meta.column(c).path_in_schema.split(".")[0] in IMAGE_COLUMNS)
            group = len(groups)
            groups.append((file, index, first_row, nbytes))
            records += [(row["caption"], (group, k, "jpg_0"), (group, k, "jpg_1"), row["label_0"])
                        for k, row in enumerate(rows[first_row:first_row + meta.num_rows])]
            first_row += meta.num_rows
    return records, groups


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> PIL, rounded as diffusers' numpy_to_pil."""
    return Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


def preprocess(image: Image.Image, resolution: int, rng: random.Random | None, random_crop=False,
               hflip=True) -> torch.Tensor:
    """PIL image -> uint8 [3,R,R]: resize shorter side (bilinear), crop, flip; rng None: center crop.
    The scaling to [-1, 1] happens on the model's device (dpo.model_pixels): a uint8 batch is a quarter
    of the bytes to stack, to pass between processes and to copy to the device."""
    image = image.convert("RGB")
    short = min(image.size)  # as torchvision: the short side becomes R exactly, the long int(R * long/short)
    image = image.resize([int(resolution * side / short) for side in image.size], Image.BILINEAR)  # antialias
    width, height = image.size
    if random_crop and rng is not None:
        top, left = rng.randint(0, height - resolution), rng.randint(0, width - resolution)
    else:  # center crop, rounded as torchvision's CenterCrop
        top, left = int(round((height - resolution) / 2.0)), int(round((width - resolution) / 2.0))
    image = image.crop((left, top, left + resolution, top + resolution))
    if hflip and rng is not None and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # HWC -> CHW


class PreferencePairs(torch.utils.data.Dataset):
    """Map-style dataset indexed by stream position; len(): the usable pairs. rows: (caption, ref_0, ref_1,
    winner: 0 if jpg_0 is preferred else 1), refs image paths or (row group, row in group, column)."""

    def __init__(self, path, resolution=512, random_crop=False, hflip=True, prompt_dropout=0.2, seed=0,
                 window=4):
        path = Path(path)
        path = path / "pairs.jsonl" if (path / "pairs.jsonl").is_file() else path
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if path.suffix == ".jsonl" and path.is_file():
            records, self.groups = _read_jsonl(path), []
        elif files and all(file.suffix == ".parquet" and file.is_file() for file in files):
            records, self.groups = _read_parquet(files)
        else:
            raise FileNotFoundError(f"{path}: not a pairs.jsonl (or a folder with one), a .parquet file or a "
                                    "folder of .parquet shards")
        self.stats, self.rows = PairStats(rows=len(records)), []
        for caption, ref_0, ref_1, label in records:
            absent = {str(ref) for ref in (ref_0, ref_1) if isinstance(ref, Path) and not ref.is_file()}
            if label not in (0, 0.5, 1):
                self.stats.malformed += 1
            elif label == 0.5:
                self.stats.ties += 1
            elif absent:
                self.stats.missing |= absent
            else:
                self.rows.append((caption or "", ref_0, ref_1, 0 if label == 1 else 1))
        if not self.rows:
            raise ValueError(f"{path}: no usable pairs ({self.stats})")
        self.resolution, self.random_crop, self.hflip = resolution, random_crop, hflip
        self.prompt_dropout, self.seed, self.window = prompt_dropout, seed, window
        self._reindex()

    def _reindex(self):
        """The rows of each row group (parquet), for the windowed order; empty per-process caches."""
        self.members = {}  # row group -> its rows, ascending
        for row, (_, ref, _, _) in enumerate(self.rows if self.groups else []):
            self.members.setdefault(ref[0], []).append(row)
        self._orders, self._group_cells, self._bytes_read = {}, {}, 0

    def __len__(self):
        return len(self.rows)

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, slots) [N]: the epoch's rows in stream order, and the slot of each row's row group in the
        epoch's group order (pairs.jsonl and window=0: the index itself)."""
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}  # a batch straddles two
            if not self.members or self.window == 0:  # a full shuffle
                generator = torch.Generator().manual_seed(self.seed + epoch)
                rows = torch.randperm(len(self.rows), generator=generator).numpy()
                self._orders[epoch] = rows, np.arange(len(self.rows))
            else:  # deviation 4: shuffle the row groups, then the rows within each window of groups
                rng = np.random.default_rng([self.seed, epoch])
                groups = np.array(list(self.members))[rng.permutation(len(self.members))]
                rows = np.concatenate([self.members[group] for group in groups])
                slots = np.repeat(np.arange(len(groups)), [len(self.members[group]) for group in groups])
                shuffle = np.lexsort((rng.random(len(rows)), slots // self.window))  # by window, then random
                self._orders[epoch] = rows[shuffle], slots[shuffle]
        return self._orders[epoch]

    def _read_group(self, group: int) -> dict:
        """{column: list of cells} of a row group's image columns: one read of its column chunks."""
        import pyarrow.parquet as pq  # optional: present, since _read_parquet found the shards
        file, index, _, _ = self.groups[group]
        return pq.ParquetFile(file).read_row_group(index, columns=list(IMAGE_COLUMNS)).to_pydict()

    def _load(self, ref) -> tuple[Image.Image, int]:
        """(decoded image, encoded size) of an image ref; raises UnreadableImage."""
        if isinstance(ref, Path):
            kind, name, encoded = "missing", str(ref), ref.read_bytes() if ref.is_file() else None
            self._bytes_read += len(encoded or b"")
        else:
            group, offset, column = ref
            file, _, first_row, nbytes = self.groups[group]
            kind, name = "null", f"{file}[row {first_row + offset}].{column}"
            if group not in self._group_cells:
                self._group_cells[group] = self._read_group(group)
                self._bytes_read += nbytes
                while len(self._group_cells) > max(self.window, 1):  # evict the oldest (deviation 4)
                    del self._group_cells[next(iter(self._group_cells))]
            encoded = self._group_cells[group][column][offset]
        if encoded is None:
            raise UnreadableImage(kind, name)
        try:
            image = Image.open(io.BytesIO(encoded))
            image.load()  # decode now, so that a truncated file fails here
        except (OSError, ValueError, SyntaxError, TypeError, Image.DecompressionBombError) as error:
            raise UnreadableImage("corrupt", name) from error
        return image, len(encoded)

    def _item(self, position: int, rows, rng: random.Random | None) -> dict | None:
        """The item at `position` from the first readable row of `rows` (deviation 1), else None; rng None:
        center crop, no flip, no prompt dropout."""
        failures, bytes_before = [], self._bytes_read
        for row in rows:
            caption, *refs, winner = self.rows[row]
            try:
                loaded = [self._load(ref) for ref in (refs[winner], refs[1 - winner])]
            except UnreadableImage as error:
                failures.append(error.args)
                getattr(self.stats, error.args[0]).add(error.args[1])  # in a worker: see PairBatches
                continue
            pixels_w, pixels_l = (preprocess(image, self.resolution, rng, self.random_crop, self.hflip)
                                  for image, _ in loaded)
            prompt = "" if rng is not None and rng.random() < self.prompt_dropout else caption
            return dict(pixels_w=pixels_w, pixels_l=pixels_l, prompt=prompt, caption=caption, row=int(row),
                        position=position, failures=failures, bytes_read=self._bytes_read - bytes_before,
                        image_bytes=sum(size for _, size in loaded))

    def __getitem__(self, position: int) -> dict:
        epoch, index = divmod(int(position), len(self.rows))
        rows = self.order(epoch)[0]
        candidates = itertools.chain(rows[index:], rows[:index])  # deviation 1: then the epoch's next rows
        if self.members:  # parquet: first the next rows of the row group
            members = self.members[self.rows[rows[index]][1][0]]
            candidates = itertools.chain(np.roll(members, -members.index(rows[index])), candidates)
        item = self._item(int(position), candidates, random.Random(f"{self.seed}/{position}"))  # deviation 2
        if item is None:
            raise RuntimeError(f"no readable pair at all ({self.stats})")
        return item

    def split_validation(self, n: int) -> tuple["PreferencePairs", "PreferencePairs"]:
        """(train_pairs, val_pairs): val_pairs has n rows fixed by the seed (whole row groups for parquet)."""
        if not 0 < n < len(self.rows):
            raise ValueError(f"--val_pairs={n}: must be between 1 and {len(self.rows) - 1} "
                             f"(the data has {len(self.rows)} usable pairs)")
        groups = list(self.members.values()) or [[row] for row in range(len(self.rows))]  # jsonl: single rows
        shuffled = np.random.default_rng([self.seed, 0x7A1]).permutation(len(groups))  # a stream of its own
        held_out = set(np.concatenate([groups[i] for i in shuffled])[:n].tolist())
        kept = [row for row in range(len(self.rows)) if row not in held_out]
        subsets = copy.copy(self), copy.copy(self)  # sharing stats
        for subset, rows in zip(subsets, (kept, sorted(held_out))):
            subset.rows = [self.rows[i] for i in rows]
            subset._reindex()
        return subsets

    def batches(self, batch_size: int) -> list[dict]:
        """Validation batches: every readable pair once, unaugmented, at VALIDATION_POSITIONS + row."""
        items = [self._item(VALIDATION_POSITIONS + row, [row], None) for row in range(len(self.rows))]
        items = [item for item in items if item is not None]
        return [collate(items[start:start + batch_size]) for start in range(0, len(items), batch_size)]


def collate(items: list[dict]) -> dict:
    """-> {"pixels_w", "pixels_l": uint8 [B,3,R,R], "prompts": list[str] (after dropout), "captions": list[str],
    "rows": [B] (dataset rows), "positions": list[int] (global stream positions)}."""
    return {**{key: torch.stack([item[key] for item in items]) for key in ("pixels_w", "pixels_l")},
            "prompts": [item["prompt"] for item in items], "captions": [item["caption"] for item in items],
            "rows": torch.tensor([item["row"] for item in items]),
            "positions": [item["position"] for item in items]}


def batch_positions(step: int, batch_size: int, rank=0, world_size=1) -> list[int]:
    """Stream positions of micro-batch `step` of rank `rank`: (step * world_size + rank) * B + [0, B)."""
    start = (step * world_size + rank) * batch_size
    return list(range(start, start + batch_size))


class PairBatches:
    """Endless collate batches of `pairs` from step `start_step` on; `.step`: the data position to save.
    Task step * K + k holds the step's positions whose group slot (order()) is k mod K: an in-order DataLoader
    gives it to worker k of K, so no two workers read one group; the workers' failures and I/O go to stats."""

    def __init__(self, pairs: PreferencePairs, batch_size, start_step=0, rank=0, world_size=1, num_workers=0):
        self.pairs, self.batch_size, self.step = pairs, batch_size, start_step
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers

    def __iter__(self):
        workers, shares, n = self.num_workers, max(self.num_workers, 1), len(self.pairs)  # shares: K per step
        steps = (batch_positions(step, self.batch_size, self.rank, self.world_size)
                 for step in itertools.count(self.step))
        tasks = ([p for p in positions if self.pairs.order(p // n)[1][p % n] % shares == k]
                 for positions in steps for k in range(shares))
        prefetch = max(2, math.ceil(4 * workers / self.batch_size)) if workers else None  # keeps all K busy
        loader = iter(DataLoader(self.pairs, batch_sampler=tasks, collate_fn=list, num_workers=workers,
                                 prefetch_factor=prefetch))
        item_lists = (sorted(itertools.chain(*step_tasks), key=lambda item: item["position"])
                      for step_tasks in zip(*[loader] * shares))  # K consecutive tasks: one step
        for items in item_lists:
            for item in items:
                for kind, ref in item["failures"]:
                    getattr(self.pairs.stats, kind).add(ref)
                self.pairs.stats.bytes_read += item["bytes_read"]
                self.pairs.stats.image_bytes += item["image_bytes"]
            self.step += 1
            yield collate(items)


def unit_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images [B,3,H,W] -> float32 in [0, 1], where they are: what a reward model takes."""
    return pixels.float() / 255


@torch.no_grad()
def relabel_with_reward(batch: dict, reward_fn) -> tuple[dict, int]:
    """AI feedback (deviation 3): the image with the higher reward_fn(images [B,3,H,W] in [0,1], captions, not
    the dropped-out prompts) becomes the winner (a tie keeps the order) -> (batch, number of swaps)."""
    score_w = reward_fn(unit_pixels(batch["pixels_w"]), batch["captions"])
    score_l = reward_fn(unit_pixels(batch["pixels_l"]), batch["captions"])
    swap = (score_l > score_w).view(-1, 1, 1, 1)
    pixels_w = torch.where(swap, batch["pixels_l"], batch["pixels_w"])
    pixels_l = torch.where(swap, batch["pixels_w"], batch["pixels_l"])
    return {**batch, "pixels_w": pixels_w, "pixels_l": pixels_l}, int(swap.sum())


def write_pairs_jsonl(folder, captions, images_0, images_1, labels_0=None) -> Path:
    """Write a pairs.jsonl dataset: images (PIL, or [3,H,W] tensors in [0, 1]) as PNGs in folder/images/, one
    line per pair; labels_0 defaults to 1 (jpg_0 preferred). Returns the path of pairs.jsonl."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    labels = [1] * len(captions) if labels_0 is None else labels_0
    with open(folder / "pairs.jsonl", "w") as file:
        for i, (caption, label, *images) in enumerate(zip(captions, labels, images_0, images_1, strict=True)):
            record = {"caption": caption, "label_0": label}
            for column, image in zip(IMAGE_COLUMNS, images):
                record[column] = f"images/{i:06d}_{column[-1]}.png"
                (to_pil(image) if isinstance(image, torch.Tensor) else image).save(folder / record[column])
            file.write(json.dumps(record) + "\n")
    return folder / "pairs.jsonl"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    inspect = parser.add_subparsers(dest="command", required=True).add_parser(
        "inspect", help="count the bad rows and measure the loader before a long run")
    inspect.add_argument("path", help="pairs.jsonl folder, .parquet file or folder of .parquet shards")
    inspect.add_argument("--pairs", type=int, default=1000, help="pairs to scan (default 1000; 0: one epoch)")
    inspect.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    inspect.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args(argv)
    if min(args.pairs, args.workers) < 0 or args.resolution < 1:
        parser.error("--pairs and --workers must be >= 0, --resolution >= 1")
    try:
        pairs = PreferencePairs(args.path, args.resolution)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"data.py inspect: {error}\n")
    total = min(args.pairs or len(pairs), len(pairs))
    steps, start = total // math.gcd(total, 8), time.perf_counter()  # batches that cover positions 0..total-1
    for _ in tqdm(zip(range(steps), PairBatches(pairs, total // steps, num_workers=args.workers)), "inspect",
                  total=steps, unit="batch"):
        pass
    speed, stats = total / (time.perf_counter() - start), pairs.stats
    groups = f" in {len(pairs.groups)} row groups" if pairs.groups else ""
    partial = "" if total == len(pairs) else " (a partial scan reads whole windows of row groups)"
    where = f"{speed / args.workers:.1f} per worker" if args.workers else "in the main process"
    print(f"{args.path}: {len(pairs)} usable pairs{groups}; scanned {total} in the training order\n"
          f"  {stats}{partial}\n  {speed:.1f} pairs/s ({where}) through the training transform at "
          f"{args.resolution} px; read {stats.bytes_read / total / 1e3:.0f} kB per pair for "
          f"{stats.image_bytes / total / 1e3:.0f} kB of its own images")


if __name__ == "__main__":
    main()
