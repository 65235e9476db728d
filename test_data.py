"""Preference data: ties, malformed rows, a missing file and a corrupt JPEG are counted and skipped; winner
first; the parquet path; the official transforms (torchvision's resize rounding); resumable (and DDP-sharded)
order for pairs.jsonl and parquet; parquet's windowed order reads each row group once per epoch, split
between DataLoader workers by row group; `data.py inspect`; the validation split; AI relabelling."""

import io
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

import data
from bench.bench_data import synthetic_jpegs, write_synthetic_pick_a_pic


def solid(value, size=(24, 16)):
    """A flat grey PIL image (value in [0, 255]) with one bright pixel column so flips are visible."""
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
    """2 good pairs (bright image preferred), then a tie, a corrupt JPEG, a missing file, a malformed row."""
    path = data.write_pairs_jsonl(tmp_path, ["sun", "day"], [solid(230), solid(20)], [solid(20), solid(230)],
                                  labels_0=[1, 0])  # pair 2: jpg_1 (bright) preferred
    (tmp_path / "corrupt.jpg").write_bytes(jpeg_bytes(solid(200))[:300])  # truncated JPEG
    extra = [
        {"caption": "tie", "jpg_0": "images/000000_0.png", "jpg_1": "images/000000_1.png", "label_0": 0.5},
        {"caption": "corrupt", "jpg_0": "corrupt.jpg", "jpg_1": "images/000000_1.png", "label_0": 1},
        {"caption": "missing", "jpg_0": "images/nope.png", "jpg_1": "images/000000_1.png", "label_0": 1},
        {"caption": "bad", "jpg_0": "images/000000_0.png", "jpg_1": "images/000000_1.png", "label_0": 2},
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
        assert (brightness_of(batch["pixels_w"]) > brightness_of(batch["pixels_l"])).all()  # winner first
    assert set(seen) == {"sun", "day"} and batches.step == 4
    assert len(stats.corrupt) == 1 and next(iter(stats.corrupt)).endswith("corrupt.jpg")
    summary = str(stats)
    assert "1 ties dropped" in summary and "1 missing, 1 corrupt and 0 null images skipped" in summary


def test_preprocess_matches_the_official_recipe():
    # 64x16, white in x = 16..48, black elsewhere. Resize shorter side to 8 -> 32x8 (white 8..24), center
    # crop x = 12..20: all white; a random crop can reach the black sides.
    image = Image.new("RGB", (64, 16), (0, 0, 0))
    image.paste((255, 255, 255), (16, 0, 48, 16))
    center = data.preprocess(image, 8, rng=None)
    assert center.shape == (3, 8, 8) and center.dtype == torch.uint8
    assert torch.equal(center, torch.full_like(center, 255))
    crops = [data.preprocess(image, 8, random.Random(i), random_crop=True, hflip=False) for i in range(20)]
    assert any(crop.min() == 0 for crop in crops)


def test_uint8_pixels_scale_on_the_device_bit_for_bit_as_the_former_loader():
    """dpo.model_pixels(preprocess(image)) equals the former float recipe, ToTensor then Normalize(0.5)."""
    import dpo

    image = Image.fromarray(torch.randint(0, 256, (20, 28, 3), dtype=torch.uint8).numpy())
    pixels = data.preprocess(image, 16, rng=None)
    resized = image.resize((22, 16), Image.BILINEAR).crop((3, 0, 19, 16))  # what preprocess does
    former = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1) * 2 - 1
    assert torch.equal(dpo.model_pixels(pixels[None], "cpu")[0], former)


def test_flips_are_independent_for_winner_and_loser(tmp_path):
    image = Image.new("RGB", (16, 16), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 4, 16))  # white left edge: a flip moves it to the right
    data.write_pairs_jsonl(tmp_path, ["x"], [image], [image])  # winner and loser are the same picture
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
    write_synthetic_pick_a_pic(tmp_path / "shards", 80, rows_per_group=10, rows_per_shard=40,
                               sizes=(16, 24), distinct_images=8)
    return tmp_path / "shards"


@pytest.fixture(params=["jsonl", "parquet"])
def stream_source(request, pairs_folder, synthetic_shards):
    return pairs_folder if request.param == "jsonl" else synthetic_shards


def test_order_is_resumable_and_ddp_shards_one_big_batch(stream_source):
    """The data half of train.py's resume and DDP tests, for both sources: a resumed stream (fresh process
    state, worker processes) continues exactly; 2 ranks x batch 2 = 1 process x batch 4, with positions."""
    pairs = data.PreferencePairs(stream_source, resolution=8, seed=3, window=2)
    run = [batch for _, batch in zip(range(5), data.PairBatches(pairs, batch_size=2))]
    assert [p for batch in run for p in batch["positions"]] == list(range(10))
    resumed = data.PairBatches(data.PreferencePairs(stream_source, resolution=8, seed=3, window=2), 2,
                               start_step=3, num_workers=2)  # a fresh process state and worker processes
    for expected, batch in zip(run[3:], resumed):
        assert batch["prompts"] == expected["prompts"] and torch.equal(batch["rows"], expected["rows"])
        assert batch["positions"] == expected["positions"]
        assert torch.equal(batch["pixels_w"], expected["pixels_w"])
        assert torch.equal(batch["pixels_l"], expected["pixels_l"])
    assert resumed.step == 5
    rows = torch.cat([batch["rows"] for batch in run])
    assert sorted(rows[:4].tolist()) != rows[:4].tolist() or sorted(rows[4:8].tolist()) != rows[4:8].tolist()

    big = next(iter(data.PairBatches(pairs, batch_size=4, start_step=1)))
    halves = [next(iter(data.PairBatches(pairs, 2, start_step=1, rank=r, world_size=2))) for r in (0, 1)]
    assert torch.equal(torch.cat([h["pixels_w"] for h in halves]), big["pixels_w"])
    assert halves[0]["prompts"] + halves[1]["prompts"] == big["prompts"]
    assert halves[0]["positions"] + halves[1]["positions"] == big["positions"] == [4, 5, 6, 7]


def test_parquet_order_reads_each_row_group_once_per_epoch(synthetic_shards, monkeypatch):
    pairs = data.PreferencePairs(synthetic_shards, resolution=8, window=3)
    assert (len(pairs), pairs.stats.ties, len(pairs.groups)) == (72, 8, 8)
    group_of = {row: ref[0] for row, (_, ref, _, _) in enumerate(pairs.rows)}
    for epoch in (0, 1):
        rows, slots = pairs.order(epoch)
        assert sorted(rows.tolist()) == list(range(72))  # every pair once per epoch
        for group in range(8):  # a group's 9 rows land within one window of 3 groups (<= 27 positions)
            where = [i for i, row in enumerate(rows) if group_of[int(row)] == group]
            assert len(where) == 9 and where[-1] - where[0] < 27 and len(set(slots[where].tolist())) == 1
    assert not (pairs.order(0)[0] == pairs.order(1)[0]).all()

    reads = []
    original = data.PreferencePairs._read_group
    monkeypatch.setattr(data.PreferencePairs, "_read_group",
                        lambda self, group: reads.append(group) or original(self, group))
    batches = iter(data.PairBatches(pairs, batch_size=4))
    assert len(list(zip(range(18), batches))) == 18  # one epoch
    assert sorted(reads) == list(range(8))  # once
    assert len(list(zip(range(18), batches))) == 18  # a second epoch: a group of the last window that is also
    assert sorted(set(reads)) == list(range(8)) and 14 <= len(reads) <= 16  # in the next one can stay cached
    stats = pairs.stats
    assert stats.bytes_read / stats.image_bytes < 1.2  # the image columns' own bytes (+ parquet headers)

    full = data.PreferencePairs(synthetic_shards, resolution=8, window=0)  # the old order: a full shuffle
    reads.clear()
    assert len(list(zip(range(18), data.PairBatches(full, batch_size=4)))) == 18
    assert len(reads) > 40 and full.stats.bytes_read / full.stats.image_bytes > 4


def test_workers_split_the_work_by_row_group(synthetic_shards, tmp_path, monkeypatch):
    """Two DataLoader workers never read the same row group, and give the batches of the main process."""
    log = tmp_path / "reads.txt"
    original = data.PreferencePairs._read_group

    def logged(self, group):  # runs in the forked workers: append "pid group" to a file
        with open(log, "a") as file:
            file.write(f"{os.getpid()} {group}\n")
        return original(self, group)

    monkeypatch.setattr(data.PreferencePairs, "_read_group", logged)
    pairs = data.PreferencePairs(synthetic_shards, resolution=8, window=4)
    in_process = [b for _, b in zip(range(14), data.PairBatches(pairs, batch_size=4))]  # 56 of 72 positions
    log.write_text("")
    fresh = data.PreferencePairs(synthetic_shards, resolution=8, window=4)  # forked workers copy the caches
    with_workers = [b for _, b in zip(range(14), data.PairBatches(fresh, batch_size=4, num_workers=2))]
    for expected, batch in zip(in_process, with_workers):
        assert batch["positions"] == expected["positions"] and batch["prompts"] == expected["prompts"]
        assert torch.equal(batch["pixels_w"], expected["pixels_w"])
    reads = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]  # prefetch: in epoch 0
    served = {pairs.rows[row][1][0] for batch in in_process for row in batch["rows"].tolist()}
    assert len({group for _, group in reads}) == len(reads) and served <= {group for _, group in reads}
    assert len({pid for pid, _ in reads}) == 2 and os.getpid() not in {pid for pid, _ in reads}


def test_inspect_counts_ties_corrupt_and_null_cells(tmp_path, capsys):
    import pyarrow as pa  # a dev requirement; the library imports it lazily
    import pyarrow.parquet as pq

    good = synthetic_jpegs(2, sizes=(20, 28))
    table = pa.table({
        "caption": ["a", "tie", "corrupt", "null", "b", "c"],
        "jpg_0": [good[0], good[0], good[0][:200], None, good[1], good[0]],
        "jpg_1": [good[1], good[1], good[1], good[1], good[0], good[1]],
        "label_0": [1.0, 0.5, 1.0, 0.0, 0.0, 1.0],
    })
    pq.write_table(table, tmp_path / "train-0.parquet", row_group_size=3)
    data.main(["inspect", str(tmp_path), "--pairs", "0", "--resolution", "16"])  # 0: one whole epoch
    out = capsys.readouterr().out
    assert "5 usable pairs in 2 row groups; scanned 5" in out and "6 rows read: 1 ties dropped" in out
    assert "0 missing, 1 corrupt and 1 null images" in out and "pairs/s" in out
    assert "read amplification" in out
    with pytest.raises(SystemExit):
        data.main(["inspect", str(tmp_path / "nope")])


def test_validation_split_is_fixed_held_out_and_unaugmented(stream_source):
    pairs = data.PreferencePairs(stream_source, resolution=8, seed=1, random_crop=True, prompt_dropout=0.5)
    n = 1 if len(pairs) < 10 else 12
    train, val = pairs.split_validation(n)
    assert len(val) == n and len(train) == len(pairs) - n
    assert not {row[1] for row in train.rows} & {row[1] for row in val.rows}  # never trained on
    assert [row[1] for row in pairs.split_validation(n)[1].rows] == [row[1] for row in val.rows]  # fixed
    if val.groups:  # parquet: whole row groups (9 usable rows each) and a part of one more
        assert len({row[1][0] for row in val.rows}) == 2
    first, second = val.batches(5), val.batches(5)
    positions = [p for batch in first for p in batch["positions"]]
    assert positions == [data.VALIDATION_POSITIONS + i for i in range(len(positions))]
    for a, b in zip(first, second):  # deterministic: center crop, no flip, no prompt dropout
        assert torch.equal(a["pixels_w"], b["pixels_w"]) and a["prompts"] == a["captions"] == b["prompts"]
    served = {train.rows[row][1] for _, batch in zip(range(20), data.PairBatches(train, 4))
              for row in batch["rows"].tolist()}
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
    table = pa.table({
        "caption": ["a", "b", "tie", "broken", "c"],
        "jpg_0": [bright, dark, bright, b"not a jpeg", dark],
        "jpg_1": [dark, bright, dark, dark, bright],
        "label_0": [1.0, 0.0, 0.5, 1.0, 0.0],
        "model_0": ["m"] * 5,  # extra Pick-a-Pic columns are ignored
    })
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
    data.write_pairs_jsonl(tmp_path, ["p0", "p1", "p2"], [solid(230), solid(230), solid(20)],
                           [solid(20), solid(20), solid(230)], labels_0=[1, 0, 1])
    pairs = data.PreferencePairs(tmp_path, resolution=8, prompt_dropout=0.5)
    batch = next(iter(data.PairBatches(pairs, batch_size=3)))
    human = (brightness_of(batch["pixels_w"]) > brightness_of(batch["pixels_l"])).tolist()
    relabelled, count = data.relabel_with_reward(batch, brightness)  # online, as the official --choice_model
    assert count == human.count(False) == 2
    assert (brightness_of(relabelled["pixels_w"]) > brightness_of(relabelled["pixels_l"])).all()
    assert relabelled["prompts"] == batch["prompts"]
    darkness = lambda images, prompts: -brightness(images, prompts)
    assert data.relabel_with_reward(relabelled, darkness)[1] == 3  # now every pair flips


def test_write_pairs_jsonl_accepts_tensors_and_errors(tmp_path):
    image = torch.rand(3, 8, 8)
    path = data.write_pairs_jsonl(tmp_path, ["t"], [image], [1 - image])
    record = json.loads(path.read_text())
    assert record["label_0"] == 1 and (tmp_path / record["jpg_0"]).is_file()
    with pytest.raises(FileNotFoundError, match="pairs.jsonl"):
        data.PreferencePairs(tmp_path / "images")
