"""Tests for clip.py: the CLIP text and vision towers equal transformers' on random weights (CPU,
fp32).

Reference models are built with random weights, saved with their own `save_pretrained`, and loaded
back into our modules through weights.py's strict loader (read_state_dict + load_strict;
rewards.load_clip for a CLIPModel folder) and our key converter. The full-size layouts are compared
key by key on the meta device. Deviations: none.
"""

import json

import pytest
import torch

from clip import CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, convert_hf_clip_keys
from rewards import load_clip
from state_dicts import load_strict, read_state_dict
from testkit import (
    clip_tokenizer,
    hf_clip_kwargs,
    max_err,
    perturb_norms,
    shapes,
    tiny_vision_config,
)


def reference_config(text: CLIPTextConfig, vision: CLIPVisionConfig):
    from transformers import CLIPConfig

    return CLIPConfig(text_config=hf_clip_kwargs(text), vision_config=hf_clip_kwargs(vision),
                      projection_dim=text.projection_dim)


# --------------------------------------------------------------------------------------------------
# Full-size key parity on the meta device (no memory allocated)


def test_sd15_text_encoder_keys_match_transformers():
    from transformers import CLIPTextConfig as ReferenceTextConfig
    from transformers import CLIPTextModel as ReferenceTextModel

    with torch.device("meta"):
        text = CLIPTextModel(CLIPTextConfig.sd15())
        reference_text = ReferenceTextModel(
            ReferenceTextConfig(**hf_clip_kwargs(CLIPTextConfig.sd15()))
        )
    # transformers >= 5 keeps a bare CLIPTextModel's keys without `text_model.` in memory (the
    # public files have it), and its position_ids buffer is non-persistent; we have no buffer at all
    # (arange on the fly).
    assert "embeddings.position_ids" in dict(reference_text.named_buffers())
    assert list(text.buffers()) == []
    assert shapes(text.state_dict()) == shapes(convert_hf_clip_keys(reference_text.state_dict()))
    assert (
        len(text.state_dict()) == 196 and sum(p.numel() for p in text.parameters()) == 123_060_480
    )
    assert all(key.startswith("text_model.") for key in text.state_dict())


@pytest.mark.parametrize("layout", ["vit_l14", "vit_h14"])
def test_full_size_clip_model_keys_match_transformers(layout):
    from transformers import CLIPModel as ReferenceCLIP

    text = CLIPTextConfig.sd15() if layout == "vit_l14" else CLIPTextConfig.vit_h14_text()
    vision = getattr(CLIPVisionConfig, layout)()
    hf_config = reference_config(text, vision)
    with torch.device("meta"):
        ours, reference = CLIPModel(text, vision), ReferenceCLIP(hf_config)
    assert shapes(ours.state_dict()) == shapes(convert_hf_clip_keys(reference.state_dict()))
    saved = hf_config.to_dict()  # what config.json holds: our configs read it back unchanged
    assert CLIPTextConfig.from_hf(saved["text_config"], saved["projection_dim"]) == text
    assert CLIPVisionConfig.from_hf(saved["vision_config"]) == vision


# --------------------------------------------------------------------------------------------------
# CLIP text and vision towers

TEXT_CONFIGS = {
    "tiny-quick_gelu": CLIPTextConfig.tiny(),
    "gelu-legacy-eos": CLIPTextConfig(
        hidden_size=48,
        num_layers=3,
        num_heads=6,
        intermediate_size=64,
        hidden_act="gelu",
        projection_dim=24,
    ),
}


def sample_ids(batch=3, seed=0):
    """Real tokenised prompts plus random ids whose first eos sits at different positions."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [
        "a photo of a cat",
        "an astronaut riding a horse on mars, 4k, trending on artstation",
    ]
    random_ids = torch.randint(0, 49406, (batch, 77), generator=generator)
    ids = torch.cat([clip_tokenizer()(prompts), random_ids])
    ids[len(prompts):, 0] = 49406
    for row, eos_at in enumerate([9, 40, 76][:batch], start=len(prompts)):
        ids[row, eos_at] = 49407
    return ids


@pytest.mark.parametrize("name", TEXT_CONFIGS)
def test_text_encoder_matches_transformers(name, tmp_path):
    from transformers import CLIPTextConfig as ReferenceTextConfig
    from transformers import CLIPTextModel as ReferenceTextModel

    hf_kwargs = hf_clip_kwargs(TEXT_CONFIGS[name])
    if name == "gelu-legacy-eos":
        # As SD1.5's text_encoder/config.json: transformers pools at argmax.
        hf_kwargs["eos_token_id"] = 2
    torch.manual_seed(0)
    reference = perturb_norms(ReferenceTextModel(ReferenceTextConfig(**hf_kwargs))).eval()
    reference.save_pretrained(tmp_path, safe_serialization=True)
    config = CLIPTextConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    weights_file = tmp_path / "model.safetensors"
    state = convert_hf_clip_keys(read_state_dict(weights_file))
    ours = load_strict(CLIPTextModel(config), state, str(weights_file))
    ids = sample_ids()
    with torch.no_grad():
        hidden, pooled = ours(ids)
        expected = reference(ids)
    assert hidden.shape == (5, 77, config.hidden_size)
    assert max_err(hidden, expected.last_hidden_state) <= 1e-5
    assert max_err(pooled, expected.pooler_output) <= 1e-5


VIT_L14_LIKE_VISION = CLIPVisionConfig(hidden_size=32, num_layers=2, num_heads=4,
                                       intermediate_size=37, patch_size=14, image_size=42)
VIT_H14_LIKE_TEXT = CLIPTextConfig(hidden_size=48, num_layers=2, num_heads=6, intermediate_size=64,
                                   hidden_act="gelu", projection_dim=24)
VIT_H14_LIKE_VISION = CLIPVisionConfig(hidden_size=40, num_layers=3, num_heads=5,
                                       intermediate_size=64, patch_size=14, image_size=28,
                                       hidden_act="gelu")
CLIP_LAYOUTS = {  # Tiny widths of the two reward-model layouts.
    "vit_l14-like": (CLIPTextConfig.tiny(), VIT_L14_LIKE_VISION),
    "vit_h14-like": (VIT_H14_LIKE_TEXT, VIT_H14_LIKE_VISION),
}


@pytest.mark.parametrize("layout", CLIP_LAYOUTS)
def test_clip_model_features_match_transformers(layout, tmp_path):
    from transformers import CLIPModel as ReferenceCLIP

    text, vision = CLIP_LAYOUTS[layout]
    torch.manual_seed(0)
    hf_config = reference_config(text, vision)
    reference = perturb_norms(ReferenceCLIP(hf_config)).eval()
    reference.save_pretrained(tmp_path, safe_serialization=True)
    # Its config.json wins.
    ours = load_clip(tmp_path, None, None, "a transformers CLIPModel folder").eval()
    size = vision.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    ids = sample_ids(batch=2)
    with torch.no_grad():
        image, text_features = ours.get_image_features(pixels), ours.get_text_features(ids)
        expected_image, expected_text = (
            reference.get_image_features(pixels),
            reference.get_text_features(ids),
        )
    # transformers 5 returns an output object holding the projected features as pooler_output
    expected_image = getattr(expected_image, "pooler_output", expected_image)
    expected_text = getattr(expected_text, "pooler_output", expected_text)
    assert image.shape == (2, text.projection_dim) and text_features.shape == (
        4,
        text.projection_dim,
    )
    assert max_err(image, expected_image) <= 1e-5
    assert max_err(text_features, expected_text) <= 1e-5
    assert ours.logit_scale.item() == reference.logit_scale.item()


def test_vision_tower_refuses_wrong_image_size():
    model = CLIPModel(CLIPTextConfig.tiny(), tiny_vision_config())
    with pytest.raises(ValueError, match=r"\[B, 3, 30, 30\]"):
        model.get_image_features(torch.zeros(1, 3, 32, 32))
