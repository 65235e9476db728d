"""Tests for unet.py, vae.py and weights.py: our UNet and VAE are diffusers'; every public file
format loads strictly.

References (test-only): diffusers UNet2DConditionModel / AutoencoderKL and its LDM converter,
transformers CLIPTextModel. The checkpoints are the tiny conftest fixtures, written by diffusers
`save_pretrained`, or reference models with random weights saved the same way. CPU, fp32.
Deviations: none.
"""

import json
import os
import pickle
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora
from clip import CLIPTextConfig
from lora import LoRALinear
from state_dicts import CheckpointError, read_state_dict
from testkit import diffusers_to_ldm, max_err, perturb_norms, shapes, tiny_vae_config
from unet import UNet2DConditionModel, UNetConfig
from vae import AutoencoderKL, VAEConfig, convert_legacy_vae_keys
from weights import (
    StableDiffusion,
    ldm_to_diffusers,
    load_models,
    load_single_file,
    load_stable_diffusion,
    load_strict,
    load_unet,
)

# a second UNet shape: 3 levels, 2 layers per block, attention only at the low resolutions, 4 heads
SMALL = UNetConfig(block_out_channels=(16, 32, 48), layers_per_block=2,
                   cross_attention=(False, True, True), num_heads=4, cross_attention_dim=24,
                   norm_num_groups=8, sample_size=16)
TINY_CONFIGS = dict(unet_config=UNetConfig.tiny(), vae_config=tiny_vae_config(),
                    text_config=CLIPTextConfig.tiny())


def reference_unet(folder):
    from diffusers import UNet2DConditionModel as DiffusersUNet
    return DiffusersUNet.from_pretrained(folder).eval()


def max_unet_error(ours, reference, cfg, timestep, shape=(2, 4, 8, 12), tokens=7):
    torch.manual_seed(1)
    sample, context = torch.randn(shape), torch.randn(shape[0], tokens, cfg.cross_attention_dim)
    with torch.no_grad():
        expected = reference(sample, timestep, context).sample
        return (ours(sample, timestep, context) - expected).abs().max().item()


# --------------------------------------------------------------------------------------------------
# UNet parity


def test_unet_matches_diffusers_through_folder_loader(tiny_sd_dir):
    """tiny preset, loaded by load_stable_diffusion from a diffusers save_pretrained folder."""
    ours, reference = load_stable_diffusion(tiny_sd_dir).unet, reference_unet(tiny_sd_dir / "unet")
    assert ours.config == UNetConfig.tiny()
    for timestep in (torch.tensor([0, 999]), 981, torch.tensor(21)):  # [B], int, 0-d
        assert max_unet_error(ours, reference, ours.config, timestep) <= 1e-5
    # H, W not multiples of 2**levels: the upsampler must match the skip sizes exactly, as
    # diffusers does.
    assert max_unet_error(ours, reference, ours.config, 37, shape=(2, 4, 13, 7)) <= 1e-5


def test_second_unet_config_matches_diffusers(tmp_path):
    """3 levels / 2 layers / 4 heads / attention only at the lower resolutions, through
    load_unet(folder)."""
    from diffusers import UNet2DConditionModel as DiffusersUNet
    torch.manual_seed(0)
    DiffusersUNet(**SMALL.to_diffusers()).save_pretrained(tmp_path / "unet")
    ours, reference = load_unet(tmp_path / "unet"), reference_unet(tmp_path / "unet")
    assert ours.config == SMALL
    assert (
        max_unet_error(ours, reference, SMALL, torch.tensor([3, 400, 900]), shape=(3, 4, 8, 12))
        <= 1e-5
    )
    assert max_unet_error(ours, reference, SMALL, 999, shape=(2, 4, 13, 7), tokens=5) <= 1e-5


def test_sd15_unet_keys_shapes_and_parameter_count_on_meta():
    from diffusers import UNet2DConditionModel as DiffusersUNet
    with torch.device("meta"):
        ours = UNet2DConditionModel(UNetConfig.sd15())
        reference = DiffusersUNet(**UNetConfig.sd15().to_diffusers())
    assert shapes(ours.state_dict()) == shapes(reference.state_dict())
    assert len(ours.state_dict()) == 686
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964
    assert UNetConfig.from_diffusers(dict(reference.config)) == UNetConfig.sd15()
    up_inputs = [[resnet.conv1.in_channels for resnet in level.resnets] for level in ours.up_blocks]
    # The table in unet.py.
    assert up_inputs == [[2560] * 3, [2560, 2560, 1920], [1920, 1280, 960], [960, 640, 640]]


def test_gradient_checkpointing_gives_the_same_values_and_gradients():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(UNetConfig.tiny()).train()
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    results = []
    for enabled in (False, True):
        unet.gradient_checkpointing = enabled
        unet.zero_grad()
        out = unet(sample, torch.tensor([10, 700]), context)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in unet.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# VAE parity

VAE_CONFIGS = {
    "tiny": tiny_vae_config(),
    "3-level": VAEConfig(
        block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, latent_channels=3
    ),
}


def saved_diffusers_vae(config: VAEConfig, folder: Path):
    from diffusers import AutoencoderKL as ReferenceVAE

    torch.manual_seed(0)
    reference = perturb_norms(ReferenceVAE(**config.to_diffusers())).eval()
    reference.save_pretrained(folder, safe_serialization=True)
    return reference, folder / "diffusion_pytorch_model.safetensors"


def load_our_vae(folder: Path, weights_file: Path) -> AutoencoderKL:
    config = VAEConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    state = convert_legacy_vae_keys(read_state_dict(weights_file))
    return load_strict(AutoencoderKL(config), state, str(weights_file)).eval()


@pytest.mark.parametrize("name", VAE_CONFIGS)
def test_vae_encode_decode_match_diffusers(name, tmp_path):
    reference, weights_file = saved_diffusers_vae(VAE_CONFIGS[name], tmp_path)
    ours = load_our_vae(tmp_path, weights_file)
    f = ours.downsample_factor
    assert f == 2 ** (len(VAE_CONFIGS[name].block_out_channels) - 1)
    # Non-square.
    x = torch.rand(2, 3, 4 * f, 6 * f, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior, expected = ours.encode(x), reference.encode(x).latent_dist
        assert max_err(posterior.mean, expected.mean) <= 1e-4
        assert max_err(posterior.logvar, expected.logvar) <= 1e-4
        assert max_err(posterior.std, expected.std) <= 1e-4
        noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(3))
        sample = posterior.mean + posterior.std * noise  # as StableDiffusion.encode_images draws it
        assert max_err(sample, expected.sample(torch.Generator().manual_seed(3))) <= 1e-4
        z = torch.randn(
            2, ours.config.latent_channels, 5, 3, generator=torch.Generator().manual_seed(2)
        )
        decoded = ours.decode(z)
        assert decoded.shape == (2, 3, 5 * f, 3 * f)
        assert max_err(decoded, reference.decode(z).sample) <= 1e-4


@pytest.mark.parametrize(
    "conv_shaped", [False, True], ids=["legacy-names", "legacy-names-1x1-conv"]
)
def test_vae_legacy_attention_names_load(conv_shaped, tmp_path):
    """The public SD1.5 vae file uses query/key/value/proj_attn (diffusers renames them at load; we
    check that it accepts our legacy file), LDM files [C, C, 1, 1] 1x1-conv shapes: both give
    identical outputs."""
    from diffusers import AutoencoderKL as ReferenceVAE
    from safetensors.torch import load_file, save_file

    reference, weights_file = saved_diffusers_vae(tiny_vae_config(), tmp_path)
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, tensor in load_file(weights_file).items():
        for new, old in legacy.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                tensor = tensor[:, :, None, None] if conv_shaped and tensor.ndim == 2 else tensor
        renamed[key] = tensor
    assert sum(".query." in key for key in renamed) == 4  # encoder and decoder: weight + bias
    save_file(renamed, weights_file)
    ours = load_our_vae(tmp_path, weights_file)
    x = torch.rand(1, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        expected = reference.encode(x).latent_dist.mean
        assert max_err(ours.encode(x).mean, expected) <= 1e-5
        if not conv_shaped:  # diffusers renames but does not reshape
            diffusers_loaded = ReferenceVAE.from_pretrained(tmp_path).eval()
            assert max_err(diffusers_loaded.encode(x).latent_dist.mean, expected) <= 1e-5


def test_vae_bad_checkpoint_names_the_key(tmp_path):
    _, weights_file = saved_diffusers_vae(tiny_vae_config(), tmp_path)
    state = read_state_dict(weights_file)
    state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"][:2]
    with pytest.raises(CheckpointError, match="decoder.conv_out.weight"):
        load_strict(AutoencoderKL(tiny_vae_config()), state, str(weights_file))
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig.from_diffusers({**tiny_vae_config().to_diffusers(), "act_fn": "relu"})


def test_vae_config_round_trip():
    for config in VAE_CONFIGS.values():
        assert VAEConfig.from_diffusers(config.to_diffusers()) == config


def test_sd15_vae_keys_and_parameter_count_on_meta():
    from diffusers import AutoencoderKL as ReferenceVAE

    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig.sd15())
        reference_vae = ReferenceVAE(**VAEConfig.sd15().to_diffusers())
    assert shapes(vae.state_dict()) == shapes(reference_vae.state_dict())
    assert len(vae.state_dict()) == 248 and sum(p.numel() for p in vae.parameters()) == 83_653_863


# --------------------------------------------------------------------------------------------------
# Folder and single-file loading


def test_folder_loader_builds_every_component(tiny_sd_dir):
    sd = load_stable_diffusion(tiny_sd_dir)
    assert isinstance(sd, StableDiffusion)
    assert sd.schedule.num_train_timesteps == 1000
    assert torch.allclose(
        sd.schedule.alphas_cumprod[[0, 999]].float(), torch.tensor([0.99915, 0.0046601]), atol=1e-6
    )
    from transformers import CLIPTextModel as HFTextModel
    reference = HFTextModel.from_pretrained(tiny_sd_dir / "text_encoder").eval()
    ids = sd.tokenizer(["a photo of a cat", "an oil painting, 4k"])
    with torch.no_grad():
        expected = reference(ids).last_hidden_state
        assert (
            sd.encode_prompts(["a photo of a cat", "an oil painting, 4k"]) - expected
        ).abs().max() <= 1e-5


def test_tokenizer_json_only_folder_loads(tiny_sd_dir, tmp_path):
    """A folder saved by transformers >= 5 has tokenizer/tokenizer.json and no vocab.json /
    merges.txt."""

    from transformers import CLIPTokenizer as HFTokenizer

    folder = shutil.copytree(tiny_sd_dir, tmp_path / "sd")
    reference = HFTokenizer.from_pretrained(folder / "tokenizer")
    shutil.rmtree(folder / "tokenizer")
    reference.save_pretrained(folder / "tokenizer")
    prompts = ["a photo of a cat", "an oil painting, 4k"]
    assert torch.equal(
        load_stable_diffusion(folder).tokenizer(prompts),
        reference(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids,
    )
    (folder / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no vocab.json"):
        load_stable_diffusion(folder)


def test_public_legacy_key_layout_loads_the_same_weights(tiny_sd_dir, tiny_sd_legacy_dir):
    """query/key/value/proj_attn VAE names, `text_model.*` + position_ids text keys (the real SD1.5
    files)."""
    sd, legacy = load_stable_diffusion(tiny_sd_dir), load_stable_diffusion(tiny_sd_legacy_dir)
    legacy_vae_keys = load_file(tiny_sd_legacy_dir / "vae/diffusion_pytorch_model.safetensors")
    assert any(".query." in k for k in legacy_vae_keys)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(sd, name).state_dict(), getattr(legacy, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_fixture_ldm_names_are_what_diffusers_converter_expects():
    """conftest.diffusers_to_ldm (the tests' independent route) inverts diffusers' own LDM
    converter, at SD1.5 size on the meta device; our rules then give back exactly our SD1.5 key set
    and shapes."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel as DiffusersUNet
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    with torch.device("meta"):
        unet = DiffusersUNet(**UNetConfig.sd15().to_diffusers())
        vae = DiffusersVAE(**VAEConfig.sd15().to_diffusers())
        ours_unet = UNet2DConditionModel(UNetConfig.sd15())
        ours_vae = AutoencoderKL(VAEConfig.sd15())
    ldm = diffusers_to_ldm(unet.state_dict(), vae.state_dict(), {}, unet_layers=2, vae_levels=4)
    assert (
        sum(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in ldm)
        == 686 + 248
    )
    assert shapes(convert_ldm_unet_checkpoint(ldm, dict(unet.config))) == shapes(unet.state_dict())
    assert shapes(convert_ldm_vae_checkpoint(ldm, dict(vae.config))) == shapes(vae.state_dict())
    unet_sd, vae_sd, _ = ldm_to_diffusers(ldm, UNetConfig.sd15(), VAEConfig.sd15())
    assert shapes(unet_sd) == shapes(ours_unet.state_dict())
    assert shapes(vae_sd) == shapes(ours_vae.state_dict())


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_checkpoint_gives_the_same_model(tiny_sd_dir, tiny_ldm_file, tmp_path, suffix):
    path = tiny_ldm_file
    # The original release format: a Lightning pickle, weights under "state_dict".
    if suffix == ".ckpt":
        path = tmp_path / "tiny.ckpt"
        torch.save({"state_dict": load_file(tiny_ldm_file), "global_step": 470000}, path)
    single, folder = load_single_file(path, **TINY_CONFIGS), load_stable_diffusion(tiny_sd_dir)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(single, name).state_dict(), getattr(folder, name).state_dict()
        assert ours.keys() == theirs.keys() and all(
            torch.equal(ours[k], theirs[k]) for k in ours
        ), name
    assert (
        max_unet_error(single.unet, reference_unet(tiny_sd_dir / "unet"), UNetConfig.tiny(), 500)
        <= 1e-5
    )
    from diffusers import AutoencoderKL as DiffusersVAE
    reference_vae = DiffusersVAE.from_pretrained(tiny_sd_dir / "vae").eval()
    image = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        expected = reference_vae.encode(image).latent_dist.mean
        assert (single.vae.encode(image).mean - expected).abs().max() <= 1e-4
    assert single.encode_prompts(["a cat"]).shape == (1, 77, 32)


def test_dtype_and_device_arguments(tiny_sd_dir):
    sd = load_stable_diffusion(tiny_sd_dir, dtype=torch.float64)
    assert {p.dtype for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters()} == {
        torch.float64
    }


# --------------------------------------------------------------------------------------------------
# Errors a user can act on


def copy_folder_with(tiny_sd_dir, tmp_path, component_file, edit):
    """A copy of tiny_sd_dir where `edit(state_dict)` changed one component's weights file."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, folder)
    state_dict = load_file(folder / component_file)
    edit(state_dict)
    save_file(state_dict, folder / component_file)
    return folder


UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("conv_in.bias"),
     "1 missing key(s) for UNet2DConditionModel, first: 'conv_in.bias'"),
    (lambda sd: sd.update(extra=torch.zeros(1)),
     "unexpected key(s) for UNet2DConditionModel, first: 'extra"),
    (lambda sd: sd.update({"conv_out.bias": torch.zeros(5)}), "mis-shaped key 'conv_out.bias'"),
])
def test_bad_keys_are_named_with_the_file(tiny_sd_dir, tmp_path, edit, message):
    folder = copy_folder_with(tiny_sd_dir, tmp_path, UNET_FILE, edit)
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors") as error:
        load_stable_diffusion(folder)
    assert message in str(error.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_stable_diffusion(tmp_path / "v1-5-pruned-emaonly.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="model_index.json: no such file"):
        load_stable_diffusion(tmp_path)
    with pytest.raises(CheckpointError, match="is a folder"):
        read_state_dict(tmp_path)


def test_not_a_checkpoint(tmp_path):
    for name in ("notes.safetensors", "notes.ckpt", "notes.txt"):
        (tmp_path / name).write_text("these are not weights")
        with pytest.raises(
            CheckpointError,
            match="not a safetensors checkpoint|cannot be read by torch.load|"
            "unknown weights format",
        ):
            read_state_dict(tmp_path / name)
    torch.save({"step": 3}, tmp_path / "no_tensors.pt")
    with pytest.raises(CheckpointError, match="holds no named tensors"):
        read_state_dict(tmp_path / "no_tensors.pt")
    save_file({"weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a Stable Diffusion single-file checkpoint"):
        load_stable_diffusion(tmp_path / "other.safetensors")


class RunsShellCommand:
    """Unpickling this calls os.system(command): what a malicious .ckpt does."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    torch.save(
        {"state_dict": {"w": torch.zeros(1)}, "payload": RunsShellCommand(f"touch {marker}")}, path
    )
    with pytest.raises(CheckpointError, match="pickled code, which is refused"):
        read_state_dict(path)
    assert not marker.exists()
    # The payload is real: unpickling runs it.
    pickle.loads(pickle.dumps(RunsShellCommand(f"touch {marker}")))
    assert marker.exists()


def ldm_like(tiny_ldm_file, **changes):
    state_dict = load_file(tiny_ldm_file)
    state_dict.update(changes)
    return state_dict


def test_sd2_and_sdxl_are_refused(tiny_sd_dir, tiny_ldm_file, tmp_path):
    cross_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    cases = {"sd2_openclip": ({"cond_stage_model.model.ln_final.weight": torch.ones(1024)}, "2.x"),
             "sd2_cross_attention": ({cross_k: torch.zeros(320, 1024)}, "2.x"),
             "sdxl": ({"conditioner.embedders.0.model.ln_final.weight": torch.ones(768)}, "SDXL")}
    for name, (changes, family) in cases.items():
        save_file(ldm_like(tiny_ldm_file, **changes), tmp_path / f"{name}.safetensors")
        with pytest.raises(CheckpointError, match=f"is an? (Stable Diffusion )?{family}.*1.x only"):
            load_stable_diffusion(tmp_path / f"{name}.safetensors")

    sdxl_index = {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    for family, edit in (("2.x", lambda index, unet: unet.update(cross_attention_dim=1024)),
                         ("SDXL", lambda index, unet: index.update(sdxl_index))):
        folder = tmp_path / f"folder_{family}"
        shutil.copytree(tiny_sd_dir, folder)
        index, unet = (
            json.loads((folder / f).read_text()) for f in ("model_index.json", "unet/config.json")
        )
        edit(index, unet)
        (folder / "model_index.json").write_text(json.dumps(index))
        (folder / "unet/config.json").write_text(json.dumps(unet))
        with pytest.raises(CheckpointError, match=f"{family} model.*1.x only"):
            load_stable_diffusion(folder)


def test_unsupported_unet_config_names_the_config_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**UNetConfig.tiny().to_diffusers(),
                                                      "use_linear_projection": True}))
    with pytest.raises(
        CheckpointError, match="config.json: unsupported UNet config: use_linear_projection"
    ):
        load_unet(tmp_path)


def test_hub_id_without_huggingface_hub_or_network(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(CheckpointError, match="pip install huggingface_hub.*local path"):
        load_stable_diffusion("stable-diffusion-v1-5/stable-diffusion-v1-5")

    def offline(repo_id, allow_patterns):
        assert "unet/diffusion_pytorch_model.safetensors" in allow_patterns
        raise OSError("we are offline")

    monkeypatch.setitem(
        sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=offline)
    )
    with pytest.raises(CheckpointError, match="we are offline.*Pass a local path"):
        load_stable_diffusion("stable-diffusion-v1-5/stable-diffusion-v1-5")


# --------------------------------------------------------------------------------------------------
# Base and aligned models (evaluate.py, sample.py)


def count_adapters(unet) -> int:
    return sum(isinstance(module, LoRALinear) for module in unet.modules())


def test_load_models_with_a_unet_keeps_the_base_and_replaces_its_unet(tiny_sd_dir):
    """A model already built (the toy world's route through toy.py) is the base; --unet replaces
    the aligned model's UNet only."""
    sd = load_stable_diffusion(tiny_sd_dir)
    base, aligned = load_models(sd, unet=str(tiny_sd_dir / "unet"))
    assert base is sd
    assert aligned.unet is not sd.unet
    assert aligned.vae is sd.vae and aligned.text_encoder is sd.text_encoder
    expected = sd.unet.state_dict()
    loaded = aligned.unet.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.items())


def test_load_models_with_a_lora_alone_returns_no_separate_base(tiny_sd_dir, tmp_path):
    """With a LoRA alone the base is the aligned model with its adapters off (lora_disabled)."""
    trained = load_stable_diffusion(tiny_sd_dir)
    lora.inject_lora(trained.unet, rank=2)
    lora.save_lora(trained.unet, tmp_path / "lora.safetensors")
    base, aligned = load_models(str(tiny_sd_dir), lora_path=str(tmp_path / "lora.safetensors"))
    assert base is None
    assert count_adapters(aligned.unet) == count_adapters(trained.unet) > 0
