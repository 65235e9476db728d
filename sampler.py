"""The DDIM sampling loop with classifier-free guidance, free of host syncs, and text-to-image on
top of it.

- Classifier-free guidance (Ho & Salimans 2022, Eq. 6):
      eps_pred = eps_uncond + w (eps_cond - eps_uncond),
  w = guidance (diffusers' guidance_scale; the paper's w is our w - 1), from ONE UNet call on
  [uncond; cond] (uncond_and_cond_eps).
- DDIM sampling (Song et al. 2021, Sec. 4.2 with Eq. 12 and 16, scheduler.ddim_step) from x_T to
  x_0.
- Stable Diffusion's sampling (Rombach et al. 2022, Sec. 3.3): prompts -> CLIP -> DDIM in latent
  space -> VAE decode (`generate`), with StableDiffusionPipeline's defaults. x_T, then the eta > 0
  noise, come from Generator("cpu").manual_seed(seed) as in diffusers, so images match diffusers'
  for the same seed.

Deviations
1. Guidance runs only when guidance > 1 and uncond is given (as diffusers: guidance <= 1 uses cond
   alone).
2. The recorded log_prob is scheduler.gaussian_log_prob's "mean" (the density / C*H*W); NaN at
   eta = 0.
3. generate keeps the latents in float32 (diffusers: the pipeline dtype) and casts only the UNet's
   input.
4. When the caller gives x_T (`latents`), the eta > 0 noise comes from a generator keyed by
   (seed, "eta") (eta_noise_generator); diffusers uses the caller's generator.
"""

from dataclasses import dataclass

import torch

from progress import bar as progress_bar
from scheduler import NoiseSchedule, gaussian_log_prob, keyed_generator


@dataclass
class SampleResult:
    latents: torch.Tensor  # x_0, [B, C, h, w]
    # "timesteps" [S], "x_t" / "x_prev" / "x0_pred" [S, B, C, h, w], "log_prob" [S, B]
    trajectory: dict | None


def uncond_and_cond_eps(unet, x_t, t, cond, uncond):
    """(eps_uncond, eps_cond) [B, C, h, w] of x_t from ONE UNet call on the stacked batch
    [uncond; cond] (diffusers' order): one call of 2B rows in place of two calls of B, so every
    weight is read once per step and the kernels launch once. t: int, 0-d or [B];
    uncond [B or 1, L, D]."""
    t = torch.as_tensor(t, device=x_t.device)
    if t.ndim:
        t = t.repeat(2)  # a [B] t (one timestep per row) serves both halves
    context = torch.cat([uncond.expand_as(cond), cond])
    eps_uncond, eps_cond = unet(torch.cat([x_t, x_t]), t, context).chunk(2)
    return eps_uncond, eps_cond


def guided_eps(unet, x_t, t, cond, uncond, guidance: float) -> torch.Tensor:
    """Classifier-free guided eps_pred [B, C, h, w]. t: int, 0-d or [B]; cond [B, L, D];
    uncond [B or 1, L, D] or None (no guidance, deviation 1)."""
    if uncond is None or guidance <= 1:
        return unet(x_t, t, cond)
    eps_uncond, eps_cond = uncond_and_cond_eps(unet, x_t, t, cond, uncond)
    return eps_uncond + guidance * (eps_cond - eps_uncond)  # Eq. 6 (CFG, Ho & Salimans)


@torch.no_grad()
def sample(
    unet,
    schedule: NoiseSchedule,
    cond,
    uncond,
    latents,
    num_steps: int = 50,
    guidance: float = 7.5,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    record: bool = False,
    progress: bool = True,
) -> SampleResult:
    """DDIM from x_T = latents [B, C, h, w] to x_0, optionally recording the trajectory. The eta > 0
    noise comes from `generator`, on its device (a CPU one gives diffusers' numbers; one on the
    latents' device saves a copy)."""
    device = latents.device
    timesteps = schedule.ddim_timesteps(num_steps, device)  # made on the device: no host copy
    noise_device = device
    if generator is not None:
        noise_device = generator.device
    trajectory = {"x_t": [], "x_prev": [], "log_prob": [], "x0_pred": []}
    x_t = latents
    for i in progress_bar(range(num_steps), desc="sample", disable=not progress):
        eps_pred = guided_eps(unet, x_t, timesteps[i], cond, uncond, guidance)
        noise = None
        if eta > 0:
            noise = torch.randn(x_t.shape, generator=generator, device=noise_device).to(device)
        step = schedule.ddim_step(eps_pred, timesteps[i], x_t, num_steps, eta, noise)  # Eq. 12, 16
        if record:
            trajectory["x_t"].append(x_t)
            trajectory["x_prev"].append(step.x_prev)
            trajectory["log_prob"].append(gaussian_log_prob(step.x_prev, step.mean, step.sigma_t))
            trajectory["x0_pred"].append(step.x0_pred)
        x_t = step.x_prev
    if not record:
        return SampleResult(latents=x_t, trajectory=None)
    stacked = {key: torch.stack(values) for key, values in trajectory.items()}
    return SampleResult(latents=x_t, trajectory={"timesteps": timesteps, **stacked})


# ---- Text-to-image with a stable_diffusion.StableDiffusion


def image_size(sd, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """(height, width), None meaning the model's native size; checked against the VAE downsample
    factor f."""
    factor = sd.vae.downsample_factor
    native = sd.unet.config.sample_size * factor
    height = height or native
    width = width or native
    if height % factor or width % factor or height <= 0 or width <= 0:
        raise ValueError(
            f"height and width must be positive multiples of {factor}, got {height}x{width}"
        )
    return height, width


def initial_latents(
    sd, num_images: int, height: int, width: int, generator: torch.Generator
) -> torch.Tensor:
    """x_T ~ N(0, I) [N, C, H/f, W/f] float32, drawn on the generator's device (CPU for diffusers
    parity)."""
    height, width = image_size(sd, height, width)
    factor = sd.vae.downsample_factor
    shape = (num_images, sd.unet.config.in_channels, height // factor, width // factor)
    return torch.randn(shape, generator=generator, device=generator.device)


def eta_noise_generator(seed: int) -> torch.Generator:
    """The eta > 0 noise's generator when the caller gives x_T (deviation 4): keyed by
    (seed, "eta"). A caller's x_T usually comes from manual_seed(seed) itself, and a generator
    seeded that way would replay x_T as the first step's noise."""
    return keyed_generator(seed, 0, "eta")


@torch.no_grad()
def generate_latents(
    sd,
    prompts: list[str],
    negative_prompt: str = "",
    num_steps: int = 50,
    guidance: float = 7.5,
    eta: float = 0.0,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    latents: torch.Tensor | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """One x_0 [B, C, H/f, W/f] (float32) per prompt. `latents` (x_T) replaces the seed's initial
    noise."""
    device = sd.unet.conv_in.weight.device
    dtype = sd.unet.conv_in.weight.dtype
    if latents is None:  # diffusers: x_T, then the eta noise, from one generator
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = initial_latents(sd, len(prompts), height, width, generator)
    else:
        generator = eta_noise_generator(seed)
    cond = sd.encode_prompts(list(prompts)).to(dtype)
    uncond = None
    if guidance > 1:
        uncond = sd.encode_prompts([negative_prompt]).to(dtype)  # [1, L, D]: every row's

    def unet(x_t, t, context):  # deviation 3: float32 latents, the UNet in its own dtype
        return sd.unet(x_t.to(dtype), t, context).float()

    x_T = latents.to(device, torch.float32)
    result = sample(unet, sd.schedule, cond, uncond, x_T, num_steps=num_steps, guidance=guidance,
                    eta=eta, generator=generator, progress=progress)
    return result.latents


@torch.no_grad()
def generate(sd, prompts: list[str], **kwargs) -> torch.Tensor:
    """Prompts -> images [B, 3, H, W] in [0, 1] float32; keyword arguments as generate_latents."""
    return sd.decode_latents(generate_latents(sd, prompts, **kwargs))
