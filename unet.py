"""The Stable Diffusion 1.5 denoiser: a text-conditioned UNet that predicts the noise eps_pred in
x_t.

Latent Diffusion Models (Rombach et al. 2022, arXiv:2112.10752), Sec. 3.3: eps_theta(z_t, t, tau(y))
is a UNet (Ho et al. 2020, DDPM, Appendix B) whose levels are ResNet blocks followed by "spatial
transformers": self-attention, cross-attention to the text tokens tau(y) (softmax(Q K^T / sqrt(d))
V) and a GEGLU feed-forward. Module paths are diffusers' state-dict keys; vae.py reuses the blocks.
Upstream read (not copied): CompVis ldm/.../openaimodel.py, diffusers unet_2d_condition.py.

Deviations from the paper / official code:
 1. Only the SD1.x topology (epsilon prediction, 1x1 conv proj_in/proj_out, one transformer layer
    per attention, no class or addition embeddings); `UNetConfig.from_diffusers` refuses other
    configs.
 2. No Dropout in the ResNet blocks (0 in SD1.5); Dropout(0) at `to_out.1`, `ff.net.1` keeps
    diffusers' keys.
 3. SiLU(time embedding) is computed once per forward and shared by every ResNet block (diffusers:
    per block).
 4. The upsampler always interpolates to the next skip's size (diffusers: scale_factor=2 unless H or
    W is not a multiple of 2**num_upsamplers; the same result).
 5. diffusers' output_scale_factor / rescale_output_factor divisions (1.0 in SD1.5) are left out.
"""

import math
from collections import OrderedDict
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

SD1_ONLY = "unet.py builds the SD1.x architecture"
# diffusers config fields whose other values describe an architecture this file does not build
# (deviation 1)
SD1_FIXED = {"use_linear_projection": False, "addition_embed_type": None, "class_embed_type": None,
             "transformer_layers_per_block": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
             "prediction_type": "epsilon"}


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # one entry per resolution level
    layers_per_block: int = 2  # ResNet(+transformer) pairs per down level; up levels have one more
    # Which down levels attend (the up levels mirror them).
    cross_attention: tuple[bool, ...] = (True, True, True, False)
    # Diffusers calls this `attention_head_dim` (a misnomer); head_dim = channels / 8.
    num_heads: int = 8
    cross_attention_dim: int = 768  # width of the text tokens (CLIP ViT-L/14 hidden size)
    norm_num_groups: int = 32
    # Latent side of the training resolution (64 * 8 = 512 px): sampler.py's default.
    sample_size: int = 64

    @classmethod
    def sd15(cls):
        return cls()

    @classmethod
    def tiny(cls):
        return cls(block_out_channels=(32, 64), layers_per_block=1, cross_attention=(True, False),
                   num_heads=2, cross_attention_dim=32, norm_num_groups=8, sample_size=8)

    @classmethod
    def from_diffusers(cls, config: dict):
        """Our config from a diffusers unet/config.json dict; ValueError for non-SD1.x
        architectures."""
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        heads = set(heads) if isinstance(heads, (list, tuple)) else {heads}
        if len(heads) != 1:
            message = "unsupported UNet config: different head counts per level; "
            raise ValueError(message + SD1_ONLY)
        down = config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
        same_names = {f.name: config[f.name] for f in fields(cls) if f.name in config}
        result = cls(
            **{**same_names, "block_out_channels": tuple(config["block_out_channels"])},
            cross_attention=tuple(t == "CrossAttnDownBlock2D" for t in down),
            num_heads=heads.pop(),
        )
        block_types = {k: v for k, v in result.to_diffusers().items() if k.endswith("block_types")}
        for name, value in {**SD1_FIXED, **block_types}.items():
            found = config.get(name, value)
            if (list(found) if isinstance(found, tuple) else found) != value:
                raise ValueError(f"unsupported UNet config: {name}={found!r}; " + SD1_ONLY)
        return result

    def to_diffusers(self) -> dict:
        """Keyword arguments for diffusers.UNet2DConditionModel (the reference used by the
        tests)."""
        down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.cross_attention]
        up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in self.cross_attention[::-1]]
        return dict(
            sample_size=self.sample_size,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=list(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            attention_head_dim=self.num_heads,
            cross_attention_dim=self.cross_attention_dim,
            norm_num_groups=self.norm_num_groups,
        )


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding of integer timesteps [B] -> [B, dim] (DDPM Appendix B / Transformer PE);
    SD1.5's flip_sin_to_cos=True, freq_shift=0: [cos, sin] with freqs exp(-ln(10000) * i /
    (dim/2))."""
    half = dim // 2
    frequency_index = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    exponent = -math.log(max_period) * frequency_index / half
    # Attention Is All You Need Sec. 3.5.
    angles = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding (none in the VAE) added in between, plus the
    input."""

    def __init__(self, in_channels, out_channels, groups, eps=1e-5, time_dim=None):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if time_dim:
            self.time_emb_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x, time_act=None):  # time_act = SiLU(time embedding) [B, time_dim]
        h = self.conv1(F.silu(self.norm1(x)))
        if time_act is not None:
            h = h + self.time_emb_proj(time_act)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Multi-head attention (LDM Sec. 3.3): self-attention if context is None, else cross-attention
    to it."""

    def __init__(self, dim, heads, context_dim=None, bias=False):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        # Attention Is All You Need Eq. 1, as in LDM Sec. 3.3.
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)  # GEGLU (exact erf GELU), GLU Variants (Shazeer 2020) Sec. 2


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer layer: self-attention, cross-attention to the text, GEGLU
    feed-forward."""

    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(OrderedDict(net=nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0),
                                                              nn.Linear(4 * dim, dim))))

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel: a transformer layer over the H*W pixels of a feature map,
    residually."""

    def __init__(self, channels, heads, context_dim, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)  # 1e-6 here, unlike the ResNet blocks
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, context_dim)]
        )
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context):
        h = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")  # one token per pixel
        h = self.transformer_blocks[0](h, context)
        # contiguous: a channels-last view would make every later conv / GroupNorm run channels-last
        h = rearrange(h, "b (h w) c -> b c h w", h=x.shape[2]).contiguous()
        return self.proj_out(h) + x


class Downsample(nn.Module):
    """Zero padding (left, right, top, bottom), then a stride-2 3x3 conv; LDM's VAE pads
    right/bottom only."""

    def __init__(self, channels, pad=(1, 1, 1, 1)):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)
        self.pad = pad

    def forward(self, x):
        return self.conv(F.pad(x, self.pad))


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to `size` (deviation 4), or by 2 if None (the VAE), then a 3x3
    conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        return self.conv(
            F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
        )


class UNetLevel(nn.Module):
    """diffusers' (CrossAttn)DownBlock2D / UpBlock2D / mid block: a ResNet per input width in
    `in_channels`, the first `num_attentions` each followed by a SpatialTransformer, then a
    down/upsampler if `resample`."""

    def __init__(self, in_channels, channels, cfg, num_attentions, resample=None):
        super().__init__()
        time_dim = 4 * cfg.block_out_channels[0]
        groups = cfg.norm_num_groups
        self.resnets = nn.ModuleList(
            ResnetBlock(c, channels, groups, 1e-5, time_dim) for c in in_channels
        )
        self.attentions = nn.ModuleList(
            SpatialTransformer(channels, cfg.num_heads, cfg.cross_attention_dim, groups)
            for _ in range(num_attentions)) if num_attentions else None
        self.downsamplers = nn.ModuleList([Downsample(channels)]) if resample == "down" else None
        self.upsamplers = nn.ModuleList([Upsample(channels)]) if resample == "up" else None


class UNet2DConditionModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        widths = cfg.block_out_channels
        L = cfg.layers_per_block
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        time_dim = 4 * widths[0]
        self.time_embedding = nn.Sequential(
            OrderedDict(  # diffusers' TimestepEmbedding
                linear_1=nn.Linear(widths[0], time_dim),
                act=nn.SiLU(),
                linear_2=nn.Linear(time_dim, time_dim),
            )
        )

        skip_widths = [widths[0]]  # widths of the feature maps the down path stores for the up path
        self.down_blocks = nn.ModuleList()
        for level, (width, attention) in enumerate(zip(widths, cfg.cross_attention)):
            last = level == len(widths) - 1
            ins = [skip_widths[-1]] + [width] * (L - 1)
            self.down_blocks.append(
                UNetLevel(ins, width, cfg, attention * L, None if last else "down")
            )
            skip_widths += [width] * (L + (0 if last else 1))

        # ResNet, attention, ResNet.
        self.mid_block = UNetLevel([widths[-1]] * 2, widths[-1], cfg, 1)

        # SD1.5 (widths 320, 640, 1280, 1280; L = 2): skips 320 (conv_in), 320 x3, 640 x3,
        # 1280 x3, 1280 x2; an up ResNet reads cat([h, skip]) (last-in first-out), so its input
        # widths are (test_models checks):
        #   up_blocks.0:      2560, 2560, 2560 -> 1280, upsample
        #   up_blocks.1 attn: 2560, 2560, 1920 -> 1280, upsample
        #   up_blocks.2 attn: 1920, 1280,  960 ->  640, upsample
        #   up_blocks.3 attn:  960,  640,  640 ->  320; GroupNorm, SiLU, conv_out 320 -> 4
        self.up_blocks = nn.ModuleList()
        levels = list(enumerate(zip(widths, cfg.cross_attention)))
        for level, (width, attention) in reversed(levels):
            # h comes from the level below (or from the mid block).
            h_width = widths[min(level + 1, len(widths) - 1)]
            # Each ResNet reads cat([h, skip]).
            ins = [(h_width if i == 0 else width) + skip_widths.pop() for i in range(L + 1)]
            self.up_blocks.append(
                UNetLevel(ins, width, cfg, attention * (L + 1), "up" if level else None)
            )

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, widths[0], eps=1e-5)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)
        # True: recompute ResNet / transformer blocks in backward.
        self.gradient_checkpointing = False

    def _run(self, block, *args):  # with gradient checkpointing: recomputed in the backward pass
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _pair(self, level, i, h, time_act, context):
        h = self._run(level.resnets[i], h, time_act)
        if level.attentions is not None:
            h = self._run(level.attentions[i], h, context)
        return h

    def forward(self, sample, timestep, encoder_hidden_states):
        """sample x_t [B,C,h,w], timestep (int | 0-d | [B]), text tokens [B,L,D] -> eps_pred
        [B,C,h,w]."""
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        emb = self.time_embedding(
            timestep_embedding(t, self.config.block_out_channels[0]).to(sample.dtype)
        )
        time_act = F.silu(emb)  # every ResNet block projects SiLU(emb) (deviation 3)
        context = encoder_hidden_states

        h = self.conv_in(sample)
        skips = [h]
        for level in self.down_blocks:
            for i in range(len(level.resnets)):
                h = self._pair(level, i, h, time_act, context)
                skips.append(h)
            if level.downsamplers is not None:
                h = level.downsamplers[0](h)
                skips.append(h)

        h = self._pair(self.mid_block, 0, h, time_act, context)  # ResNet, attention, then ResNet
        h = self._run(self.mid_block.resnets[1], h, time_act)

        for level in self.up_blocks:
            for i in range(len(level.resnets)):
                h = torch.cat([h, skips.pop()], dim=1)  # the skips are consumed last-in first-out
                h = self._pair(level, i, h, time_act, context)
            if level.upsamplers is not None:
                # Deviation 4: odd latent sizes work.
                h = level.upsamplers[0](h, size=skips[-1].shape[-2:])
        return self.conv_out(F.silu(self.conv_norm_out(h)))
