"""Diffusion-DPO (Wallace et al., CVPR 2024, arXiv 2311.12908), its SFT baseline, and the one DPO objective.

DPO (Rafailov et al. 2023, Eq. 7) fits a policy to preference pairs through the implicit reward
beta log(p_theta / p_ref): L = -log sigmoid(beta [log-ratio(winner) - log-ratio(loser)]). `dpo_loss` is that
objective on given log-ratios (the DPO reference's `preference_loss`); both papers optimise it and differ
only in the log-ratio (TailorPO: one denoising transition, tailorpo.py). Diffusion-DPO bounds log p(x_0) by
the ELBO with q(x_{1:T}|x_0) for the reverse posterior: a contrast of denoising errors (Sec. 4, Eq. 14):

    L(theta) = -E_{(x_0^w, x_0^l) ~ D, t ~ U(0,T), x_t^w ~ q(x_t^w|x_0^w), x_t^l ~ q(x_t^l|x_0^l)}
      log sigmoid( -beta T omega(lambda_t) ( ||eps^w - eps_theta(x_t^w,t)||^2 - ||eps^w - eps_ref(x_t^w,t)||^2
                                         - ||eps^l - eps_theta(x_t^l,t)||^2 + ||eps^l - eps_ref(x_t^l,t)||^2))

i.e. dpo_loss with log-ratio(x) = -0.5 (err_theta(x) - err_ref(x)) per sample (`diffusion_log_ratio`): the
policy learns to denoise the preferred image better than the frozen reference does, the other one worse.

Deviations from Eq. 14, 1-5 as the official code (SalesforceAIResearch/DiffusionDPO train.py), so that its
beta=5000 means the same here:
  1. The squared errors are MEANS over the C*H*W latent elements, not sums (||.||^2 / D).
  2. T*omega(lambda_t) is a constant and the log-ratio carries the factor 0.5: logits = -0.5*beta*(...);
     official beta_code is the paper's beta*T*omega = 0.5*beta_code/D (test_dpo checks it).
  3. Winner and loser share eps and t (Eq. 14 writes eps^w and eps^l; the official code shares them:
     `noise.chunk(2)[0].repeat(2, 1, 1, 1)`, see also DiffusionDPO issue #1).
  4. Implicit accuracy counts a tie (logits == 0, at init) as wrong; diffusers' script as 0.5 (`tie_credit`).
  5. The prompt is encoded once per pair and repeated for the loser (same caption by construction).
  6. A pair's VAE posterior noise, t and eps are keyed by (seed, its global position) (scheduler.keyed_randn):
     N processes equal one with an N x batch (official: a per-process generator).
"""

import torch
import torch.nn.functional as F

from scheduler import keyed_generator, keyed_randn


def dpo_loss(log_ratio_w, log_ratio_l, beta: float, tie_credit: float = 0.0, mask=None):
    """The DPO objective (Rafailov et al. 2023, Eq. 7) on per-pair log-ratios; returns (loss 0-d, metrics).

    Shape: log_ratio_w, log_ratio_l [N]: log p_theta - log p_ref of the winner / loser (graph via the policy).
    Shape: mask [N] or None: 1 where a pair counts; the loss is the mean over those (0 with a graph if none).
    metrics (the same keys on every call): loss; implicit_accuracy, the fraction of pairs with logits > 0, a
    tie worth `tie_credit`; reward_margin, the mean implicit reward margin beta * logits.
    """
    logits = log_ratio_w - log_ratio_l
    losses = -F.logsigmoid(beta * logits)  # DPO Eq. 7; the mean over pairs comes after (cf. diffusers #6702)
    weight = torch.ones_like(losses) if mask is None else mask.to(losses.dtype)
    count = weight.sum().clamp_min(1)
    loss = (losses * weight).sum() / count
    logits = logits.detach()
    accuracy = (logits > 0).to(weight.dtype) + tie_credit * (logits == 0).to(weight.dtype)
    metrics = {"loss": loss.detach(), "implicit_accuracy": (accuracy * weight).sum() / count,
               "reward_margin": (beta * logits * weight).sum() / count}
    return loss, metrics


def per_sample_mse(eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] x2 -> [B]: mean squared error over all non-batch dims, in float32 (deviation 1)."""
    return (eps_pred.float() - noise.float()).pow(2).flatten(1).mean(dim=1)


def diffusion_log_ratio(model_err, ref_err):
    """Diffusion-DPO's per-sample log-ratio, -0.5 (err_theta - err_ref) (Eq. 14 with deviations 1, 2). [B]."""
    return -0.5 * (model_err - ref_err)


def model_pixels(pixels_uint8: torch.Tensor, device) -> torch.Tensor:
    """uint8 images [B, 3, R, R] (data.py's batches) -> float32 in [-1, 1] on `device`: x / 127.5 - 1.

    The copy to the device moves a quarter of the float32 bytes. The arithmetic equals the loader's former
    (x / 255) * 2 - 1 bit for bit: 127.5 = 255 / 2, and a factor of 2 commutes with float rounding.
    """
    if pixels_uint8.dtype != torch.uint8:
        raise ValueError(f"dpo.model_pixels: expected uint8 pixels, got {pixels_uint8.dtype}")
    return pixels_uint8.to(device).float() / 127.5 - 1


def keyed_latents(sd, pixels, seed: int, positions: list[int], streams=("w",)) -> torch.Tensor:
    """pixels [kB,3,H,W] in [-1,1], k halves of B images (one noise stream each: "w", "l") -> latents x_0
    [kB,C,h,w] float32: posterior samples keyed by (seed, position, stream), in ONE VAE call."""
    factor, device = sd.vae.downsample_factor, next(sd.unet.parameters()).device
    shape = (sd.vae.config.latent_channels, pixels.shape[2] // factor, pixels.shape[3] // factor)
    noise = torch.cat([keyed_randn(seed, positions, shape, f"vae_{stream}", device) for stream in streams])
    return sd.encode_images(pixels, noise)


def keyed_t_and_eps(sd, latents, seed: int, positions: list[int]):
    """t [B] ~ U{0..T-1} and eps ~ N(0, I) like latents (float32), keyed by (seed, position)."""
    t = [int(torch.randint(sd.schedule.num_train_timesteps, (), generator=keyed_generator(seed, p, "t")))
         for p in positions]
    eps = keyed_randn(seed, positions, latents.shape[1:], "eps", latents.device)
    return torch.tensor(t, device=latents.device), eps


def dpo_train_step(sd, reference_unet, batch: dict, beta: float, seed: int):
    """train.py plug-in: (loss, metrics) of a batch of pairs. ONE policy and ONE reference forward on [w; l].

    batch: {"pixels_w", "pixels_l": uint8 [B,3,H,W] (model_pixels), "prompts": list[str], "positions": list[int]};
    reference_unet(x_t, t, context) -> eps_ref. metrics: dpo_loss's and the mean errors {model,ref}_err_{w,l}.
    """
    positions = batch["positions"]
    device = next(sd.unet.parameters()).device
    pixels = model_pixels(torch.cat([batch["pixels_w"], batch["pixels_l"]]), device)
    latents_w, latents_l = keyed_latents(sd, pixels, seed, positions, ("w", "l")).chunk(2)
    t, eps = keyed_t_and_eps(sd, latents_w, seed, positions)
    t, eps = t.repeat(2), eps.repeat(2, 1, 1, 1)  # deviation 3: the same t and eps for winner and loser
    x_t = sd.schedule.add_noise(torch.cat([latents_w, latents_l]), eps, t)  # DDPM Eq. 4, [2B]: w, then l
    context = sd.encode_prompts(batch["prompts"]).repeat(2, 1, 1)  # deviation 5
    eps_pred = sd.unet(x_t, t, context)
    with torch.no_grad():
        eps_ref = reference_unet(x_t, t, context)
    model_err_w, model_err_l = per_sample_mse(eps_pred, eps).chunk(2)
    ref_err_w, ref_err_l = per_sample_mse(eps_ref, eps).chunk(2)
    loss, metrics = dpo_loss(diffusion_log_ratio(model_err_w, ref_err_w),
                             diffusion_log_ratio(model_err_l, ref_err_l), beta)  # Eq. 14 (Diffusion-DPO)
    errors = dict(model_err_w=model_err_w, model_err_l=model_err_l, ref_err_w=ref_err_w, ref_err_l=ref_err_l)
    return loss, {**metrics, **{key: value.detach().mean() for key, value in errors.items()}}


def sft_train_step(sd, batch: dict, seed: int):
    """train.py plug-in for the paper's SFT baseline: eps-MSE (DDPM L_simple, Ho et al. 2020 Eq. 14) on
    the preferred images batch["pixels_w"] (uint8) only (winner's streams). Returns (loss, {loss, model_err_w})."""
    pixels = model_pixels(batch["pixels_w"], next(sd.unet.parameters()).device)
    latents = keyed_latents(sd, pixels, seed, batch["positions"])
    t, eps = keyed_t_and_eps(sd, latents, seed, batch["positions"])
    eps_pred = sd.unet(sd.schedule.add_noise(latents, eps, t), t, sd.encode_prompts(batch["prompts"]))
    loss = per_sample_mse(eps_pred, eps).mean()  # Eq. 14 (DDPM, L_simple)
    return loss, {"loss": loss.detach(), "model_err_w": loss.detach()}
