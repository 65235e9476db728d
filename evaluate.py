"""Evaluate an aligned model against its base: same prompts and seeds, rewards, win rates, a picture grid.

The evaluation protocol of both papers, reduced to what a user can run anywhere: for each prompt i and seed s,
one image from the base model and one from the aligned model, both from the SAME initial noise x_T (so a
pair differs only by the fine-tuning), every image saved as a PNG and scored by every requested reward:

    per reward: mean +- standard error of base and of aligned (over the prompt x seed images);
    the paired difference aligned - base, mean +- standard error;
    the win rate P(reward(aligned) > reward(base)) over the pairs, ties counted 1/2, +- its binomial stderr;
    the same per prompt category (DrawBench's 11, PartiPrompts' 12).

Diffusion-DPO reports win rates of the aligned model against the base (PartiPrompts, HPSv2's prompts);
TailorPO and the seed report mean rewards (the seed: SD1.5-DPO on DrawBench). The published numbers are
printed beside ours for reference (PUBLISHED), labelled as not measured here.

    python evaluate.py --model path/to/stable-diffusion-v1-5 --lora out/lora.safetensors \\
        --prompts drawbench --rewards aesthetic,hpsv2,pickscore,clipscore --seeds 0-3 --out out/eval
    python evaluate.py --model toy --lora out/lora.safetensors --rewards saturation --seeds 0-3

Outputs in --out: images/{base,aligned}/p{prompt index:03d}_s{seed}.png (the index into the prompt list
used), report.md (the tables, also printed), report.json, grid.png (per prompt one row: base | aligned).
Images are reused: a second run in the same --out generates only missing images, so adding a reward only
scores. Each images/ folder keeps a settings.json (sampler settings, model files, prompts by index); a run
with other settings or another model refuses to mix its images with them.

Choices where the papers are silent (numbered):
1. Ties (equal scores, e.g. a reward saturated on both images) count 1/2 in the win rate, as in the
   Diffusion-DPO paper's human study (ties split).
2. The standard errors treat the prompt x seed pairs as independent draws (no clustering by prompt).
3. Sampling defaults: DDIM, 50 steps, guidance 7.5, eta 0 for SD1.5 (the DPO paper's quick_samples setting);
   the toy world uses 10 steps and guidance 3 (its alignment runs' rollout settings).
4. x_T of image (i, s) is torch.randn with torch.Generator("cpu").manual_seed(s), the same for every prompt:
   image (i, s) is what diffusers' pipeline gives for (prompt i, generator seed s), whatever the batch size,
   --max-prompts or which images were reused. (With eta > 0 the per-step noise depends on the batch.)
5. Rewards score the saved PNGs (uint8), not the float images, so a reused image scores exactly as when it
   was generated, and other tools scoring the PNGs see what we scored.
"""

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import lora
import rewards
from sampler import generate_latents, initial_latents
from weights import CheckpointError, load_stable_diffusion, load_strict, load_unet, read_state_dict

PROMPT_SETS = {  # name -> file; source and licence in assets/prompts/README.md
    "drawbench": Path(__file__).with_name("assets") / "prompts" / "drawbench.csv",
    "parti": Path(__file__).with_name("assets") / "prompts" / "parti.tsv",
}
PUBLISHED = {  # DrawBench means reported by the seed (DiffusionDPO reference numbers): printed, not measured
    "drawbench": {
        "label": "published by the seed / DiffusionDPO reference numbers, not measured here",
        "metrics": {"aesthetic": "LAION aesthetic", "hpsv2": "HPSv2", "sbert": "SentenceBERT text alignment"},
        "rows": {"SD1.5-DPO": {"aesthetic": 5.6205, "hpsv2": 0.2672, "sbert": 0.6075},
                 "LCM-DPO": {"aesthetic": 6.043, "hpsv2": 0.2814, "sbert": 0.572}},
    },
}

# ----------------------------------------------------------------------------------------------------------
# Prompts, seeds and statistics


@dataclasses.dataclass
class PromptSet:
    name: str
    prompts: list[str]
    categories: list[str]  # one per prompt; "" where the source has none

    def head(self, count: int) -> "PromptSet":
        return PromptSet(self.name, self.prompts[:count or None], self.categories[:count or None])


def read_prompts(spec: str) -> PromptSet:
    """'drawbench', 'parti' (assets/prompts), 'toy' (toy.PROMPTS), a .txt file (one prompt per line) or a
    .csv/.tsv file: the column prompt/prompts/caption/text (any case; else the first) and, if present, the
    column category. TSV files are read without quote processing (PartiPrompts has unbalanced quotes)."""
    if spec == "toy":
        import toy

        return PromptSet("toy", list(toy.PROMPTS), [""] * len(toy.PROMPTS))
    path = PROMPT_SETS.get(spec, Path(spec))
    if not path.is_file():
        raise ValueError(f"--prompts {spec!r}: no such file; give {', '.join(PROMPT_SETS)}, 'toy', or a "
                         ".txt/.csv/.tsv file")
    with open(path, newline="", encoding="utf-8") as f:
        if path.suffix in (".csv", ".tsv"):
            tsv = path.suffix == ".tsv"
            rows = list(csv.reader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else 0))
            names = [name.strip().lower() for name in rows[0]] if rows else []
            column = next((names.index(n) for n in ("prompt", "prompts", "caption", "text") if n in names), 0)
            category = names.index("category") if "category" in names else None
            rows = [row for row in rows[1:] if len(row) > column and row[column].strip()]
            prompts = [row[column].strip() for row in rows]
            categories = [row[category].strip() if category is not None else "" for row in rows]
        else:
            prompts = [line.strip() for line in f if line.strip()]
            categories = [""] * len(prompts)
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts found")
    return PromptSet(spec if spec in PROMPT_SETS else path.stem, prompts, categories)


def parse_seeds(text: str) -> list[int]:
    """'0-7' -> [0..7]; '1,5,9' -> [1, 5, 9]; '4' -> [0, 1, 2, 3] (a count)."""
    try:
        if "-" in text:
            first, last = (int(v) for v in text.split("-"))
            seeds = list(range(first, last + 1))
        elif "," in text:
            seeds = [int(v) for v in text.split(",")]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds {text!r}: give a range '0-3', a list '1,5,9' or a count '4' of seeds >= 0")
    return seeds


def mean_stderr(values: torch.Tensor) -> dict:
    values = values.double()
    stderr = values.std().item() / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": values.mean().item(), "stderr": stderr}


def win_rate(aligned: torch.Tensor, base: torch.Tensor) -> dict:
    """P(aligned > base) over paired scores [N], ties worth 1/2 (choice 1), with its binomial stderr."""
    wins = (aligned > base).double() + 0.5 * (aligned == base).double()
    p = wins.mean().item()
    return {"win_rate": p, "stderr": math.sqrt(p * (1 - p) / len(wins)), "ties": int((aligned == base).sum())}


def summarize(scores_base: dict, scores_aligned: dict) -> dict:
    """Per reward: base/aligned mean +- stderr, paired delta, win rate. Scores: paired [N] tensors."""
    report = {}
    for name in scores_base:
        base, aligned = scores_base[name], scores_aligned[name]
        report[name] = {
            "base": mean_stderr(base),
            "aligned": mean_stderr(aligned),
            "delta": mean_stderr(aligned - base),
            **win_rate(aligned, base),
        }
    return report


# ----------------------------------------------------------------------------------------------------------
# Images on disk: generated once, reused


def image_path(folder: Path, prompt_index: int, seed: int) -> Path:
    return folder / f"p{prompt_index:03d}_s{seed}.png"


def check_folder(folder: Path, settings: dict, prompts: list[str]):
    """settings.json of an images folder: the same sampler settings and model, and the same prompt at every
    index, or an error (images of another run must not be reused)."""
    path = folder / "settings.json"
    saved = json.loads(path.read_text()) if path.is_file() else {"settings": settings, "prompts": {}}
    if saved["settings"] != settings:
        raise FileExistsError(f"{folder} holds images made with {saved['settings']}, not {settings}: give "
                              "another --out, or delete the folder")
    for index, prompt in enumerate(prompts):
        if saved["prompts"].setdefault(str(index), prompt) != prompt:
            raise FileExistsError(f"{folder}: image index {index} is of the prompt "
                                  f"{saved['prompts'][str(index)]!r}, not {prompt!r}: give another --out, or "
                                  "delete the folder")
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=1))


def save_png(image: torch.Tensor, path: Path):
    """[3, H, W] in [0, 1] -> PNG, rounded as diffusers' numpy_to_pil; written atomically (a killed run
    leaves no truncated file that a later run would reuse)."""
    array = (image * 255).round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
    partial = path.with_suffix(".partial.png")
    Image.fromarray(array).save(partial)
    os.replace(partial, path)


def load_png(path: Path) -> torch.Tensor:
    """PNG -> [3, H, W] float32 in [0, 1]."""
    with Image.open(path) as picture:
        array = np.asarray(picture.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def generate_images(sd, items: list[tuple[str, int]], num_steps: int = 50, guidance: float = 7.5,
                    eta: float = 0.0, batch_size: int = 8, desc: str = "generating", progress: bool = True):
    """Yields (positions in items, images [B, 3, H, W] in [0, 1] float32) for (prompt, seed) items, in
    batches of at most batch_size; one x_T per seed (choice 4), decoded by sd.decode_latents."""
    bar = tqdm(total=len(items), desc=desc, unit="image", disable=not progress or not items)
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = range(start, min(start + batch_size, len(items)))
            for seed in sorted({items[j][1] for j in batch}):
                positions = [j for j in batch if items[j][1] == seed]
                x_T = initial_latents(sd, 1, None, None, torch.Generator("cpu").manual_seed(seed))
                latents = generate_latents(sd, [items[j][0] for j in positions], num_steps=num_steps,
                                           guidance=guidance, eta=eta, seed=seed,
                                           latents=x_T.expand(len(positions), -1, -1, -1), progress=False)
                yield positions, sd.decode_latents(latents)
                bar.update(len(positions))
    bar.close()


def generate(sd, prompts: list[str], seeds: list[int], num_steps: int = 50, guidance: float = 7.5,
             eta: float = 0.0, batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """Images [len(prompts) * len(seeds), 3, H, W] in memory (no files), row i * len(seeds) + k holding
    (prompt i, seeds[k]): compare()'s pair order and x_T (choice 4). For fresh-sample rewards in training."""
    items = [(prompt, seed) for prompt in prompts for seed in seeds]
    rows = [None] * len(items)
    for positions, images in generate_images(sd, items, num_steps, guidance, eta, batch_size,
                                             progress=progress):
        for j, image in zip(positions, images):
            rows[j] = image
    return torch.stack(rows)


def generate_missing(sd, prompts: list[str], seeds: list[int], folder: Path, num_steps: int, guidance: float,
                     eta: float, batch_size: int, desc: str, progress: bool = True) -> int:
    """Generates the images of `folder` that do not exist yet; returns how many it made."""
    missing = [(i, seed) for seed in seeds for i in range(len(prompts))
               if not image_path(folder, i, seed).is_file()]
    items = [(prompts[i], seed) for i, seed in missing]
    for positions, images in generate_images(sd, items, num_steps, guidance, eta, batch_size, desc, progress):
        for j, image in zip(positions, images):
            save_png(image, image_path(folder, *missing[j]))
    return len(missing)


@torch.no_grad()
def score_pairs(folders: dict[str, Path], prompts: list[str], pairs: list[tuple[int, int]], reward_fns: dict,
                batch_size: int, progress: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """{folder name: {reward name: scores [len(pairs)]}} of the saved PNGs (choice 5)."""
    scores = {kind: {name: [] for name in reward_fns} for kind in folders}
    with tqdm(total=len(pairs) * len(folders), desc="scoring", unit="image", disable=not progress) as bar:
        for k in range(0, len(pairs), batch_size):
            batch = pairs[k:k + batch_size]
            batch_prompts = [prompts[i] for i, _ in batch]
            for kind, folder in folders.items():
                images = torch.stack([load_png(image_path(folder, i, seed)) for i, seed in batch])
                for name, reward_fn in reward_fns.items():
                    scores[kind][name].append(reward_fn(images, batch_prompts).float().cpu())
                bar.update(len(batch))
    return {kind: {name: torch.cat(values) for name, values in by_name.items()}
            for kind, by_name in scores.items()}


def save_grid(rows: list[tuple[str, list[Path], list[Path]]], path: Path, cell: int = 96) -> Path:
    """rows: (prompt, base PNGs, aligned PNGs); per row the prompt on a caption line, then base images | a
    gap | aligned images (same seeds in the same column order)."""
    columns = max(len(base) for _, base, _ in rows)
    gap, caption = cell // 4, 14
    width = 2 * columns * cell + gap
    grid = Image.new("RGB", (width, len(rows) * (cell + caption) + caption), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((2, 1), "base", fill="black")
    draw.text((columns * cell + gap + 2, 1), "aligned (same seeds)", fill="black")
    for row, (prompt, base, aligned) in enumerate(rows):
        top = caption + row * (cell + caption)
        draw.text((2, top + 1), prompt[: width // 6], fill="black")
        for column, (b, a) in enumerate(zip(base, aligned)):
            for left, file in ((column * cell, b), (columns * cell + gap + column * cell, a)):
                with Image.open(file) as opened:  # nearest when enlarging tiny toy images
                    picture = opened.convert("RGB")
                resample = Image.NEAREST if picture.width < cell else Image.BILINEAR
                grid.paste(picture.resize((cell, cell), resample), (left, top + caption))
    grid.save(path)
    return path


# ----------------------------------------------------------------------------------------------------------
# The comparison and its report


def has_lora(unet) -> bool:
    return any(isinstance(module, lora.LoRALinear) for module in unet.modules())


def compare(aligned_sd, prompts: list[str], reward_fns: dict, seeds: list[int], out_dir: str,
            base_sd=None, categories: list[str] | None = None, prompt_set: str = "", num_steps: int = 50,
            guidance: float = 7.5, eta: float = 0.0, batch_size: int = 8, grid_prompts: int = 12,
            grid_seeds: int = 4, model_ids: dict | None = None, progress: bool = True) -> dict:
    """Base vs aligned on the same prompts and seeds -> the report (also written as report.json, report.md).

    reward_fns: {name: reward(images, prompts) -> [B]}, already loaded (rewards.get_reward); nothing is
    loaded here. base_sd=None: the base is aligned_sd's UNet with its LoRA adapters switched off
    (lora.lora_disabled), so a LoRA run needs no second model. categories: one per prompt (per-category
    tables). prompt_set: e.g. "drawbench", which prints PUBLISHED's reference rows beside ours. model_ids:
    {"base": ..., "aligned": ...} strings that name the models (file paths, sizes) in the images' settings.
    """
    if base_sd is None and not has_lora(aligned_sd.unet):
        raise ValueError("compare: base_sd=None means 'aligned_sd without its LoRA', but its UNet has no "
                         "LoRA layers; pass the base model as base_sd")
    out = Path(out_dir)
    folders = {kind: out / "images" / kind for kind in ("base", "aligned")}
    sampler = {"num_steps": num_steps, "guidance": guidance, "eta": eta}
    generated = {}
    for kind, folder in folders.items():
        sd = aligned_sd if kind == "aligned" or base_sd is None else base_sd
        dtype = str(sd.unet.conv_in.weight.dtype).removeprefix("torch.")
        check_folder(folder, {**sampler, "dtype": dtype, "model": (model_ids or {}).get(kind, "")}, prompts)
        switch_off = kind == "base" and base_sd is None
        with lora.lora_disabled(aligned_sd.unet) if switch_off else contextlib.nullcontext():
            generated[kind] = generate_missing(sd, prompts, seeds, folder, num_steps, guidance, eta,
                                               batch_size, f"generating {kind}", progress)

    pairs = [(i, seed) for i in range(len(prompts)) for seed in seeds]
    scores = score_pairs(folders, prompts, pairs, reward_fns, batch_size, progress)
    categories = categories or [""] * len(prompts)
    by_category = {}
    for category in sorted(set(categories) - {""}):
        rows = torch.tensor([k for k, (i, _) in enumerate(pairs) if categories[i] == category])
        subset = {kind: {name: values[rows] for name, values in by_name.items()}
                  for kind, by_name in scores.items()}
        by_category[category] = {"num_pairs": len(rows),
                                 "rewards": summarize(subset["base"], subset["aligned"])}

    rows = [(prompts[i], [image_path(folders["base"], i, s) for s in seeds[:grid_seeds]],
             [image_path(folders["aligned"], i, s) for s in seeds[:grid_seeds]])
            for i in range(min(grid_prompts, len(prompts)))]
    report = {
        "prompt_set": prompt_set,
        "num_prompts": len(prompts),
        "seeds": list(seeds),
        "num_pairs": len(pairs),
        "sampler": sampler,
        "rewards": summarize(scores["base"], scores["aligned"]),
        "categories": by_category,
        "reference": PUBLISHED.get(prompt_set),
        "generated": generated,
        "images": str(out / "images"),
        "grid": str(save_grid(rows, out / "grid.png")),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(format_markdown(report))
    return report


def cell(stats: dict, digits: int = 4) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['stderr']:.{digits}f}"


def format_markdown(report: dict) -> str:
    """The report as Markdown tables: overall, the published reference beside ours, per category."""
    sampler = report["sampler"]
    title = report["prompt_set"] or "custom prompts"
    lines = [f"## {title}: {report['num_prompts']} prompts x {len(report['seeds'])} seeds = "
             f"{report['num_pairs']} pairs (DDIM {sampler['num_steps']} steps, guidance "
             f"{sampler['guidance']}, eta {sampler['eta']})", "",
             "| metric | base | aligned | aligned - base | win rate aligned > base | ties |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in report["rewards"].items():
        lines.append(f"| {name} | {cell(r['base'])} | {cell(r['aligned'])} | {r['delta']['mean']:+.4f} ± "
                     f"{r['delta']['stderr']:.4f} | {r['win_rate']:.3f} ± {r['stderr']:.3f} | {r['ties']} |")
    reference = report.get("reference")
    if reference:
        metrics = reference["metrics"]
        lines += ["", f"Reference: {title} means {reference['label']}; ours (measured above) beside them.",
                  "",
                  "| model | " + " | ".join(metrics.values()) + " |", "| --- |" + " --- |" * len(metrics)]
        for model, values in reference["rows"].items():
            lines.append(f"| {model} (published) | " + " | ".join(f"{values[m]}" for m in metrics) + " |")
        for kind in ("base", "aligned"):
            ours = [f"{report['rewards'][m][kind]['mean']:.4f}" if m in report["rewards"] else "not measured"
                    for m in metrics]
            lines.append(f"| ours: {kind} | " + " | ".join(ours) + " |")
    if report["categories"]:
        lines += ["", "Per category:", "",
                  "| category | pairs | metric | base | aligned | aligned - base | win rate |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for category, c in report["categories"].items():
            for name, r in c["rewards"].items():
                lines.append(f"| {category} | {c['num_pairs']} | {name} | {r['base']['mean']:.4f} | "
                             f"{r['aligned']['mean']:.4f} | {r['delta']['mean']:+.4f} ± "
                             f"{r['delta']['stderr']:.4f} | {r['win_rate']:.3f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Command line


def file_id(path: str | None) -> str:
    """A model file or folder named with its size and modification time (a retrained file is another)."""
    if not path:
        return ""
    stat = os.stat(path)
    return f"{os.path.abspath(path)} ({stat.st_size} bytes, modified {int(stat.st_mtime)})"


def load_models(model: str, unet: str | None, lora_path: str | None, device: str, dtype: torch.dtype):
    """(base_sd, aligned_sd); base_sd is None when the aligned model is the base plus a LoRA (compare then
    switches the adapters off for the base images: one UNet in memory)."""
    if not unet and not lora_path:
        raise ValueError("give the aligned weights: --unet (a UNet folder or state dict) and/or --lora")
    if model == "toy":
        import toy

        base = toy.load_base_model(device=device)
    else:
        base = load_stable_diffusion(model, device=device, dtype=dtype)
    aligned = dataclasses.replace(base)
    if unet:
        if os.path.isdir(unet):  # a diffusers unet folder (train.py's out_dir/unet of a full fine-tune)
            aligned.unet = load_unet(unet).to(device, dtype)
        else:  # a state dict with diffusers names, for the base model's architecture
            with torch.device("meta"):
                aligned.unet = type(base.unet)(base.unet.config)
            aligned.unet = load_strict(aligned.unet, read_state_dict(unet), unet).to(device, dtype).eval()
    if lora_path:
        state = read_state_dict(lora_path)
        try:
            rank = lora.lora_rank(state)
            lora.inject_lora(aligned.unet, rank=rank)
            lora.load_lora(aligned.unet, state)
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"{lora_path}: not a LoRA of this model ({error})") from None
        aligned.unet.to(device, dtype)
    return (base if unet else None), aligned


def load_rewards(names: list[str], device, reward_paths: dict[str, str]) -> dict:
    """{name: rewards.get_reward(name, device, paths)}; a path KEY=FILE goes to every reward whose loader
    takes KEY, NAME.KEY=FILE to that reward only."""
    import inspect

    loaded = {}
    for name in names:
        accepted = inspect.signature(rewards.REWARDS[name]).parameters
        paths = {key.removeprefix(f"{name}."): value for key, value in reward_paths.items()
                 if "." not in key or key.startswith(f"{name}.")}
        loaded[name] = rewards.get_reward(name, device, **{k: v for k, v in paths.items() if k in accepted})
    return loaded


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Compare an aligned model with its base: rewards, win rates.")
    p.add_argument("--model", default="toy", help="base model: 'toy' (toy.py), a diffusers folder, a single "
                   "SD1.5 .safetensors/.ckpt file, or a hub id")
    p.add_argument("--unet", default=None, help="aligned UNet: a diffusers unet folder (train.py out/unet) "
                   "or a .safetensors state dict with diffusers names")
    p.add_argument("--lora", default=None, help="aligned LoRA .safetensors (train.py out/lora.safetensors)")
    p.add_argument("--prompts", default="toy", help="'drawbench' (200), 'parti' (1632), 'toy', a .txt file "
                   "(one prompt per line) or a .csv/.tsv file with a prompt (and category) column")
    p.add_argument("--max-prompts", type=int, default=0, help="use only the first N prompts (0 = all)")
    p.add_argument("--rewards", default="saturation",
                   help=f"comma-separated, of: {', '.join(rewards.REWARDS)}")
    p.add_argument("--reward-path", action="append", default=[], metavar="KEY=FILE",
                   help="a reward weight file, e.g. mlp_path=sac+logos+ava1-l14-linearMSE.pth or "
                   "pickscore.path=weights/PickScore_v1 (NAME.KEY: for that reward only; repeatable)")
    p.add_argument("--seeds", default="0-3", help="'0-7' (a range), '1,5,9' (a list) or '4' (a count)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 10 for the toy, else 50)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (toy default 3, else 7.5)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic given the seed)")
    p.add_argument("--batch-size", type=int, default=8, help="images per generation / scoring batch")
    p.add_argument("--grid-prompts", type=int, default=12, help="rows (prompts) in grid.png")
    p.add_argument("--grid-seeds", type=int, default=4, help="images per model per row in grid.png")
    p.add_argument("--out", default="out/eval", help="folder for images/, report.md, report.json, grid.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the generating models (rewards always score in float32)")
    return p


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    toy_model = args.model == "toy"
    names = [name for name in args.rewards.split(",") if name]
    unknown = [name for name in names if name not in rewards.REWARDS]
    paths = [item.split("=", 1) for item in args.reward_path]
    for message, bad in [(f"--rewards: unknown {unknown}; choose from {', '.join(rewards.REWARDS)}", unknown),
                         ("--rewards: give at least one reward", not names),
                         ("--reward-path: give KEY=FILE", any(len(item) != 2 for item in paths)),
                         ("--steps, --batch-size must be >= 1", min(args.steps or 1, args.batch_size) < 1),
                         ("--max-prompts must be >= 0", args.max_prompts < 0)]:
        if bad:
            parser.error(message)
    try:  # every option and file is checked before a model is loaded
        prompt_set = read_prompts(args.prompts).head(args.max_prompts)
        seeds = parse_seeds(args.seeds)
        reward_fns = load_rewards(names, args.device, dict(paths))
        base, aligned = load_models(args.model, args.unet, args.lora, args.device, getattr(torch, args.dtype))
        aligned_files = [args.model, file_id(args.unet), file_id(args.lora)]
        model_ids = {"base": args.model, "aligned": " + ".join(filter(None, aligned_files))}
        report = compare(
            aligned, prompt_set.prompts, reward_fns, seeds, args.out, base_sd=base,
            categories=prompt_set.categories, prompt_set=prompt_set.name,
            num_steps=args.steps or (10 if toy_model else 50),
            guidance=args.guidance if args.guidance is not None else (3.0 if toy_model else 7.5),
            eta=args.eta, batch_size=args.batch_size, grid_prompts=args.grid_prompts,
            grid_seeds=args.grid_seeds, model_ids=model_ids)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"evaluate.py: {error}") from None  # one line naming the option or file and why
    print(format_markdown(report))
    print("wrote", *(os.path.join(args.out, name) for name in ("report.md", "report.json", "grid.png")),
          report["images"], sep="\n  ")
    return report


if __name__ == "__main__":
    main()
