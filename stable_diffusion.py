"""Stable Diffusion as the training code sees it: the three models, the tokenizer and the schedule,
with the two conversions every method needs (LDM, Rombach et al. 2022, Sec. 3.1 and 3.3).

    image x in [-1, 1] -> latent z = scaling_factor * (mu + sigma * noise)  (the VAE posterior)
    prompt y           -> context tau(y), CLIP's last hidden state          (the UNet condition)

Loading the public weights into it is weights.py's job; the toy world builds one of its own.
"""

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from clip import CLIPTextModel
from scheduler import NoiseSchedule
from tokenizer import CLIPTokenizer
from unet import UNet2DConditionModel


@dataclass
class StableDiffusion:
    """The frozen models run in their own parameter dtype with autocast off and return float32
    (train.py's precision policy); a model without weights (the toy's identity VAE) carries its
    dtype in a buffer."""

    unet: UNet2DConditionModel
    # vae.AutoencoderKL, or any module with its encode/decode and config.scaling_factor (the
    # toy's identity).
    vae: nn.Module
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    schedule: NoiseSchedule

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text conditioning: CLIP's last hidden state for the 77 padded tokens, [B, 77, D]
        float32."""
        device = self.text_encoder.text_model.embeddings.token_embedding.weight.device
        with torch.autocast(device.type, enabled=False):
            return self.text_encoder(self.tokenizer(prompts).to(device))[0].float()

    def encode_images(
        self, pixels: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """pixels [N, 3, H, W] in [-1, 1] -> latents [N, C, H/f, W/f] float32 scaled by
        scaling_factor: the posterior sample mean + std * noise (AEVB's reparameterisation trick);
        the mean if noise is None."""
        device, dtype = _device_dtype(self.vae)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            posterior = self.vae.encode(pixels.to(device, dtype))
            latents = posterior.mean.float()
            if noise is not None:
                # The reparameterisation trick, AEVB Sec. 2.4.
                latents = latents + posterior.std.float() * noise.to(device, torch.float32)
        return latents * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [N, C, h, w] -> images [N, 3, H, W] in [0, 1] fp32, differentiable
        (TailorPO-G)."""
        device, dtype = _device_dtype(self.vae)
        with torch.autocast(device.type, enabled=False):
            images = self.vae.decode(
                (latents.float() / self.vae.config.scaling_factor).to(device, dtype)
            )
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def to(self, device=None, dtype=None):
        for model in (self.unet, self.vae, self.text_encoder):
            model.to(device=device, dtype=dtype)
        return self


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    tensor = next(itertools.chain(module.parameters(), module.buffers()))
    return tensor.device, tensor.dtype
