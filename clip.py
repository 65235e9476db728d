"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision").

Two models with transformers' key names (strict loading):
* CLIPTextModel: the causal text transformer (Sec. 2.4). SD1.5 conditions its UNet on the full
  77-token last hidden state (after the final LayerNorm) of the OpenAI ViT-L/14 text tower.
* CLIPModel: both towers with the projection heads and logit_scale (Sec. 2.3: logits =
  exp(logit_scale) * cos(image, text)); the reward models use it in the ViT-L/14 (quick-GELU) and
  ViT-H/14 (exact GELU) layouts.

Deviations from the official code (OpenAI clip, transformers):
1. No `position_ids` buffer (positions are arange(L)): convert_hf_clip_keys() drops it from a file.
2. The pooled text feature is taken at the FIRST eos (49407). transformers pools at
   input_ids.argmax() when a legacy config (SD1.5's) says eos_token_id == 2; 49407 is CLIP's largest
   id, so both pick the same position.
3. Attention through F.scaled_dot_product_attention; no dropout, attention mask (none is passed
   here) or position-embedding interpolation.
"""

from dataclasses import asdict, dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "max_positions": "max_position_embeddings"}


@dataclass
class TowerConfig:
    """A transformer tower's shape. HF_DEFAULTS: transformers' defaults, for keys a config.json
    leaves out."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    # "quick_gelu" (OpenAI ViT-L/14) or "gelu" (exact erf, OpenCLIP ViT-H/14).
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    HF_DEFAULTS: ClassVar[dict] = {}

    @classmethod
    def from_hf(cls, config: dict):
        """From a transformers CLIPTextConfig / CLIPVisionConfig dict."""
        defaults = {**asdict(cls()), **cls.HF_DEFAULTS}
        values = {}
        for name, default in defaults.items():
            values[name] = config.get(HF_NAMES.get(name, name), default)
        return cls(**values)


@dataclass
class CLIPTextConfig(TowerConfig):  # defaults: SD1.5's text encoder (OpenAI ViT-L/14)
    vocab_size: int = 49408
    max_positions: int = 77
    eos_token_id: int = 49407  # pooling position (deviation 2)
    projection_dim: int = 768  # width of text_projection / visual_projection in CLIPModel
    HF_DEFAULTS = dict(hidden_size=512, num_heads=8, intermediate_size=2048, projection_dim=512)

    @classmethod
    def sd15(cls):
        return cls()

    @classmethod
    def tiny(cls):
        return cls(
            hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37, projection_dim=16
        )

    @classmethod
    def vit_h14_text(cls):  # OpenCLIP ViT-H/14 text tower (PickScore, HPSv2)
        return cls(
            hidden_size=1024,
            num_layers=24,
            num_heads=16,
            intermediate_size=4096,
            hidden_act="gelu",
            projection_dim=1024,
        )

    @classmethod
    def from_hf(cls, config: dict, projection_dim: int | None = None):
        """A CLIPModel passes its text_config and projection_dim; legacy configs (SD1.5's) say
        eos 2."""
        text = super().from_hf(config)
        return replace(text, eos_token_id=49407 if text.eos_token_id == 2 else text.eos_token_id,
                       projection_dim=projection_dim or text.projection_dim)


@dataclass
class CLIPVisionConfig(TowerConfig):
    patch_size: int = 14
    image_size: int = 224
    HF_DEFAULTS = dict(patch_size=32)

    @classmethod
    def vit_l14(cls):  # OpenAI CLIP ViT-L/14 (aesthetic predictor)
        return cls(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)

    @classmethod
    def vit_h14(cls):  # OpenCLIP ViT-H/14 (PickScore, HPSv2)
        return cls(
            hidden_size=1280, num_layers=32, num_heads=16, intermediate_size=5120, hidden_act="gelu"
        )


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation x * sigmoid(1.702 x) of GELU (Hendrycks & Gimpel 2016, Sec. 2)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class Attention(nn.Module):
    def __init__(self, width, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(width, width) for _ in range(4)
        )

    def forward(self, x, causal: bool):
        q, k, v = (rearrange(proj(x), "b n (h d) -> b h n d", h=self.num_heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        # Attention Is All You Need Eq. 1.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))


class MLP(nn.Module):
    def __init__(self, width, hidden, act):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, causal: bool):
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x, causal: bool):
        for layer in self.layers:
            x = layer(x, causal)
        return x


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.hidden_size)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class TextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids):
        """input_ids [B, L] (L <= 77) -> (last_hidden_state [B, L, D], pooled [B, D] at the first
        eos)."""
        hidden = self.final_layer_norm(self.encoder(self.embeddings(input_ids), causal=True))
        eos_position = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
        return hidden, hidden[torch.arange(len(hidden), device=hidden.device), eos_position]


class CLIPTextModel(nn.Module):
    """The text tower alone (SD1.5's text_encoder); keys `text_model.*`."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.text_model = TextTransformer(config)

    def forward(self, input_ids):
        return self.text_model(input_ids)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        width = cfg.hidden_size
        patch = cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.patch_embedding = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        # One position per patch, plus one for the class token.
        self.position_embedding = nn.Embedding((cfg.image_size // patch) ** 2 + 1, width)

    def forward(self, pixel_values):
        # [B, D, g, g] -> [B, g*g, D].
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(len(patches), 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        # "layrnorm" (sic) is transformers' key name.
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values):
        """pixel_values [B, 3, S, S], CLIP-normalised -> pooled [B, D] (class token after
        post_layernorm)."""
        size = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"CLIP vision tower expects pixel_values [B, 3, {size}, {size}], "
                             f"got {list(pixel_values.shape)}; resize and center-crop first")
        hidden = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)), causal=False)
        return self.post_layernorm(hidden[:, 0])


class CLIPModel(nn.Module):
    """Both towers plus projections; keys as transformers' CLIPModel."""

    def __init__(self, text_config: CLIPTextConfig, vision_config: CLIPVisionConfig):
        super().__init__()
        self.text_model = TextTransformer(text_config)
        self.vision_model = VisionTransformer(vision_config)
        self.visual_projection = nn.Linear(
            vision_config.hidden_size, text_config.projection_dim, bias=False
        )
        self.text_projection = nn.Linear(
            text_config.hidden_size, text_config.projection_dim, bias=False
        )
        # log(1/0.07), the paper's initial temperature.
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))

    def get_image_features(self, pixel_values):
        return self.visual_projection(self.vision_model(pixel_values))

    def get_text_features(self, input_ids):
        return self.text_projection(self.text_model(input_ids)[1])


def convert_hf_clip_keys(state_dict: dict) -> dict:
    """A transformers CLIP(Text)Model file in our keys: no `*.embeddings.position_ids` (deviation
    1), and `text_model.` restored on a bare CLIPTextModel saved by transformers >= 5."""
    bare_text_model = ("embeddings.", "encoder.", "final_layer_norm.")
    return {("text_model." + key if key.startswith(bare_text_model) else key): tensor
            for key, tensor in state_dict.items() if not key.endswith("embeddings.position_ids")}
