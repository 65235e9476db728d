"""LoRA: zero-init identity, adapters-off == base, merge == unmerged, save/load round trip, and the
saved file loading into a diffusers UNet2DConditionModel through diffusers' own LoRA API with equal
outputs."""

import pytest
import torch

import lora
from state_dicts import CheckpointError
from unet import UNet2DConditionModel, UNetConfig


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(UNetConfig.tiny()).eval()


def inputs(config, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, generator=g)
    context = torch.randn(2, 5, config.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 700]), context


def randomize_lora(unet, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in lora._lora_modules(unet):
            module.lora_B.weight.copy_(0.05 * torch.randn(module.lora_B.weight.shape, generator=g))


@torch.no_grad()
def test_zero_init_is_identity_and_disabled_is_base():
    unet = tiny_unet()
    x, t, context = inputs(unet.config)
    base = unet(x, t, context)
    params = lora.inject_lora(unet, rank=4, alpha=8)
    num_attention = sum(1 for m in unet.modules() if hasattr(m, "to_q"))
    # (A, B) x 4 targets per attention.
    assert num_attention > 0 and len(params) == 2 * 4 * num_attention
    assert all(p.requires_grad for p in params)
    # Base frozen.
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
    torch.testing.assert_close(unet(x, t, context), base, rtol=0, atol=0)  # B == 0 at init
    randomize_lora(unet)
    adapted = unet(x, t, context)
    assert (adapted - base).abs().max() > 1e-3  # the adapters do change the output
    with lora.lora_disabled(unet):
        torch.testing.assert_close(unet(x, t, context), base, rtol=0, atol=0)
    torch.testing.assert_close(unet(x, t, context), adapted, rtol=0, atol=0)  # re-enabled on exit


def test_gradients_reach_only_lora_and_base_keys_keep_names():
    unet = tiny_unet()
    keys_before = set(unet.state_dict())
    params = lora.inject_lora(unet, rank=2)
    keys_after = set(unet.state_dict())
    assert keys_before <= keys_after  # base keys keep their diffusers names
    assert {k.rsplit(".", 2)[-2] for k in keys_after - keys_before} == {"lora_A", "lora_B"}
    x, t, context = inputs(unet.config)
    unet(x, t, context).square().mean().backward()
    # B gets a gradient at step 0 (A does not: B == 0)
    assert all(p.grad is not None for p in params[1::2])


@torch.no_grad()
def test_merge_equals_unmerged_and_round_trip(tmp_path):
    unet = tiny_unet()
    x, t, context = inputs(unet.config)
    lora.inject_lora(unet, rank=4, alpha=2)
    randomize_lora(unet)
    adapted = unet(x, t, context)

    path = tmp_path / "lora.safetensors"
    lora.save_lora(unet, path)
    fresh = tiny_unet()
    lora.inject_lora(fresh, rank=4, alpha=2)
    lora.load_lora(fresh, path)
    # Scale 0.5 is exact in float.
    torch.testing.assert_close(fresh(x, t, context), adapted, rtol=0, atol=0)

    lora.merge_lora(unet)
    assert not lora._lora_modules(unet) and set(unet.state_dict()) == set(tiny_unet().state_dict())
    torch.testing.assert_close(unet(x, t, context), adapted, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="shape"):
        wrong_rank = tiny_unet()
        lora.inject_lora(wrong_rank, rank=3)
        lora.load_lora(wrong_rank, path)
    with pytest.raises(CheckpointError, match="state dict: not a LoRA of this model: missing key"):
        lora.load_lora(
            fresh, {k: v for k, v in lora.lora_state_dict(fresh).items() if "attn2" not in k}
        )


@torch.no_grad()
def test_saved_file_loads_in_diffusers(tmp_path):
    from testkit import build_tiny_pipeline

    pipeline = build_tiny_pipeline()  # a diffusers StableDiffusionPipeline with our tiny presets
    ours = UNet2DConditionModel(UNetConfig.tiny()).eval()
    ours.load_state_dict(pipeline.unet.state_dict())
    lora.inject_lora(ours, rank=4, alpha=8)  # scale 2: checks the alpha/r baked into the file
    randomize_lora(ours)
    # Diffusers' default file name.
    lora.save_lora(ours, tmp_path / "pytorch_lora_weights.safetensors")

    pipeline.load_lora_weights(str(tmp_path))  # the user-facing diffusers API
    x, t, context = inputs(ours.config)
    expected = ours(x, t, context)
    with lora.lora_disabled(ours):
        assert (expected - ours(x, t, context)).abs().max() > 1e-3  # the adapter is not a no-op
    torch.testing.assert_close(pipeline.unet(x, t, context).sample, expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_bf16_merge_equals_the_fp32_merge_cast_to_bf16():
    """merge_lora adds B A in float32 and rounds once: adding a small update in bf16 would lose much
    of it."""
    unet = tiny_unet().to(torch.bfloat16)
    lora.inject_lora(unet, rank=4)
    # Updates of rms ~1e-3 relative to weights of rms ~0.1.
    for _, module in lora._lora_modules(unet):
        module.lora_B.weight.normal_(std=1e-3, generator=torch.Generator().manual_seed(0))
    fp32 = tiny_unet()
    lora.inject_lora(fp32, rank=4)
    fp32.load_state_dict({key: value.float() for key, value in unet.state_dict().items()})
    naive = {name: (m.weight + (m.scale * m.lora_B.weight @ m.lora_A.weight).to(m.weight.dtype))
             for name, m in lora._lora_modules(unet)}  # what an in-dtype add would give
    lora.merge_lora(unet)
    lora.merge_lora(fp32)
    merged, expected = unet.state_dict(), fp32.state_dict()
    assert all(
        merged[key].dtype == torch.bfloat16 and torch.equal(merged[key], expected[key].bfloat16())
        for key in merged
    )
    # The test can fail.
    assert any(not torch.equal(naive[name], merged[f"{name}.weight"]) for name in naive)
