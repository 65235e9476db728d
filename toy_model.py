"""The toy world's base model: the repository's modules at tiny size, pretrained on its pictures.

toy.py hands this file its world (the prompts, draw() and the world's version) and gets back a
stable_diffusion.StableDiffusion; this file knows nothing else of the world, so imports run one way,
toy -> toy_model. The UNet and the text encoder are fitted together with L_simple,

    L = E_{x_0, t ~ U{0..999}, eps ~ N(0,I)} || eps - eps_pred(x_t, t, c) ||^2   (Ho et al. 2020,
    Eq. 14) x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps

Deviations from Stable Diffusion (numbered):
1. No VAE: pixel-space diffusion through IdentityVAE; pretraining even vae.py's tiny VAE takes
longer
   than the whole toy budget, and 16x16 is already as small as a latent.
2. The text encoder is trained from scratch with the UNet (SD1.5 keeps CLIP frozen); 10% of the
   prompts are dropped to "" during pretraining so classifier-free guidance works.
3. Cross-attention only at the 8x8 level of the UNet (SD1.5: at every level but the lowest); see
   ToyConfig.
4. Cached under .cache/toy/ in a folder named by hash_key of the world's version and the ToyConfig;
   every toy cache (base model, pairs, reward model) is named by hash_key and written atomically
   (publish).
"""

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from clip import CLIPTextConfig, CLIPTextModel
from progress import bar
from scheduler import NoiseSchedule
from stable_diffusion import StableDiffusion
from state_dicts import load_strict
from tokenizer import CLIPTokenizer
from unet import UNet2DConditionModel, UNetConfig

# The toy caches: named by a hash of what made them, published atomically --------------------------


def hash_key(fields: dict) -> str:
    """A cache entry's name: 12 hex digits of the SHA-256 of `fields` as JSON."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def publish(temporary: str, folder: str, fields: dict):
    """Finish a cache folder: fields -> temporary/config.json, rename it to folder (unless already
    there)."""
    with open(os.path.join(temporary, "config.json"), "w") as f:
        json.dump(fields, f, indent=1)
    if os.path.isdir(folder):
        shutil.rmtree(temporary)
    else:
        os.replace(temporary, folder)


# The base model: identity VAE (deviation 1), config, pretraining, cache ---------------------------

# draw(prompt, size, generator) -> [3, size, size] in [-1, 1]: one picture of the world's prompt.
Draw = Callable[[str, int, torch.Generator], torch.Tensor]


class IdentityVAE(nn.Module):
    """Pixel-space stand-in for vae.AutoencoderKL: latents are the images, [-1, 1], 3 channels."""

    downsample_factor = 1

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=1.0, latent_channels=3)
        # No weights, but a dtype and device like a real VAE (moved by .to(); not saved).
        self.register_buffer("dtype_carrier", torch.zeros(()), persistent=False)

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        """The posterior N(x, 0) with vae.DiagonalGaussian's fields (mean, std, logvar)."""
        return SimpleNamespace(mean=x, std=torch.zeros_like(x), logvar=torch.full_like(x, -30.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


@dataclass
class ToyConfig:
    image_size: int = 16  # pixels; also the "latent" size (identity VAE)
    block_out_channels: tuple = (16, 32)  # UNet widths per level (16x16 -> 8x8)
    cross_attention: tuple = (False, True)  # 8x8 only: at 16x16 (256 tokens) it dominated a step
    layers_per_block: int = 1
    num_heads: int = 2
    pretrain_steps: int = 1600  # AdamW steps of L_simple (a few CPU-minutes on one core)
    batch_size: int = 32
    lr: float = 2e-3  # peak; linear warmup over 50 steps then cosine decay to 10%
    ema_decay: float = 0.99  # the cached weights are an exponential moving average (cleaner)
    prompt_dropout: float = 0.1  # fraction of prompts replaced by "" (classifier-free guidance)
    seed: int = 0  # initialisation and data


def pretrain(
    unet,
    text_encoder,
    tokenizer,
    schedule,
    prompts: Sequence[str],
    draw: Draw,
    config: ToyConfig,
    progress: bool = True,
) -> list[float]:
    """Fit eps_pred to the world with L_simple (Ho et al. 2020, Eq. 14); returns the loss per step.
    Each step picks a batch of the world's `prompts` uniformly and draws one picture of each."""
    generator = torch.Generator().manual_seed(config.seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)

    def lr_factor(step: int) -> float:  # linear warmup, then cosine decay to 10% (ToyConfig.lr)
        progress_fraction = max(0, step - 50) / max(1, config.pretrain_steps - 50)
        cosine = torch.cos(torch.tensor(torch.pi * progress_fraction))
        return min(1, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + cosine.item()))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    ema = [p.detach().clone() for p in params]
    losses = []
    steps = range(config.pretrain_steps)
    for _ in bar(steps, desc="toy pretraining", unit="step", disable=not progress):
        picks = torch.randint(len(prompts), (config.batch_size,), generator=generator)
        batch = [prompts[i] for i in picks]
        x0 = torch.stack([draw(p, config.image_size, generator) for p in batch])
        drop = torch.rand(len(batch), generator=generator) < config.prompt_dropout
        batch = ["" if d else p for p, d in zip(batch, drop.tolist())]
        # Encode each distinct prompt once (the world's prompts and ""), then gather per sample.
        unique = sorted(set(batch))
        context = text_encoder(tokenizer(unique))[0][[unique.index(p) for p in batch]]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, schedule.num_train_timesteps, (len(batch),), generator=generator)
        x_t = schedule.add_noise(x0, noise, t)  # q(x_t | x_0)
        loss = F.mse_loss(unet(x_t, t, context), noise)  # Ho et al. Eq. 14
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        # A short horizon at the start, then ToyConfig.ema_decay.
        decay = min(config.ema_decay, (1 + len(losses)) / (10 + len(losses)))
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses.append(loss.item())
    with torch.no_grad():
        torch._foreach_copy_(params, ema)
    return losses


def load_base_model(
    world_version: int,
    prompts: Sequence[str],
    draw: Draw,
    cache_dir: str = ".cache/toy",
    device="cpu",
    config: ToyConfig | None = None,
    progress: bool = True,
) -> StableDiffusion:
    """The base model of a world (its version, prompts and draw(), as pretrain takes them),
    pretrained once and cached in cache_dir/<hash_key of the version and config>/ (deviation 4)."""
    if torch.device(device).type == "cpu":
        # Tiny tensors: on a shared CPU, threads waiting for each other made steps far slower.
        torch.set_num_threads(1)
    config = config or ToyConfig()
    text_config = CLIPTextConfig.tiny()
    unet_config = replace(
        UNetConfig.tiny(),
        in_channels=3,
        out_channels=3,
        sample_size=config.image_size,
        block_out_channels=config.block_out_channels,
        num_heads=config.num_heads,
        cross_attention=config.cross_attention,
        layers_per_block=config.layers_per_block,
        cross_attention_dim=text_config.hidden_size,
    )
    torch.manual_seed(config.seed)  # the initial weights
    unet = UNet2DConditionModel(unet_config)
    text_encoder = CLIPTextModel(text_config)
    tokenizer = CLIPTokenizer.default()
    schedule = NoiseSchedule.sd15()
    fields = {"world": world_version, **asdict(config)}  # config.json, hashed: the folder's name
    folder = os.path.join(cache_dir, hash_key(fields))
    modules = {"unet": unet, "text_encoder": text_encoder}
    if os.path.isdir(folder):
        for name, module in modules.items():
            path = os.path.join(folder, name)
            load_strict(module, load_file(f"{path}.safetensors"), path)
    else:
        print(f"pretraining the toy base model ({config.pretrain_steps} steps; cached in {folder})")
        losses = pretrain(unet, text_encoder, tokenizer, schedule, prompts, draw, config, progress)
        temporary = f"{folder}.tmp{os.getpid()}"
        os.makedirs(temporary, exist_ok=True)
        for name, module in modules.items():
            save_file(module.state_dict(), os.path.join(temporary, f"{name}.safetensors"))
        with open(os.path.join(temporary, "pretrain_loss.json"), "w") as f:
            json.dump(losses, f)
        publish(temporary, folder, fields)
    for module in modules.values():
        module.eval().requires_grad_(False).to(device)
    vae = IdentityVAE().to(device)
    return StableDiffusion(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, schedule=schedule
    )
