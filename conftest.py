"""Shared pytest fixtures: tiny Stable Diffusion checkpoints in the public file formats.

The fixtures write files the way the real SD1.5 files are written (diffusers `save_pretrained`, the
legacy VAE attention names, the LDM single file), but with the tiny presets (unet.py, clip.py,
testkit.py) and random weights from a fixed seed, so the loaders in weights.py are tested against
what users actually download. The helpers they use, shared with the benchmarks, are in testkit.py.
"""

import shutil

import pytest
import torch

from testkit import (
    LEGACY_VAE_ATTENTION,
    build_tiny_pipeline,
    clip_tokenizer,
    diffusers_to_ldm,
    save_hf_tokenizer,
    tiny_vae_config,
    with_text_model_prefix,
)
from unet import UNetConfig
from weights import load_stable_diffusion


def pytest_configure(config):
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two OpenMP
    # threads that wait for each other made the tests ~7x slower (test_models.py: 124 s -> 18 s with
    # one thread). A pytest hook, so that scripts importing build_tiny_pipeline from here
    # (benchmarks) keep torch's thread setting.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """Folder of a tiny SD pipeline saved by diffusers `save_pretrained` (safetensors), SD1.5
    layout: model_index.json, unet/, vae/, text_encoder/, tokenizer/ (our CLIPTokenizer's files),
    scheduler/."""
    folder = tmp_path_factory.mktemp("tiny_sd")
    build_tiny_pipeline().save_pretrained(folder, safe_serialization=True)
    # The tokenizer files are exactly those our tokenizer writes.
    shutil.rmtree(folder / "tokenizer")
    save_hf_tokenizer(clip_tokenizer(), folder / "tokenizer")
    return folder


@pytest.fixture(scope="session")
def tiny_sd_legacy_dir(tiny_sd_dir, tmp_path_factory):
    """tiny_sd_dir with the older key layout of the public SD1.5 folder: vae/ stores the mid-block
    attention as query/key/value/proj_attn, and text_encoder/ keys are `text_model.*` plus the
    `text_model.embeddings.position_ids` buffer that older transformers versions saved."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("tiny_sd_legacy") / "model"
    shutil.copytree(tiny_sd_dir, folder)
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    renamed = {}
    for key, tensor in load_file(vae_file).items():
        for new, old in LEGACY_VAE_ATTENTION.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        renamed[key] = tensor
    save_file(renamed, vae_file)
    text_file = folder / "text_encoder" / "model.safetensors"
    text = {with_text_model_prefix(k): v for k, v in load_file(text_file).items()}
    text["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(text, text_file)
    return folder


@pytest.fixture(scope="session")
def tiny_ldm_file(tiny_sd_dir, tmp_path_factory):
    """tiny_sd_dir's weights as one LDM single-file checkpoint (model.diffusion_model.*,
    first_stage_model.*, cond_stage_model.transformer.*) plus the extras real files carry (schedule
    buffers, EMA scalars)."""
    from safetensors.torch import load_file, save_file

    parts = [
        load_file(tiny_sd_dir / name)
        for name in (
            "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors",
        )
    ]
    levels = len(tiny_vae_config().block_out_channels)
    ldm = diffusers_to_ldm(*parts, UNetConfig.tiny().layers_per_block, levels)
    path = tmp_path_factory.mktemp("tiny_ldm") / "tiny-pruned-emaonly.safetensors"
    save_file({k: v.contiguous() for k, v in ldm.items()}, path)
    return path


@pytest.fixture
def tiny_sd(tiny_sd_dir):
    """A fresh stable_diffusion.StableDiffusion loaded from tiny_sd_dir (function scope: tests may
    train it)."""
    return load_stable_diffusion(tiny_sd_dir)
