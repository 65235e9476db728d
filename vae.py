"""The Stable Diffusion 1.5 variational autoencoder (AutoencoderKL), written from scratch.

Concept: latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", Sec. 3.1) runs the diffusion model on z = E(x), a KL-regularised latent that is 8x smaller than
the image per side. The encoder E maps an image x in [-1, 1] to a diagonal Gaussian posterior
q(z|x) = N(mean, exp(logvar)); the decoder D maps a latent back to pixels. SD1.5 trains the UNet on
z * scaling_factor (0.18215) so that the latents have roughly unit variance; that scaling is done by the
CALLER, never inside this module (latents = vae.encode(x).sample() * config.scaling_factor).

Structure (per side): conv_in -> down/up blocks of ResNet blocks -> mid block (ResNet, single-head
self-attention, ResNet) -> GroupNorm -> SiLU -> conv_out. Module names mirror the current diffusers
AutoencoderKL state-dict keys, so its files load with an identity key map and strict=True.

Deviations from the original LDM code / diffusers:
1. Only the SD-style configuration is implemented: DownEncoderBlock2D / UpDecoderBlock2D, SiLU, a
   mid-block attention, quant_conv and post_quant_conv. No tiling, slicing or fp16 upcasting logic.
2. Attention runs through F.scaled_dot_product_attention (diffusers upcasts the softmax to fp32; in fp32
   this is the same computation).
3. convert_legacy_vae_keys() accepts the pre-refactor attention names (query/key/value/proj_attn) that the
   public SD1.5 diffusers VAE file still uses, and squeezes LDM-style [C, C, 1, 1] conv weights to [C, C].
"""

import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

GROUP_NORM_EPS = 1e-6  # every VAE GroupNorm uses 1e-6 (the UNet uses 1e-5)


@dataclass
class VAEConfig:
    in_channels: int = 3  # image channels (RGB); out_channels is the same
    latent_channels: int = 4  # channels of z
    block_out_channels: tuple = (128, 256, 512, 512)  # one level per entry; len-1 downsamplings
    layers_per_block: int = 2  # ResNet blocks per encoder level (decoder levels have one more)
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # used by the caller: z_model = z * scaling_factor
    sample_size: int = 512  # nominal image size (informational)

    @classmethod
    def sd15(cls):
        return cls()

    @classmethod
    def tiny(cls):
        return cls(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64)

    @classmethod
    def from_diffusers(cls, config: dict):
        """Build from a diffusers vae/config.json dict; refuse variants this file does not implement."""
        in_channels = config.get("in_channels", 3)
        unsupported = {
            "out_channels": config.get("out_channels", in_channels) != in_channels,
            "act_fn": config.get("act_fn", "silu") != "silu",
            "down_block_types": any(t != "DownEncoderBlock2D" for t in config.get("down_block_types", [])),
            "up_block_types": any(t != "UpDecoderBlock2D" for t in config.get("up_block_types", [])),
            "use_quant_conv": not config.get("use_quant_conv", True),
            "use_post_quant_conv": not config.get("use_post_quant_conv", True),
            "mid_block_add_attention": not config.get("mid_block_add_attention", True),
            "shift_factor": config.get("shift_factor") not in (None, 0, 0.0),
        }
        bad = [name for name, is_bad in unsupported.items() if is_bad]
        if bad:
            raise ValueError(f"VAE config field(s) {bad} describe a variant that vae.py does not implement")
        return cls(
            in_channels=in_channels,
            latent_channels=config.get("latent_channels", 4),
            block_out_channels=tuple(config.get("block_out_channels", (128, 256, 512, 512))),
            layers_per_block=config.get("layers_per_block", 2),
            norm_num_groups=config.get("norm_num_groups", 32),
            scaling_factor=config.get("scaling_factor", 0.18215),
            sample_size=config.get("sample_size", 512),
        )

    def to_diffusers(self) -> dict:
        """Keyword arguments for diffusers.AutoencoderKL (used by the parity tests)."""
        kwargs = asdict(self)
        levels = len(self.block_out_channels)
        kwargs.update(
            out_channels=self.in_channels,
            block_out_channels=list(self.block_out_channels),
            down_block_types=["DownEncoderBlock2D"] * levels,
            up_block_types=["UpDecoderBlock2D"] * levels,
            act_fn="silu",
        )
        return kwargs


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))); moments [B, 2*C, h, w] = cat(mean, logvar)."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # same clamp as LDM/diffusers: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        # Draw on the generator's device (like diffusers' randn_tensor) so a CPU generator gives the same
        # noise whatever device the model runs on.
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)  # reparameterisation trick, AEVB Sec. 2.4

    def mode(self):
        return self.mean


class ResnetBlock(nn.Module):
    """(GroupNorm -> SiLU -> conv) twice plus a shortcut (1x1 conv when channels change). No time input."""

    def __init__(self, in_channels, out_channels, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=GROUP_NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=GROUP_NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over all h*w positions, with a pre-GroupNorm and a residual."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x):
        tokens = rearrange(self.group_norm(x), "b c h w -> b (h w) c")  # one token per pixel
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # [B, 1, hw, C]
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # Attention Is All You Need Eq. 1, one head
        out = self.to_out[1](self.to_out[0](out))
        return x + rearrange(out, "b (h w) c -> b c h w", h=x.shape[2])


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric (right/bottom) zero pad, as in LDM (padding=0 in diffusers)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `resnets`, then an optional `downsamplers.0` or `upsamplers.0`."""

    def __init__(self, in_channels, out_channels, num_resnets, groups, resample=None):
        super().__init__()
        channels = [in_channels] + [out_channels] * num_resnets
        self.resnets = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in zip(channels, channels[1:]))
        # An empty ModuleList holds no parameters, so it adds no state-dict keys.
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if resample == "down" else [])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if resample == "up" else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.downsamplers, *self.upsamplers]:
            x = layer(x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels, groups):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, groups) for _ in range(2))
        self.attentions = nn.ModuleList([Attention(channels, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        inputs, last = (chans[0], *chans[:-1]), len(chans) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Level(inputs[i], chans[i], cfg.layers_per_block, groups, "down" if i < last else None)
            for i in range(len(chans))
        )
        self.mid_block = MidBlock(chans[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=GROUP_NORM_EPS)
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups  # deepest level first
        inputs, last = (chans[0], *chans[:-1]), len(chans) - 1
        self.conv_in = nn.Conv2d(cfg.latent_channels, chans[0], 3, padding=1)
        self.mid_block = MidBlock(chans[0], groups)
        self.up_blocks = nn.ModuleList(
            Level(inputs[i], chans[i], cfg.layers_per_block + 1, groups, "up" if i < last else None)
            for i in range(len(chans))
        )
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=GROUP_NORM_EPS)
        self.conv_out = nn.Conv2d(chans[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x) -> DiagonalGaussian:
        """x: image in [-1, 1], [B, 3, H, W] with H, W multiples of downsample_factor -> q(z|x)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        """z: UNscaled latent [B, 4, H/f, W/f] (divide by scaling_factor first) -> image ~[-1, 1]."""
        return self.decoder(self.post_quant_conv(z))


# Pre-refactor diffusers attention names (still used by the public SD1.5 vae/ file) -> current names.
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_KEY = re.compile(r"(.*attentions\.\d+)\.(query|key|value|proj_attn|to_[qkv]|to_out\.0)\.(\w+)")


def convert_legacy_vae_keys(state_dict: dict) -> dict:
    """Rename mid-block attention query/key/value/proj_attn to to_q/to_k/to_v/to_out.0.

    Also squeezes [C, C, 1, 1] attention weights (1x1 convs in LDM files) to the [C, C] Linear shape.
    Keys that are already in the current naming pass through unchanged.
    """
    converted = {}
    for key, tensor in state_dict.items():
        match = _ATTENTION_KEY.fullmatch(key)
        if match:
            block, name, param = match.groups()
            key = f"{block}.{_LEGACY_ATTENTION_NAMES.get(name, name)}.{param}"
            if param == "weight" and tensor.ndim == 4:
                tensor = tensor[:, :, 0, 0]  # 1x1 conv weight [C, C, 1, 1] -> Linear weight [C, C]
        converted[key] = tensor
    return converted
