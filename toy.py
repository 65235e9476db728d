"""A CPU toy world where preference alignment visibly works: coloured shapes described by short prompts.

Both papers' stories in minutes, no GPU or download; results in README.md and bench/results/bench_methods.md.
A 16x16 picture shows a shape (circle, square, triangle) of one colour on a background of another, prompted
"a red circle on a blue background" (60 prompts); position, size and each colour's vividness vary.
1. The base model (load_base_model): the repository's modules at tiny size, pretrained and cached with
       L = E_{x_0, t ~ U{0..999}, eps ~ N(0,I)} || eps - eps_pred(x_t, t, c) ||^2     (Ho et al. 2020, Eq. 14)
       x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
2. The toy human (judge, utility, fidelity; JUDGES) only labels pairs and judges results: prompt fidelity
   plus quality, with the terms of judge() in [0, 1],
       u(image, prompt) = shape + colour + background + 0.5 (vivid + clean)    in [0, 4]
   Fidelity dominates: a wrong background (-1) is never made up for by quality (at most +1).
3. A toy Pick-a-Pic (make_pairs) for --method=dpo|sft: two base-model samples of one prompt labelled by noisy
   Bradley-Terry preferences P(A > B) = sigmoid((u_A - u_B) / tau), near-equal pairs ties. The 12
   HELD_OUT_PROMPTS appear in no pair: new combinations of the words and word pairs of the other 48.
4. The toy reward model (toy_reward.py, World.reward, --reward=toy): learned from the pairs, not u.
5. The door (MODEL, world(), World): all that train.py, evaluate.py and rewards.py know of the toy.

Deviations from Stable Diffusion (numbered):
1. No VAE: pixel-space diffusion through IdentityVAE; pretraining even vae.py's tiny VAE takes longer than the
   whole toy budget, and 16x16 is already as small as a latent.
2. The text encoder is trained from scratch with the UNet (SD1.5 keeps CLIP frozen); 10% of the prompts are
   dropped to "" during pretraining so classifier-free guidance works.
3. Cross-attention only at the 8x8 level of the UNet (SD1.5: at every level but the lowest); see ToyConfig.
4. Cached under .cache/toy/ (base model, pairs, reward model, keyed by hash_key), each written atomically.
"""

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import toy_reward
from clip import CLIPTextConfig, CLIPTextModel
from pair_files import write_pairs_jsonl
from progress import bar
from sampler import generate
from scheduler import NoiseSchedule
from tokenizer import CLIPTokenizer
from unet import UNet2DConditionModel, UNetConfig
from weights import StableDiffusion, load_strict

# The world: prompts and procedurally drawn images -----------------------------------------------------------

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (0.95, 0.1, 0.1), "green": (0.1, 0.8, 0.15), "blue": (0.15, 0.3, 0.95),  # pure RGB
           "yellow": (0.95, 0.85, 0.1), "purple": (0.6, 0.15, 0.85)}  # in [0, 1]; draw() mixes them with grey
PROMPTS = [f"a {colour} {shape} on a {background} background" for shape in SHAPES for colour in COLOURS
           for background in COLOURS if background != colour]  # 3 shapes x 5 colours x 4 backgrounds = 60


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


# The toy human: a hidden utility u(image, prompt), the judge of every alignment result ----------------------

_CHROMA = torch.tensor(list(COLOURS.values())) - 0.5  # [5, 3] each colour minus mid-grey, in COLOURS' order


def colour_membership(images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, ...]:
    """(P_fg, P_bg, vividness) [B, H*W] of images [B, 3, H, W] in [0, 1]: each pixel p's membership of the
    asked shape and background colours, where p is the colour k its chroma d = p - 0.5 points to (softmax over
    the cosines, temperature 0.1) times a confidence min(1, |d| / 0.1) (0.1 ~ draw()'s dullest chroma), and
    its vividness min(1, |d| / |c_k - 0.5|) for the nearest colour k (shade()'s saturation, if clean)."""
    d = images.flatten(2).transpose(1, 2) - 0.5  # [B, HW, 3]
    norm = (d.pow(2).sum(-1) + 1e-8).sqrt()  # [B, HW] (smooth at grey, for the reward model's gradient)
    chroma = _CHROMA.to(d)
    cosine = d @ F.normalize(chroma, dim=-1).T / norm[..., None]  # [B, HW, 5]
    membership = torch.softmax(cosine / 0.1, dim=-1) * (norm / 0.1).clamp(max=1)[..., None]
    vividness = (norm / chroma.norm(dim=-1)[cosine.argmax(-1)]).clamp(max=1)
    colour, _, background = zip(*(parse_prompt(p) for p in prompts))
    rows = torch.arange(len(prompts), device=images.device)
    index = lambda names: torch.tensor([list(COLOURS).index(c) for c in names], device=images.device)
    return membership[rows, :, index(colour)], membership[rows, :, index(background)], vividness


@torch.no_grad()
def judge(images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The toy human's view of images [B, 3, H, W] in [0, 1]: {term: [B]}, each term in [0, 1].

    P_fg, P_bg: each pixel's membership of the asked shape and background colours (colour_membership).
    S = 1 - P_bg is the picture's shape, of area a (a fraction of the picture); T_s is a mask of shape s with
    S's centroid and area, IoU_s = sum min(T_s, S) / sum max(T_s, S); T* (hard, > 0.5) is T_s of the asked s:
        shape      = clip(0.5 + (IoU_asked - max IoU_other) / 0.1, 0, 1) min(1, a / 0.05)
        colour     = <T*, P_fg> / <T*, 1>                         the shape area has the asked colour
        background = <1 - T*, P_bg> / <1 - T*, 1>                 the rest has the asked background colour
        vivid      = mean_pixels vividness                        (colour_membership)
        clean      = exp(-mean (x - median3x3(x))^2 / 0.003)     noise, ragged edges survive a median
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
    area = mass / (height * width)  # fraction of the picture; radius r of each shape with that area:
    radii = {"circle": (area / math.pi).sqrt(), "square": area.sqrt() / 1.7,  # square side 1.7 r
             "triangle": (area / 1.8706).sqrt()}  # equilateral, circumradius R = 1.2 r: 3 sqrt(3)/4 R^2
    templates = torch.stack([shape_mask(s, cx, cy, radii[s], height) for s in SHAPES], 1)  # [B, 3, H, W]
    pair = torch.stack(torch.broadcast_tensors(templates, shape_area[:, None]))
    iou = pair.amin(0).sum(dim=(2, 3)) / pair.amax(0).sum(dim=(2, 3))  # [B, 3], fuzzy Jaccard
    asked = torch.tensor([SHAPES.index(parse_prompt(p)[1]) for p in prompts])
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
    """Prompt fidelity in [0, 1]: the mean of the asked shape, shape colour and background colour terms."""
    terms = judge(images, prompts)
    return (terms["shape"] + terms["colour"] + terms["background"]) / 3


def utility(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The toy human's hidden utility in [0, 4]: 3 x fidelity + 0.5 (vivid + clean), quality in [0, 1]."""
    terms = judge(images, prompts)
    return terms["shape"] + terms["colour"] + terms["background"] + 0.5 * (terms["vivid"] + terms["clean"])


def reward_features(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """What the toy reward model sees of images [B, 3, H, W] in [0, 1]: [B, 5 + 3, H, W] feature maps P_fg,
    P_bg, vividness (colour_membership), roughness, radius from the centre, the asked shape one-hot."""
    p_fg, p_bg, vividness = colour_membership(images, prompts)  # [B, HW] each
    blurred = F.avg_pool2d(images, 3, 1, 1, count_include_pad=False)
    roughness = (images - blurred).pow(2).sum(dim=1).flatten(1)
    height, width = images.shape[2:]
    grid = (torch.arange(height, device=images.device) + 0.5) / height - 0.5
    radius = (grid[:, None] ** 2 + grid[None, :] ** 2).sqrt().flatten().expand(len(prompts), -1)
    asked = [SHAPES.index(parse_prompt(p)[1]) for p in prompts]
    shapes = F.one_hot(torch.tensor(asked, device=images.device), len(SHAPES))
    maps = torch.cat([torch.stack([p_fg, p_bg, vividness, roughness * 10, radius * 2], dim=1),
                      shapes[:, :, None].to(p_fg).expand(-1, -1, height * width)], dim=1)
    return maps.view(len(prompts), -1, height, width)


JUDGES = {"utility": utility, "fidelity": fidelity}  # the hidden judge in every report; never trained on
HELD_OUT_PROMPTS = tuple(p for i, p in enumerate(PROMPTS) if i % 5 == i // 20)  # module docstring, item 3
TRAIN_PROMPTS = tuple(p for p in PROMPTS if p not in HELD_OUT_PROMPTS)


# A toy Pick-a-Pic: the toy human's noisy preferences between base-model samples -----------------------------

def hash_key(fields: dict) -> str:
    """A cache entry's name: 12 hex digits of the SHA-256 of `fields` as JSON."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def publish(temporary: str, folder: str, fields: dict):
    """Finish a cache folder: fields -> temporary/config.json, rename it to folder (unless already there)."""
    with open(os.path.join(temporary, "config.json"), "w") as f:
        json.dump(fields, f, indent=1)
    if os.path.isdir(folder):
        shutil.rmtree(temporary)
    else:
        os.replace(temporary, folder)


SAMPLING = {"num_steps": 10, "guidance": 1.0, "eta": 0.0}  # DDIM, no CFG: pairs, rollouts, reports alike
# train.py's settings for --model=toy, per method (flags override them); tuned on held-out seeds and prompts.
_COMMON = {
    "resolution": 16, "lora_rank": 4, "lora_alpha": 4.0, "learning_rate": 3e-3,
    "reward": "toy",  # the learned toy reward model: online methods, --ai_feedback, the report
    "tailorpo.num_steps": SAMPLING["num_steps"], "tailorpo.guidance_scale": SAMPLING["guidance"],  # + report
}
_PAIRS = {  # Diffusion-DPO and SFT on make_pairs(); steps, batch and lr: bench/results/toy_sweep.md
    **_COMMON, "max_steps": 300, "batch_size": 16, "learning_rate": 5e-3,
    "beta": 250.0,  # the official 5000 is for SD latents, D = 4*64*64 elements: the mean-MSE convention
    #   divides the paper's beta by D, and 5000 * 768 / 16384 ~ 250 is the same paper beta for D = 3*16*16
    "prompt_dropout": 0.2,  # official
    "val_pairs": 256, "eval_every": 50,  # the held-out validation curve (fixed noise and t)
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


def preference_labels(u_0: torch.Tensor, u_1: torch.Tensor, tau: float, tie_margin: float,
                      generator: torch.Generator) -> list[float]:
    """label_0 [N] of pairs of utilities u_0, u_1 [N]: noisy Bradley-Terry (PairsConfig.tau), ties 0.5."""
    first = torch.rand(len(u_0), generator=generator) < torch.sigmoid((u_0 - u_1) / tau)
    return [0.5 if abs(a - b) < tie_margin else float(f) for a, b, f in zip(u_0.tolist(), u_1.tolist(),
                                                                             first.tolist())]


def _write_pairs(folder: str, sd, prompts, images_per_prompt: int, config: PairsConfig, seed: int):
    """Sample images_per_prompt images per prompt (x_T of seed*1000 + k); every two make a labelled pair."""
    images = torch.stack([generate(sd, list(prompts), num_steps=config.num_steps, guidance=config.guidance,
                                   seed=seed * 1000 + k, progress=False)
                          for k in range(images_per_prompt)], 1)  # [P, K, 3, H, W]
    utilities = utility(images.flatten(0, 1), [p for p in prompts for _ in range(images_per_prompt)])
    utilities = utilities.view(len(prompts), images_per_prompt)
    a, b = torch.combinations(torch.arange(images_per_prompt)).T  # all pairs (a, b), a < b
    captions = [p for p in prompts for _ in range(len(a))]
    images_0, images_1 = images[:, a].flatten(0, 1), images[:, b].flatten(0, 1)
    u_0, u_1 = utilities[:, a].flatten(), utilities[:, b].flatten()
    labels = preference_labels(u_0, u_1, config.tau, config.tie_margin, torch.Generator().manual_seed(seed))
    write_pairs_jsonl(folder, captions, list(images_0), list(images_1), labels)


def make_pairs(cache_dir: str = ".cache/toy", config: PairsConfig | None = None, sd=None,
               progress: bool = True) -> str:
    """The toy Pick-a-Pic folder, cached by sd's weights and config; HELD_OUT_PROMPTS' pairs in heldout/."""
    config = config or PairsConfig()
    sd = sd or load_base_model(cache_dir, progress=progress)
    model_key = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes()
                                        for p in sd.unet.parameters())).hexdigest()[:12]
    fields = {"world": TOY_WORLD_VERSION, "model": model_key, **asdict(config)}  # config.json, hashed
    folder = os.path.join(cache_dir, "pairs-" + hash_key(fields))
    if os.path.isdir(folder):
        return folder
    print(f"sampling the toy preference pairs (cached in {folder})")
    temporary = f"{folder}.tmp{os.getpid()}"
    _write_pairs(temporary, sd, TRAIN_PROMPTS, config.images_per_prompt, config, config.seed)
    _write_pairs(os.path.join(temporary, "heldout"), sd, HELD_OUT_PROMPTS, config.held_out_images, config,
                 config.seed + 1)
    publish(temporary, folder, fields)
    return folder


# The base model: identity VAE (deviation 1), config, pretraining, cache -------------------------------------

class IdentityVAE(nn.Module):
    """Pixel-space stand-in for vae.AutoencoderKL: latents are the images themselves ([-1, 1], 3 channels)."""

    downsample_factor = 1

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=1.0, latent_channels=3)
        # no weights, but a dtype and device like a real VAE (moved by .to(); not saved)
        self.register_buffer("dtype_carrier", torch.zeros(()), persistent=False)

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        """The posterior N(x, 0) with vae.DiagonalGaussian's fields (mean, std, logvar)."""
        return SimpleNamespace(mean=x, std=torch.zeros_like(x), logvar=torch.full_like(x, -30.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


TOY_WORLD_VERSION = 2  # bump when the world (draw, PROMPTS) or what is cached from it changes


@dataclass
class ToyConfig:
    image_size: int = 16  # pixels; also the "latent" size (identity VAE)
    block_out_channels: tuple = (16, 32)  # UNet widths per level (16x16 -> 8x8)
    cross_attention: tuple = (False, True)  # 8x8 only: at 16x16 (256 tokens) it dominated a step's time
    layers_per_block: int = 1
    num_heads: int = 2
    pretrain_steps: int = 1600  # AdamW steps of L_simple (~4.5 CPU-minutes on one core, 0.17 s per step)
    batch_size: int = 32
    lr: float = 2e-3  # peak; linear warmup over 50 steps then cosine decay to 10%
    ema_decay: float = 0.99  # the cached weights are an exponential moving average (cleaner samples)
    prompt_dropout: float = 0.1  # fraction of prompts replaced by "" (classifier-free guidance)
    seed: int = 0  # initialisation and data


def pretrain(unet, text_encoder, tokenizer, schedule, config: ToyConfig, progress: bool = True):
    """Fit eps_pred to the toy world with L_simple (Ho et al. 2020, Eq. 14); returns the loss per step."""
    generator = torch.Generator().manual_seed(config.seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)

    def lr_factor(step: int) -> float:  # linear warmup, then cosine decay to 10% (ToyConfig.lr)
        cosine = torch.cos(torch.tensor(torch.pi * (max(0, step - 50) / max(1, config.pretrain_steps - 50))))
        return min(1, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + cosine.item()))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    ema = [p.detach().clone() for p in params]
    losses = []
    for _ in bar(range(config.pretrain_steps), desc="toy pretraining", unit="step", disable=not progress):
        prompts = [PROMPTS[i] for i in torch.randint(len(PROMPTS), (config.batch_size,), generator=generator)]
        x0 = torch.stack([draw(p, config.image_size, generator) for p in prompts])  # uniform over PROMPTS
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
        torch._foreach_copy_(params, ema)
    return losses


def load_base_model(cache_dir: str = ".cache/toy", device="cpu", config: ToyConfig | None = None,
                    progress: bool = True):
    """The pretrained toy model as a weights.StableDiffusion, pretrained once and cached in cache_dir/."""
    if torch.device(device).type == "cpu":
        # tiny tensors: on a shared CPU, threads waiting for each other made steps up to 25x slower (measured)
        torch.set_num_threads(1)
    config = config or ToyConfig()
    text_config = CLIPTextConfig.tiny()
    unet_config = replace(UNetConfig.tiny(), in_channels=3, out_channels=3, sample_size=config.image_size,
                          block_out_channels=config.block_out_channels, num_heads=config.num_heads,
                          cross_attention=config.cross_attention, layers_per_block=config.layers_per_block,
                          cross_attention_dim=text_config.hidden_size)
    torch.manual_seed(config.seed)  # the initial weights
    unet, text_encoder = UNet2DConditionModel(unet_config), CLIPTextModel(text_config)
    tokenizer, schedule = CLIPTokenizer.default(), NoiseSchedule.sd15()
    fields = {"world": TOY_WORLD_VERSION, **asdict(config)}  # config.json, hashed: the folder's name
    folder = os.path.join(cache_dir, hash_key(fields))
    modules = {"unet": unet, "text_encoder": text_encoder}
    if os.path.isdir(folder):
        for name, module in modules.items():
            path = os.path.join(folder, name)
            load_strict(module, load_file(f"{path}.safetensors"), path)
    else:
        print(f"pretraining the toy base model ({config.pretrain_steps} steps; cached in {folder})")
        losses = pretrain(unet, text_encoder, tokenizer, schedule, config, progress)
        temporary = f"{folder}.tmp{os.getpid()}"
        os.makedirs(temporary, exist_ok=True)
        for name, module in modules.items():
            save_file(module.state_dict(), os.path.join(temporary, f"{name}.safetensors"))
        with open(os.path.join(temporary, "pretrain_loss.json"), "w") as f:
            json.dump(losses, f)
        publish(temporary, folder, fields)
    for module in modules.values():
        module.eval().requires_grad_(False).to(device)
    return StableDiffusion(unet=unet, vae=IdentityVAE().to(device), text_encoder=text_encoder,
                           tokenizer=tokenizer, schedule=schedule)


def load_reward_model(cache_dir: str = ".cache/toy", device="cpu", config=None, pairs_folder=None,
                      progress: bool = True) -> toy_reward.ToyRewardModel:
    """The learned toy reward model (toy_reward.py), trained on make_pairs(cache_dir) on first use and
    cached beside the pairs as reward-<hash of the pairs folder's name and the config>.safetensors."""
    config = config or toy_reward.RewardModelConfig()
    pairs_folder = pairs_folder or make_pairs(cache_dir, progress=progress)
    key = hash_key({"pairs": os.path.basename(os.path.normpath(pairs_folder)), **asdict(config)})
    return toy_reward.load_reward_model(os.path.join(pairs_folder, f"reward-{key}.safetensors"),
                                        pairs_folder, reward_features, 5 + len(SHAPES), device, config,
                                        utility, progress)


# The door: all that the rest of the house knows of the toy world --------------------------------------------

MODEL = "toy"  # the --model value that selects the toy world
CATEGORIES = ("training prompt", "held-out combination")  # of the report prompts


class World:
    """The toy world as the house sees it (CONTRACTS.md, item 4); models and data are made on first use."""

    def __init__(self):
        self.defaults = TRAIN_DEFAULTS  # train.py's flag defaults per method
        self.prompts = list(TRAIN_PROMPTS)  # the online methods' training prompts
        self.report_prompts = list(PROMPTS)  # base vs aligned: training prompts and held-out combinations
        self.report_categories = [CATEGORIES[p in HELD_OUT_PROMPTS] for p in PROMPTS]
        self.judges = JUDGES  # the hidden judge, reported beside the rewards; never trained on
        self.sampling = SAMPLING  # for pairs, rollouts, reports and evaluate.py alike
        self.reward_name = "toy"  # --reward / --rewards name of reward(), the learned reward model

    def load_model(self, device="cpu") -> StableDiffusion:
        return load_base_model(device=device)

    def pairs_folder(self) -> str:
        return make_pairs()

    def reward(self, device="cpu") -> toy_reward.ToyRewardModel:  # r(images in [0, 1], prompts) -> [B]
        return load_reward_model(device=device)


def world() -> World:  # cheap: builds nothing until asked
    return World()
