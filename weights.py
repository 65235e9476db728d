"""Loading the public Stable Diffusion 1.5 weights into our from-scratch modules, strictly.

Sources: a diffusers folder (our module names are its keys), the original CompVis/LDM single file
(renamed by LDM_UNET_RULES / LDM_VAE_RULES) or a hub id. Modules are built on the meta device and
filled by `load_strict`, which names the file and the first bad key. Pickles:
torch.load(weights_only=True) only.

Deviations from diffusers' loaders:
 1. SD2.x and SDXL checkpoints are recognised and refused (this project implements SD1.x only).
 2. Single-file checkpoints use the SD1.5 configs and schedule (the file stores none); keys outside
    the three model prefixes (the DDPM schedule buffers, `model_ema.*`) are ignored.
 3. A single file's tokenizer is CLIPTokenizer.default(), the bundled OpenAI BPE vocabulary
    (SD1.5's).
"""

import dataclasses
import json
import re
from pathlib import Path

import torch

from clip import CLIPTextConfig, CLIPTextModel, convert_hf_clip_keys
from lora import load_lora
from scheduler import NoiseSchedule
from stable_diffusion import StableDiffusion
from state_dicts import SUFFIXES, CheckpointError, load_strict, read_state_dict
from tokenizer import CLIPTokenizer
from unet import UNet2DConditionModel, UNetConfig
from vae import AutoencoderKL, VAEConfig, convert_legacy_vae_keys


def build(model_class, config, state_dict, source):
    """model_class(config) filled with state_dict, without allocating or initialising random weights
    first."""
    with torch.device("meta"):
        model = model_class(config)
    return load_strict(model, state_dict, source).eval()


def load_stable_diffusion(path_or_hub_id, device="cpu", dtype=torch.float32) -> StableDiffusion:
    """SD1.x from a diffusers folder, a single-file LDM checkpoint or a hub id (see the module
    docstring)."""
    path = Path(path_or_hub_id)
    owner_slash_name = re.fullmatch(r"[\w.-]+/[\w.-]+", str(path_or_hub_id))
    if path.is_dir():
        sd = load_diffusers_folder(path)
    elif path.is_file():
        sd = load_single_file(path)
    elif owner_slash_name and path.suffix not in SUFFIXES:  # A hub id.
        sd = load_diffusers_folder(download(str(path_or_hub_id)))
    else:
        raise CheckpointError(
            f"{path}: no such file or folder (expected a diffusers model folder, "
            "a .safetensors/.ckpt single-file checkpoint, or a hub id like owner/name)"
        )
    return sd.to(device, dtype)


def refuse_other_families(source, kind: str, sdxl: bool, sd2: bool):
    """Deviation 1. kind: "model" (a diffusers folder) or "checkpoint" (a single file)."""
    if sdxl or sd2:
        family = "an SDXL" if sdxl else "a Stable Diffusion 2.x"
        raise CheckpointError(f"{source} is {family} {kind}; this project implements SD 1.x only")


def read_json(path: Path, parse=dict):
    """parse(the JSON at path); a ValueError (bad JSON, an architecture our configs refuse) names
    the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return parse(json.loads(path.read_text()))
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from error


def load_component(
    folder: Path, model_class, parse_config, convert=dict, stem="diffusion_pytorch_model"
):
    """A component folder: config.json + weights (fp32 safetensors, else the fp16 variant, else a
    pickle)."""
    config = read_json(folder / "config.json", parse_config)
    names = [f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bin"]
    file = next((folder / name for name in names if (folder / name).is_file()), None)
    if file is None:
        raise CheckpointError(f"{folder}: no {' or '.join(names)}")
    return build(model_class, config, convert(read_state_dict(file)), str(file))


def load_unet(folder) -> UNet2DConditionModel:
    """A diffusers unet/ folder."""
    return load_component(Path(folder), UNet2DConditionModel, UNetConfig.from_diffusers)


def load_models(model, unet=None, lora_path=None, device="cpu", dtype=torch.float32):
    """(base_sd, aligned_sd): the model, and the model with --unet and/or --lora applied.

    `model` is what load_stable_diffusion reads, or a StableDiffusion already built (the toy
    world's, which evaluate.py gets through toy.py). base_sd is None without `unet`: with a LoRA
    alone the base is the aligned model with its adapters off (lora.lora_disabled). The LoRA
    adapters stay float32 (lora.py deviation 3); a LoRA that does not fit the model raises
    CheckpointError.
    """
    if isinstance(model, StableDiffusion):
        base = model
    else:
        base = load_stable_diffusion(model, device=device, dtype=dtype)
    aligned = dataclasses.replace(base)
    if unet and Path(unet).is_dir():  # A diffusers unet folder: train.py's out_dir/unet.
        aligned.unet = load_unet(unet)
    elif unet:  # A state dict with diffusers names, for the base model's architecture.
        aligned.unet = build(type(base.unet), base.unet.config, read_state_dict(unet), unet)
    aligned.unet.to(device, dtype)
    if lora_path:
        load_lora(aligned.unet, lora_path)
    if unet:
        return base, aligned
    return None, aligned


def load_diffusers_folder(folder: Path) -> StableDiffusion:
    model_index, unet_config = (
        read_json(folder / name) for name in ("model_index.json", "unet/config.json")
    )
    refuse_other_families(folder, "model", sdxl="text_encoder_2" in model_index,
                          sd2=unet_config.get("cross_attention_dim") == 1024)
    unet = load_unet(folder / "unet")
    vae = load_component(
        folder / "vae", AutoencoderKL, VAEConfig.from_diffusers, convert_legacy_vae_keys
    )
    text_encoder = load_component(folder / "text_encoder", CLIPTextModel, CLIPTextConfig.from_hf,
                                  convert_hf_clip_keys, "model")

    tokenizer_folder = folder / "tokenizer"
    vocab = tokenizer_folder / "vocab.json"
    merges = tokenizer_folder / "merges.txt"
    if vocab.is_file() and merges.is_file():  # SD1.5's files.
        tokenizer = CLIPTokenizer.from_files(vocab, merges)
    elif (tokenizer_folder / "tokenizer.json").is_file():  # transformers >= 5 writes only this.
        tokenizer = CLIPTokenizer.from_tokenizer_json(tokenizer_folder / "tokenizer.json")
    else:
        raise CheckpointError(f"{tokenizer_folder}: no vocab.json + merges.txt or tokenizer.json")

    schedule = NoiseSchedule.sd15()
    scheduler_file = folder / "scheduler/scheduler_config.json"
    if scheduler_file.is_file():
        schedule = read_json(scheduler_file, parse_schedule)
    return StableDiffusion(unet, vae, text_encoder, tokenizer, schedule)


def parse_schedule(config: dict) -> NoiseSchedule:
    return NoiseSchedule.from_config(config, "unsupported scheduler")


def download(hub_id: str) -> Path:
    """Fetch the fp32 safetensors, configs and tokenizer of a hub model; needs huggingface_hub and
    network."""
    patterns = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json",
                "tokenizer/*", "unet/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]
    try:
        from huggingface_hub import snapshot_download  # Optional: only hub ids need it.
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except Exception as error:  # Not installed, offline, unknown or gated repo.
        failed = ("needs `pip install huggingface_hub`" if isinstance(error, ImportError)
                  else f"failed ({type(error).__name__}: {error})")
        raise CheckpointError(
            f"'{hub_id}' is no local path, and downloading it from the hub {failed}. "
            "Pass a local path to a diffusers folder or a .safetensors file."
        ) from error


def LDM_UNET_RULES(n):
    """rename()'s rules for model.diffusion_model.*. n = layers_per_block + 1 is the LDM stride per
    level: input_blocks 1.. hold n entries per level (the ResNet/attention pairs, then the
    downsampler `.0.op`); output_blocks hold n pairs per level, the last one followed by the
    upsampler `conv`."""

    # Down block i is input_blocks.(i + 1) (input_blocks.0 is conv_in); up block i is
    # output_blocks.i.
    def block(side, i, kind):
        return f"{side}_blocks.{i // n}.{kind}.{i % n}."

    return [
        (r"time_embed\.0\.", "time_embedding.linear_1."),
        (r"time_embed\.2\.", "time_embedding.linear_2."),
        (r"input_blocks\.0\.0\.", "conv_in."),
        (r"middle_block\.0\.", "mid_block.resnets.0."),
        (r"middle_block\.1\.", "mid_block.attentions.0."),
        (r"middle_block\.2\.", "mid_block.resnets.1."),
        (r"out\.0\.", "conv_norm_out."),
        (r"out\.2\.", "conv_out."),
        (
            r"input_blocks\.(\d+)\.0\.op\.",
            lambda m: f"down_blocks.{int(m[1]) // n - 1}.downsamplers.0.conv.",
        ),
        (r"input_blocks\.(\d+)\.0\.", lambda m: block("down", int(m[1]) - 1, "resnets")),
        (r"input_blocks\.(\d+)\.1\.", lambda m: block("down", int(m[1]) - 1, "attentions")),
        (
            r"output_blocks\.(\d+)\.[12]\.conv\.",
            lambda m: f"up_blocks.{int(m[1]) // n}.upsamplers.0.conv.",
        ),
        (r"output_blocks\.(\d+)\.0\.", lambda m: block("up", int(m[1]), "resnets")),
        (r"output_blocks\.(\d+)\.1\.", lambda m: block("up", int(m[1]), "attentions")),
    ]


# The names inside ResNets (the index gaps are SiLU / Dropout); the UNet's spatial transformers
# keep their names.
LDM_RESNET_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                    "out_layers.0": "norm2", "out_layers.3": "conv2",
                    "skip_connection": "conv_shortcut", "nin_shortcut": "conv_shortcut"}


def LDM_VAE_RULES(levels):
    att = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

    # LDM numbers decoder levels from the lowest resolution, diffusers from the highest.
    def decoder(m, kind):
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.{kind}."

    return [
        (r"(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
        (r"encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
        (r"encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"decoder\.up\.(\d+)\.block\.(\d+)\.", lambda m: decoder(m, f"resnets.{m[2]}")),
        (r"decoder\.up\.(\d+)\.upsample\.", lambda m: decoder(m, "upsamplers.0")),
        (
            r"(encoder|decoder)\.mid\.block_(\d)\.",
            lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.",
        ),
        (
            r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.",
            lambda m: f"{m[1]}.mid_block.attentions.0.{att[m[2]]}.",
        ),
    ]


def rename(state_dict, prefix, rules):
    """The keys under `prefix`, without it; each rule is (regex on the key's start, replacement),
    the first that matches renames it, then LDM_RESNET_NAMES apply."""
    renamed = {}
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        for pattern, replacement in rules:
            key, count = re.subn("^" + pattern, replacement, key, count=1)
            if count:
                break
        for old, new in LDM_RESNET_NAMES.items():
            key = key.replace(f".{old}.", f".{new}.")
        renamed[key] = tensor
    return renamed


def ldm_to_diffusers(state_dict, unet_config: UNetConfig, vae_config: VAEConfig):
    """Split an LDM single-file state dict into (unet, vae, text encoder) state dicts with our key
    names."""
    unet = rename(
        state_dict, "model.diffusion_model.", LDM_UNET_RULES(unet_config.layers_per_block + 1)
    )
    vae = rename(
        state_dict, "first_stage_model.", LDM_VAE_RULES(len(vae_config.block_out_channels))
    )
    vae = convert_legacy_vae_keys(vae)  # LDM's attention 1x1 convs become Linear weights.
    # The text encoder is transformers' CLIPTextModel, keys and all.
    text = convert_hf_clip_keys(rename(state_dict, "cond_stage_model.transformer.", []))
    return unet, vae, text


SD2_PROBE_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def load_single_file(path, unet_config=None, vae_config=None, text_config=None) -> StableDiffusion:
    """An SD1.x LDM checkpoint (.safetensors or .ckpt); configs default to SD1.5 (tests pass tiny
    ones)."""
    unet_config = unet_config or UNetConfig.sd15()
    vae_config = vae_config or VAEConfig.sd15()
    text_config = text_config or CLIPTextConfig.sd15()
    state_dict = read_state_dict(path)
    cross_k = state_dict.get(SD2_PROBE_KEY)  # SD2.x cross-attends to 1024-wide OpenCLIP tokens.
    sdxl = any(k.startswith("conditioner.embedders.") for k in state_dict)
    sd2 = any(k.startswith("cond_stage_model.model.") for k in state_dict)
    sd2 = sd2 or (cross_k is not None and cross_k.shape[1] == 1024)
    refuse_other_families(path, "checkpoint", sdxl, sd2)
    if not any(k.startswith("model.diffusion_model.") for k in state_dict):
        raise CheckpointError(f"{path} is not a Stable Diffusion single-file checkpoint "
                              "(no model.diffusion_model.* keys)")
    unet, vae, text = ldm_to_diffusers(state_dict, unet_config, vae_config)
    text_source = f"{path} (cond_stage_model.transformer.*)"
    return StableDiffusion(
        unet=build(UNet2DConditionModel, unet_config, unet, f"{path} (model.diffusion_model.*)"),
        vae=build(AutoencoderKL, vae_config, vae, f"{path} (first_stage_model.*)"),
        text_encoder=build(CLIPTextModel, text_config, text, text_source),
        tokenizer=CLIPTokenizer.default(),
        schedule=NoiseSchedule.sd15(),
    )
