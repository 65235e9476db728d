"""A CPU toy world where preference alignment visibly works: coloured shapes described by short
prompts.

Both papers' stories in minutes, no GPU or download; results in README.md and
bench/results/bench_methods.md. A 16x16 picture shows a shape (circle, square, triangle) of one
colour on a background of another, prompted "a red circle on a blue background" (60 prompts);
position, size and each colour's vividness vary.
1. The base model (load_base_model; toy_model.py, with its deviations from Stable Diffusion): the
   repository's modules at tiny size, pretrained on draw()'s pictures of PROMPTS with L_simple and
   cached.
2. The toy human (judge, utility, fidelity; JUDGES) only labels pairs and judges results: prompt
   fidelity plus quality, with the terms of judge() in [0, 1],
       u(image, prompt) = shape + colour + background + 0.5 (vivid + clean)    in [0, 4]
   Fidelity dominates: a wrong background (-1) is never made up for by quality (at most +1).
3. A toy Pick-a-Pic (make_pairs) for --method=dpo|sft: two base-model samples of one prompt labelled
   by noisy Bradley-Terry preferences P(A > B) = sigmoid((u_A - u_B) / tau), near-equal pairs ties.
   The 12 HELD_OUT_PROMPTS appear in no pair: new combinations of the words and word pairs of the
   other 48.
4. The toy reward model (toy_reward.py, World.reward, --reward=toy): learned from the pairs, not u.
5. The door (MODEL, world(), World): all that train.py, evaluate.py and rewards.py know of the toy.
Base model, pairs and reward model are cached under .cache/toy/, each in an entry named by
toy_model.hash_key and written atomically (toy_model.publish). Imports run one way:
toy -> toy_model, toy_reward.
"""

import hashlib
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import toy_model
import toy_reward
from pair_files import write_pairs_jsonl
from sampler import generate
from stable_diffusion import StableDiffusion

# The world: prompts and procedurally drawn images -------------------------------------------------

SHAPES = ("circle", "square", "triangle")
# Pure RGB in [0, 1]; draw() mixes them with grey.
COLOURS = {
    "red": (0.95, 0.1, 0.1),
    "green": (0.1, 0.8, 0.15),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.85, 0.1),
    "purple": (0.6, 0.15, 0.85),
}
# 3 shapes x 5 colours x 4 backgrounds = 60 prompts.
PROMPTS = [
    f"a {colour} {shape} on a {background} background"
    for shape in SHAPES
    for colour in COLOURS
    for background in COLOURS
    if background != colour
]
TOY_WORLD_VERSION = 2  # bump when the world (draw, PROMPTS) or what is cached from it changes


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """'a red circle on a blue background' -> ('red', 'circle', 'blue'); a clear error otherwise."""
    words = prompt.split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        raise ValueError(
            f"not a toy prompt: {prompt!r} (expected 'a <colour> <shape> on a <colour> background')"
        )
    colour, shape, background = words[1], words[2], words[5]
    if colour not in COLOURS or background not in COLOURS or shape not in SHAPES:
        raise ValueError(
            f"unknown colour or shape in {prompt!r}; colours {list(COLOURS)}, shapes {SHAPES}"
        )
    return colour, shape, background


def shape_mask(shape: str, cx, cy, radius, size: int) -> torch.Tensor:
    """Soft mask [..., size, size] in (0, 1) of a shape centred at (cx, cy) (fractions of the side)
    with `radius`; cx, cy, radius are floats or tensors of one shape [...]. Anti-aliased edge ~ a
    pixel wide."""
    cx, cy, radius = (
        torch.as_tensor(v, dtype=torch.float32)[..., None, None] for v in (cx, cy, radius)
    )
    grid = (torch.arange(size) + 0.5) / size
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    dx, dy = x - cx, y - cy
    if shape == "circle":
        distance = (dx**2 + dy**2).sqrt() - radius  # signed distance, negative inside
    elif shape == "square":
        distance = torch.maximum(dx.abs(), dy.abs()) - 0.85 * radius
    else:
        # An upward equilateral triangle, circumradius R: the max of its edges' half-plane
        # distances.
        R = 1.2 * radius
        distance = torch.maximum(dy - 0.5 * R, 0.866 * dx.abs() - 0.5 * dy - 0.5 * R)
    return torch.sigmoid(-distance * size * 2.0)


def shade(colour: str, vividness: float) -> torch.Tensor:
    """The colour mixed with mid-grey: [3] in [0, 1]; vividness 0 -> 20% of the colour, 1 -> the
    pure one."""
    saturation = 0.2 + 0.8 * vividness
    return 0.5 + saturation * (torch.tensor(COLOURS[colour]) - 0.5)


def draw(prompt: str, size: int, generator: torch.Generator) -> torch.Tensor:
    """One picture for `prompt`: [3, size, size] in [-1, 1]; position, size, vividness random."""
    colour, shape, background = parse_prompt(prompt)
    cx, cy, radius, vivid_fg, vivid_bg = torch.rand(5, generator=generator).tolist()
    cx, cy = 0.3 + 0.4 * cx, 0.3 + 0.4 * cy  # centre in the middle 40% of the picture
    radius = 0.2 + 0.12 * radius
    mask = shape_mask(shape, cx, cy, radius, size)
    background_rgb = shade(background, vivid_bg).view(3, 1, 1)
    shape_rgb = shade(colour, vivid_fg).view(3, 1, 1)
    image = torch.lerp(background_rgb, shape_rgb, mask)
    return image * 2 - 1


# The toy human: a hidden utility u(image, prompt), the judge of every alignment result ------------

# [5, 3]: each colour minus mid-grey, in COLOURS' order.
_CHROMA = torch.tensor(list(COLOURS.values())) - 0.5


def colour_membership(images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, ...]:
    """(P_fg, P_bg, vividness) [B, H*W] of images [B, 3, H, W] in [0, 1]: each pixel p's membership
    of the asked shape and background colours, where p is the colour k its chroma d = p - 0.5 points
    to (softmax over the cosines, temperature 0.1) times a confidence min(1, |d| / 0.1) (0.1 ~
    draw()'s dullest chroma), and its vividness min(1, |d| / |c_k - 0.5|) for the nearest colour k
    (shade()'s saturation, if clean)."""
    d = images.flatten(2).transpose(1, 2) - 0.5  # [B, HW, 3]
    # [B, HW]; smooth at grey, for the reward model's gradient.
    norm = (d.pow(2).sum(-1) + 1e-8).sqrt()
    chroma = _CHROMA.to(d)
    cosine = d @ F.normalize(chroma, dim=-1).T / norm[..., None]  # [B, HW, 5]
    membership = torch.softmax(cosine / 0.1, dim=-1) * (norm / 0.1).clamp(max=1)[..., None]
    vividness = (norm / chroma.norm(dim=-1)[cosine.argmax(-1)]).clamp(max=1)
    colour, _, background = zip(*(parse_prompt(p) for p in prompts))
    rows = torch.arange(len(prompts), device=images.device)
    names = list(COLOURS)
    colour_index = torch.tensor([names.index(c) for c in colour], device=images.device)
    background_index = torch.tensor([names.index(c) for c in background], device=images.device)
    return membership[rows, :, colour_index], membership[rows, :, background_index], vividness


@torch.no_grad()
def judge(images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The toy human's view of images [B, 3, H, W] in [0, 1]: {term: [B]}, each term in [0, 1].

    P_fg, P_bg: each pixel's membership of the asked shape and background colours
    (colour_membership). S = 1 - P_bg is the picture's shape, of area a (a fraction of the picture);
    T_s is a mask of shape s with S's centroid and area, IoU_s = sum min(T_s, S) / sum max(T_s, S);
    T* (hard, > 0.5) is T_s of the asked s:
        shape      = clip(0.5 + (IoU_asked - max IoU_other) / 0.1, 0, 1) min(1, a / 0.05)
        colour     = <T*, P_fg> / <T*, 1>              the shape area has the asked colour
        background = <1 - T*, P_bg> / <1 - T*, 1>      the rest has the asked background colour
        vivid      = mean_pixels vividness             (colour_membership)
        clean      = exp(-mean (x - median3x3(x))^2 / 0.003)   noise, ragged edges survive a median
    """
    batch, _, height, width = images.shape
    images = images.float().cpu()
    p_fg, p_bg, vividness = colour_membership(images, prompts)  # [B, HW] each
    rows = torch.arange(batch)
    shape_area = (1 - p_bg).view(batch, height, width)
    mass = shape_area.sum(dim=(1, 2)).clamp(min=1e-3)
    grid = (torch.arange(height) + 0.5) / height
    cy = (shape_area.sum(2) * grid).sum(1) / mass
    cx = (shape_area.sum(1) * grid).sum(1) / mass
    area = mass / (height * width)  # a fraction of the picture
    # The radius r of each shape with that area.
    radii = {
        "circle": (area / math.pi).sqrt(),
        "square": area.sqrt() / 1.7,  # side 1.7 r
        "triangle": (area / 1.8706).sqrt(),  # equilateral, circumradius R = 1.2 r: 3 sqrt(3)/4 R^2
    }
    # [B, 3, H, W]: T_s for every shape s.
    templates = torch.stack([shape_mask(s, cx, cy, radii[s], height) for s in SHAPES], 1)
    pair = torch.stack(torch.broadcast_tensors(templates, shape_area[:, None]))
    iou = pair.amin(0).sum(dim=(2, 3)) / pair.amax(0).sum(dim=(2, 3))  # [B, 3], fuzzy Jaccard
    asked = torch.tensor([SHAPES.index(parse_prompt(p)[1]) for p in prompts])
    other = iou.masked_fill(F.one_hot(asked, len(SHAPES)).bool(), -1.0).max(dim=1).values
    inside = (templates[rows, asked].flatten(1) > 0.5).float()  # [B, HW]: T* as a hard mask
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    neighbourhoods = padded.unfold(2, 3, 1).unfold(3, 3, 1).flatten(-2)  # [B, 3, H, W, 9]
    residual = (images - neighbourhoods.median(dim=-1).values).pow(2).mean(dim=(1, 2, 3))
    return {
        "shape": (0.5 + (iou[rows, asked] - other) / 0.1).clamp(0, 1) * (area / 0.05).clamp(max=1),
        "colour": (inside * p_fg).sum(1) / inside.sum(1).clamp(min=1),
        "background": ((1 - inside) * p_bg).sum(1) / (1 - inside).sum(1).clamp(min=1),
        "vivid": vividness.mean(1),
        "clean": torch.exp(-residual / 0.003),
    }


def fidelity(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Prompt fidelity in [0, 1]: the mean of the asked shape, shape colour and background colour
    terms."""
    terms = judge(images, prompts)
    return (terms["shape"] + terms["colour"] + terms["background"]) / 3


def utility(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The toy human's hidden utility in [0, 4]: 3 x fidelity + 0.5 (vivid + clean), quality in
    [0, 1]."""
    terms = judge(images, prompts)
    quality = 0.5 * (terms["vivid"] + terms["clean"])
    return terms["shape"] + terms["colour"] + terms["background"] + quality


def reward_features(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """What the toy reward model sees of images [B, 3, H, W] in [0, 1]: [B, 5 + 3, H, W] feature
    maps P_fg, P_bg, vividness (colour_membership), roughness, radius from the centre, the asked
    shape one-hot."""
    p_fg, p_bg, vividness = colour_membership(images, prompts)  # [B, HW] each
    blurred = F.avg_pool2d(images, 3, 1, 1, count_include_pad=False)
    roughness = (images - blurred).pow(2).sum(dim=1).flatten(1)
    height, width = images.shape[2:]
    grid = (torch.arange(height, device=images.device) + 0.5) / height - 0.5
    radius = (grid[:, None] ** 2 + grid[None, :] ** 2).sqrt().flatten().expand(len(prompts), -1)
    asked = [SHAPES.index(parse_prompt(p)[1]) for p in prompts]
    shapes = F.one_hot(torch.tensor(asked, device=images.device), len(SHAPES))
    per_pixel = torch.stack([p_fg, p_bg, vividness, roughness * 10, radius * 2], dim=1)
    per_image = shapes[:, :, None].to(p_fg).expand(-1, -1, height * width)
    maps = torch.cat([per_pixel, per_image], dim=1)
    return maps.view(len(prompts), -1, height, width)


# The hidden judge in every report; never trained on.
JUDGES = {"utility": utility, "fidelity": fidelity}
# New combinations of known words (module docstring, item 3).
HELD_OUT_PROMPTS = tuple(p for i, p in enumerate(PROMPTS) if i % 5 == i // 20)
TRAIN_PROMPTS = tuple(p for p in PROMPTS if p not in HELD_OUT_PROMPTS)


# The base model of this world (toy_model.py) ------------------------------------------------------


def load_base_model(
    cache_dir: str = ".cache/toy",
    device="cpu",
    config: toy_model.ToyConfig | None = None,
    progress: bool = True,
) -> StableDiffusion:
    """The toy base model (toy_model.load_base_model) fitted to this world's PROMPTS and draw():
    pretrained on first use, then loaded from cache_dir/."""
    return toy_model.load_base_model(
        TOY_WORLD_VERSION, PROMPTS, draw, cache_dir, device, config, progress
    )


# A toy Pick-a-Pic: the toy human's noisy preferences between base-model samples -------------------

# DDIM, no CFG: pairs, rollouts and reports alike.
SAMPLING = {"num_steps": 10, "guidance": 1.0, "eta": 0.0}
# train.py's settings for --model=toy, per method (flags override them); tuned on held-out seeds
# and prompts.
_COMMON = {
    "resolution": 16,
    "lora_rank": 4,
    "lora_alpha": 4.0,
    "learning_rate": 3e-3,
    "reward": "toy",  # the learned toy reward model: online methods, --ai_feedback, the report
    "tailorpo.num_steps": SAMPLING["num_steps"],
    "tailorpo.guidance_scale": SAMPLING["guidance"],  # + report
}
_PAIRS = {  # Diffusion-DPO and SFT on make_pairs(); steps, batch and lr: bench/results/toy_sweep.md
    **_COMMON,
    "max_steps": 600,
    "batch_size": 16,
    "learning_rate": 4e-3,
    # The official 5000 is for SD latents, D = 4*64*64 elements: the mean-MSE convention divides the
    # paper's beta by D, and 5000 * 768 / 16384 ~ 250 is the same paper beta for D = 3*16*16.
    "beta": 250.0,
    "prompt_dropout": 0.2,  # official
    "val_pairs": 256,
    "eval_every": 100,  # the held-out validation curve (fixed noise and t)
}
# The online methods: 4 prompts per step from TRAIN_PROMPTS; beta 10.
_ONLINE = {**_COMMON, "max_steps": 100, "batch_size": 4}
TRAIN_DEFAULTS = {
    "dpo": _PAIRS,
    "sft": _PAIRS,
    "tailorpo": _ONLINE,
    "tailorpo-g": _ONLINE,
    "trajectory": _ONLINE,
}


@dataclass
class PairsConfig:
    # Base-model samples per prompt (seeds); every two of them make a pair.
    images_per_prompt: int = 12
    # Samples per held-out prompt (pairs for checks only, heldout/pairs.jsonl).
    held_out_images: int = 6
    num_steps: int = SAMPLING["num_steps"]  # DDIM steps (eta 0) and CFG scale of the samples
    guidance: float = SAMPLING["guidance"]
    tau: float = 0.1  # Bradley-Terry temperature on u: P(A > B) = sigmoid((u_A - u_B) / tau)
    tie_margin: float = 0.02  # |u_A - u_B| below this: a tie (label 0.5; data.py skips ties)
    seed: int = 0


def preference_labels(
    u_0: torch.Tensor, u_1: torch.Tensor, tau: float, tie_margin: float, generator: torch.Generator
) -> list[float]:
    """label_0 [N] of pairs of utilities u_0, u_1 [N]: noisy Bradley-Terry (PairsConfig), ties
    0.5."""
    first = torch.rand(len(u_0), generator=generator) < torch.sigmoid((u_0 - u_1) / tau)
    return [
        0.5 if abs(a - b) < tie_margin else float(f)
        for a, b, f in zip(u_0.tolist(), u_1.tolist(), first.tolist())
    ]


def _write_pairs(folder: str, sd, prompts, images_per_prompt: int, config: PairsConfig, seed: int):
    """Sample images_per_prompt images per prompt (x_T of seed*1000 + k); every two make a pair."""
    sampling = {"num_steps": config.num_steps, "guidance": config.guidance, "progress": False}
    seeds = [seed * 1000 + k for k in range(images_per_prompt)]
    # [P, K, 3, H, W]: K samples of each of the P prompts.
    images = torch.stack([generate(sd, list(prompts), seed=s, **sampling) for s in seeds], 1)
    repeated = [p for p in prompts for _ in range(images_per_prompt)]
    utilities = utility(images.flatten(0, 1), repeated).view(len(prompts), images_per_prompt)
    a, b = torch.combinations(torch.arange(images_per_prompt)).T  # all pairs (a, b), a < b
    captions = [p for p in prompts for _ in range(len(a))]
    images_0, images_1 = images[:, a].flatten(0, 1), images[:, b].flatten(0, 1)
    u_0, u_1 = utilities[:, a].flatten(), utilities[:, b].flatten()
    generator = torch.Generator().manual_seed(seed)
    labels = preference_labels(u_0, u_1, config.tau, config.tie_margin, generator)
    write_pairs_jsonl(folder, captions, list(images_0), list(images_1), labels)


def make_pairs(
    cache_dir: str = ".cache/toy", config: PairsConfig | None = None, sd=None, progress: bool = True
) -> str:
    """The toy Pick-a-Pic folder, cached by sd's weights and config; HELD_OUT_PROMPTS' pairs in
    heldout/."""
    config = config or PairsConfig()
    sd = sd or load_base_model(cache_dir, progress=progress)
    weights_bytes = b"".join(p.detach().cpu().numpy().tobytes() for p in sd.unet.parameters())
    model_key = hashlib.sha256(weights_bytes).hexdigest()[:12]
    # config.json, hashed: the folder's name.
    fields = {"world": TOY_WORLD_VERSION, "model": model_key, **asdict(config)}
    folder = os.path.join(cache_dir, "pairs-" + toy_model.hash_key(fields))
    if os.path.isdir(folder):
        return folder
    print(f"sampling the toy preference pairs (cached in {folder})")
    temporary = f"{folder}.tmp{os.getpid()}"
    _write_pairs(temporary, sd, TRAIN_PROMPTS, config.images_per_prompt, config, config.seed)
    held_out = os.path.join(temporary, "heldout")
    _write_pairs(held_out, sd, HELD_OUT_PROMPTS, config.held_out_images, config, config.seed + 1)
    toy_model.publish(temporary, folder, fields)
    return folder


# The toy reward model (toy_reward.py), learned from the pairs -------------------------------------


def load_reward_model(
    cache_dir: str = ".cache/toy",
    device="cpu",
    config=None,
    pairs_folder=None,
    progress: bool = True,
) -> toy_reward.ToyRewardModel:
    """The learned toy reward model (toy_reward.py), trained on make_pairs(cache_dir) on first use
    and cached beside the pairs as reward-<key>.safetensors, keyed by the pairs folder's name and
    the config."""
    config = config or toy_reward.RewardModelConfig()
    pairs_folder = pairs_folder or make_pairs(cache_dir, progress=progress)
    pairs_name = os.path.basename(os.path.normpath(pairs_folder))
    key = toy_model.hash_key({"pairs": pairs_name, "version": toy_reward.VERSION, **asdict(config)})
    path = os.path.join(pairs_folder, f"reward-{key}.safetensors")
    channels = 5 + len(SHAPES)  # reward_features' maps
    return toy_reward.load_reward_model(
        path, pairs_folder, reward_features, channels, device, config, utility, progress
    )


# The door: all that the rest of the house knows of the toy world ----------------------------------

MODEL = "toy"  # the --model value that selects the toy world
CATEGORIES = ("training prompt", "held-out combination")  # of the report prompts


class World:
    """The toy world as the house sees it (CONTRACTS.md, item 4); models, data made on first use."""

    def __init__(self):
        self.defaults = TRAIN_DEFAULTS  # train.py's flag defaults per method
        self.prompts = list(TRAIN_PROMPTS)  # the online methods' training prompts
        # Base vs aligned: training prompts and held-out combinations.
        self.report_prompts = list(PROMPTS)
        self.report_categories = [CATEGORIES[p in HELD_OUT_PROMPTS] for p in PROMPTS]
        self.judges = JUDGES  # the hidden judge, reported beside the rewards; never trained on
        self.sampling = SAMPLING  # for pairs, rollouts, reports and evaluate.py alike
        self.reward_name = "toy"  # --reward / --rewards name of reward(), the learned reward model

    def load_model(self, device="cpu") -> StableDiffusion:
        return load_base_model(device=device)

    def pairs_folder(self) -> str:
        return make_pairs()

    def reward(self, device="cpu") -> toy_reward.ToyRewardModel:
        """The learned toy reward model, r(images in [0, 1], prompts) -> [B]."""
        return load_reward_model(device=device)


def world() -> World:  # cheap: builds nothing until asked
    return World()
