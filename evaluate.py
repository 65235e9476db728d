"""Evaluate an aligned model against its base: per prompt i and seed s, base and aligned images from
the SAME x_T, scored by every reward. The report leads with the effect size, the mean change
r(aligned) - r(base) +- its stderr in the reward's own units; then the win rate P(r(aligned) >
r(base)) +- its binomial stderr with near-ties counted as ties (choice 6); then the means; overall
and per category; a picture grid.

    python evaluate.py --model path/to/stable-diffusion-v1-5 --lora out/dpo/lora.safetensors \\
        --prompts drawbench --rewards aesthetic,hpsv2,pickscore,clipscore --seeds 0-3 \\
        --out_dir out/eval-drawbench

Choices where the papers are silent:
1. Ties count 1/2 in the win rate (e.g. a saturated reward), as the Diffusion-DPO paper's human
   study.
2. The standard errors treat the prompt x seed pairs as independent draws (no clustering by
   prompt).
3. Sampling: DDIM, 50 steps, guidance 7.5, eta 0 (the DPO paper's quick_samples); the toy: its
   world's.
4. x_T of image (i, s) is torch.randn with torch.Generator("cpu").manual_seed(s) for every prompt:
   what diffusers' pipeline gives for (prompt i, seed s), whatever the batching or reuse (at
   eta > 0: the batch's).
5. Rewards score the saved PNGs (uint8): a reused image scores as when it was made, as other tools
   see it.
6. A near-tie is a tie: |r(aligned) - r(base)| <= TIE_FRACTION x the base's seed-to-seed std of r
   (the spread of one prompt's images over seeds, pooled over prompts). A shift ten times smaller
   than what a new seed changes is no preference a viewer would state, yet a tiny consistent shift
   would win nearly every exact comparison (one DPO step: +0.001 +- 0.002 utility "won" 0.64).
"""

import contextlib
import csv
import inspect
import json
import math
import os
from collections import namedtuple
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import config
import lora
import progress
import rewards
import sampler
import toy
import weights
from pair_files import to_pil
from state_dicts import CheckpointError

PROMPTS_DIR = Path(__file__).with_name("assets") / "prompts"  # sources and licences: its README.md
PROMPT_SETS = {"drawbench": PROMPTS_DIR / "drawbench.csv", "parti": PROMPTS_DIR / "parti.tsv"}
# the seed's DrawBench means (sbert: SentenceBERT text alignment), not ours
PUBLISHED = {"drawbench": {
    "SD1.5-DPO": {"aesthetic": 5.6205, "hpsv2": 0.2672, "sbert": 0.6075},
    "LCM-DPO": {"aesthetic": 6.043, "hpsv2": 0.2814, "sbert": 0.572}}}


# categories: one per prompt ("": none)
PromptSet = namedtuple("PromptSet", "name prompts categories")


def read_prompts(spec: str, max_prompts: int = 0) -> PromptSet:
    """The first max_prompts (0: all) of drawbench, parti, a .txt (a prompt per line) or a
    .csv/.tsv."""
    path = PROMPT_SETS.get(spec, Path(spec))
    if not path.is_file():
        raise ValueError(f"--prompts {spec!r}: no such file; give {', '.join(PROMPT_SETS)} or a "
                         ".txt/.csv/.tsv file")
    elif path.suffix == ".txt":
        rows = [["prompt"]] + [[line] for line in path.read_text(encoding="utf-8").splitlines()]
    else:  # .csv, or .tsv without quote processing (PartiPrompts' has unbalanced quotes)
        with open(path, newline="", encoding="utf-8") as f:
            tsv = path.suffix == ".tsv"
            reader = csv.reader(f, "excel-tab", quoting=csv.QUOTE_NONE) if tsv else csv.reader(f)
            rows = list(reader)
    names = [name.strip().lower() for name in rows[0]] if rows else []
    headers = ("prompt", "prompts", "caption", "text")
    column = next((names.index(n) for n in headers if n in names), 0)
    rows = [row for row in rows[1:] if len(row) > column and row[column].strip()]
    rows = rows[:max_prompts or None]
    if not rows:
        raise ValueError(f"--prompts {path}: no prompts found")
    categories = [row[names.index("category")].strip() if "category" in names else ""
                  for row in rows]
    name = spec if spec in PROMPT_SETS else path.stem
    return PromptSet(name, [row[column].strip() for row in rows], categories)


def parse_seeds(text: str) -> list[int]:
    """'0-7' -> [0..7]; '1,5,9' -> [1, 5, 9]; '4' -> [0, 1, 2, 3] (a count)."""
    try:
        if "-" in text:
            first, last = (int(v) for v in text.split("-"))
            seeds = list(range(first, last + 1))
        else:
            seeds = [int(v) for v in text.split(",")] if "," in text else list(range(int(text)))
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds {text!r}: give a range '0-3', a list '1,5,9' or a count '4' of "
                         "seeds >= 0")
    return seeds


def mean_stderr(values: torch.Tensor) -> dict:
    values = values.double()
    stderr = values.std().item() / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": values.mean().item(), "stderr": stderr}


TIE_FRACTION = 0.1  # near-ties: a tenth of the base's seed-to-seed std (choice 6)


def wins(aligned: torch.Tensor, base: torch.Tensor, tie_threshold: float = 0.0) -> torch.Tensor:
    """Per pair [N]: 1 where aligned > base, 0 where below, 1/2 where |aligned - base| <=
    tie_threshold (a near-tie is a tie: choices 1, 6)."""
    return (aligned > base).double().masked_fill((aligned - base).abs() <= tie_threshold, 0.5)


def win_rate(aligned: torch.Tensor, base: torch.Tensor, tie_threshold: float = 0.0) -> dict:
    """P(aligned > base) over paired scores [N], near-ties 1/2 (wins), with its binomial stderr."""
    won = wins(aligned, base, tie_threshold)
    p = won.mean().item()
    ties = int(((aligned - base).abs() <= tie_threshold).sum())
    return {"win_rate": p, "stderr": math.sqrt(p * (1 - p) / len(won)), "ties": ties,
            "tie_threshold": tie_threshold}


def seed_std(scores: torch.Tensor, num_seeds: int) -> float:
    """The seed-to-seed std of scores [P * S] (prompt-major, S seeds each), pooled over the P
    prompts; with one seed, the std over all images (which also counts prompt-to-prompt
    differences)."""
    if num_seeds < 2:
        return scores.double().std().item() if len(scores) > 1 else 0.0
    return scores.double().view(-1, num_seeds).var(dim=1).mean().sqrt().item()


def summarize(scores: dict, tie_thresholds: dict, rows=slice(None)) -> dict:
    """Per reward: the change aligned - base (mean +- stderr), the win rate with near-ties
    (tie_thresholds: {name: threshold}), base and aligned mean +- stderr. scores: {kind: {name:
    [N]}}"""
    report = {}
    for name in scores["base"]:
        base, aligned = scores["base"][name][rows], scores["aligned"][name][rows]
        report[name] = {"delta": mean_stderr(aligned - base),
                        **win_rate(aligned, base, tie_thresholds[name]),
                        "base": mean_stderr(base), "aligned": mean_stderr(aligned)}
    return report


def image_path(folder: Path, prompt_index: int, seed: int) -> Path:
    return folder / f"p{prompt_index:03d}_s{seed}.png"


@torch.no_grad()
def generate(sd, prompts: list[str], seed: int, num_steps: int = 50, guidance: float = 7.5,
             eta: float = 0.0, batch_size: int = 8) -> torch.Tensor:
    """Images [len(prompts), 3, H, W] in [0, 1], in batches of batch_size, all from seed's x_T
    (choice 4)."""
    x_T = sampler.initial_latents(sd, 1, None, None, torch.Generator("cpu").manual_seed(seed))
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        images.append(sampler.generate(sd, batch, num_steps=num_steps, guidance=guidance, eta=eta,
                                       seed=seed, latents=x_T.expand(len(batch), -1, -1, -1),
                                       progress=False))
    return torch.cat(images)


@torch.no_grad()
def score_images(folder: Path, prompts: list[str], pairs: list, reward_fns: dict, batch_size: int):
    """{reward name: scores [len(pairs)]} of the saved PNGs of (prompt index, seed) pairs (choice
    5)."""
    scores = {name: [] for name in reward_fns}
    starts = range(0, len(pairs), batch_size)
    for k in progress.bar(starts, desc=f"scoring {folder.name}", unit="batch"):
        batch = pairs[k:k + batch_size]
        images = torch.stack([rewards.read_image(image_path(folder, i, seed)) for i, seed in batch])
        for name, reward_fn in reward_fns.items():
            scores[name].append(reward_fn(images, [prompts[i] for i, _ in batch]).float().cpu())
    return {name: torch.cat(values) for name, values in scores.items()}


def save_grid(folders: dict[str, Path], prompts: list[str], seeds: list[int], path: Path,
              cell: int = 96):
    """Per prompt a caption line, then its base images | a gap | its aligned images (a column per
    seed)."""
    columns = len(seeds)
    gap = cell // 4
    caption = 14
    width = 2 * columns * cell + gap
    grid = Image.new("RGB", (width, len(prompts) * (cell + caption) + caption), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((2, 1), "base", fill="black")
    draw.text((columns * cell + gap + 2, 1), "aligned (same seeds)", fill="black")
    for row, prompt in enumerate(prompts):
        top = caption + row * (cell + caption)
        draw.text((2, top + 1), prompt[: width // 6], fill="black")
        files = [image_path(folders[kind], row, seed) for kind in folders for seed in seeds]
        for k, file in enumerate(files):
            with Image.open(file) as picture:  # nearest when enlarging tiny toy images
                resample = Image.NEAREST if picture.width < cell else Image.BILINEAR
                left = k * cell + (gap if k >= columns else 0)
                cell_image = picture.convert("RGB").resize((cell, cell), resample)
                grid.paste(cell_image, (left, top + caption))
    grid.save(path)


def compare(aligned_sd, prompts: list[str], reward_fns: dict, seeds: list[int], out_dir: str,
            base_sd=None, categories: list[str] | None = None, prompt_set: str = "",
            num_steps: int = 50,
            guidance: float = 7.5, eta: float = 0.0, batch_size: int = 8,
            model_ids: dict | None = None) -> dict:
    """Base vs aligned on the same prompts and seeds -> the report (also written as report.json,
    report.md). reward_fns: {name: reward(images, prompts) -> [B]}; base_sd None: aligned_sd with
    its LoRA off."""
    has_lora = any(isinstance(m, lora.LoRALinear) for m in aligned_sd.unet.modules())
    if base_sd is None and not has_lora:
        raise ValueError("compare: base_sd=None, but aligned_sd has no LoRA layers to switch off "
                         "(the base)")
    out = Path(out_dir)
    sampler = {"num_steps": num_steps, "guidance": guidance, "eta": eta}
    folders = {kind: out / "images" / kind for kind in ("base", "aligned")}
    pairs = [(i, seed) for i in range(len(prompts)) for seed in seeds]
    generated = {}
    scores = {}
    for kind, folder in folders.items():
        sd = aligned_sd if kind == "aligned" or base_sd is None else base_sd
        # images of other settings (sampler, model, prompts) are refused
        saved = folder / "settings.json"
        settings = {**sampler, "dtype": str(sd.unet.conv_in.weight.dtype), "prompts": prompts,
                    "model": (model_ids or {}).get(kind)}
        if saved.is_file() and json.loads(saved.read_text()) != settings:
            raise FileExistsError(f"{folder} holds images made with other settings: give another "
                                  "--out_dir")
        folder.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(settings, indent=1))
        missing = [(seed, [i for i in range(len(prompts))
                           if not image_path(folder, i, seed).is_file()]) for seed in seeds]
        todo = [(seed, indices[k:k + batch_size]) for seed, indices in missing
                for k in range(0, len(indices), batch_size)]  # one seed per batch (choice 4)
        generated[kind] = sum(len(batch) for _, batch in todo)
        with (lora.lora_disabled(aligned_sd.unet) if kind == "base" else contextlib.nullcontext(),
              progress.bar(total=generated[kind], desc=f"generating {kind}", unit="image",
                           disable=not todo) as bar):
            for seed, batch in todo:
                images = generate(sd, [prompts[i] for i in batch], seed, num_steps, guidance, eta)
                for i, image in zip(batch, images):  # atomically: no truncated PNG to reuse
                    path = image_path(folder, i, seed)
                    to_pil(image).save(path.with_suffix(".partial.png"))
                    os.replace(path.with_suffix(".partial.png"), path)
                bar.update(len(batch))
        scores[kind] = score_images(folder, prompts, pairs, reward_fns, batch_size)

    thresholds = {name: TIE_FRACTION * seed_std(values, len(seeds))
                  for name, values in scores["base"].items()}
    by_category = {}
    for category in sorted(set(categories or []) - {""}):
        rows = [k for k, (i, _) in enumerate(pairs) if categories[i] == category]
        by_category[category] = {"num_pairs": len(rows),
                                 "rewards": summarize(scores, thresholds, torch.tensor(rows))}
    save_grid(folders, prompts[:12], seeds[:4], out / "grid.png")
    report = {"prompt_set": prompt_set, "num_prompts": len(prompts), "seeds": list(seeds),
              "num_pairs": len(pairs), "sampler": sampler, "rewards": summarize(scores, thresholds),
              "legends": {name: legend(name, fn) for name, fn in reward_fns.items()},
              "categories": by_category, "reference": PUBLISHED.get(prompt_set),
              "generated": generated,
              "images": str(out / "images"), "grid": str(out / "grid.png")}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(format_markdown(report))
    return report


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = [header, ["---"] * len(header), *rows]
    return ["| " + " | ".join(map(str, cells)) + " |" for cells in lines]


def pm(stats: dict, sign: str = "") -> str:
    return f"{stats['mean']:{sign}.4f} ± {stats['stderr']:.4f}"


def legend(name: str, reward_fn) -> str:
    """A metric's one-line legend: rewards.LEGENDS, else the first paragraph of the docstring of
    its function (or of the model a rewards.ModelReward wraps), on one line."""
    doc = getattr(reward_fn, "model", reward_fn).__doc__ or ""
    first_paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    return rewards.LEGENDS.get(name, first_paragraph)


def format_markdown(report: dict) -> str:
    """The report as Markdown: effect sizes first (the mean change in each metric's units, then the
    win rate with near-ties as ties), the means, a legend line per metric; the published reference;
    per category."""
    sampler = report["sampler"]
    title = report["prompt_set"] or "custom prompts"
    lines = [f"## {title}: {report['num_prompts']} prompts x {len(report['seeds'])} seeds = "
             f"{report['num_pairs']} pairs (DDIM {sampler['num_steps']} steps, guidance "
             f"{sampler['guidance']}, eta {sampler['eta']})", ""]
    lines += table(["metric", "change aligned - base", "win rate aligned > base",
                    "near-ties (threshold)", "base", "aligned"],
                   [[name, pm(r["delta"], "+"), f"{r['win_rate']:.3f} ± {r['stderr']:.3f}",
                     f"{r['ties']} ({r['tie_threshold']:.3g})", pm(r["base"]), pm(r["aligned"])]
                    for name, r in report["rewards"].items()])
    lines += ["", f"Near-ties count 1/2: |change| <= {TIE_FRACTION} x the base's seed-to-seed std "
              "of the metric (evaluate.py, choice 6)."]
    lines += [f"- {name}: {text}" for name, text in report.get("legends", {}).items()]
    if report.get("reference"):
        metrics = list(next(iter(report["reference"].values())))
        rows = [[f"{model} (published)", *values.values()]
                for model, values in report["reference"].items()]
        rows += [[f"ours: {kind}", *(f"{report['rewards'][m][kind]['mean']:.4f}"
                                     if m in report["rewards"] else "not measured"
                                     for m in metrics)]
                 for kind in ("base", "aligned")]
        lines += ["", f"{title} means published by the seed, not measured here (sbert: "
                  "SentenceBERT):", ""]
        lines += table(["model", *metrics], rows)
    if report["categories"]:
        lines += ["", "Per category:", ""]
        lines += table(["category", "pairs", "metric", "change aligned - base", "win rate", "base",
                        "aligned"],
                       [[category, c["num_pairs"], name, pm(r["delta"], "+"),
                         f"{r['win_rate']:.3f}", f"{r['base']['mean']:.4f}",
                         f"{r['aligned']['mean']:.4f}"]
                        for category, c in report["categories"].items()
                        for name, r in c["rewards"].items()])
    return "\n".join(lines) + "\n"


def load_rewards(names: list[str], device, reward_paths: dict[str, str], world=None) -> dict:
    """{name: reward}; the toy world's learned reward (world.reward_name) through its door; a path
    KEY=FILE goes to every reward whose loader takes KEY, NAME.KEY=FILE to one."""
    loaded = {}
    for name in names:
        if world is not None and name == world.reward_name:
            loaded[name] = rewards.ModelReward(name, world.reward(device))
            continue
        accepted = inspect.signature(rewards.REWARDS[name]).parameters
        paths = {key.removeprefix(f"{name}."): value for key, value in reward_paths.items()
                 if "." not in key or key.startswith(f"{name}.")}
        kwargs = {k: v for k, v in paths.items() if k in accepted}
        loaded[name] = rewards.get_reward(name, device, **kwargs)
    return loaded


def main(argv=None) -> dict:
    p = config.Parser(description="Compare an aligned model with its base: rewards, win rates.")
    p.add_argument("--model", default=toy.MODEL,
                   help="'toy', a diffusers folder, an SD1.5 file or a hub id")
    p.add_argument("--unet",
                   help="aligned UNet: a diffusers unet folder or a .safetensors state dict")
    p.add_argument("--lora", help="aligned LoRA .safetensors (train.py's OUT_DIR/lora.safetensors)")
    p.add_argument("--prompts", default="",
                   help="drawbench (200), parti (1632), or a .txt/.csv/.tsv (default: the toy "
                   "world's report prompts for --model toy, else drawbench)")
    p.add_argument("--max_prompts", type=int, default=0,
                   help="use only the first N prompts (0 = all)")
    p.add_argument("--rewards", default="saturation",
                   help=f"comma-separated: {', '.join(rewards.REWARDS)}")
    p.add_argument("--reward_paths", default="", metavar="KEY=FILE[,KEY=FILE]",
                   help="reward weight files, e.g. mlp_path=a.pth,pickscore.path=PickScore_v1 "
                   "(NAME.KEY: that reward only)")
    p.add_argument("--seeds", default="0-3",
                   help="'0-7' (a range), '1,5,9' (a list) or '4' (a count)")
    p.add_argument("--steps", type=int, help="DDIM steps (default: the toy world's, else 50)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: the toy world's, else 7.5)")
    p.add_argument("--eta", type=float,
                   help="DDIM eta (default: the toy world's, else 0: deterministic)")
    p.add_argument("--batch_size", type=int, default=8,
                   help="images per generation / scoring batch")
    p.add_argument("--out_dir", default="out/evaluate",
                   help="folder for images/, report.md, report.json and grid.png (train.py's runs "
                   "write to out/<method>, their reports to OUT_DIR/eval)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the frozen weights")
    try:  # every option and file is checked before a model is loaded; each error is one line
        return evaluate_main(p.parse_args(argv))
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"evaluate.py: {error}") from None


def evaluate_main(args) -> dict:
    """main() after parsing: the checks, the models, compare(), the printed report."""
    world = toy.world() if args.model == toy.MODEL else None  # the toy world, through its door
    defaults = world.sampling if world else {"num_steps": 50, "guidance": 7.5, "eta": 0.0}
    num_steps = defaults["num_steps"] if args.steps is None else args.steps
    names = [name for name in args.rewards.split(",") if name]
    paths = [item.split("=", 1) for item in args.reward_paths.split(",") if item]
    known = [*rewards.REWARDS, *([world.reward_name] if world else [])]
    for message, bad in [(f"--rewards {args.rewards!r}: choose from {', '.join(known)}",
                          not names or any(name not in known for name in names)),
                         ("--reward_paths: give KEY=FILE[,KEY=FILE]",
                          any(len(item) != 2 for item in paths)),
                         ("--steps, --batch_size must be >= 1",
                          min(num_steps, args.batch_size) < 1),
                         ("--max_prompts must be >= 0", args.max_prompts < 0),
                         ("give the aligned weights: --unet and/or --lora",
                          not (args.unet or args.lora))]:
        if bad:
            raise config.ConfigError(message)
    if world and not args.prompts:
        last = args.max_prompts or None
        prompt_set = PromptSet(toy.MODEL, world.report_prompts[:last],
                               world.report_categories[:last])
    else:
        prompt_set = read_prompts(args.prompts or "drawbench", args.max_prompts)
    seeds = parse_seeds(args.seeds)
    reward_fns = {**(world.judges if world else {}),
                  **load_rewards(names, args.device, dict(paths), world)}
    model = world.load_model(args.device) if world else args.model
    dtype = getattr(torch, args.dtype)
    base, aligned = weights.load_models(model, args.unet, args.lora, args.device, dtype)
    aligned_files = [args.model] + [  # with size and time: a retrained file is another model
        f"{os.path.abspath(f)} ({os.stat(f).st_size} bytes, modified {int(os.stat(f).st_mtime)})"
        for f in (args.unet, args.lora) if f]
    report = compare(
        aligned, prompt_set.prompts, reward_fns, seeds, args.out_dir, base_sd=base,
        eta=defaults["eta"] if args.eta is None else args.eta,
        categories=prompt_set.categories, prompt_set=prompt_set.name, batch_size=args.batch_size,
        num_steps=num_steps,
        guidance=defaults["guidance"] if args.guidance is None else args.guidance,
        model_ids={"base": args.model, "aligned": " + ".join(aligned_files)})
    print(format_markdown(report),
          f"wrote report.md, report.json, grid.png, images/ in {args.out_dir}", sep="\n")
    return report


if __name__ == "__main__":
    main()
