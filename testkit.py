"""Test helpers shared by the tests and the benchmarks: tiny presets, the tests' tiny Stable
Diffusion (ours in memory, diffusers' as a pipeline), tokenizer files in the SD1.5 layout, the LDM
renaming, a UNet call counter. pytest's fixtures that write these as public files live in
conftest.py.

The LDM names come from `diffusers_to_ldm`, written from the published CompVis <-> diffusers
renaming rules in the diffusers -> LDM direction, so that it checks the LDM -> diffusers rules in
weights.py instead of repeating them. diffusers and transformers are test-only references: they are
imported inside functions.
"""

import functools
import json
import os
import pickle
from collections import OrderedDict
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from clip import HF_NAMES, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig
from scheduler import NoiseSchedule
from stable_diffusion import StableDiffusion
from tokenizer import BOS, EOS, CLIPTokenizer
from unet import UNet2DConditionModel, UNetConfig
from vae import AutoencoderKL, VAEConfig

# The SD1.5 scheduler/scheduler_config.json values (DDIMScheduler's own defaults differ).
SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    steps_offset=1,
    clip_sample=False,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


LEGACY_VAE_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


@functools.cache
def clip_tokenizer() -> CLIPTokenizer:
    """The bundled OpenAI vocabulary (CLIPTokenizer.default()), read once per test session."""
    return CLIPTokenizer.default()


def hf_clip_kwargs(config) -> dict:
    """Keyword arguments for transformers' CLIPTextConfig / CLIPVisionConfig: our tower config's
    values."""
    return {HF_NAMES.get(name, name): value for name, value in asdict(config).items()}


def tiny_vae_config() -> VAEConfig:
    """The tests' tiny VAE: four levels (downsample factor 8, as SD1.5's), one ResNet per level."""
    return VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)


def tiny_vision_config() -> CLIPVisionConfig:
    """The tests' tiny CLIP vision tower (the text tower's preset is CLIPTextConfig.tiny)."""
    return CLIPVisionConfig(
        hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37, patch_size=6, image_size=30
    )


def make_tiny_sd(seed=0, unet_config: UNetConfig | None = None) -> StableDiffusion:
    """The tests' one tiny Stable Diffusion, built in memory: our tiny presets with random weights
    from `seed` (UNet, then VAE, then text encoder), the UNet trainable, VAE and text encoder
    frozen, the SD1.5 schedule. `unet_config` replaces the tiny UNet; the text width follows its
    cross_attention_dim. The same presets as public files on disk (diffusers' initialisation):
    fixtures tiny_sd_dir / tiny_sd."""
    unet_config = unet_config or UNetConfig.tiny()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(unet_config)
    vae = AutoencoderKL(tiny_vae_config()).requires_grad_(False)
    text_config = replace(CLIPTextConfig.tiny(), hidden_size=unet_config.cross_attention_dim)
    text_encoder = CLIPTextModel(text_config).requires_grad_(False)
    return StableDiffusion(unet, vae, text_encoder, clip_tokenizer(), NoiseSchedule.sd15())


def build_tiny_pipeline(seed=0):
    """A diffusers StableDiffusionPipeline made of our tiny presets with random weights (fixed
    seed)."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel as DiffusersUNet
    from transformers import CLIPTextConfig as HFTextConfig
    from transformers import CLIPTextModel as HFTextModel

    torch.manual_seed(seed)
    unet = DiffusersUNet(**UNetConfig.tiny().to_diffusers())
    vae = DiffusersVAE(**tiny_vae_config().to_diffusers())
    text_encoder = HFTextModel(HFTextConfig(**hf_clip_kwargs(CLIPTextConfig.tiny())))
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        unet=unet.eval(),
        tokenizer=hf_clip_tokenizer(),
        scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def hf_clip_tokenizer():
    """transformers' CLIPTokenizer reading the files save_hf_tokenizer writes for
    CLIPTokenizer.default()."""
    import tempfile

    from transformers import CLIPTokenizer as HFTokenizer

    with tempfile.TemporaryDirectory() as folder:
        save_hf_tokenizer(clip_tokenizer(), folder)
        return HFTokenizer.from_pretrained(folder)


def save_hf_tokenizer(tokenizer: CLIPTokenizer, folder) -> None:
    """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json (SD1.5
    layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(
        json.dumps(tokenizer.vocab, ensure_ascii=False), encoding="utf-8"
    )
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in tokenizer.merges)
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {
        **special,
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": tokenizer.max_length,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def perturb_norms(model, seed=0):
    """Norm layers start at weight 1 / bias 0; randomise them so parity tests also cover their
    affine part."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def max_err(a, b) -> float:
    return (a - b).abs().max().item()


def shapes(state_dict) -> dict:
    return {key: tuple(tensor.shape) for key, tensor in state_dict.items()}


@functools.cache
def tokenizer_golden() -> list[dict]:
    """assets/tokenizer_golden.json's entries {"text", "openai_ids"}: strings and the ids OpenAI's
    SimpleTokenizer gives them (written by test_tokenizer.py, which documents them)."""
    path = Path(__file__).with_name("assets") / "tokenizer_golden.json"
    return json.loads(path.read_text(encoding="ascii"))["strings"]


def with_text_model_prefix(key):
    """transformers >= 5 saves a bare CLIPTextModel without the `text_model.` prefix the public
    files use."""
    return key if key.startswith("text_model.") else "text_model." + key


def diffusers_to_ldm(unet, vae, text, unet_layers, vae_levels):
    """Rename diffusers/transformers state dicts to one CompVis/LDM single-file state dict.

    unet_layers = layers_per_block of the UNet; vae_levels = len(vae block_out_channels).
    """
    # LDM numbers every (ResNet[, attention]) pair and every resampler in one list.
    n = unet_layers + 1
    resnet_names = {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "conv_shortcut": "skip_connection",
    }
    ldm = {}
    for key, tensor in unet.items():
        parts = key.split(".")
        if parts[0] == "down_blocks":
            level = int(parts[1])
            kind = parts[2]
            if kind == "downsamplers":
                parts = ["input_blocks", str(1 + level * n + unet_layers), "0", "op"] + parts[5:]
            else:
                index = 1 + level * n + int(parts[3])
                parts = ["input_blocks", str(index), "0" if kind == "resnets" else "1"] + parts[4:]
        elif parts[0] == "up_blocks":
            level = int(parts[1])
            kind = parts[2]
            if (
                kind == "upsamplers"
            ):  # sits after the ResNet, and after the attention if the level has one
                has_attention = any(k.startswith(f"up_blocks.{level}.attentions.") for k in unet)
                slot = "2" if has_attention else "1"
                parts = ["output_blocks", str(level * n + unet_layers), slot] + parts[4:]
            else:
                slot = "0" if kind == "resnets" else "1"
                parts = ["output_blocks", str(level * n + int(parts[3])), slot] + parts[4:]
        elif parts[0] == "mid_block":
            slot = {"resnets.0": "0", "attentions.0": "1", "resnets.1": "2"}[".".join(parts[1:3])]
            parts = ["middle_block", slot] + parts[3:]
        elif parts[0] == "time_embedding":
            parts = ["time_embed", {"linear_1": "0", "linear_2": "2"}[parts[1]]] + parts[2:]
        else:
            top = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}[
                parts[0]
            ]
            parts = top.split(".") + parts[1:]
        if "resnets" in key:
            parts[-2] = resnet_names.get(parts[-2], parts[-2])
        ldm["model.diffusion_model." + ".".join(parts)] = tensor

    attention_names = {
        "group_norm": "norm",
        "to_q": "q",
        "to_k": "k",
        "to_v": "v",
        "to_out.0": "proj_out",
    }
    for key, tensor in vae.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = new.replace("mid_block.resnets.0", "mid.block_1").replace(
            "mid_block.resnets.1", "mid.block_2"
        )
        if ".mid_block.attentions.0." in new:
            prefix, name = new.split(".mid_block.attentions.0.")
            name, param = name.rsplit(".", 1)
            new = f"{prefix}.mid.attn_1.{attention_names[name]}.{param}"
            if param == "weight" and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]  # LDM stores them as 1x1 convs
        parts = new.split(".")
        if parts[1] in ("down_blocks", "up_blocks"):
            down = parts[1] == "down_blocks"
            # LDM numbers the decoder's levels from the image end, diffusers' from the latent end.
            level = int(parts[2]) if down else vae_levels - 1 - int(parts[2])
            kind = {
                "resnets": ["block", parts[4]],
                "downsamplers": ["downsample"],
                "upsamplers": ["upsample"],
            }
            parts = [parts[0], "down" if down else "up", str(level)] + kind[parts[3]] + parts[5:]
        ldm["first_stage_model." + ".".join(parts)] = tensor

    for key, tensor in text.items():
        ldm["cond_stage_model.transformer." + with_text_model_prefix(key)] = tensor
    ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    # extras that real single files carry and loaders ignore
    ldm["betas"] = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ldm["model_ema.decay"] = torch.tensor(0.9999)
    return ldm


class UNetCallCounter:
    """Counts forward calls and rows (batch size) of UNet modules; `with UNetCallCounter(unet) as
    counter:`.

    A forward pre-hook on the module, so a reference that is the same UNet with LoRA adapters off is
    counted too; gradient checkpointing recomputes inner blocks, not the UNet's forward, and is not
    counted.
    """

    def __init__(self, *modules):
        self.modules = modules
        self.handles = []
        self.calls = 0
        self.rows = 0

    def _count(self, module, args, kwargs):
        self.calls += 1
        self.rows += (args[0] if args else kwargs["sample"]).shape[0]

    def __enter__(self):
        self.handles = [
            m.register_forward_pre_hook(self._count, with_kwargs=True) for m in self.modules
        ]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


# ---- Reward-model files (the tiny CLIP of the reward tests, the aesthetic MLP, bad weight files)


# Tiny towers in the two published layouts: OpenAI ViT-L/14 (quick_gelu) and OpenCLIP ViT-H/14
# (exact gelu).
L14 = (CLIPTextConfig.tiny(), tiny_vision_config())


def hf_clip(text_config, vision_config, seed=0):
    """A transformers CLIPModel with random weights (LayerNorms and logit_scale randomised too)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config=hf_clip_kwargs(text_config),
        vision_config=hf_clip_kwargs(vision_config),
        projection_dim=text_config.projection_dim,
    )
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "norm" in name or name == "logit_scale":
                tensor.add_(0.3 * torch.randn_like(tensor))
    return model


def write_aesthetic_pth(path, embed_dim, seed=0):
    """The upstream MLP class (Linear/Dropout Sequential, ReLUs commented out) saved as upstream
    does."""
    torch.manual_seed(seed)
    layers = nn.Sequential(
        nn.Linear(embed_dim, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )
    state = OrderedDict((f"layers.{k}", v) for k, v in layers.state_dict().items())
    torch.save(state, path)
    return state


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_bad_file(tmp_path, kind):
    """A bad weight file of each kind users meet, and the reason its error must give."""
    if kind == "pickle_with_code":
        path = tmp_path / "evil.pth"
        path.write_bytes(
            pickle.dumps({"layers.0.weight": RunsCode(tmp_path / "pwned")}, protocol=2)
        )
        return path, "refused: this pickle would run code"
    if kind == "corrupt_safetensors":  # a huge header length: safetensors' "header too large"
        path = tmp_path / "broken.safetensors"
        path.write_bytes(b"\xff" * 64)
        return path, "is not a safetensors checkpoint .*header too large"
    if kind == "corrupt_pickle":
        path = tmp_path / "truncated.pt"
        path.write_bytes(b"\x80\x02}q\x00(X")
        return path, "cannot be read by torch.load\\(weights_only=True\\)"
    return tmp_path / "missing.pth", "missing.pth: no such file"
