"""The on-disk formats of preference pairs: reading pairs.jsonl and parquet, writing pairs.jsonl.

Pick-a-Pic v2 (Diffusion-DPO Sec. 5) has the columns `caption`, `jpg_0`, `jpg_1` (JPEG bytes) and
`label_0` (1: jpg_0 preferred, 0: jpg_1, 0.5: a tie), in parquet shards; pairs.jsonl has the same
fields, the images as paths relative to it. Other preference sets map their columns onto these
fields (--data_columns, parse_columns); without label_0, jpg_0 is the preferred image (binarized
sets: prompt, chosen, rejected). An image cell is bytes or the hub `datasets` struct {bytes, path},
its path relative to the parquet file when bytes is null. Data that cannot be read is refused in one
line (DataError) before any model is built; pyarrow is imported only for parquet. Nothing here
decodes an image: data.py does, when a pair is served.
"""

import json
from pathlib import Path

import torch
from PIL import Image

FIELDS = ("caption", "jpg_0", "jpg_1", "label_0")  # what --data_columns maps onto a set's columns
IMAGE_COLUMNS = ("jpg_0", "jpg_1")


class DataError(ValueError):
    """Data that cannot be trained on, said in one line before any model is built."""


def parse_columns(text: str) -> dict[str, str]:
    """--data_columns "caption=prompt,jpg_0=chosen,..." -> {field: column}; "" -> {}."""
    entries = [[part.strip() for part in entry.split("=")] for entry in text.split(",")]
    entries = [entry for entry in entries if entry != [""]]
    for entry in entries:
        if len(entry) != 2 or entry[0] not in FIELDS or not entry[1]:
            raise DataError(f"--data_columns: {'='.join(entry)!r} is not KEY=COLUMN, KEY one of "
                            f"{', '.join(FIELDS)}")
    return dict(entries)


def mapped_columns(columns: dict | None) -> dict[str, str]:
    """{field: column to read}: no mapping reads Pick-a-Pic's four columns; a mapping reads the
    fields it does not name by their own names, except label_0 (then jpg_0 is preferred)."""
    mapped = {key: (columns or {}).get(key, key) for key in FIELDS}
    if columns and "label_0" not in columns:
        del mapped["label_0"]
    return mapped


def parquet_module():
    """pyarrow.parquet: optional, imported only for parquet data."""
    try:
        import pyarrow.parquet as pq  # optional
    except ImportError:
        raise DataError("reading parquet data needs pyarrow: pip install pyarrow") from None
    return pq


def data_files(path: Path) -> list[Path]:
    """[pairs.jsonl] (given or in the folder), [a .parquet file] or a folder's .parquet files."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix not in (".jsonl", ".parquet"):
        raise DataError(f"{path}: not a pairs.jsonl or .parquet file (nor a folder of them)")
    jsonl = [path / "pairs.jsonl"] if (path / "pairs.jsonl").is_file() else []
    files = [path] if path.is_file() else jsonl or sorted(path.glob("*.parquet"))
    if not files:
        raise DataError(f"{path}: a folder with no pairs.jsonl and no .parquet files")
    return files


def read_jsonl(path: Path, columns: dict) -> list[tuple]:
    """-> records (caption, ref_0, ref_1, label_0), refs image paths; a bad line has label None."""
    records = []
    for line in filter(str.strip, path.read_text().splitlines()):
        try:
            item = json.loads(line)
            images = (path.parent / item[columns[column]] for column in IMAGE_COLUMNS)
            label = item[columns["label_0"]] if "label_0" in columns else 1
            records.append((item.get(columns["caption"]), *images, label))
        except (ValueError, KeyError, TypeError, AttributeError):
            records.append((None, None, None, None))
    return records


def read_parquet(files: list[Path], columns: dict) -> tuple[list[tuple], list[tuple]]:
    """-> (records with refs (row group id, row in group, field), row groups (file, index in the
    file, first row in the file, compressed bytes of its image columns: what reading it costs))."""
    records = []
    groups = []
    image_columns = [columns[column] for column in IMAGE_COLUMNS]
    for file in files:
        try:
            parquet = parquet_module().ParquetFile(file)
            names = parquet.schema_arrow.names
            text = parquet.read(columns=[columns[key] for key in ("caption", "label_0")
                                         if columns.get(key) in names]).to_pydict()
        except (ValueError, OSError) as error:  # pyarrow's ArrowInvalid is a ValueError
            reason = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise DataError(f"{file}: not a readable parquet file ({reason})") from None
        missing = [column for column in columns.values() if column not in names]
        if missing:
            raise DataError(f"{file}: no column {', '.join(map(repr, missing))}; its columns: "
                            f"{', '.join(names)} (map them with --data_columns KEY=COLUMN)")
        labels = text.get(columns.get("label_0"))
        first_row = 0
        for index in range(parquet.num_row_groups):
            meta = parquet.metadata.row_group(index)
            chunks = [meta.column(c) for c in range(meta.num_columns)]
            images = [c for c in chunks if c.path_in_schema.split(".")[0] in image_columns]
            groups.append((file, index, first_row, sum(c.total_compressed_size for c in images)))
            for row in range(first_row, first_row + meta.num_rows):
                refs = [(len(groups) - 1, row - first_row, column) for column in IMAGE_COLUMNS]
                label = 1 if labels is None else labels[row]
                records.append((text[columns["caption"]][row], *refs, label))
            first_row += meta.num_rows
    return records, groups


def cell_bytes(cell, folder: Path) -> tuple[bytes | None, str]:
    """(encoded image or None, why None) of a parquet image cell: bytes, or the `datasets` struct
    {bytes, path}, its path relative to the parquet file's folder when bytes is null."""
    if isinstance(cell, dict) and cell.get("bytes") is None and cell.get("path"):
        path = folder / cell["path"]
        return (path.read_bytes() if path.is_file() else None), "missing"
    return (cell.get("bytes") if isinstance(cell, dict) else cell), "null"


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> PIL, rounded as diffusers' numpy_to_pil."""
    pixels = (image.clamp(0, 1) * 255).round().byte()
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())


def write_pairs_jsonl(folder, captions, images_0, images_1, labels_0=None) -> Path:
    """Write a pairs.jsonl dataset: images (PIL, or [3,H,W] tensors in [0, 1]) as PNGs in
    folder/images/, one line per pair; labels_0 defaults to 1 (jpg_0 preferred). -> pairs.jsonl."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    labels = [1] * len(captions) if labels_0 is None else labels_0
    with open(folder / "pairs.jsonl", "w") as file:
        rows = zip(captions, labels, images_0, images_1, strict=True)
        for i, (caption, label, *images) in enumerate(rows):
            record = {"caption": caption, "label_0": label}
            for column, image in zip(IMAGE_COLUMNS, images):
                record[column] = f"images/{i:06d}_{column[-1]}.png"
                pil = to_pil(image) if isinstance(image, torch.Tensor) else image
                pil.save(folder / record[column])
            file.write(json.dumps(record) + "\n")
    return folder / "pairs.jsonl"
