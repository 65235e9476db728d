"""The Stable Diffusion 1.5 variational autoencoder (AutoencoderKL), written from scratch.

Latent diffusion (Rombach et al. 2022, LDM Sec. 3.1) runs the diffusion model on z = E(x), a
KL-regularised latent 8x smaller than the image per side. The encoder E maps an image x in [-1, 1]
to a diagonal Gaussian posterior q(z|x) = N(mean, exp(logvar)); the decoder D maps z back to pixels.
SD1.5 trains the UNet on z * scaling_factor (0.18215). The blocks are unet.py's; module names are
diffusers' keys.

Deviations from the original LDM code / diffusers:
1. Only the SD configuration: DownEncoderBlock2D / UpDecoderBlock2D, SiLU, a mid-block attention,
   quant_conv and post_quant_conv. No tiling, slicing or fp16 upcasting logic.
2. Attention through F.scaled_dot_product_attention (diffusers upcasts the softmax to fp32; the same
   in fp32).
3. convert_legacy_vae_keys() accepts the pre-refactor attention names (query/key/value/proj_attn)
   that the public SD1.5 diffusers VAE file still uses, and squeezes LDM-style [C, C, 1, 1] conv
   weights to [C, C].
"""

import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields

import torch
from einops import rearrange
from torch import nn

import unet
from unet import Downsample, ResnetBlock, Upsample

EPS = 1e-6  # every VAE GroupNorm uses 1e-6 (the UNet's ResNets use 1e-5)
# diffusers config fields and the values this file builds; others describe variants it does not
# (deviation 1)
SD_ONLY = {"act_fn": ["silu"], "use_quant_conv": [True], "use_post_quant_conv": [True],
           "mid_block_add_attention": [True], "shift_factor": [None, 0]}


@dataclass
class VAEConfig:
    in_channels: int = 3  # image channels (RGB); out_channels is the same
    latent_channels: int = 4  # channels of z
    block_out_channels: tuple = (128, 256, 512, 512)  # one level per entry; len-1 downsamplings
    layers_per_block: int = 2  # ResNet blocks per encoder level (decoder levels have one more)
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # used by the caller: z_model = z * scaling_factor

    @classmethod
    def sd15(cls):
        return cls()

    @classmethod
    def from_diffusers(cls, config: dict):
        """Build from a diffusers vae/config.json dict (same field names); refuse variants not built
        here."""
        kwargs = {f.name: config.get(f.name, f.default) for f in fields(cls)}
        result = cls(**{**kwargs, "block_out_channels": tuple(kwargs["block_out_channels"])})
        structure = ("out_channels", "down_block_types", "up_block_types")
        allowed = {
            **SD_ONLY,
            **{k: [v] for k, v in result.to_diffusers().items() if k in structure},
        }
        bad = [
            name for name, values in allowed.items() if config.get(name, values[0]) not in values
        ]
        if bad:
            raise ValueError(
                f"VAE config field(s) {bad} describe a variant that vae.py does not implement"
            )
        return result

    def to_diffusers(self) -> dict:
        """Keyword arguments for diffusers.AutoencoderKL (used by the parity tests)."""
        widths = list(self.block_out_channels)
        n = len(widths)
        return {
            **asdict(self),
            "block_out_channels": widths,
            "out_channels": self.in_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
        }


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))); moments [B, 2*C, h, w] = cat(mean,
    logvar)."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # same clamp as LDM/diffusers: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)


class Attention(unet.Attention):
    """Single-head self-attention over all h*w positions, with a pre-GroupNorm and a residual."""

    def __init__(self, channels, groups):
        super().__init__(channels, heads=1, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)

    def forward(self, x):
        tokens = rearrange(self.group_norm(x), "b c h w -> b (h w) c")  # one token per pixel
        return x + rearrange(super().forward(tokens), "b (h w) c -> b c h w", h=x.shape[2])


class MidBlock(nn.Module):
    def __init__(self, channels, groups):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, groups, EPS) for _ in range(2))
        self.attentions = nn.ModuleList([Attention(channels, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


def levels(widths, num_resnets, groups, resample: str):
    """`down_blocks` / `up_blocks`: per width a level of ResNet blocks (`resnets`), all but the last
    level followed by `downsamplers.0` (LDM pads right/bottom only) or `upsamplers.0` (resample
    "down" / "up")."""
    blocks = []
    for i, (width_in, width) in enumerate(zip([widths[0], *widths], widths)):
        channels = [width_in] + [width] * num_resnets
        layers = OrderedDict(resnets=nn.Sequential(*(ResnetBlock(a, b, groups, EPS)
                                                     for a, b in zip(channels, channels[1:]))))
        if i < len(widths) - 1:
            resampler = (
                Downsample(width, pad=(0, 1, 0, 1)) if resample == "down" else Upsample(width)
            )
            layers[f"{resample}samplers"] = nn.Sequential(resampler)
        blocks.append(nn.Sequential(layers))
    return nn.Sequential(*blocks)


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = cfg = config
        widths = cfg.block_out_channels
        groups = cfg.norm_num_groups
        latent = cfg.latent_channels
        self.encoder = nn.Sequential(OrderedDict(
            conv_in=nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1),
            down_blocks=levels(widths, cfg.layers_per_block, groups, "down"),
            mid_block=MidBlock(widths[-1], groups),
            conv_norm_out=nn.GroupNorm(groups, widths[-1], eps=EPS), conv_act=nn.SiLU(),
            conv_out=nn.Conv2d(widths[-1], 2 * latent, 3, padding=1)))  # mean and logvar
        self.decoder = nn.Sequential(OrderedDict(
            conv_in=nn.Conv2d(latent, widths[-1], 3, padding=1),
            mid_block=MidBlock(widths[-1], groups),
            # Deepest level first.
            up_blocks=levels(widths[::-1], cfg.layers_per_block + 1, groups, "up"),
            conv_norm_out=nn.GroupNorm(groups, widths[0], eps=EPS), conv_act=nn.SiLU(),
            conv_out=nn.Conv2d(widths[0], cfg.in_channels, 3, padding=1)))
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = nn.Conv2d(latent, latent, 1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x) -> DiagonalGaussian:
        """x: image in [-1, 1], [B, 3, H, W] with H, W multiples of downsample_factor -> q(z|x)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        """z: UNscaled latent [B, 4, H/f, W/f] (divide by scaling_factor first) -> image in
        about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))


LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def convert_legacy_vae_keys(state_dict: dict) -> dict:
    """Deviation 3: mid-block attention keys in the current names and Linear shapes; others pass
    unchanged."""
    converted = {}
    for key, tensor in state_dict.items():
        match = re.fullmatch(r"(.*\.attentions\.\d+)\.(.+)\.(\w+)", key)
        if match:
            block, name, param = match.groups()
            key = f"{block}.{LEGACY_ATTENTION_NAMES.get(name, name)}.{param}"
            # 1x1 conv [C, C, 1, 1] -> Linear.
            tensor = tensor[:, :, 0, 0] if tensor.ndim == 4 else tensor
        converted[key] = tensor
    return converted
