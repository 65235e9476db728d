"""A CPU toy world where preference alignment visibly works: coloured shapes described by short prompts.

The point of this file is to let a newcomer without a GPU or the SD1.5 weights run both papers' stories end
to end in minutes: Diffusion-DPO (offline, on human preference pairs) and TailorPO (online, against a reward
model), each judged by a hidden "human" that nothing trains on. Nothing is downloaded: the images are drawn
on the fly and the base model is pretrained here, with the plain DDPM objective (Ho et al. 2020, Eq. 14):

    L = E_{x_0, t ~ U{0..999}, eps ~ N(0,I)} || eps - eps_pred(x_t, t, c) ||^2,
        x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps

The world. A 16x16 RGB picture of one shape (circle, square, triangle) of one colour on a background of
another colour, described by the prompt "a red circle on a blue background" (60 prompts). Position and size
vary, and so does the *vividness* of each colour (every colour is mixed with mid-grey by a random amount).

The pieces, in the order of the RLHF picture:
1. The base model (load_base_model): the repository's own modules at tiny size, pretrained on draw()'s
   pictures and cached. Its samples are imperfect the way a real base model's are: wrong or muddy
   background colours, pixel noise, dull colours, blobby shapes.
2. The toy human (judge / utility / fidelity): a hidden utility u(image, prompt) in [0, 4], prompt fidelity
   (the asked shape, shape colour and background colour) plus quality (vivid colours, no pixel noise or
   ragged edges); the formula is in judge() and utility(). It is only ever used to label pairs and to
   judge results.
3. A toy Pick-a-Pic (make_pairs): two base-model samples of the same prompt, labelled by the toy human with
   noisy Bradley-Terry preferences, P(A > B) = sigmoid((u_A - u_B) / tau), near-equal pairs labelled ties;
   a pairs.jsonl folder with PNGs that --method=dpo|sft reads through data.py like Pick-a-Pic. 12 of the 60
   prompts (HELD_OUT_PROMPTS, new combinations of known words) appear in no pair, for a generalisation check.
4. A toy reward model (ToyRewardModel, rewards.get_reward("toy")), the role PickScore plays for SD:
   prompt-aware, differentiable, learned from the pairs with the Bradley-Terry loss; NOT the hidden utility.
   The online methods and Diffusion-DPO with AI feedback use it.
TRAIN_DEFAULTS holds the settings train.py applies for --model=toy; SAMPLING the sampling of pairs, rollouts
and evaluation (10 DDIM steps, no CFG: the preference data are on-policy).

Measured (one thread of the shared 2-core CPU, load ~1-2): pretraining 271 s, pairs 10 s, reward model 13 s
(pairwise accuracy 0.95 on held-out pairs of the training prompts, 0.89 on the held-out prompts' pairs; u
itself: 0.93 / 0.91 against the noisy labels). Against the base on fresh seeds (192 images each; mean +-
stderr), hidden-utility win rate and prompt-fidelity change:
    Diffusion-DPO (TRAIN_DEFAULTS["dpo"], 45 s)   training prompts 0.90 +- 0.02, +0.024 +- 0.004;
                                                 held-out prompts 0.93 +- 0.02, +0.039 +- 0.006
    TailorPO (TRAIN_DEFAULTS["tailorpo"], 35 s)   training prompts 0.81 +- 0.03, +0.033 +- 0.006;
                                                 held-out prompts 0.78 +- 0.03, +0.035 +- 0.006

Deviations from Stable Diffusion (numbered):
1. No VAE. The toy diffuses in pixel space through IdentityVAE, a stand-in with the AutoencoderKL interface
   (encode(x).sample()/.mode() == x, decode(z) == z, config.scaling_factor = 1.0, downsample_factor = 1).
   Pretraining even the tiny VAE of vae.py takes longer than the whole toy budget on a 2-core CPU, and a
   16x16 image is already as small as a latent.
2. The text encoder is trained from scratch together with the UNet (SD1.5 keeps a pretrained CLIP frozen);
   10% of the prompts are dropped to "" during pretraining so classifier-free guidance works.
3. Cross-attention only at the 8x8 level of the UNet (SD1.5: at every level but the lowest); see ToyConfig.
4. Everything is cached under .cache/toy/: the base model in <hash of ToyConfig>/, the pairs in
   pairs-<hash>/ (keyed by the base weights and PairsConfig), the reward model inside the pairs folder. Each
   is written to a temporary name and renamed, so an interrupted run never leaves half a cache. The same
   config and seed always give the same files (on the same torch build). The base weights are an
   exponential moving average of the pretraining iterates (decay 0.99): cleaner samples after few steps.
"""

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from rewards import Reward

# ----------------------------------------------------------------------------------------------------------
# The world: prompts and procedurally drawn images

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # pure RGB in [0, 1]; each image mixes them with grey by a random amount (the "vividness")
    "red": (0.95, 0.1, 0.1),
    "green": (0.1, 0.8, 0.15),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.85, 0.1),
    "purple": (0.6, 0.15, 0.85),
}
PROMPTS = [
    f"a {colour} {shape} on a {background} background"
    for shape in SHAPES
    for colour in COLOURS
    for background in COLOURS
    if background != colour
]  # 3 shapes x 5 colours x 4 backgrounds = 60 prompts


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """'a red circle on a blue background' -> ('red', 'circle', 'blue'); a clear error for anything else."""
    words = prompt.split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        raise ValueError(f"not a toy prompt: {prompt!r} (expected 'a <colour> <shape> on a <colour> "
                         "background')")
    colour, shape, background = words[1], words[2], words[5]
    if colour not in COLOURS or background not in COLOURS or shape not in SHAPES:
        raise ValueError(f"unknown colour or shape in {prompt!r}; colours {list(COLOURS)}, shapes {SHAPES}")
    return colour, shape, background


def shape_mask(shape: str, cx, cy, radius, size: int) -> torch.Tensor:
    """Soft mask [..., size, size] in (0, 1) of a shape centred at (cx, cy) (fractions of the side) with
    `radius`; cx, cy, radius are floats or tensors of one shape [...]. Anti-aliased edge ~ a pixel wide."""
    cx, cy, radius = (torch.as_tensor(v, dtype=torch.float32)[..., None, None] for v in (cx, cy, radius))
    grid = (torch.arange(size) + 0.5) / size
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    dx, dy = x - cx, y - cy
    if shape == "circle":
        distance = (dx**2 + dy**2).sqrt() - radius  # signed distance, negative inside
    elif shape == "square":
        distance = torch.maximum(dx.abs(), dy.abs()) - 0.85 * radius
    else:  # upward equilateral triangle, circumradius R: max of the three edges' half-plane distances
        R = 1.2 * radius
        distance = torch.maximum(dy - 0.5 * R, 0.866 * dx.abs() - 0.5 * dy - 0.5 * R)
    return torch.sigmoid(-distance * size * 2.0)


def shade(colour: str, vividness: float) -> torch.Tensor:
    """The colour mixed with mid-grey: [3] in [0, 1]; vividness 0 -> 20% of the colour, 1 -> the pure one."""
    saturation = 0.2 + 0.8 * vividness
    return 0.5 + saturation * (torch.tensor(COLOURS[colour]) - 0.5)


def draw(prompt: str, size: int, generator: torch.Generator) -> torch.Tensor:
    """One picture for `prompt`: [3, size, size] in [-1, 1]; position, size, vividness from `generator`."""
    colour, shape, background = parse_prompt(prompt)
    cx, cy, radius, vivid_fg, vivid_bg = torch.rand(5, generator=generator).tolist()
    cx, cy = 0.3 + 0.4 * cx, 0.3 + 0.4 * cy  # centre in the middle 40% of the picture
    radius = 0.2 + 0.12 * radius
    mask = shape_mask(shape, cx, cy, radius, size)
    image = torch.lerp(shade(background, vivid_bg).view(3, 1, 1), shade(colour, vivid_fg).view(3, 1, 1), mask)
    return image * 2 - 1


def sample_batch(batch_size: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """A training batch: images [B, 3, size, size] in [-1, 1] and their prompts (uniform over PROMPTS)."""
    indices = torch.randint(len(PROMPTS), (batch_size,), generator=generator).tolist()
    prompts = [PROMPTS[i] for i in indices]
    return torch.stack([draw(p, size, generator) for p in prompts]), prompts


# ----------------------------------------------------------------------------------------------------------
# The toy human: a hidden utility u(image, prompt), the judge of every alignment result

COLOUR_NAMES = tuple(COLOURS)
_CHROMA = torch.tensor([COLOURS[name] for name in COLOUR_NAMES]) - 0.5  # [5, 3] colour minus mid-grey


def _templates(size: int) -> torch.Tensor:
    """[3 shapes, 13 * 13 * 7, size * size]: each shape at 13 x 13 centres and 7 radii spanning draw()'s."""
    grid = torch.linspace(0.3, 0.7, 13)
    cx, cy, radius = torch.meshgrid(grid, grid, torch.linspace(0.2, 0.32, 7), indexing="ij")
    return torch.stack([shape_mask(shape, cx.flatten(), cy.flatten(), radius.flatten(), size).flatten(1)
                        for shape in SHAPES])


def colour_membership(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(membership [B, 5, H*W], vividness [B, H*W]) of images [B, 3, H, W] in [0, 1].

    A pixel p is the colour k whose direction from grey its own chroma d = p - 0.5 points to (softmax over
    the cosines, temperature 0.1), times a confidence min(1, |d| / 0.1) (grey pixels are no colour; 0.1 is
    about the chroma of draw()'s dullest shade). Its vividness is |d| / |c_k - 0.5| of the nearest colour k
    (draw()'s saturation 0.2 + 0.8 vividness for a clean drawing), capped at 1."""
    d = images.flatten(2).transpose(1, 2) - 0.5  # [B, HW, 3]
    norm = (d.pow(2).sum(-1) + 1e-8).sqrt()  # [B, HW] (smooth at grey, for the reward model's gradient)
    chroma = _CHROMA.to(d)
    cosine = d @ F.normalize(chroma, dim=-1).T / norm[..., None]  # [B, HW, 5]
    membership = torch.softmax(cosine / 0.1, dim=-1) * (norm / 0.1).clamp(max=1)[..., None]
    vividness = (norm / chroma.norm(dim=-1)[cosine.argmax(-1)]).clamp(max=1)
    return membership.transpose(1, 2), vividness


@torch.no_grad()
def judge(images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The toy human's view of images [B, 3, H, W] in [0, 1]: {term: [B]}, each term in [0, 1].

    With P_c the colour membership of each pixel (colour_membership), fg / bg the asked shape and background
    colours, and T a template mask of a shape at one of 196 positions/sizes (_templates), a template explains
    the picture as well as A(T) = mean_pixels(T P_fg + (1 - T) P_bg). T* is the best template of the asked
    shape, T' the best of the other two shapes:
        shape      = clip(0.5 + (A(T*) - A(T')) / 0.04, 0, 1)    the asked shape explains it best
        colour     = <T*, P_fg> / <T*, 1>                         the shape area has the asked colour
        background = <1 - T*, P_bg> / <1 - T*, 1>                 the rest has the asked background colour
        vivid      = mean_pixels vividness                        (colour_membership)
        clean      = exp(-mean (x - median3x3(x))^2 / 0.003)     pixel noise and ragged edges leave a
                     residual after a 3x3 median filter; flat areas and straight edges do not
    """
    colour, shape, background = zip(*(parse_prompt(p) for p in prompts))
    batch, _, height, width = images.shape
    images = images.float().cpu()
    membership, vividness = colour_membership(images)
    rows = torch.arange(batch)
    p_fg = membership[rows, torch.tensor([COLOUR_NAMES.index(c) for c in colour])]  # [B, HW]
    p_bg = membership[rows, torch.tensor([COLOUR_NAMES.index(c) for c in background])]
    # the picture's shape: anything that is not the background colour; its centroid and area place one
    # template per shape (draw()'s shapes are centred on their centroid), the IoU says which fits
    shape_area = (1 - p_bg).view(batch, height, width)
    mass = shape_area.sum(dim=(1, 2)).clamp(min=1e-3)
    grid = (torch.arange(height) + 0.5) / height
    cy = (shape_area.sum(2) * grid).sum(1) / mass
    cx = (shape_area.sum(1) * grid).sum(1) / mass
    area = mass / (height * width)  # fraction of the picture; radius r of each shape with that area:
    radii = {"circle": (area / math.pi).sqrt(), "square": area.sqrt() / 1.7,  # square side 1.7 r
             "triangle": (area / 1.8706).sqrt()}  # equilateral, circumradius R = 1.2 r: 3 sqrt(3)/4 R^2
    templates = torch.stack([shape_mask(s, cx, cy, radii[s], height) for s in SHAPES], 1)  # [B, 3, H, W]
    pair = torch.stack(torch.broadcast_tensors(templates, shape_area[:, None]))
    iou = pair.amin(0).sum(dim=(2, 3)) / pair.amax(0).sum(dim=(2, 3))  # [B, 3], fuzzy Jaccard
    asked = torch.tensor([SHAPES.index(s) for s in shape])
    other = iou.masked_fill(F.one_hot(asked, len(SHAPES)).bool(), -1.0).max(dim=1).values
    inside = (templates[rows, asked].flatten(1) > 0.5).float()  # [B, HW]: T* as a hard mask
    median = F.pad(images, (1, 1, 1, 1), mode="replicate").unfold(2, 3, 1).unfold(3, 3, 1).flatten(-2)
    residual = (images - median.median(dim=-1).values).pow(2).mean(dim=(1, 2, 3))
    return {
        "shape": (0.5 + (iou[rows, asked] - other) / 0.1).clamp(0, 1) * (area / 0.05).clamp(max=1),
        "colour": (inside * p_fg).sum(1) / inside.sum(1).clamp(min=1),
        "background": ((1 - inside) * p_bg).sum(1) / (1 - inside).sum(1).clamp(min=1),
        "vivid": vividness.mean(1),
        "clean": torch.exp(-residual / 0.003),
    }


def fidelity(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Prompt fidelity [B] in [0, 1]: the mean of judge()'s shape, colour and background terms."""
    terms = judge(images, prompts)
    return (terms["shape"] + terms["colour"] + terms["background"]) / 3


def utility(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The hidden utility u [B] in [0, 4] of images [B, 3, H, W] in [0, 1] for their toy prompts:
        u = shape + colour + background + 0.5 (vivid + clean)          (terms of judge(), each in [0, 1])
    Fidelity dominates: a wrong background (-1) is never made up for by quality (at most +1)."""
    terms = judge(images, prompts)
    return terms["shape"] + terms["colour"] + terms["background"] + 0.5 * (terms["vivid"] + terms["clean"])


JUDGES = {"utility": utility, "fidelity": fidelity}  # the hidden judge in every report; never trained on
HELD_OUT_PROMPTS = tuple(p for i, p in enumerate(PROMPTS) if i % 5 == i // 20)  # 12 (colour, shape,
#   background) combinations that no pair and no reward model sees; every colour, shape and background, and
#   every pair of them, still appears among the other 48 (test_toy checks)
TRAIN_PROMPTS = tuple(p for p in PROMPTS if p not in HELD_OUT_PROMPTS)


# ----------------------------------------------------------------------------------------------------------
# A toy Pick-a-Pic: the toy human's noisy preferences between base-model samples


SAMPLING = {"num_steps": 10, "guidance": 1.0}  # the toy's sampling everywhere: DDIM eta 0, no CFG. Pairs,
#   rollouts and evaluation use the same setting, so the preference data are on-policy. With CFG 3 the base
#   follows prompts better (fidelity 0.48 vs 0.35), but Diffusion-DPO's gains did not survive it: aligned on
#   CFG-3 pairs and judged at CFG 3, win rates vs base 0.43-0.75 and fidelity down (14 settings tried).


# train.py's settings for --model=toy, per method (applied before --config files and the command line).
# Measured with toy.SAMPLING on 48 training prompts x 4 held-out seeds and 12 held-out prompts x 16 seeds.
_COMMON = {
    "resolution": 16,
    "lora_rank": 4,
    "lora_alpha": 4.0,
    "learning_rate": 3e-3,
    "reward": "toy",  # the learned toy reward model: online methods, --ai_feedback, the report
    "tailorpo.num_steps": SAMPLING["num_steps"],  # also the sampling of train.py's report
    "tailorpo.guidance_scale": SAMPLING["guidance"],
}
_PAIRS = {  # Diffusion-DPO and SFT on make_pairs()
    **_COMMON,
    "max_steps": 150,
    "batch_size": 32,  # pairs per step; with 4-8 the gradient noise undid the gains (measured)
    "beta": 250.0,  # the official 5000 is for SD latents, D = 4*64*64 elements: the mean-MSE convention
    #   divides the paper's beta by D, and 5000 * 768 / 16384 ~ 250 is the same paper beta for D = 3*16*16
    "prompt_dropout": 0.2,  # official
    "val_pairs": 256, "eval_every": 25,  # the held-out validation curve (fixed noise and t)
}
_ONLINE = {**_COMMON, "max_steps": 100, "batch_size": 4}  # 4 prompts per step from TRAIN_PROMPTS; beta 10
TRAIN_DEFAULTS = {"dpo": _PAIRS, "sft": _PAIRS, "tailorpo": _ONLINE, "tailorpo-g": _ONLINE,
                  "trajectory": _ONLINE}


@dataclass
class PairsConfig:
    images_per_prompt: int = 12  # base-model samples per prompt (seeds); every two of them make a pair
    held_out_images: int = 6  # samples per held-out prompt (pairs for checks only, heldout/pairs.jsonl)
    num_steps: int = SAMPLING["num_steps"]  # DDIM steps (eta 0) and CFG scale of the samples
    guidance: float = SAMPLING["guidance"]
    tau: float = 0.1  # Bradley-Terry temperature on u: P(A > B) = sigmoid((u_A - u_B) / tau)
    tie_margin: float = 0.02  # |u_A - u_B| below this: a tie (label 0.5; data.py skips ties)
    seed: int = 0

    def cache_key(self, model_key: str) -> str:
        blob = json.dumps({"world": TOY_WORLD_VERSION, "model": model_key, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def preference_labels(u_0: torch.Tensor, u_1: torch.Tensor, tau: float, tie_margin: float,
                      generator: torch.Generator) -> list[float]:
    """label_0 per pair (1: image 0 preferred, 0: image 1, 0.5: a tie) from utilities [N], [N]: a noisy
    Bradley-Terry judge, P(0 > 1) = sigmoid((u_0 - u_1) / tau); near-equal pairs are ties."""
    first = torch.rand(len(u_0), generator=generator) < torch.sigmoid((u_0 - u_1) / tau)
    return [0.5 if abs(a - b) < tie_margin else float(f) for a, b, f in zip(u_0.tolist(), u_1.tolist(),
                                                                             first.tolist())]


def _write_pairs(folder: str, sd, prompts, images_per_prompt: int, config: PairsConfig, seed: int):
    """Sample images_per_prompt images per prompt (DDIM from x_T of seed*1000 + k), label every two of them
    and write folder/pairs.jsonl + images/ (data.write_pairs_jsonl). Returns the utilities of the pairs."""
    from data import write_pairs_jsonl
    from sample import generate

    images = torch.stack([generate(sd, list(prompts), num_steps=config.num_steps, guidance=config.guidance,
                                   seed=seed * 1000 + k, progress=False)
                          for k in range(images_per_prompt)], 1)  # [P, K, 3, H, W]
    utilities = utility(images.flatten(0, 1), [p for p in prompts for _ in range(images_per_prompt)])
    utilities = utilities.view(len(prompts), images_per_prompt)
    index = torch.combinations(torch.arange(images_per_prompt))  # all pairs (a, b), a < b
    captions = [p for p in prompts for _ in range(len(index))]
    images_0 = images[:, index[:, 0]].flatten(0, 1)
    images_1 = images[:, index[:, 1]].flatten(0, 1)
    u_0, u_1 = utilities[:, index[:, 0]].flatten(), utilities[:, index[:, 1]].flatten()
    labels = preference_labels(u_0, u_1, config.tau, config.tie_margin, torch.Generator().manual_seed(seed))
    write_pairs_jsonl(folder, captions, list(images_0), list(images_1), labels)
    return u_0, u_1, labels


def make_pairs(cache_dir: str = ".cache/toy", config: PairsConfig | None = None, sd=None,
               progress: bool = True) -> str:
    """The toy Pick-a-Pic folder (cached): pairs.jsonl + images/ over TRAIN_PROMPTS for --method=dpo|sft, and
    heldout/pairs.jsonl over HELD_OUT_PROMPTS (never trained on). Pairs are two base-model samples of one
    prompt (different seeds), labelled by preference_labels on the hidden utility. sd: the base model
    (default load_base_model(cache_dir)); the folder is keyed by its weights and `config`."""
    config = config or PairsConfig()
    sd = sd or load_base_model(cache_dir, progress=progress)
    model_key = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes()
                                        for p in sd.unet.parameters())).hexdigest()[:12]
    folder = os.path.join(cache_dir, "pairs-" + config.cache_key(model_key))
    if os.path.isdir(folder):
        return folder
    print(f"sampling the toy preference pairs (cached in {folder})")
    start = time.time()
    temporary = f"{folder}.tmp{os.getpid()}"
    u_0, u_1, labels = _write_pairs(temporary, sd, TRAIN_PROMPTS, config.images_per_prompt, config,
                                    config.seed)
    _write_pairs(os.path.join(temporary, "heldout"), sd, HELD_OUT_PROMPTS, config.held_out_images, config,
                 config.seed + 1)
    with open(os.path.join(temporary, "config.json"), "w") as f:
        json.dump({"world": TOY_WORLD_VERSION, "model": model_key, **asdict(config)}, f, indent=1)
    decided = torch.tensor([label != 0.5 for label in labels])
    agree = ((u_0 > u_1) == torch.tensor([label == 1.0 for label in labels]))[decided].float().mean()
    print(f"{len(labels)} pairs ({(~decided).sum()} ties) in {time.time() - start:.0f} s; the label agrees "
          f"with the utility order on {agree:.2f} of the others")
    if os.path.isdir(folder):
        shutil.rmtree(temporary)
    else:
        os.replace(temporary, folder)
    return folder


# ----------------------------------------------------------------------------------------------------------
# A toy reward model (the role PickScore plays for SD): learned from the pairs, not the hidden utility


class ToyRewardModel(Reward):
    """r(image, prompt): a small CNN on fixed, prompt-aware feature maps, learned from the preference pairs.

    The toy's stand-in for PickScore, a head learned on top of fixed features (as the LAION aesthetic
    predictor is an MLP on CLIP embeddings). Per pixel, four fixed differentiable features: how much it is
    the asked shape colour and the asked background colour (colour_membership), its vividness, and its
    roughness ||x - boxblur3x3(x)||^2. Two 3x3 convolutions with GELU over these maps, a mean over the
    picture and a linear head give one number; all of that is learned. A fifth, constant map, the distance
    from the picture's centre, lets it learn where each colour belongs. It never sees u's templates, weights
    or median filter. Images [B, 3, H, W] in [0, 1] -> scores [B]; differentiable in the images."""

    name = "toy"

    def __init__(self, width: int = 16):
        super().__init__()
        channels = 5 + len(SHAPES)
        self.convs = nn.ModuleList([nn.Conv2d(channels, width, 3, padding=1),
                                    nn.Conv2d(width, width, 3, padding=1)])
        self.head = nn.Linear(2 * width, 1)

    def features(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """[B, 8, H, W]: asked-colour and asked-background membership, vividness, roughness, the distance
        from the centre, and the asked shape as three constant one-hot planes."""
        colour, shape, background = zip(*(parse_prompt(p) for p in prompts))
        rows = torch.arange(len(prompts), device=images.device)
        membership, vividness = colour_membership(images)  # [B, 5, HW], [B, HW]
        index = lambda names: torch.tensor([COLOUR_NAMES.index(c) for c in names], device=images.device)
        p_fg, p_bg = membership[rows, index(colour)], membership[rows, index(background)]
        blurred = F.avg_pool2d(images, 3, 1, 1, count_include_pad=False)
        roughness = (images - blurred).pow(2).sum(dim=1).flatten(1)
        height, width = images.shape[2:]
        grid = (torch.arange(height, device=images.device) + 0.5) / height - 0.5
        radius = (grid[:, None] ** 2 + grid[None, :] ** 2).sqrt().flatten().expand(len(prompts), -1)
        shapes = F.one_hot(torch.tensor([SHAPES.index(s) for s in shape], device=images.device), len(SHAPES))
        maps = torch.cat([torch.stack([p_fg, p_bg, vividness, roughness * 10, radius * 2], dim=1),
                          shapes[:, :, None].to(p_fg).expand(-1, -1, height * width)], dim=1)
        return maps.view(len(prompts), -1, height, width)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        h = self.features(images, prompts)
        for conv in self.convs:
            h = F.gelu(conv(h))
        return self.head(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)).squeeze(1)


@dataclass
class RewardModelConfig:
    width: int = 16  # ToyRewardModel channels
    steps: int = 400  # AdamW steps of the Bradley-Terry loss
    batch_size: int = 64  # pairs per step
    lr: float = 3e-3
    weight_decay: float = 1e-2
    validation: int = 256  # pairs of the training prompts kept out of training, for the accuracy report
    seed: int = 0


def _pair_tensors(folder: str):
    """(winners [N,3,H,W], losers [N,3,H,W] in [0, 1], captions) of a pairs.jsonl folder, read by data.py
    (ties skipped there; no flips, no prompt dropout)."""
    from data import PreferencePairs

    pairs = PreferencePairs(folder, resolution=16, hflip=False, prompt_dropout=0.0)
    (batch,) = pairs.batches(len(pairs))
    return (batch["pixels_w"] + 1) / 2, (batch["pixels_l"] + 1) / 2, batch["captions"]


def pairwise_accuracy(reward_fn, winners, losers, captions) -> float:
    """Fraction of pairs the reward orders as labelled (ties in score count 1/2)."""
    with torch.no_grad():
        margin = reward_fn(winners, captions) - reward_fn(losers, captions)
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item()


def _augment(images, flip, blur):
    """images [B,3,H,W] blended with their 3x3 box blur by blur [B,1,1,1] in [0, 1], flipped where flip."""
    images = torch.lerp(images, F.avg_pool2d(images, 3, 1, 1, count_include_pad=False), blur)
    return torch.where(flip, images.flip(-1), images)


def train_reward_model(pairs_folder: str, config: RewardModelConfig | None = None, progress: bool = True):
    """Fit ToyRewardModel to the pairs with the Bradley-Terry loss -log sigmoid(r(x_w) - r(x_l)) (the reward
    model step of RLHF). Augmentation, the same for both images of a pair: a horizontal flip (p 1/2), and
    (p 1/2) a blend with a 3x3 box blur of random strength, so that the blurry x0_pred of early denoising
    steps (which TailorPO scores) are ranked like finished images. Returns (model, metrics: accuracies on the
    held-out pairs of the training prompts and of the held-out prompts)."""
    config = config or RewardModelConfig()
    winners, losers, captions = _pair_tensors(pairs_folder)
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(config.seed))
    validation, train = order[:config.validation], order[config.validation:]
    torch.manual_seed(config.seed)
    model = ToyRewardModel(config.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    for step in tqdm(range(config.steps), desc="toy reward model", disable=not progress):
        batch = train[torch.randint(len(train), (config.batch_size,), generator=generator)]
        flip = torch.rand(len(batch), 1, 1, 1, generator=generator) < 0.5
        blur = torch.rand(len(batch), 1, 1, 1, generator=generator)
        blur = blur * (torch.rand(len(batch), 1, 1, 1, generator=generator) < 0.5)
        texts = [captions[i] for i in batch]
        margin = (model(_augment(winners[batch], flip, blur), texts)
                  - model(_augment(losers[batch], flip, blur), texts))
        loss = -F.logsigmoid(margin).mean()  # Bradley-Terry
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:  # cosine decay to 0
            group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / config.steps))
    model.eval().requires_grad_(False)
    held_out = _pair_tensors(os.path.join(pairs_folder, "heldout"))
    metrics = {
        "train_accuracy": pairwise_accuracy(model, winners[train], losers[train],
                                            [captions[i] for i in train]),
        "validation_accuracy": pairwise_accuracy(model, winners[validation], losers[validation],
                                                 [captions[i] for i in validation]),
        "held_out_prompts_accuracy": pairwise_accuracy(model, *held_out),
        "utility_held_out_prompts_accuracy": pairwise_accuracy(utility, *held_out),
    }
    return model, metrics


def load_reward_model(cache_dir: str = ".cache/toy", device="cpu", config: RewardModelConfig | None = None,
                      pairs_folder: str | None = None, progress: bool = True) -> ToyRewardModel:
    """The learned toy reward model (rewards.get_reward("toy")), frozen; trained on make_pairs(cache_dir) and
    cached beside the pairs on the first call."""
    config = config or RewardModelConfig()
    pairs_folder = pairs_folder or make_pairs(cache_dir, progress=progress)
    blob = json.dumps({"pairs": os.path.basename(os.path.normpath(pairs_folder)), **asdict(config)},
                      sort_keys=True)
    path = os.path.join(pairs_folder, f"reward-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.safetensors")
    if not os.path.isfile(path):
        start = time.time()
        model, metrics = train_reward_model(pairs_folder, config, progress)
        print(f"trained the toy reward model in {time.time() - start:.0f} s; pairwise accuracy: " + ", ".join(
            f"{k} {v:.3f}" for k, v in metrics.items()))
        save_file(model.state_dict(), f"{path}.tmp{os.getpid()}", metadata={k: str(v) for k, v in
                                                                           metrics.items()})
        os.replace(f"{path}.tmp{os.getpid()}", path)
    from weights import load_strict

    model = load_strict(ToyRewardModel(config.width), load_file(path), path)
    return model.eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------------------------------------
# The identity "VAE" (deviation 1)


class IdentityLatent:
    """What AutoencoderKL.encode returns (a DiagonalGaussian) with zero variance: sample() == mode() == x."""

    def __init__(self, x: torch.Tensor):
        self.mean, self.logvar, self.std = x, torch.full_like(x, -30.0), torch.zeros_like(x)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean


@dataclass
class IdentityVAEConfig:
    scaling_factor: float = 1.0
    latent_channels: int = 3


class IdentityVAE(nn.Module):
    """Pixel-space stand-in for vae.AutoencoderKL: latents are the images themselves ([-1, 1], 3 channels)."""

    downsample_factor = 1

    def __init__(self):
        super().__init__()
        self.config = IdentityVAEConfig()
        # no weights, but a dtype and device like a real VAE (moved by .to(); not saved)
        self.register_buffer("dtype_carrier", torch.zeros(()), persistent=False)

    def encode(self, x: torch.Tensor) -> IdentityLatent:
        return IdentityLatent(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


# ----------------------------------------------------------------------------------------------------------
# The base model: config, pretraining, cache

TOY_WORLD_VERSION = 2  # bump when the world (draw, PROMPTS) or what is cached from it changes


@dataclass
class ToyConfig:
    image_size: int = 16  # pixels; also the "latent" size (identity VAE)
    block_out_channels: tuple = (16, 32)  # UNet widths per level (16x16 -> 8x8)
    cross_attention: tuple = (False, True)  # attention at 8x8 only: at 16x16 (256 tokens) it took 2/3 of the
    #   time of a training step (measured), and the prompt reaches 16x16 through the up path
    layers_per_block: int = 1
    num_heads: int = 2
    pretrain_steps: int = 1600  # AdamW steps of L_simple (~4.5 CPU-minutes on one core, 0.17 s per step)
    batch_size: int = 32
    lr: float = 2e-3  # peak; linear warmup over 50 steps then cosine decay to 10%
    ema_decay: float = 0.99  # the cached weights are an exponential moving average (cleaner samples)
    prompt_dropout: float = 0.1  # fraction of prompts replaced by "" (classifier-free guidance)
    seed: int = 0  # initialisation and data

    @classmethod
    def default(cls):
        return cls()

    @classmethod
    def tiny(cls):
        """Seconds instead of minutes, for tests: the same world and model shapes, a few steps."""
        return cls(pretrain_steps=4, batch_size=8)

    def cache_key(self) -> str:
        blob = json.dumps({"world": TOY_WORLD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_models(config: ToyConfig):
    """Fresh (unet, text_encoder, tokenizer) at toy size, initialised from config.seed."""
    from clip import CLIPTextConfig, CLIPTextModel
    from tokenizer import CLIPTokenizer
    from unet import UNet2DConditionModel, UNetConfig

    text_config = CLIPTextConfig.tiny()
    unet_config = replace(
        UNetConfig.tiny(),
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(config.block_out_channels),
        cross_attention=tuple(config.cross_attention),
        layers_per_block=config.layers_per_block,
        num_heads=config.num_heads,
        cross_attention_dim=text_config.hidden_size,
        sample_size=config.image_size,
    )
    torch.manual_seed(config.seed)
    return UNet2DConditionModel(unet_config), CLIPTextModel(text_config), CLIPTokenizer.default()


def pretrain(unet, text_encoder, tokenizer, schedule, config: ToyConfig, progress: bool = True):
    """Fit eps_pred to the toy world with L_simple (Ho et al. 2020, Eq. 14); returns the loss per step."""
    generator = torch.Generator().manual_seed(config.seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    warmup = 50

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_fraction = (step - warmup) / max(1, config.pretrain_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * progress_fraction)).item())

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    ema = [p.detach().clone() for p in params]
    unet.train()
    text_encoder.train()
    losses = []
    for _ in tqdm(range(config.pretrain_steps), desc="toy pretraining", disable=not progress):
        x0, prompts = sample_batch(config.batch_size, config.image_size, generator)
        drop = torch.rand(len(prompts), generator=generator) < config.prompt_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        # encode each distinct prompt once (there are at most 61), then gather per sample
        unique = sorted(set(prompts))
        context = text_encoder(tokenizer(unique))[0][[unique.index(p) for p in prompts]]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, schedule.num_train_timesteps, (len(prompts),), generator=generator)
        x_t = schedule.add_noise(x0, noise, t)  # q(x_t | x_0)
        loss = F.mse_loss(unet(x_t, t, context), noise)  # Ho et al. Eq. 14
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        decay = min(config.ema_decay, (1 + len(losses)) / (10 + len(losses)))  # short horizon at the start
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses.append(loss.item())
    with torch.no_grad():
        for p, average in zip(params, ema):
            p.copy_(average)
    unet.eval()
    text_encoder.eval()
    return losses


def load_base_model(cache_dir: str = ".cache/toy", device="cpu", config: ToyConfig | None = None,
                    progress: bool = True):
    """The pretrained toy model as a weights.StableDiffusion; pretrains and caches it on the first call.

    The cache folder is .cache/toy/<config hash>/ (unet.safetensors, text_encoder.safetensors,
    config.json, pretrain_loss.json); it is written to a temporary folder and renamed, so an interrupted
    pretraining never leaves a half-written model behind.
    """
    from scheduler import NoiseSchedule
    from weights import StableDiffusion, load_strict

    if torch.device(device).type == "cpu":
        # The toy's tensors are tiny: a second intra-op thread gains little, and on a shared CPU threads that
        # wait for each other made pretraining steps up to 25x slower (measured here). A process-wide setting.
        torch.set_num_threads(1)
    config = config or ToyConfig.default()
    unet, text_encoder, tokenizer = build_models(config)
    schedule = NoiseSchedule.sd15()
    folder = os.path.join(cache_dir, config.cache_key())
    if os.path.isdir(folder):
        load_strict(unet, load_file(os.path.join(folder, "unet.safetensors")), os.path.join(folder, "unet"))
        load_strict(text_encoder, load_file(os.path.join(folder, "text_encoder.safetensors")),
                    os.path.join(folder, "text_encoder"))
        unet.eval()
        text_encoder.eval()
    else:
        print(f"pretraining the toy base model ({config.pretrain_steps} steps; cached in {folder})")
        start = time.time()
        losses = pretrain(unet, text_encoder, tokenizer, schedule, config, progress)
        final = sum(losses[-50:]) / len(losses[-50:])
        print(f"pretrained in {time.time() - start:.0f} s, loss of the last 50 steps {final:.4f}")
        temporary = f"{folder}.tmp{os.getpid()}"
        os.makedirs(temporary, exist_ok=True)
        save_file(unet.state_dict(), os.path.join(temporary, "unet.safetensors"))
        save_file(text_encoder.state_dict(), os.path.join(temporary, "text_encoder.safetensors"))
        with open(os.path.join(temporary, "config.json"), "w") as f:
            json.dump({"world": TOY_WORLD_VERSION, **asdict(config)}, f, indent=1)
        with open(os.path.join(temporary, "pretrain_loss.json"), "w") as f:
            json.dump(losses, f)
        if os.path.isdir(folder):  # another process cached the same model meanwhile: keep theirs
            shutil.rmtree(temporary)
        else:
            os.replace(temporary, folder)
    for module in (unet, text_encoder):
        module.requires_grad_(False)
        module.to(device)
    return StableDiffusion(unet=unet, vae=IdentityVAE().to(device), text_encoder=text_encoder,
                           tokenizer=tokenizer, schedule=schedule)
