"""Tests of the toy world (toy.py) and of evaluate.py: a shortened version of the default pipeline end to end
(pretrain a few steps -> align a few steps with train.py -> evaluate), and evaluate.py on a tiny random
SD-format folder. Each test names the property it proves; none of them times anything."""

import json

import pytest
import torch
from PIL import Image

import evaluate
import toy


def test_toy_prompts_and_drawings_match():
    """Every prompt parses; a drawing is [3,16,16] in [-1,1], reproducible from the generator, and its pixels
    are the named colours: the background colour dominates, the shape colour is present."""
    assert len(toy.PROMPTS) == len(set(toy.PROMPTS)) == 60
    first = toy.draw("a red square on a blue background", 16, torch.Generator().manual_seed(3))
    again = toy.draw("a red square on a blue background", 16, torch.Generator().manual_seed(3))
    assert first.shape == (3, 16, 16) and first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, again)
    red, blue = first[0] > first[2] + 0.1, first[2] > first[0] + 0.1  # pixels closer to red / to blue
    assert blue.float().mean() > 0.5 and red.float().mean() > 0.05
    with pytest.raises(ValueError, match="not a toy prompt"):
        toy.parse_prompt("a photo of a cat")
    with pytest.raises(ValueError, match="unknown colour or shape"):
        toy.parse_prompt("a pink circle on a red background")


def test_identity_vae_has_the_autoencoder_interface():
    vae, x = toy.IdentityVAE(), torch.randn(2, 3, 16, 16)
    assert torch.equal(vae.encode(x).sample(), x) and torch.equal(vae.encode(x).mode(), x)
    assert torch.equal(vae.decode(x), x)
    assert vae.config.scaling_factor == 1.0 and vae.downsample_factor == 1


@pytest.fixture(scope="module")
def tiny_toy(tmp_path_factory, request):
    """toy.load_base_model at ToyConfig.tiny() (4 pretraining steps) in a temporary cache; patched into
    toy.load_base_model so that train.py and evaluate.py (which call it with defaults) use the tiny one."""
    cache = tmp_path_factory.mktemp("toy_cache")
    original = toy.load_base_model

    def load_tiny(cache_dir=None, device="cpu", config=None, progress=False):
        return original(str(cache), device, config or toy.ToyConfig.tiny(), progress)

    patch = pytest.MonkeyPatch()
    patch.setattr(toy, "load_base_model", load_tiny)
    request.addfinalizer(patch.undo)
    return cache


def test_base_model_is_cached_and_reloads_identically(tiny_toy):
    """First call pretrains and writes the cache folder (keyed by the config hash); the second loads the same
    weights; another config gets another key. The returned sd generates 16x16 images through sample.py."""
    from sample import generate

    first = toy.load_base_model()
    (folder,) = list(tiny_toy.iterdir())
    assert folder.name == toy.ToyConfig.tiny().cache_key() != toy.ToyConfig.default().cache_key()
    files = {p.name for p in folder.iterdir()}
    assert files >= {"unet.safetensors", "text_encoder.safetensors", "config.json"}
    second = toy.load_base_model()
    for a, b in zip(first.unet.state_dict().values(), second.unet.state_dict().values()):
        assert torch.equal(a, b)
    losses = json.loads((folder / "pretrain_loss.json").read_text())
    assert len(losses) == toy.ToyConfig.tiny().pretrain_steps and all(v == v for v in losses)
    images = generate(first, toy.PROMPTS[:2], num_steps=2, guidance=3.0, progress=False)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1


def test_shortened_default_pipeline_end_to_end(tiny_toy, tmp_path):
    """train.py with its default method and model (TailorPO on the toy, LoRA) for 2 steps, then evaluate.py on
    its LoRA: report.json and grid.png are written and well-formed, and the aligned model differs from the
    base (the LoRA update reached the images: not every pair is a tie)."""
    import train

    out = tmp_path / "run"
    train.main([f"--out_dir={out}", "--max_steps=2", "--batch_size=2", "--tailorpo.num_steps=3",
                "--eval_every=0", "--learning_rate=1e-2"])
    report = evaluate.main(["--model", "toy", "--lora", str(out / "lora.safetensors"), "--max-prompts", "3",
                            "--seeds", "0-1", "--steps", "3", "--rewards", "saturation,brightness",
                            "--out", str(tmp_path / "eval")])
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["num_pairs"] == 6 and set(saved["rewards"]) == {"saturation", "brightness"}
    for r in saved["rewards"].values():
        assert 0 <= r["win_rate"] <= 1 and r["stderr"] >= 0 and r["base"]["stderr"] >= 0
    assert saved["rewards"]["saturation"]["ties"] < 6
    grid = Image.open(saved["grid"])
    assert grid.size == (2 * 2 * 96 + 24, 3 * (96 + 14) + 14)  # 2 seeds x (base | aligned), 3 prompt rows

