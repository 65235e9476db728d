"""Preference pairs for Diffusion-DPO: (caption, preferred image x_0^w, dis-preferred image x_0^l).

Diffusion-DPO (Wallace et al. 2024, Sec. 5) trains on Pick-a-Pic v2: rows of `caption`, `jpg_0`, `jpg_1` (JPEG
bytes) and `label_0` (1: jpg_0 preferred, 0: jpg_1 preferred, 0.5: a tie). Two sources in that schema:
  * Pick-a-Pic parquet shards (a .parquet file or a folder of them; pyarrow is imported only here);
  * a folder format made by hand or by `write_pairs_jsonl`: pairs.jsonl, one JSON object per line with the
    same four fields, jpg_0/jpg_1 being image paths relative to the jsonl file (any format PIL reads).
Processing follows the official train.py: ties are dropped (the paper's ~12%), the winner is put first, and
each image goes through resize (shorter side to R, longer side int(R * long / short), bilinear, as
torchvision) -> center crop (random crop with random_crop=True) -> random horizontal flip (off with
hflip=False) -> [-1, 1], independently for x_0^w and x_0^l; 20% of captions are replaced by ""
(proportion_empty_prompts=0.2). AI feedback (the paper's AI-feedback variant, official --choice_model):
`relabel_with_reward` re-ranks the pairs of a batch with any rewards.py reward and ignores the human label;
`relabel_dataset` does it once for a whole dataset.

Unreadable data never stops a run: ties and malformed rows are dropped and counted when the index is built,
missing image files are counted then too, and an image that fails to decode (or a null parquet cell) is
counted and its pair replaced (deviation 1). `PreferencePairs.stats.summary()` reports it all;
`python data.py inspect PATH` counts it before a long run and measures the loader's speed.

The order: item `position` p of the infinite stream is row order_e[p mod N], e = p // N, N usable pairs.
  * pairs.jsonl: order_e = randperm(N, seed + e), a full shuffle.
  * parquet: Pick-a-Pic's shards hold ~100 rows per row group, the smallest unit parquet reads, so a full
    shuffle reads ~100 pairs to use one (~100x read amplification). Instead (deviation 4) order_e shuffles
    the row groups, cuts that sequence into windows of `window` groups (default 4) and shuffles the rows
    within each window. Every row group is read once per epoch and a process holds at most one window of
    images in memory (4 groups x ~100 pairs x ~330 KB = ~130 MB for Pick-a-Pic v2). Shuffle quality: the
    rows of one group land within one window, i.e. at most window x rows-per-group - 1 (~400) positions
    apart; which groups share a window changes every epoch. window=0 gives the full shuffle (the old order).
Crop/flip/dropout draws come from a RNG seeded by (seed, p), so the whole stream is a pure function of
(seed, position): train.py resumes exactly by restarting PairBatches at the saved step, and DDP rank r of W
takes positions (step*W + r)*B ... +B, so W processes see exactly the pairs (and augmentations) of one
process with a W times larger batch. Batches carry `positions` (the global stream positions), on which the
methods key their noise. DataLoader workers split the work by row group: worker k of K decodes the rows
whose group has slot s (its index in the epoch's group order) with s % K == k, so no two workers read the
same group; the main process reassembles each batch in position order, so the batches do not depend on K.
Under DDP every rank reads every group of a window (1/W of its rows are that rank's); on one machine the OS
page cache serves the repeats.

Validation (`split_validation`): n fixed rows chosen by the seed are removed from the training stream. For
parquet they are whole row groups (the groups first in a seeded order, the last one partly), so scoring them
reads ceil(n / rows-per-group) groups. Validation items are center-cropped, not flipped, never dropped out,
and carry positions VALIDATION_POSITIONS + i (i = 0..n-1), far beyond any training position.

Deviations from the official code:
  1. The official code drops the tie rows with datasets.filter and lets a corrupt image crash the run; here
     bad images are skipped and counted: the pair is replaced by the next readable row of its row group
     (parquet; then the next rows of the epoch's order) or of the epoch's order (jsonl).
  2. Random decisions use a per-position Python RNG, not torchvision's global one (for exact resume).
     Draw order per pair: winner crop, winner flip, loser crop, loser flip, prompt dropout.
  3. AI feedback works on batches of any size (official: batch size 1) and on the augmented images; human
     ties are still dropped first. relabel_dataset scores un-augmented center crops, once, before training.
  4. Parquet rows are shuffled within windows of row groups (above), not globally: the official code
     converts the dataset to memory-mapped Arrow files first (another ~335 GB) and shuffles globally.
"""

import argparse
import copy
import io
import json
import math
import random
import time
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from tqdm import tqdm

_BAD_IMAGE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what a bad file can raise
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
VALIDATION_POSITIONS = 1 << 40  # validation item i has position VALIDATION_POSITIONS + i (module docstring)


class UnreadableImage(Exception):
    """kind: "missing" | "corrupt" | "null"; ref: the image's path, or "shard.parquet[row N].jpg_0"."""

    def __init__(self, kind: str, ref):
        super().__init__(kind, ref)
        self.kind, self.ref = kind, ref


@dataclass
class PairStats:
    """What was dropped or skipped, and why (image failures are counted once per image), and the I/O."""

    rows: int = 0  # rows read
    ties: int = 0
    malformed: int = 0  # unparsable line, label not in {0, 0.5, 1}, missing field
    missing: set = field(default_factory=set)  # images (path or parquet cell) that do not exist
    corrupt: set = field(default_factory=set)  # images that do not decode
    null: set = field(default_factory=set)  # null parquet image cells
    relabelled: int = 0  # pairs whose winner the reward changed (AI feedback)
    bytes_read: int = 0  # bytes read from files (whole parquet column chunks) by the batches served
    image_bytes: int = 0  # bytes of the served pairs' own images

    def summary(self) -> str:
        text = (f"{self.rows} rows read: {self.ties} ties dropped, {self.malformed} malformed rows dropped, "
                f"{len(self.missing)} missing, {len(self.corrupt)} corrupt and {len(self.null)} null images "
                f"skipped, {self.relabelled} pairs relabelled by the reward")
        if self.image_bytes:
            text += f", read amplification {self.bytes_read / self.image_bytes:.2f}x"
        return text


def _parse_label(value):
    label = float(value)
    if label not in (0.0, 0.5, 1.0):
        raise ValueError(f"label_0 must be 0, 0.5 or 1, got {value!r}")
    return label


def _read_jsonl(path: Path, stats: PairStats):
    """-> list of (caption, ref_0, ref_1, label_0); refs are absolute paths."""
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stats.rows += 1
        try:
            item = json.loads(line)
            refs = [path.parent / item["jpg_0"], path.parent / item["jpg_1"]]
            records.append((item.get("caption") or "", *refs, _parse_label(item["label_0"])))
        except (ValueError, KeyError, TypeError):
            stats.malformed += 1
    return records


def _import_pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError("reading or writing Pick-a-Pic parquet shards needs pyarrow: pip install pyarrow") \
            from error
    return pa, pq


@dataclass(frozen=True)
class RowGroup:
    file: Path
    index: int  # row group index in the file
    first_row: int  # row number of its first row in the file
    nbytes: int  # compressed bytes of its jpg_0 and jpg_1 column chunks: what reading it costs


def _read_parquet(files: list[Path], stats: PairStats):
    """-> (records, groups): records (caption, ref_0, ref_1, label_0) with refs (group id, row in group,
    column); groups: list of RowGroup."""
    _, pq = _import_pyarrow()
    records, groups = [], []
    for file in files:
        parquet = pq.ParquetFile(file)
        missing = {"caption", "label_0", *IMAGE_COLUMNS} - set(parquet.schema_arrow.names)
        if missing:
            raise ValueError(f"{file}: not a Pick-a-Pic shard, no column(s) {sorted(missing)}")
        table = parquet.read(columns=["caption", "label_0"])  # the images are read lazily
        captions, labels = table["caption"].to_pylist(), table["label_0"].to_pylist()
        first_row = 0
        for index in range(parquet.num_row_groups):
            meta = parquet.metadata.row_group(index)
            nbytes = sum(meta.column(c).total_compressed_size for c in range(meta.num_columns)
                         if meta.column(c).path_in_schema.split(".")[0] in IMAGE_COLUMNS)
            group = len(groups)
            groups.append(RowGroup(file, index, first_row, nbytes))
            for offset in range(meta.num_rows):
                stats.rows += 1
                caption, label = captions[first_row + offset], labels[first_row + offset]
                try:
                    refs = (group, offset, "jpg_0"), (group, offset, "jpg_1")
                    records.append((caption or "", *refs, _parse_label(label)))
                except (ValueError, TypeError):
                    stats.malformed += 1
            first_row += meta.num_rows
    return records, groups


def _to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> PIL, rounded as diffusers' numpy_to_pil."""
    return Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


def preprocess(image: Image.Image, resolution: int, rng: random.Random | None, random_crop=False, hflip=True):
    """PIL image -> [3,R,R] in [-1,1]: resize shorter side (bilinear), crop, flip; rng None: center crop."""
    image = image.convert("RGB")
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(resolution * long / short)  # torchvision's rounding: the short side is R exactly
    new_size = (resolution, new_long) if width <= height else (new_long, resolution)
    image = image.resize(new_size, Image.BILINEAR)  # PIL antialiases when shrinking, as torchvision's Resize
    width, height = image.size
    if random_crop and rng is not None:
        top, left = rng.randint(0, height - resolution), rng.randint(0, width - resolution)
    else:  # center crop, rounded as torchvision's CenterCrop
        top, left = int(round((height - resolution) / 2.0)), int(round((width - resolution) / 2.0))
    image = image.crop((left, top, left + resolution, top + resolution))
    if hflip and rng is not None and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # HWC -> CHW
    return pixels * 2 - 1  # Normalize([0.5], [0.5])


class PreferencePairs(Dataset):
    """Map-style dataset indexed by stream position (module docstring); len() = number of usable pairs.

    window: row groups per shuffle window for parquet (0: full shuffle); ignored for pairs.jsonl."""

    def __init__(self, path, resolution=512, random_crop=False, hflip=True, prompt_dropout=0.2, seed=0,
                 window=4):
        path = Path(path)
        if path.is_dir() and (path / "pairs.jsonl").exists():
            path = path / "pairs.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder (expected pairs.jsonl or parquet)")
        if window < 0:
            raise ValueError(f"window={window}: must be >= 0 (row groups per shuffle window; 0: no window)")
        self.stats = PairStats()
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        self.groups = []  # parquet row groups (RowGroup); empty for pairs.jsonl
        if path.suffix == ".jsonl":
            records = _read_jsonl(path, self.stats)
        elif files and all(f.suffix == ".parquet" for f in files):
            records, self.groups = _read_parquet(files, self.stats)
        else:
            raise FileNotFoundError(f"{path}: expected pairs.jsonl, a .parquet file or a folder of .parquet")
        self.rows = []  # (caption, ref_0, ref_1, winner index: 0 if jpg_0 is preferred else 1)
        for caption, ref_0, ref_1, label in records:
            if label == 0.5:
                self.stats.ties += 1
                continue
            absent = {str(ref) for ref in (ref_0, ref_1) if isinstance(ref, Path) and not ref.is_file()}
            self.stats.missing |= absent
            if not absent:
                self.rows.append((caption, ref_0, ref_1, 0 if label == 1.0 else 1))
        if not self.rows:
            raise ValueError(f"{path}: no usable pairs ({self.stats.summary()})")
        self.resolution, self.random_crop, self.hflip = resolution, random_crop, hflip
        self.prompt_dropout, self.seed, self.window = prompt_dropout, seed, window
        self.validation = False  # set on the validation part of split_validation
        self._index()

    def _index(self):
        """Rows of each row group (parquet), for the windowed order; resets the per-process cache."""
        members = {}
        for row, (_, ref_0, _, _) in enumerate(self.rows):
            if not isinstance(ref_0, Path):
                members.setdefault(ref_0[0], []).append(row)
        self.members = {group: np.array(rows) for group, rows in members.items()}
        self._cache = {}  # per process: epoch orders, row group contents, bytes read

    def __len__(self):
        return len(self.rows)

    def __getstate__(self):  # DataLoader workers get a copy without the cache
        return {**self.__dict__, "_cache": {}}

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, slots) [N]: the rows of epoch `epoch` in stream order, and the slot of each row's row group
        in the epoch's group order (pairs.jsonl and window=0: the index itself). Cached per process."""
        orders = self._cache.setdefault("orders", {})
        if epoch not in orders:
            if len(orders) > 1:  # keep the last two epochs: a batch can straddle an epoch boundary
                del orders[min(orders)]
            if not self.members or self.window == 0:  # a full shuffle
                generator = torch.Generator().manual_seed(self.seed + epoch)
                orders[epoch] = (torch.randperm(len(self.rows), generator=generator).numpy(),
                                 np.arange(len(self.rows)))
            else:  # deviation 4: shuffle the row groups, then the rows within each window of groups
                rng = np.random.default_rng([self.seed, epoch])
                groups = list(self.members)
                group_order = [groups[i] for i in rng.permutation(len(groups))]
                rows, slots = [], []
                for start in range(0, len(group_order), self.window):
                    window = group_order[start:start + self.window]
                    window_rows = np.concatenate([self.members[g] for g in window])
                    window_slots = np.concatenate([np.full(len(self.members[g]), start + i)
                                                   for i, g in enumerate(window)])
                    shuffle = rng.permutation(len(window_rows))
                    rows.append(window_rows[shuffle])
                    slots.append(window_slots[shuffle])
                orders[epoch] = (np.concatenate(rows), np.concatenate(slots))
        return orders[epoch]

    def owner(self, position: int, num_workers: int) -> int:
        """The DataLoader worker that decodes `position`: its row group's slot modulo the worker count."""
        epoch, index = divmod(int(position), len(self.rows))
        return int(self.order(epoch)[1][index]) % num_workers

    def _image_bytes(self, ref, cache_key=None) -> bytes:
        """The encoded image of a ref; raises UnreadableImage. Parquet row groups are cached under cache_key
        (one key at a time: a new key drops the cached groups); None: the group itself (the last group)."""
        if isinstance(ref, Path):
            try:
                data = ref.read_bytes()
            except FileNotFoundError as error:
                raise UnreadableImage("missing", str(ref)) from error
            self._cache["bytes_read"] = self._cache.get("bytes_read", 0) + len(data)
            return data
        group, offset, column = ref
        if self._cache.get("key") != (cache_key if cache_key is not None else ("group", group)):
            self._cache["key"] = cache_key if cache_key is not None else ("group", group)
            self._cache["groups"] = {}
        groups = self._cache["groups"]
        if group not in groups:
            groups[group] = self._read_group(group)
            self._cache["bytes_read"] = self._cache.get("bytes_read", 0) + self.groups[group].nbytes
        data = groups[group][column][offset]
        data = data["bytes"] if isinstance(data, dict) else data  # HF Image feature {"bytes", "path"}
        if data is None:
            raise UnreadableImage("null", self._name(ref))
        return data

    def _read_group(self, group: int) -> dict:
        """{column: list of cell values} of one row group's image columns: one read of its column chunks."""
        _, pq = _import_pyarrow()
        info = self.groups[group]
        table = pq.ParquetFile(info.file).read_row_group(info.index, columns=list(IMAGE_COLUMNS))
        return {column: table[column].to_pylist() for column in IMAGE_COLUMNS}

    def _name(self, ref) -> str:
        if isinstance(ref, Path):
            return str(ref)
        info = self.groups[ref[0]]
        return f"{info.file}[row {info.first_row + ref[1]}].{ref[2]}"

    def _decode(self, data: bytes, ref) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(data))
            image.load()  # decode now, so that truncated/corrupt files fail here
            return image
        except (*_BAD_IMAGE, TypeError) as error:
            raise UnreadableImage("corrupt", self._name(ref)) from error

    def load_image(self, ref) -> Image.Image:
        """Decoded PIL image of a ref; raises UnreadableImage."""
        return self._decode(self._image_bytes(ref), ref)

    def _pair(self, row: int, cache_key=None):
        """(winner, loser) PIL images of a row and their encoded size; raises UnreadableImage."""
        _, ref_0, ref_1, winner = self.rows[row]
        refs = (ref_0, ref_1)[winner], (ref_0, ref_1)[1 - winner]
        encoded = [self._image_bytes(ref, cache_key) for ref in refs]
        return [self._decode(data, ref) for data, ref in zip(encoded, refs)], sum(map(len, encoded))

    def _candidates(self, epoch: int, index: int):
        """Rows to try for stream index `index` (deviation 1): its row, then the next rows of its row group
        (parquet), then the next rows of the epoch's order."""
        rows = self.order(epoch)[0]
        row = int(rows[index])
        if not isinstance(self.rows[row][1], Path):
            members = self.members[self.rows[row][1][0]]
            k = int(np.searchsorted(members, row))
            yield from (int(r) for r in chain(members[k:], members[:k]))
        yield from (int(rows[(index + i) % len(rows)]) for i in range(len(rows)))

    def __getitem__(self, position: int) -> dict:
        epoch, index = divmod(int(position), len(self.rows))
        slot = int(self.order(epoch)[1][index])
        cache_key = ("window", epoch, slot // self.window) if self.members and self.window else None
        rng = None if self.validation else random.Random(f"{self.seed}/{position}")  # deviation 2
        failures, bytes_before = [], self._cache.get("bytes_read", 0)
        for row in self._candidates(epoch, index):
            try:
                (image_w, image_l), image_bytes = self._pair(row, cache_key)
                break
            except UnreadableImage as error:
                failures.append((error.kind, error.ref))
                getattr(self.stats, error.kind).add(error.ref)  # in a worker process: see PairBatches
        else:
            raise RuntimeError(f"no readable pair at all ({len(failures)} image failures)")
        pixels_w = preprocess(image_w, self.resolution, rng, self.random_crop, self.hflip)
        pixels_l = preprocess(image_l, self.resolution, rng, self.random_crop, self.hflip)
        caption = self.rows[row][0]
        prompt = "" if rng is not None and rng.random() < self.prompt_dropout else caption
        return dict(pixels_w=pixels_w, pixels_l=pixels_l, prompt=prompt, caption=caption, row=row,
                    position=int(position), failures=failures, image_bytes=image_bytes,
                    bytes_read=self._cache.get("bytes_read", 0) - bytes_before)

    def _subset(self, rows: list[int], validation: bool) -> "PreferencePairs":
        subset = copy.copy(self)  # shares stats
        subset.rows, subset.validation = [self.rows[row] for row in rows], validation
        subset._index()
        return subset

    def split_validation(self, n: int) -> tuple["PreferencePairs", "PreferencePairs"]:
        """(train_pairs, val_pairs): n rows chosen by the seed (whole row groups for parquet) go to
        val_pairs and never appear in train_pairs' stream (module docstring)."""
        if not 0 < n < len(self.rows):
            raise ValueError(f"--val_pairs={n}: must be between 1 and {len(self.rows) - 1} "
                             f"(the data has {len(self.rows)} usable pairs)")
        rng = np.random.default_rng([self.seed, 0x7A1])  # a stream of its own, fixed by the seed
        if self.members:
            groups = list(self.members)
            chosen = np.concatenate([self.members[groups[i]] for i in rng.permutation(len(groups))])[:n]
        else:
            chosen = rng.choice(len(self.rows), n, replace=False)
        held_out = set(chosen.tolist())
        train = [row for row in range(len(self.rows)) if row not in held_out]
        return self._subset(train, False), self._subset(sorted(held_out), True)

    def batches(self, batch_size: int) -> list[dict]:
        """Validation: every pair once, in a fixed order, center-cropped, no flip, no prompt dropout, as
        collate dicts with positions VALIDATION_POSITIONS + i. Unreadable pairs are skipped (and counted)."""
        items = []
        for i in range(len(self.rows)):
            try:
                (image_w, image_l), image_bytes = self._pair(i)
            except UnreadableImage as error:
                getattr(self.stats, error.kind).add(error.ref)
                continue
            caption = self.rows[i][0]
            items.append(dict(pixels_w=preprocess(image_w, self.resolution, None, hflip=False),
                              pixels_l=preprocess(image_l, self.resolution, None, hflip=False),
                              prompt=caption, caption=caption, row=i, position=VALIDATION_POSITIONS + i,
                              failures=[], image_bytes=image_bytes, bytes_read=0))
        return [collate(items[start:start + batch_size]) for start in range(0, len(items), batch_size)]


def collate(items: list[dict]) -> dict:
    """-> {"pixels_w", "pixels_l": [B,3,R,R], "prompts": list[str] (after dropout), "captions": list[str],
    "rows": [B] (dataset rows), "positions": list[int] (global stream positions), "failures": [(kind,
    image)] met while loading, "bytes_read", "image_bytes": int (I/O of this batch, see PairStats)}."""
    return {
        "pixels_w": torch.stack([item["pixels_w"] for item in items]),
        "pixels_l": torch.stack([item["pixels_l"] for item in items]),
        "prompts": [item["prompt"] for item in items],
        "captions": [item["caption"] for item in items],
        "rows": torch.tensor([item["row"] for item in items]),
        "positions": [item["position"] for item in items],
        "failures": [failure for item in items for failure in item["failures"]],
        "bytes_read": sum(item["bytes_read"] for item in items),
        "image_bytes": sum(item["image_bytes"] for item in items),
    }


def batch_positions(step: int, batch_size: int, rank=0, world_size=1) -> list[int]:
    """Stream positions of micro-batch `step` of rank `rank`: (step * world_size + rank) * B + [0, B)."""
    start = (step * world_size + rank) * batch_size
    return list(range(start, start + batch_size))


class _WorkerShare(IterableDataset):
    """Worker k of K: for each step from `start`, (step, the items of that batch it owns) (see owner)."""

    def __init__(self, pairs, batch_size, start, rank, world_size):
        self.pairs, self.batch_size, self.start, self.rank, self.world_size = (
            pairs, batch_size, start, rank, world_size)

    def __iter__(self):
        worker = get_worker_info()
        step = self.start
        while True:
            positions = batch_positions(step, self.batch_size, self.rank, self.world_size)
            mine = [p for p in positions if self.pairs.owner(p, worker.num_workers) == worker.id]
            yield step, [self.pairs[p] for p in mine]
            step += 1


def _as_is(share):
    return share


class PairBatches:
    """Endless batches of `pairs` from step `start_step` on; `.step` is the data position to save for resume.

    Each batch is collate's dict. With num_workers > 0, worker k's t-th output is its share of batch
    start_step + t (the DataLoader takes outputs from workers 0, 1, ..., K-1 in turn), and the shares are
    merged in position order: the same batches as num_workers=0. Image failures and I/O met by the
    workers are added to pairs.stats here, in the main process."""

    def __init__(self, pairs: PreferencePairs, batch_size, start_step=0, rank=0, world_size=1, num_workers=0):
        self.pairs, self.batch_size, self.step = pairs, batch_size, start_step
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers

    def positions(self, step: int) -> list[int]:
        return batch_positions(step, self.batch_size, self.rank, self.world_size)

    def _item_lists(self):
        if self.num_workers == 0:
            step = self.step
            while True:
                yield [self.pairs[p] for p in self.positions(step)]
                step += 1
        start = self.step
        share = _WorkerShare(self.pairs, self.batch_size, start, self.rank, self.world_size)
        # each worker decodes ~B/K items per share: ask for enough shares ahead to keep all K busy
        prefetch = max(2, math.ceil(4 * self.num_workers / self.batch_size))
        loader = DataLoader(share, batch_size=None, collate_fn=_as_is, num_workers=self.num_workers,
                            prefetch_factor=prefetch)
        shares = []
        for t, (step, items) in enumerate(loader):
            assert step == start + t // self.num_workers, "DataLoader workers out of turn"
            shares.append(items)
            if len(shares) == self.num_workers:
                yield sorted(chain(*shares), key=lambda item: item["position"])
                shares = []

    def __iter__(self):
        for items in self._item_lists():
            batch = collate(items)
            for kind, ref in batch["failures"]:
                getattr(self.pairs.stats, kind).add(ref)
            self.pairs.stats.bytes_read += batch["bytes_read"]
            self.pairs.stats.image_bytes += batch["image_bytes"]
            self.step += 1
            yield batch


def _reward_device(reward_fn, default="cpu"):
    parameter = next(reward_fn.parameters(), None) if isinstance(reward_fn, torch.nn.Module) else None
    return parameter.device if parameter is not None else torch.device(default)


@torch.no_grad()
def relabel_with_reward(batch: dict, reward_fn) -> tuple[dict, int]:
    """AI feedback, online as the official --choice_model: in each pair the image with the higher
    reward_fn(images [B,3,H,W] in [0,1], captions) becomes the winner; the human label is ignored (equal
    scores keep the current order). Scored with the original captions (before prompt dropout).
    -> (batch with winners first, number of pairs whose winner changed)."""
    device = _reward_device(reward_fn, batch["pixels_w"].device)
    captions = batch.get("captions", batch["prompts"])
    score_w = reward_fn(((batch["pixels_w"] + 1) / 2).to(device), captions).float().cpu()
    score_l = reward_fn(((batch["pixels_l"] + 1) / 2).to(device), captions).float().cpu()
    swap = (score_l > score_w).view(-1, 1, 1, 1)
    pixels_w = torch.where(swap, batch["pixels_l"], batch["pixels_w"])
    pixels_l = torch.where(swap, batch["pixels_w"], batch["pixels_l"])
    return {**batch, "pixels_w": pixels_w, "pixels_l": pixels_l}, int(swap.sum())


@torch.no_grad()
def relabel_dataset(pairs: PreferencePairs, reward_fn, batch_size=8, progress=True) -> int:
    """AI feedback, offline: re-rank every pair of `pairs` once (deviation 3); winner = the higher
    reward_fn(images in [0,1], captions), equal scores: jpg_0 (official). Images are center-cropped at the
    dataset resolution, not flipped. Returns the number of pairs whose winner changed; unreadable pairs
    keep their label (they are skipped in training anyway)."""
    device = _reward_device(reward_fn)
    changed = 0
    for start in tqdm(range(0, len(pairs.rows), batch_size), desc="relabel", disable=not progress):
        rows, images_0, images_1 = [], [], []
        for row in range(start, min(start + batch_size, len(pairs.rows))):
            caption, ref_0, ref_1, winner = pairs.rows[row]
            try:
                image_0, image_1 = pairs.load_image(ref_0), pairs.load_image(ref_1)
            except UnreadableImage as error:
                getattr(pairs.stats, error.kind).add(error.ref)
                continue
            rows.append(row)
            images_0.append((preprocess(image_0, pairs.resolution, None) + 1) / 2)
            images_1.append((preprocess(image_1, pairs.resolution, None) + 1) / 2)
        if not rows:
            continue
        captions = [pairs.rows[row][0] for row in rows]
        scores_0 = reward_fn(torch.stack(images_0).to(device), captions).float().cpu()
        scores_1 = reward_fn(torch.stack(images_1).to(device), captions).float().cpu()
        for row, score_0, score_1 in zip(rows, scores_0.tolist(), scores_1.tolist()):
            caption, ref_0, ref_1, winner = pairs.rows[row]
            new_winner = 1 if score_1 > score_0 else 0
            changed += new_winner != winner
            pairs.rows[row] = (caption, ref_0, ref_1, new_winner)
    pairs.stats.relabelled += changed
    return changed


def write_pairs_jsonl(folder, captions, images_0, images_1, labels_0=None, image_format="png") -> Path:
    """Write a pairs.jsonl dataset: images (PIL, or [3,H,W] tensors in [0, 1]) to folder/images/, one line per
    pair. labels_0 defaults to 1 (jpg_0 preferred). Returns the path of pairs.jsonl."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    labels_0 = [1] * len(captions) if labels_0 is None else labels_0
    if not len(captions) == len(images_0) == len(images_1) == len(labels_0):
        raise ValueError("captions, images_0, images_1 and labels_0 must have the same length")
    lines = []
    for i, (caption, image_0, image_1, label) in enumerate(zip(captions, images_0, images_1, labels_0)):
        record = {"caption": caption, "label_0": label}
        for side, image in (("jpg_0", image_0), ("jpg_1", image_1)):
            image = _to_pil(image) if isinstance(image, torch.Tensor) else image
            relative = f"images/{i:06d}_{side[-1]}.{image_format}"
            image.save(folder / relative)
            record[side] = relative
        lines.append(json.dumps(record))
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


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
    labels alternating 1/0.
    The images are drawn from `distinct_images` synthetic JPEGs of sizes[0]..sizes[1] px (synthetic_jpegs).
    Returns the shard paths (folder/train-00000-of-NNNNN.parquet ...)."""
    pa, pq = _import_pyarrow()
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
                                pa.binary()) for side, column in enumerate(IMAGE_COLUMNS)},
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


def inspect(path, pairs=1000, workers=0, resolution=512, full=False, window=4, batch_size=8, seed=0,
            progress=True) -> dict:
    """What `python data.py inspect` prints, as a dict: counts, throughput of the training transform over the
    first `pairs` positions of the training order (full: one whole epoch) and read amplification. The
    parquet order reads whole row groups, ties included: over an epoch the amplification is about
    rows / usable pairs (1.14 with Pick-a-Pic's 12% ties) plus the parquet page headers."""
    dataset = PreferencePairs(path, resolution, seed=seed, window=window)
    stats = dataset.stats
    total = len(dataset) if full else min(pairs, len(dataset))
    batch_size = max(b for b in range(1, batch_size + 1) if total % b == 0)  # positions 0..total-1 exactly
    steps = total // batch_size
    served = 0
    bar = tqdm(total=steps * batch_size, desc="inspect", unit="pair", disable=not progress)
    start = time.perf_counter()
    for _, batch in zip(range(steps), PairBatches(dataset, batch_size, num_workers=workers)):
        served += len(batch["positions"])
        bar.update(len(batch["positions"]))
    seconds = time.perf_counter() - start
    bar.close()
    return dict(path=str(path), row_groups=len(dataset.groups), rows=stats.rows, pairs=len(dataset),
                ties=stats.ties, malformed=stats.malformed, missing=len(stats.missing),
                corrupt=len(stats.corrupt), null=len(stats.null), scanned=served, workers=workers,
                resolution=resolution, window=window, pairs_per_s=served / seconds,
                bytes_read_per_pair=stats.bytes_read / served,
                image_bytes_per_pair=stats.image_bytes / served,
                read_amplification=stats.bytes_read / max(stats.image_bytes, 1))


def _print_inspection(report: dict):
    r = argparse.Namespace(**report)
    scope = "one whole epoch" if r.scanned >= r.pairs else f"the first {r.scanned}"
    print(f"{r.path}: {r.rows} rows" + (f" in {r.row_groups} row groups" if r.row_groups else ""))
    print(f"  pairs: {r.pairs} usable; dropped: {r.ties} ties, {r.malformed} malformed rows, "
          f"{r.missing} pairs with a missing image file")
    print(f"  scanned {r.scanned} pairs ({scope} of the training order): {r.corrupt} corrupt and {r.null} "
          f"null images (their pairs are replaced in training)")
    where = f"{r.pairs_per_s / r.workers:.1f} per worker" if r.workers else "in the main process"
    print(f"  throughput of the training transform at {r.resolution} px: {r.pairs_per_s:.1f} pairs/s "
          f"with {r.workers} worker(s) ({where})")
    window = f" (shuffle window: {r.window} row groups)" if r.row_groups else ""
    if r.row_groups and r.window and r.scanned < r.pairs and r.scanned < r.window * r.pairs / r.row_groups:
        window += "; a scan shorter than one window overstates it: the window's groups are read in full"
    print(f"  read {r.bytes_read_per_pair / 1e3:.0f} kB per pair for {r.image_bytes_per_pair / 1e3:.0f} "
          f"kB of the pairs' own images: read amplification {r.read_amplification:.2f}x{window}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("inspect", help="count bad rows and measure the loader before a long run")
    check.add_argument("path", help="pairs.jsonl folder, .parquet file or folder of .parquet shards")
    check.add_argument("--pairs", type=int, default=1000, help="pairs to scan (default 1000)")
    check.add_argument("--full", action="store_true", help="scan one whole epoch")
    check.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    check.add_argument("--resolution", type=int, default=512)
    check.add_argument("--window", type=int, default=4, help="row groups per shuffle window (parquet)")
    check.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args(argv)
    for name in ("pairs", "resolution", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: must be >= 1")
    if args.workers < 0 or args.window < 0:
        parser.error("--workers and --window must be >= 0")
    try:
        report = inspect(args.path, args.pairs, args.workers, args.resolution, args.full, args.window,
                         args.batch_size)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"data.py inspect: {error}\n")
    _print_inspection(report)


if __name__ == "__main__":
    main()
