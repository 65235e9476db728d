"""Preference data: ties, malformed rows, a missing file and a corrupt JPEG are counted and skipped;
winner first; the parquet path; the official transforms (torchvision's resize rounding); resumable
(and DDP-sharded) order for pairs.jsonl and parquet; parquet's windowed order reads each row group
once per epoch, split between DataLoader workers by row group; `data.py inspect`; the validation
split; AI relabelling."""

import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import pair_files
from bench.bench_data import synthetic_jpegs, write_synthetic_pick_a_pic


def solid(value, size=(24, 16)):
    """A flat grey PIL image (value in [0, 255]) with one bright pixel column so flips are
    visible."""
    image = Image.new("RGB", size, (value, value, value))
    for y in range(size[1]):
        image.putpixel((1, y), (255, 0, 0))
    return image


def brightness_of(pixels):
    """Mean value of each uint8 image [B,3,H,W] -> [B]."""
    return pixels.float().mean(dim=(1, 2, 3))


def jpeg_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture()
def pairs_folder(tmp_path):
    """2 good pairs (bright image preferred), then a tie, a corrupt JPEG, a missing file, a
    malformed row."""
    path = pair_files.write_pairs_jsonl(
        tmp_path, ["sun", "day"], [solid(230), solid(20)], [solid(20), solid(230)], labels_0=[1, 0]
    )  # pair 2: jpg_1 (bright) preferred
    (tmp_path / "corrupt.jpg").write_bytes(jpeg_bytes(solid(200))[:300])  # truncated JPEG
    extra = [
        {
            "caption": "tie",
            "jpg_0": "images/000000_0.png",
            "jpg_1": "images/000000_1.png",
            "label_0": 0.5,
        },
        {
            "caption": "corrupt",
            "jpg_0": "corrupt.jpg",
            "jpg_1": "images/000000_1.png",
            "label_0": 1,
        },
        {
            "caption": "missing",
            "jpg_0": "images/nope.png",
            "jpg_1": "images/000000_1.png",
            "label_0": 1,
        },
        {
            "caption": "bad",
            "jpg_0": "images/000000_0.png",
            "jpg_1": "images/000000_1.png",
            "label_0": 2,
        },
    ]
    with open(path, "a") as file:
        file.write("\n".join(json.dumps(row) for row in extra) + "\n")
    return tmp_path


def test_ties_corrupt_and_missing_are_counted_and_skipped(pairs_folder):
    pairs = data.PreferencePairs(pairs_folder, resolution=8, prompt_dropout=0.0)
    stats = pairs.stats
    assert (stats.rows, stats.ties, stats.malformed, len(stats.missing)) == (6, 1, 1, 1)
    assert len(pairs) == 3  # sun, day and the corrupt one (found when read)
    batches = data.PairBatches(pairs, batch_size=3)
    seen = []
    for _, batch in zip(range(4), batches):  # 12 positions = 4 epochs, no crash
        assert batch["pixels_w"].shape == (3, 3, 8, 8)
        seen += batch["prompts"]
        assert batch["pixels_w"].dtype == torch.uint8  # scaled on the device (dpo.model_pixels)
        assert (
            brightness_of(batch["pixels_w"]) > brightness_of(batch["pixels_l"])
        ).all()  # winner first
    assert set(seen) == {"sun", "day"} and batches.step == 4
    assert len(stats.corrupt) == 1 and next(iter(stats.corrupt)).endswith("corrupt.jpg")
    summary = str(stats)
    assert (
        "1 ties dropped" in summary and "1 missing, 1 corrupt and 0 null images skipped" in summary
    )


def test_preprocess_matches_the_official_recipe():
    # 64x16, white in x = 16..48, black elsewhere. Resize shorter side to 8 -> 32x8 (white 8..24),
    # center crop x = 12..20: all white; a random crop can reach the black sides.
    image = Image.new("RGB", (64, 16), (0, 0, 0))
    image.paste((255, 255, 255), (16, 0, 48, 16))
    center = data.preprocess(image, 8, rng=None)
    assert center.shape == (3, 8, 8) and center.dtype == torch.uint8
    assert torch.equal(center, torch.full_like(center, 255))
    crops = [
        data.preprocess(image, 8, random.Random(i), random_crop=True, hflip=False)
        for i in range(20)
    ]
    assert any(crop.min() == 0 for crop in crops)


def test_uint8_pixels_scale_on_the_device_bit_for_bit_as_the_former_loader():
    """dpo.model_pixels(preprocess(image)) equals the former float recipe, ToTensor then
    Normalize(0.5)."""
    import dpo

    image = Image.fromarray(torch.randint(0, 256, (20, 28, 3), dtype=torch.uint8).numpy())
    pixels = data.preprocess(image, 16, rng=None)
    resized = image.resize((22, 16), Image.BILINEAR).crop((3, 0, 19, 16))  # what preprocess does
    former = (
        torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1) * 2 - 1
    )
    assert torch.equal(dpo.model_pixels(pixels[None], "cpu")[0], former)


def test_flips_are_independent_for_winner_and_loser(tmp_path):
    image = Image.new("RGB", (16, 16), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 4, 16))  # white left edge: a flip moves it to the right
    pair_files.write_pairs_jsonl(
        tmp_path, ["x"], [image], [image]
    )  # winner and loser are the same picture
    pairs = data.PreferencePairs(tmp_path, resolution=8, prompt_dropout=0.0)
    items = [pairs[p] for p in range(40)]
    same = [torch.equal(item["pixels_w"], item["pixels_l"]) for item in items]
    assert 5 < sum(same) < 35  # flipped independently: sometimes equal, sometimes mirrored
    no_flip = data.PreferencePairs(tmp_path, resolution=8, hflip=False, prompt_dropout=0.0)
    assert all(torch.equal(no_flip[p]["pixels_w"], no_flip[p]["pixels_l"]) for p in range(10))


def test_empty_prompt_dropout_rate(pairs_folder):
    pairs = data.PreferencePairs(pairs_folder, resolution=8)  # default 20%
    prompts = [pairs[p]["prompt"] for p in range(400)]
    assert 0.13 < prompts.count("") / 400 < 0.27


@pytest.fixture()
def synthetic_shards(tmp_path):
    """Pick-a-Pic-like parquet: 2 shards, 80 rows in row groups of 10 (8 ties), 16..24 px JPEGs."""
    write_synthetic_pick_a_pic(
        tmp_path / "shards",
        80,
        rows_per_group=10,
        rows_per_shard=40,
        sizes=(16, 24),
        distinct_images=8,
    )
    return tmp_path / "shards"


@pytest.fixture(params=["jsonl", "parquet"])
def stream_source(request, pairs_folder, synthetic_shards):
    return pairs_folder if request.param == "jsonl" else synthetic_shards


def first_batches(pairs, count, *args, **kwargs):
    """The first `count` batches of data.PairBatches(pairs, *args, **kwargs)."""
    return [batch for _, batch in zip(range(count), data.PairBatches(pairs, *args, **kwargs))]


def assert_same_batches(batches, expected):
    for batch, wanted in zip(batches, expected, strict=True):
        assert batch["positions"] == wanted["positions"] and batch["prompts"] == wanted["prompts"]
        assert torch.equal(batch["rows"], wanted["rows"])
        assert torch.equal(batch["pixels_w"], wanted["pixels_w"])
        assert torch.equal(batch["pixels_l"], wanted["pixels_l"])


def test_a_resumed_stream_continues_exactly(stream_source):
    """The data half of train.py's resume test, for both sources: from start_sample on, a fresh
    process state with worker processes serves the batches of the uninterrupted run."""
    pairs = data.PreferencePairs(stream_source, resolution=8, seed=3, window=2)
    run = first_batches(pairs, 5, batch_size=2)
    assert [p for batch in run for p in batch["positions"]] == list(range(10))
    fresh = data.PreferencePairs(stream_source, resolution=8, seed=3, window=2)
    resumed = data.PairBatches(fresh, 2, start_sample=6, num_workers=2)
    assert_same_batches([batch for _, batch in zip(range(2), resumed)], run[3:])
    assert resumed.step == 2
    rows = torch.cat([batch["rows"] for batch in run])
    assert (
        sorted(rows[:4].tolist()) != rows[:4].tolist()
        or sorted(rows[4:8].tolist()) != rows[4:8].tolist()
    )


def test_jsonl_ranks_share_one_big_batch(pairs_folder):
    """pairs.jsonl keeps global positions: 2 ranks x batch 2 = 1 process x batch 4 (train.py's
    DDP test)."""
    pairs = data.PreferencePairs(pairs_folder, resolution=8, seed=3)
    big = first_batches(pairs, 2, batch_size=4)[1]
    halves = [first_batches(pairs, 2, 2, rank=rank, world_size=2)[1] for rank in (0, 1)]
    assert torch.equal(torch.cat([half["pixels_w"] for half in halves]), big["pixels_w"])
    assert halves[0]["prompts"] + halves[1]["prompts"] == big["prompts"]
    assert halves[0]["positions"] + halves[1]["positions"] == big["positions"] == [4, 5, 6, 7]


def test_batch_positions_after_start_sample_continue_with_another_batch_size():
    """8 samples consumed at batch 4; batch 2 continues at [8, 9], [10, 11]; on 2 ranks,
    interleaved."""
    assert [data.batch_positions(step, 4) for step in (0, 1)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [data.batch_positions(step, 2, start_sample=8) for step in (0, 1)] == [[8, 9], [10, 11]]
    assert data.batch_positions(1, 2, rank=1, world_size=2, start_sample=8) == [14, 15]


def test_a_resume_with_another_batch_size_serves_the_next_samples(stream_source):
    """After 8 samples at batch 4, batch 2 serves the items that batch 4 would have served next."""
    pairs = data.PreferencePairs(stream_source, resolution=8, seed=3, window=2)
    expected = first_batches(pairs, 3, batch_size=4)[2]
    resumed = first_batches(pairs, 2, 2, start_sample=8)
    assert [p for batch in resumed for p in batch["positions"]] == expected["positions"]
    assert torch.equal(torch.cat([batch["pixels_l"] for batch in resumed]), expected["pixels_l"])


def test_ranks_read_disjoint_row_groups_covering_an_epoch(synthetic_shards, monkeypatch):
    """Issue 19.4: over an epoch, each parquet row group is read by exactly one of 2 ranks, once."""
    reads = {0: [], 1: []}
    original = data.PreferencePairs._read_group

    def logged(self, group):
        reads[rank].append(group)
        return original(self, group)

    monkeypatch.setattr(data.PreferencePairs, "_read_group", logged)
    for rank in (0, 1):
        pairs = data.PreferencePairs(
            synthetic_shards, resolution=8, window=2
        )  # 8 groups of 9 pairs
        first_batches(pairs, 9, 4, rank=rank, world_size=2)  # 2 x 9 x 4 = 72 positions: one epoch
    assert len(reads[0]) == len(set(reads[0])) and len(reads[1]) == len(set(reads[1]))
    assert not set(reads[0]) & set(reads[1]) and sorted(reads[0] + reads[1]) == list(range(8))


def test_parquet_ranks_resume_exactly_on_the_same_world_size(synthetic_shards):
    """A rank's stream continues exactly from start_sample (global: both ranks' samples), any
    batch size."""
    pairs = data.PreferencePairs(synthetic_shards, resolution=8, seed=2)
    run = first_batches(pairs, 3, 4, rank=1, world_size=2)
    resumed = first_batches(pairs, 2, 2, start_sample=2 * 8, rank=1, world_size=2)
    assert [p for batch in resumed for p in batch["positions"]] == run[2]["positions"]
    assert torch.equal(torch.cat([batch["pixels_w"] for batch in resumed]), run[2]["pixels_w"])


def test_parquet_ranks_key_their_items_apart(synthetic_shards):
    """Two ranks' items never share a key (the augmentation RNG's and dpo's noise key)."""
    pairs = data.PreferencePairs(synthetic_shards, resolution=8)
    keys = [first_batches(pairs, 1, 4, rank=rank, world_size=2)[0]["positions"] for rank in (0, 1)]
    assert keys == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_parquet_ranks_with_unequal_shares_serve_equally_many_batches(synthetic_shards):
    """3 ranks own 27, 27 and 18 pairs; each serves a batch every step, past its epoch (no hang)."""
    pairs = data.PreferencePairs(synthetic_shards, resolution=8)
    counts = [len(first_batches(pairs, 10, 4, rank=rank, world_size=3)) for rank in range(3)]
    assert counts == [10, 10, 10]


def test_resume_problem_accepts_the_same_stream(stream_source):
    pairs = data.PreferencePairs(stream_source, resolution=8, seed=3)
    saved = json.loads(json.dumps(pairs.identity(world_size=2)))  # as stored in a checkpoint
    assert data.resume_problem(saved, data.PreferencePairs(stream_source, 16, seed=3), 2) is None


def test_resume_problem_names_another_seed(stream_source):
    pairs = data.PreferencePairs(stream_source, resolution=8, seed=3)
    reseeded = data.PreferencePairs(stream_source, resolution=8, seed=4)
    problem = data.resume_problem(pairs.identity(), reseeded, 1)
    assert "seed" in problem and "\n" not in problem


def test_resume_problem_names_other_pairs(stream_source):
    """Another --val_pairs holds out other rows: the training stream changed."""
    pairs = data.PreferencePairs(stream_source, resolution=8, seed=3)
    train, _ = pairs.split_validation(1)
    assert "pairs" in data.resume_problem(pairs.identity(), train, 1)


def test_resume_problem_refuses_parquet_on_another_world_size(synthetic_shards, pairs_folder):
    pairs = data.PreferencePairs(synthetic_shards, resolution=8)
    problem = data.resume_problem(pairs.identity(world_size=4), pairs, 2)
    assert "4" in problem and "2" in problem and "\n" not in problem
    jsonl = data.PreferencePairs(pairs_folder, resolution=8)
    assert data.resume_problem(jsonl.identity(world_size=4), jsonl, 2) is None  # global positions


def test_parquet_order_reads_each_row_group_once_per_epoch(synthetic_shards, monkeypatch):
    pairs = data.PreferencePairs(synthetic_shards, resolution=8, window=3)
    assert (len(pairs), pairs.stats.ties, len(pairs.groups)) == (72, 8, 8)
    group_of = {row: ref[0] for row, (_, ref, _, _) in enumerate(pairs.rows)}
    for epoch in (0, 1):
        rows, slots = pairs.order(epoch)
        assert sorted(rows.tolist()) == list(range(72))  # every pair once per epoch
        for group in range(
            8
        ):  # a group's 9 rows land within one window of 3 groups (<= 27 positions)
            where = [i for i, row in enumerate(rows) if group_of[int(row)] == group]
            assert (
                len(where) == 9
                and where[-1] - where[0] < 27
                and len(set(slots[where].tolist())) == 1
            )
    assert not (pairs.order(0)[0] == pairs.order(1)[0]).all()

    reads = []
    original = data.PreferencePairs._read_group
    monkeypatch.setattr(
        data.PreferencePairs,
        "_read_group",
        lambda self, group: reads.append(group) or original(self, group),
    )
    batches = iter(data.PairBatches(pairs, batch_size=4))
    assert len(list(zip(range(18), batches))) == 18  # one epoch
    assert sorted(reads) == list(range(8))  # once
    assert (
        len(list(zip(range(18), batches))) == 18
    )  # a second epoch: a group of the last window that is also
    assert (
        sorted(set(reads)) == list(range(8)) and 14 <= len(reads) <= 16
    )  # in the next one can stay cached
    stats = pairs.stats
    assert (
        stats.bytes_read / stats.image_bytes < 1.2
    )  # the image columns' own bytes (+ parquet headers)

    full = data.PreferencePairs(
        synthetic_shards, resolution=8, window=0
    )  # the old order: a full shuffle
    reads.clear()
    assert len(list(zip(range(18), data.PairBatches(full, batch_size=4)))) == 18
    assert len(reads) > 40 and full.stats.bytes_read / full.stats.image_bytes > 4


def test_workers_split_the_work_by_row_group(synthetic_shards, tmp_path, monkeypatch):
    """Two DataLoader workers never read the same row group, and give the batches of the main
    process."""
    log = tmp_path / "reads.txt"
    original = data.PreferencePairs._read_group

    def logged(self, group):  # runs in the forked workers: append "pid group" to a file
        with open(log, "a") as file:
            file.write(f"{os.getpid()} {group}\n")
        return original(self, group)

    monkeypatch.setattr(data.PreferencePairs, "_read_group", logged)
    pairs = data.PreferencePairs(synthetic_shards, resolution=8, window=4)
    in_process = [
        b for _, b in zip(range(14), data.PairBatches(pairs, batch_size=4))
    ]  # 56 of 72 positions
    log.write_text("")
    fresh = data.PreferencePairs(
        synthetic_shards, resolution=8, window=4
    )  # forked workers copy the caches
    with_workers = [
        b for _, b in zip(range(14), data.PairBatches(fresh, batch_size=4, num_workers=2))
    ]
    for expected, batch in zip(in_process, with_workers):
        assert (
            batch["positions"] == expected["positions"] and batch["prompts"] == expected["prompts"]
        )
        assert torch.equal(batch["pixels_w"], expected["pixels_w"])
    reads = [
        tuple(map(int, line.split())) for line in log.read_text().splitlines()
    ]  # prefetch: in epoch 0
    served = {pairs.rows[row][1][0] for batch in in_process for row in batch["rows"].tolist()}
    assert len({group for _, group in reads}) == len(reads) and served <= {
        group for _, group in reads
    }
    assert len({pid for pid, _ in reads}) == 2 and os.getpid() not in {pid for pid, _ in reads}


def test_inspect_counts_ties_corrupt_and_null_cells(tmp_path, capsys):
    import pyarrow as pa  # a dev requirement; the library imports it lazily
    import pyarrow.parquet as pq

    good = synthetic_jpegs(2, sizes=(20, 28))
    table = pa.table(
        {
            "caption": ["a", "tie", "corrupt", "null", "b", "c"],
            "jpg_0": [good[0], good[0], good[0][:200], None, good[1], good[0]],
            "jpg_1": [good[1], good[1], good[1], good[1], good[0], good[1]],
            "label_0": [1.0, 0.5, 1.0, 0.0, 0.0, 1.0],
        }
    )
    pq.write_table(table, tmp_path / "train-0.parquet", row_group_size=3)
    data.main(
        ["inspect", str(tmp_path), "--pairs", "0", "--resolution", "16"]
    )  # 0: one whole epoch
    out = capsys.readouterr().out
    assert (
        "5 usable pairs in 2 row groups; scanned 5" in out and "6 rows read: 1 ties dropped" in out
    )
    assert "0 missing, 1 corrupt and 1 null images" in out and "pairs/s" in out
    assert "read amplification" in out
    with pytest.raises(pair_files.DataError, match="no such file"):
        data.main(["inspect", str(tmp_path / "nope")])


def test_validation_split_is_fixed_held_out_and_unaugmented(stream_source):
    pairs = data.PreferencePairs(
        stream_source, resolution=8, seed=1, random_crop=True, prompt_dropout=0.5
    )
    n = 1 if len(pairs) < 10 else 12
    train, val = pairs.split_validation(n)
    assert len(val) == n and len(train) == len(pairs) - n
    assert not {row[1] for row in train.rows} & {row[1] for row in val.rows}  # never trained on
    assert [row[1] for row in pairs.split_validation(n)[1].rows] == [
        row[1] for row in val.rows
    ]  # fixed
    if val.groups:  # parquet: whole row groups (9 usable rows each) and a part of one more
        assert len({row[1][0] for row in val.rows}) == 2
    first, second = val.batches(5), val.batches(5)
    positions = [p for batch in first for p in batch["positions"]]
    assert positions == [data.VALIDATION_POSITIONS + i for i in range(len(positions))]
    for a, b in zip(first, second):  # deterministic: center crop, no flip, no prompt dropout
        assert (
            torch.equal(a["pixels_w"], b["pixels_w"])
            and a["prompts"] == a["captions"] == b["prompts"]
        )
    served = {
        train.rows[row][1]
        for _, batch in zip(range(20), data.PairBatches(train, 4))
        for row in batch["rows"].tolist()
    }
    assert served and not served & {row[1] for row in val.rows}
    with pytest.raises(ValueError, match="--val_pairs"):
        pairs.split_validation(len(pairs))


@pytest.mark.parametrize("size", [(392, 392), (784, 784), (1568, 1568), (392, 784), (1568, 784)])
def test_resize_rounds_like_torchvision(size):
    """Short side -> R exactly, long side int(R * long / short): no black row, random crop works."""
    white = Image.new("RGB", size, (255, 255, 255))
    center = data.preprocess(white, 512, rng=None)
    assert center.shape == (3, 512, 512) and torch.equal(center, torch.full_like(center, 255))
    crop = data.preprocess(white, 512, random.Random(0), random_crop=True)
    assert crop.shape == (3, 512, 512) and torch.equal(crop, torch.full_like(crop, 255))


def test_pick_a_pic_parquet_shards(tmp_path):
    import pyarrow as pa  # a dev requirement; the library imports it lazily
    import pyarrow.parquet as pq

    bright, dark = jpeg_bytes(solid(230)), jpeg_bytes(solid(20))
    table = pa.table(
        {
            "caption": ["a", "b", "tie", "broken", "c"],
            "jpg_0": [bright, dark, bright, b"not a jpeg", dark],
            "jpg_1": [dark, bright, dark, dark, bright],
            "label_0": [1.0, 0.0, 0.5, 1.0, 0.0],
            "model_0": ["m"] * 5,  # extra Pick-a-Pic columns are ignored
        }
    )
    pq.write_table(table.slice(0, 3), tmp_path / "train-0.parquet", row_group_size=2)
    pq.write_table(table.slice(3), tmp_path / "train-1.parquet", row_group_size=1)
    pairs = data.PreferencePairs(tmp_path, resolution=8, prompt_dropout=0.0)
    assert pairs.stats.ties == 1 and len(pairs) == 4
    prompts = []
    for _, batch in zip(range(2), data.PairBatches(pairs, batch_size=4)):
        prompts += batch["prompts"]
        assert (brightness_of(batch["pixels_w"]) > brightness_of(batch["pixels_l"])).all()
    assert set(prompts) == {"a", "b", "c"} and len(pairs.stats.corrupt) == 1


def brightness(images, prompts):
    """A simple reward: mean pixel value; also checks the reward interface."""
    assert images.min() >= 0 and images.max() <= 1 and len(prompts) == images.shape[0]
    assert all(prompts)  # scored with the captions, not the dropped-out prompts
    return images.mean(dim=(1, 2, 3))


def test_ai_feedback_relabelling_flips_pairs(tmp_path):
    # human labels: pair p0 prefers the bright image, p1 and p2 the dark one
    pair_files.write_pairs_jsonl(
        tmp_path,
        ["p0", "p1", "p2"],
        [solid(230), solid(230), solid(20)],
        [solid(20), solid(20), solid(230)],
        labels_0=[1, 0, 1],
    )
    pairs = data.PreferencePairs(tmp_path, resolution=8, prompt_dropout=0.5)
    batch = next(iter(data.PairBatches(pairs, batch_size=3)))
    human = (brightness_of(batch["pixels_w"]) > brightness_of(batch["pixels_l"])).tolist()
    relabelled, count = data.relabel_with_reward(
        batch, brightness
    )  # online, as the official --choice_model
    assert count == human.count(False) == 2
    assert (brightness_of(relabelled["pixels_w"]) > brightness_of(relabelled["pixels_l"])).all()
    assert relabelled["prompts"] == batch["prompts"]
    darkness = lambda images, prompts: -brightness(images, prompts)
    assert data.relabel_with_reward(relabelled, darkness)[1] == 3  # now every pair flips


def test_write_pairs_jsonl_accepts_tensors(tmp_path):
    image = torch.rand(3, 8, 8)
    path = pair_files.write_pairs_jsonl(tmp_path, ["t"], [image], [1 - image])
    record = json.loads(path.read_text())
    assert record["label_0"] == 1 and (tmp_path / record["jpg_0"]).is_file()


def image_cell(jpeg=None, path=None):
    """A `datasets` Image cell: the struct {bytes, path}."""
    return {"bytes": jpeg, "path": path}


@pytest.fixture()
def datasets_layout(tmp_path):
    """A binarized preference set as the hub's `datasets` writes it: prompt, chosen, rejected
    (winner first, no label), images as {bytes, path}; row 1's chosen image is a file beside the
    parquet, row 2's is null."""
    import pyarrow as pa  # a dev requirement; the library imports it lazily
    import pyarrow.parquet as pq

    bright = jpeg_bytes(solid(230))
    dark = jpeg_bytes(solid(20))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "bright.jpg").write_bytes(bright)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "prompt": ["a", "b", "null", "c"],
            "chosen": pa.array(
                [
                    image_cell(bright),
                    image_cell(None, "images/bright.jpg"),
                    None,
                    image_cell(bright, "ignored.jpg"),
                ],
                image,
            ),
            "rejected": pa.array([image_cell(dark)] * 4, image),
        }
    )
    pq.write_table(table, tmp_path / "train-0.parquet", row_group_size=2)
    return tmp_path


DATASETS_COLUMNS = "caption=prompt,jpg_0=chosen,jpg_1=rejected"


def test_inspect_maps_the_columns_of_a_datasets_layout(datasets_layout, capsys):
    data.main(
        [
            "inspect",
            str(datasets_layout),
            "--data_columns",
            DATASETS_COLUMNS,
            "--pairs",
            "0",
            "--resolution",
            "8",
        ]
    )
    out = capsys.readouterr().out
    assert "4 usable pairs in 2 row groups; scanned 4" in out
    assert "0 missing, 0 corrupt and 1 null images" in out


def test_without_label_0_the_mapped_jpg_0_is_preferred(datasets_layout):
    """chosen (bright) comes first, read from bytes or from a path relative to the parquet file."""
    columns = pair_files.parse_columns(DATASETS_COLUMNS)
    pairs = data.PreferencePairs(datasets_layout, resolution=8, prompt_dropout=0.0, columns=columns)
    (served,) = pairs.batches(4)
    assert served["captions"] == ["a", "b", "c"]  # the null image's pair is skipped
    assert (brightness_of(served["pixels_w"]) > brightness_of(served["pixels_l"])).all()


def test_parse_columns():
    assert pair_files.parse_columns("") == {}
    assert pair_files.parse_columns("caption=prompt, jpg_0=chosen") == {
        "caption": "prompt",
        "jpg_0": "chosen",
    }


@pytest.mark.parametrize("text", ["caption", "caption=", "winner=chosen"])
def test_parse_columns_refuses_bad_syntax_in_one_line(text):
    with pytest.raises(pair_files.DataError, match="--data_columns") as error:
        pair_files.parse_columns(text)
    assert "\n" not in str(error.value)


def bad_data(kind, tmp_path, monkeypatch):
    """(path, columns) of a bad input of the given kind, and the words its error must contain."""
    if kind == "no such path":
        return tmp_path / "nope", {}, "no such file"
    if kind == "empty folder":
        return tmp_path, {}, "no pairs.jsonl"
    if kind == "text file":
        (tmp_path / "notes.txt").write_text("hello\n")
        return tmp_path / "notes.txt", {}, "not a pairs.jsonl"
    if kind == "fake parquet":
        (tmp_path / "train.parquet").write_text("hello\n" * 20)
        return tmp_path / "train.parquet", {}, "not a readable parquet file"
    if kind == "no usable pairs":
        pair_files.write_pairs_jsonl(tmp_path, ["tie"], [solid(10)], [solid(20)], labels_0=[0.5])
        return tmp_path, {}, "no usable pairs"
    write_synthetic_pick_a_pic(tmp_path, 4, sizes=(16, 16), distinct_images=1)
    if kind == "missing column":
        return tmp_path, {"caption": "prompt"}, "no column 'prompt'; its columns: caption, jpg_0"
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import pyarrow.parquet fails
    return tmp_path, {}, "pip install pyarrow"


BAD_DATA = [
    "no such path",
    "empty folder",
    "text file",
    "fake parquet",
    "no usable pairs",
    "missing column",
    "no pyarrow",
]


@pytest.mark.parametrize("kind", BAD_DATA)
def test_check_data_refuses_bad_data_in_one_line(kind, tmp_path, monkeypatch):
    path, columns, words = bad_data(kind, tmp_path, monkeypatch)
    with pytest.raises(pair_files.DataError) as error:
        data.check_data(str(path), columns)
    assert words in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("kind", BAD_DATA)
def test_inspect_refuses_bad_data_in_one_line(kind, tmp_path, monkeypatch):
    path, columns, words = bad_data(kind, tmp_path, monkeypatch)
    mapping = ",".join(f"{key}={column}" for key, column in columns.items())
    with pytest.raises(pair_files.DataError) as error:
        data.main(["inspect", str(path), "--data_columns", mapping])
    assert words in str(error.value) and "\n" not in str(error.value)


def test_the_inspect_command_answers_a_fake_parquet_in_one_line(tmp_path):
    """Formerly a 20-line ArrowInvalid traceback."""
    (tmp_path / "train.parquet").write_text("hello\n" * 20)
    result = subprocess.run(
        [sys.executable, "data.py", "inspect", str(tmp_path), "--num-workers=0"],
        capture_output=True,
        text=True,
        cwd=Path(data.__file__).parent,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert (
        result.stderr.startswith("data.py inspect: ") and "not a readable parquet" in result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1


def test_inspect_answers_an_unknown_flag_with_a_suggestion(pairs_folder):
    with pytest.raises(ValueError, match="did you mean --num_workers"):
        data.main(["inspect", str(pairs_folder), "--num_worker=2"])


def test_inspect_shows_the_split_over_ranks(synthetic_shards, capsys):
    data.main(
        ["inspect", str(synthetic_shards), "--pairs", "8", "--resolution", "8", "--world", "3"]
    )
    out = capsys.readouterr().out
    assert "rank 0 of 3: 3 row groups, 27 pairs per epoch" in out
    assert "rank 1 of 3: 3 row groups, 27 pairs" in out and "rank 2 of 3: 2 row groups, 18" in out


def test_check_data_counts_pairs_without_decoding(synthetic_shards, monkeypatch):
    monkeypatch.setattr(data.PreferencePairs, "_read_group", None)  # reading an image would fail
    assert data.check_data(str(synthetic_shards), {}) == 72


def test_the_validation_split_decodes_nothing(stream_source, monkeypatch):
    """Issue 19.5: ranks that do not validate split the data without decoding or holding images."""
    monkeypatch.setattr(data.PreferencePairs, "_load", None)  # reading an image would fail
    train, val = data.PreferencePairs(stream_source, resolution=8).split_validation(1)
    assert len(val) == 1 and len(train) >= 2
