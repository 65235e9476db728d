"""Diffusion-DPO (Wallace et al., CVPR 2024, arXiv 2311.12908), its SFT baseline, and the one DPO
objective.

DPO (Rafailov et al. 2023, Eq. 7) fits a policy to preference pairs through the implicit reward
beta log(p_theta / p_ref): L = -log sigmoid(beta [log-ratio(winner) - log-ratio(loser)]).
`dpo_loss` is that objective on given log-ratios (the DPO reference's `preference_loss`); both
papers optimise it and differ only in the log-ratio (TailorPO: one denoising transition,
tailorpo.py). Diffusion-DPO bounds log p(x_0) by the ELBO with q(x_{1:T}|x_0) for the reverse
posterior, which gives a contrast of denoising errors (Sec. 4, Eq. 14):

    L(theta) = -E_{(x_0^w, x_0^l) ~ D, t ~ U(0,T), x_t^w ~ q(x_t^w|x_0^w), x_t^l ~ q(x_t^l|x_0^l)}
        log sigmoid( -beta T omega(lambda_t) (
              ||eps^w - eps_theta(x_t^w,t)||^2 - ||eps^w - eps_ref(x_t^w,t)||^2
            - ||eps^l - eps_theta(x_t^l,t)||^2 + ||eps^l - eps_ref(x_t^l,t)||^2 ))

that is, dpo_loss with log-ratio(x) = -0.5 (err_theta(x) - err_ref(x)) per sample
(`diffusion_log_ratio`): the policy learns to denoise the preferred image better than the frozen
reference does, and the other one worse.

The mean over pairs. A call's loss is the sum of its kept pairs' losses divided by the call's pair
count N (a masked pair contributes 0), not by its kept count. N is fixed by the batch shape, so the
mean of the losses (and gradients) of N processes, or of N grad_accum micro-batches, is exactly the
loss of one call on all their pairs: DDP averages gradients, and a mean of per-call kept-pair means
would weight a pair by 1 / (its call's kept count). The kept-pair mean over all processes would need
the kept count all-reduced, a collective inside a loss function; dividing by N needs none. With no
mask (Diffusion-DPO) both are the plain mean. The metrics implicit_accuracy and reward_margin stay
means over the kept pairs, what a reader of the log expects; "loss" is the optimised loss.

Deviations from Eq. 14, 1-5 as the official code (SalesforceAIResearch/DiffusionDPO train.py), so
that its beta=5000 means the same here:
  1. The squared errors are MEANS over the C*H*W latent elements, not sums (||.||^2 / D).
  2. T*omega(lambda_t) is a constant and the log-ratio carries the factor 0.5:
     logits = -0.5*beta*(...); official beta_code is the paper's beta*T*omega = 0.5*beta_code/D
     (test_dpo checks it).
  3. Winner and loser share eps and t (Eq. 14 writes eps^w and eps^l; the official code shares
     them: `noise.chunk(2)[0].repeat(2, 1, 1, 1)`, see also DiffusionDPO issue #1).
  4. Implicit accuracy counts a tie (logits == 0, at init) as wrong; diffusers' script counts it
     as 0.5 (`tie_credit`).
  5. The prompt is encoded once per pair and repeated for the loser (same caption by construction).
  6. A pair's VAE posterior noise, t and eps are keyed by (seed, its global position)
     (scheduler.keyed_randn): N processes equal one with an N x batch (official: a per-process
     generator).
"""

import torch
import torch.nn.functional as F

from scheduler import keyed_generator, keyed_randn


def dpo_loss(log_ratio_w, log_ratio_l, beta: float, tie_credit: float = 0.0, mask=None):
    """The DPO objective (Rafailov et al. 2023, Eq. 7) on per-pair log-ratios.

    Shape: log_ratio_w, log_ratio_l [N]: log p_theta - log p_ref of the winner / loser (with the
        policy's graph).
    Shape: mask [N] or None: 1 where a pair counts. The loss is the kept pairs' sum divided by N
        (the module docstring says why); it is 0, with a graph, when nothing is kept.
    Returns (loss 0-d, metrics). metrics, the same keys on every call: loss; implicit_accuracy, the
    fraction of kept pairs with logits > 0, a tie worth `tie_credit`; reward_margin, the kept
    pairs' mean implicit reward margin beta * logits.
    """
    logits = log_ratio_w - log_ratio_l
    losses = -F.logsigmoid(beta * logits)  # DPO Eq. 7, per pair (the mean after: diffusers #6702)
    weight = torch.ones_like(losses)
    if mask is not None:
        weight = mask.to(losses.dtype)
    loss = (losses * weight).sum() / len(losses)
    kept = weight.sum().clamp_min(1)
    logits = logits.detach()
    accuracy = (logits > 0).to(weight.dtype) + tie_credit * (logits == 0).to(weight.dtype)
    metrics = {
        "loss": loss.detach(),
        "implicit_accuracy": (accuracy * weight).sum() / kept,
        "reward_margin": (beta * logits * weight).sum() / kept,
    }
    return loss, metrics


def per_sample_mse(eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] twice -> [B]: the mean squared error over all non-batch dims, in float32
    (deviation 1)."""
    return (eps_pred.float() - noise.float()).pow(2).flatten(1).mean(dim=1)


def diffusion_log_ratio(model_err, ref_err):
    """Diffusion-DPO's per-sample log-ratio [B], -0.5 (err_theta - err_ref) (Eq. 14 with deviations
    1 and 2)."""
    return -0.5 * (model_err - ref_err)


def model_pixels(pixels_uint8: torch.Tensor, device) -> torch.Tensor:
    """uint8 images [B, 3, R, R] (data.py's batches) -> float32 in [-1, 1] on `device`,
    x / 127.5 - 1.

    The copy to the device moves a quarter of the float32 bytes. The arithmetic equals the loader's
    former (x / 255) * 2 - 1 bit for bit: 127.5 = 255 / 2, and a factor of 2 commutes with float
    rounding.
    """
    if pixels_uint8.dtype != torch.uint8:
        raise ValueError(f"dpo.model_pixels: expected uint8 pixels, got {pixels_uint8.dtype}")
    return pixels_uint8.to(device).float() / 127.5 - 1


def keyed_latents(sd, pixels, seed: int, positions: list[int], streams=("w",)) -> torch.Tensor:
    """Latents x_0 [kB, C, h, w] float32 of pixels [kB, 3, H, W] in [-1, 1], k blocks of B images
    with one noise stream each ("w", "l"): posterior samples keyed by (seed, position, stream), in
    ONE VAE call."""
    factor = sd.vae.downsample_factor
    device = next(sd.unet.parameters()).device
    shape = (sd.vae.config.latent_channels, pixels.shape[2] // factor, pixels.shape[3] // factor)
    noise = [keyed_randn(seed, positions, shape, f"vae_{stream}", device) for stream in streams]
    return sd.encode_images(pixels, torch.cat(noise))


def keyed_t_and_eps(sd, latents, seed: int, positions: list[int]):
    """t [B] ~ U{0..T-1} and eps ~ N(0, I) like latents (float32), keyed by (seed, position)."""
    t = []
    for position in positions:
        generator = keyed_generator(seed, position, "t")
        t.append(int(torch.randint(sd.schedule.num_train_timesteps, (), generator=generator)))
    eps = keyed_randn(seed, positions, latents.shape[1:], "eps", latents.device)
    return torch.tensor(t, device=latents.device), eps


def dpo_train_step(sd, reference_unet, batch: dict, beta: float, seed: int):
    """train.py plug-in: (loss, metrics) of a batch of pairs, from ONE policy and ONE reference
    forward on [winners; losers].

    batch: {"pixels_w", "pixels_l": uint8 [B, 3, H, W] (model_pixels), "prompts": list[str],
    "positions": list[int]}; reference_unet(x_t, t, context) -> eps_ref.
    metrics: dpo_loss's, and the mean errors model_err_w, model_err_l, ref_err_w, ref_err_l.
    """
    positions = batch["positions"]
    device = next(sd.unet.parameters()).device
    pixels = model_pixels(torch.cat([batch["pixels_w"], batch["pixels_l"]]), device)
    latents = keyed_latents(sd, pixels, seed, positions, ("w", "l"))  # [2B]: winners, then losers
    t, eps = keyed_t_and_eps(sd, latents[: len(positions)], seed, positions)
    # Deviation 3: the winner and the loser share t and eps.
    t = t.repeat(2)
    eps = eps.repeat(2, 1, 1, 1)
    x_t = sd.schedule.add_noise(latents, eps, t)  # DDPM Eq. 4
    context = sd.encode_prompts(batch["prompts"]).repeat(2, 1, 1)  # deviation 5
    eps_pred = sd.unet(x_t, t, context)
    with torch.no_grad():
        eps_ref = reference_unet(x_t, t, context)
    model_err_w, model_err_l = per_sample_mse(eps_pred, eps).chunk(2)
    ref_err_w, ref_err_l = per_sample_mse(eps_ref, eps).chunk(2)
    log_ratio_w = diffusion_log_ratio(model_err_w, ref_err_w)
    log_ratio_l = diffusion_log_ratio(model_err_l, ref_err_l)
    loss, metrics = dpo_loss(log_ratio_w, log_ratio_l, beta)  # Eq. 14 (Diffusion-DPO)
    metrics["model_err_w"] = model_err_w.detach().mean()
    metrics["model_err_l"] = model_err_l.detach().mean()
    metrics["ref_err_w"] = ref_err_w.detach().mean()
    metrics["ref_err_l"] = ref_err_l.detach().mean()
    return loss, metrics


def sft_train_step(sd, batch: dict, seed: int):
    """train.py plug-in for the paper's SFT baseline: the eps-MSE (DDPM L_simple, Ho et al. 2020
    Eq. 14) on the preferred images batch["pixels_w"] (uint8) only, with the winners' streams.
    Returns (loss, {loss, model_err_w})."""
    positions = batch["positions"]
    pixels = model_pixels(batch["pixels_w"], next(sd.unet.parameters()).device)
    latents = keyed_latents(sd, pixels, seed, positions)
    t, eps = keyed_t_and_eps(sd, latents, seed, positions)
    x_t = sd.schedule.add_noise(latents, eps, t)  # DDPM Eq. 4
    eps_pred = sd.unet(x_t, t, sd.encode_prompts(batch["prompts"]))
    loss = per_sample_mse(eps_pred, eps).mean()  # Eq. 14 (DDPM, L_simple)
    return loss, {"loss": loss.detach(), "model_err_w": loss.detach()}
