"""Tests of the toy world (toy.py) and of evaluate.py: a shortened version of the default pipeline
end to end (pretrain a few steps -> align a few steps with train.py -> evaluate), and evaluate.py on
a tiny random SD-format folder. Each test names the property it proves; none of them times
anything."""

import json
from dataclasses import asdict

import pytest
import torch
from PIL import Image

import evaluate
import toy
import toy_model
import toy_reward


def test_toy_prompts_and_drawings_match():
    """Every prompt parses; a drawing is [3,16,16] in [-1,1], reproducible from the generator, and
    its pixels are the named colours: the background colour dominates, the shape colour is
    present."""
    assert len(toy.PROMPTS) == len(set(toy.PROMPTS)) == 60
    first = toy.draw("a red square on a blue background", 16, torch.Generator().manual_seed(3))
    again = toy.draw("a red square on a blue background", 16, torch.Generator().manual_seed(3))
    assert first.shape == (3, 16, 16) and first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, again)
    red, blue = (
        first[0] > first[2] + 0.1,
        first[2] > first[0] + 0.1,
    )  # pixels closer to red / to blue
    assert blue.float().mean() > 0.5 and red.float().mean() > 0.05
    with pytest.raises(ValueError, match="not a toy prompt"):
        toy.parse_prompt("a photo of a cat")
    with pytest.raises(ValueError, match="unknown colour or shape"):
        toy.parse_prompt("a pink circle on a red background")


def test_identity_vae_has_the_autoencoder_interface():
    """The posterior is N(x, 0) with vae.DiagonalGaussian's fields; StableDiffusion.encode_images /
    decode_latents are the identity (up to [-1, 1] -> [0, 1]) on it, with or without posterior
    noise."""
    from stable_diffusion import StableDiffusion

    vae = toy_model.IdentityVAE()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = vae.encode(x)
    assert torch.equal(posterior.mean, x) and torch.equal(posterior.std, torch.zeros_like(x))
    assert torch.equal(posterior.logvar, torch.full_like(x, -30.0))
    assert torch.equal(vae.decode(x), x)
    assert (
        vae.config.scaling_factor == 1.0
        and vae.downsample_factor == 1
        and vae.config.latent_channels == 3
    )
    sd = StableDiffusion(unet=None, vae=vae, text_encoder=None, tokenizer=None, schedule=None)
    assert torch.equal(sd.encode_images(x), x) and torch.equal(
        sd.encode_images(x, torch.randn_like(x)), x
    )
    assert torch.equal(sd.decode_latents(x), x / 2 + 0.5)


# Seconds instead of minutes: the same shapes, few steps.
TINY = toy_model.ToyConfig(pretrain_steps=4, batch_size=8)


@pytest.fixture(scope="module")
def tiny_toy(tmp_path_factory, request):
    """The toy world at test size in a temporary cache: load_base_model at TINY (4 pretraining
    steps), make_pairs with 3 samples per prompt and 2-step sampling, a 20-step reward model;
    patched into toy, so that the door (toy.world()) and through it train.py, evaluate.py and
    evaluate.load_rewards(["toy"], ..., world) use these."""
    cache = tmp_path_factory.mktemp("toy_cache")
    load_base_model, make_pairs = toy.load_base_model, toy.make_pairs
    load_reward_model = toy.load_reward_model

    def load_tiny(cache_dir=None, device="cpu", config=None, progress=False):
        return load_base_model(str(cache), device, config or TINY, progress)

    def make_tiny_pairs(cache_dir=None, config=None, sd=None, progress=False):
        config = config or toy.PairsConfig(images_per_prompt=3, held_out_images=2, num_steps=2)
        return make_pairs(str(cache), config, sd, progress)

    def load_tiny_reward(
        cache_dir=None, device="cpu", config=None, pairs_folder=None, progress=False
    ):
        config = config or toy_reward.RewardModelConfig(steps=20, validation=16)
        return load_reward_model(str(cache), device, config, pairs_folder, progress)

    patch = pytest.MonkeyPatch()
    patch.setattr(toy, "load_base_model", load_tiny)
    patch.setattr(toy, "make_pairs", make_tiny_pairs)
    patch.setattr(toy, "load_reward_model", load_tiny_reward)
    request.addfinalizer(patch.undo)
    return cache


def base_model_key(config: toy_model.ToyConfig) -> str:
    """The name of the base model's cache folder for `config` in this world."""
    return toy_model.hash_key({"world": toy.TOY_WORLD_VERSION, **asdict(config)})


def test_the_default_base_model_keeps_its_cache_name():
    """The default base model's cache folder name is a golden value: a change to the world's
    version, ToyConfig's fields or hash_key renames it, and every run then pretrains for minutes
    again. Change it here only on purpose."""
    assert base_model_key(toy_model.ToyConfig()) == "1055ac3be9b8"


def test_base_model_is_cached_and_reloads_identically(tiny_toy):
    """First call pretrains and writes the cache folder (keyed by the config hash); the second loads
    the same weights; another config gets another key. The returned sd generates 16x16 images
    through sample.py."""
    from sampler import generate

    first = toy.load_base_model()
    (folder,) = list(tiny_toy.iterdir())
    assert folder.name == base_model_key(TINY) != base_model_key(toy_model.ToyConfig())
    files = {p.name for p in folder.iterdir()}
    assert files >= {"unet.safetensors", "text_encoder.safetensors", "config.json"}
    second = toy.load_base_model()
    for a, b in zip(first.unet.state_dict().values(), second.unet.state_dict().values()):
        assert torch.equal(a, b)
    losses = json.loads((folder / "pretrain_loss.json").read_text())
    assert len(losses) == TINY.pretrain_steps and all(v == v for v in losses)
    images = generate(first, toy.PROMPTS[:2], num_steps=2, guidance=3.0, progress=False)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1


def test_shortened_default_pipeline_end_to_end(tiny_toy, tmp_path):
    """train.py with its default method and model (Diffusion-DPO on the toy pairs, LoRA; 8
    validation pairs: the tiny pairs folder has fewer than the default 256) for 2 steps, then
    evaluate.py on its LoRA: report.json and grid.png are written and well-formed, and the aligned
    model differs from the base (the LoRA update reached the images: not every pair is a tie)."""
    import train

    out = tmp_path / "run"
    train.main(
        [
            f"--out_dir={out}",
            "--max_steps=2",
            "--batch_size=2",
            "--tailorpo.num_steps=3",
            "--eval_every=0",
            "--val_pairs=8",
            "--learning_rate=1e-2",
        ]
    )
    report = evaluate.main(
        [
            "--model",
            "toy",
            "--lora",
            str(out / "lora.safetensors"),
            "--max_prompts",
            "3",
            "--seeds",
            "0-1",
            "--steps",
            "3",
            "--rewards",
            "saturation,brightness",
            "--out_dir",
            str(tmp_path / "eval"),
        ]
    )
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert (
        saved["num_pairs"] == 6
    )  # the toy's hidden judge (toy.JUDGES) is reported beside the rewards asked
    assert set(saved["rewards"]) == {"saturation", "brightness", "utility", "fidelity"}
    for r in saved["rewards"].values():
        assert 0 <= r["win_rate"] <= 1 and r["stderr"] >= 0 and r["base"]["stderr"] >= 0
    assert saved["rewards"]["saturation"]["ties"] < 6
    grid = Image.open(saved["grid"])
    assert grid.size == (
        2 * 2 * 96 + 24,
        3 * (96 + 14) + 14,
    )  # 2 seeds x (base | aligned), 3 prompt rows


# --------------------------------------------------------------------------------------------------
# The toy human, the toy Pick-a-Pic and the toy reward model


def drawings(prompts, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([toy.draw(p, 16, generator) for p in prompts]) / 2 + 0.5  # [0, 1]


def swap_word(prompt: str, slot: int) -> str:
    """The prompt with word `slot` (1 colour, 2 shape, 5 background) replaced by another valid
    one."""
    words = prompt.split()
    choices = toy.SHAPES if slot == 2 else [c for c in toy.COLOURS if c not in (words[1], words[5])]
    words[slot] = next(c for c in choices if c != words[slot])
    return " ".join(words)


def test_utility_prefers_the_asked_picture():
    """u ranks a drawing of its prompt above the same picture judged against a prompt with another
    shape colour, shape or background, and above a noisy or dull version of it; a drawing's fidelity
    is high and every term is in [0, 1]."""
    prompts = [toy.PROMPTS[i % 60] for i in range(120)]
    images = drawings(prompts)
    u = toy.utility(images, prompts)
    for slot in (1, 2, 5):  # u(image, its prompt) > u(image, a prompt that asks for something else)
        assert (
            u > toy.utility(images, [swap_word(p, slot) for p in prompts])
        ).float().mean() > 0.9, slot
    noisy = (
        images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    ).clamp(0, 1)
    dull = 0.5 + 0.3 * (images - 0.5)
    assert (u > toy.utility(noisy, prompts)).all()
    assert (
        u > toy.utility(dull, prompts)
    ).float().mean() > 0.95  # a dull copy has softer (cleaner) edges
    terms = toy.judge(images, prompts)
    assert all(((v >= 0) & (v <= 1)).all() for v in terms.values())
    assert toy.fidelity(images, prompts).mean() > 0.8


def test_preference_labels_are_bradley_terry_with_ties():
    """P(label_0 = 1) = sigmoid((u_0 - u_1) / tau) within 4 standard errors; |u_0 - u_1| <
    tie_margin gives
    0.5; the labels are a function of the generator."""
    n, tau = 20000, 0.1
    u_0 = torch.cat([torch.full((n,), 1.1), torch.full((n,), 0.95), torch.full((100,), 1.01)])
    u_1 = torch.ones(len(u_0))
    labels = torch.tensor(
        toy.preference_labels(u_0, u_1, tau, 0.02, torch.Generator().manual_seed(0))
    )
    for block, delta in ((labels[:n], 0.1), (labels[n : 2 * n], -0.05)):
        p = torch.sigmoid(torch.tensor(delta / tau)).item()
        assert abs(block.mean().item() - p) < 4 * (p * (1 - p) / n) ** 0.5
    assert (labels[2 * n :] == 0.5).all() and (
        (labels[: 2 * n] == 0) | (labels[: 2 * n] == 1)
    ).all()
    again = toy.preference_labels(u_0, u_1, tau, 0.02, torch.Generator().manual_seed(0))
    assert again == labels.tolist()


def test_held_out_combinations():
    """12 held-out prompts, disjoint from the 48 training ones; every colour, shape, background and
    every pair of them still appears in training, so the held-out prompts are new combinations of
    known words."""
    train = [toy.parse_prompt(p) for p in toy.TRAIN_PROMPTS]
    assert len(toy.HELD_OUT_PROMPTS) == 12 and len(train) == 48
    assert set(toy.HELD_OUT_PROMPTS).isdisjoint(toy.TRAIN_PROMPTS)
    assert set(toy.HELD_OUT_PROMPTS) | set(toy.TRAIN_PROMPTS) == set(toy.PROMPTS)
    assert len({(c, s) for c, s, _ in train}) == 15 and len({(s, b) for _, s, b in train}) == 15
    assert len({(c, b) for c, _, b in train}) == 20


def test_make_pairs_writes_a_cached_pairs_folder(tiny_toy):
    """make_pairs: every two samples of a training prompt make a pair, read back by data.py; the
    held-out prompts only under heldout/; a second call returns the cached folder without sampling
    again."""
    from data import PreferencePairs

    config = toy.PairsConfig(images_per_prompt=3, held_out_images=2, num_steps=2)
    folder = toy.make_pairs(str(tiny_toy), config, progress=False)
    lines = [json.loads(line) for line in open(f"{folder}/pairs.jsonl")]
    assert len(lines) == 48 * 3 and {line["caption"] for line in lines} == set(toy.TRAIN_PROMPTS)
    assert {line["label_0"] for line in lines} <= {0.0, 0.5, 1.0}
    held_out = [json.loads(line) for line in open(f"{folder}/heldout/pairs.jsonl")]
    assert len(held_out) == 12 and {line["caption"] for line in held_out} == set(
        toy.HELD_OUT_PROMPTS
    )
    pairs = PreferencePairs(folder, resolution=16)
    assert len(pairs) + pairs.stats.ties == len(lines)
    modified = (tiny_toy / folder.split("/")[-1] / "pairs.jsonl").stat().st_mtime_ns
    assert toy.make_pairs(str(tiny_toy), config, progress=False) == folder
    assert (tiny_toy / folder.split("/")[-1] / "pairs.jsonl").stat().st_mtime_ns == modified


def test_reward_model_learns_the_preferences(tmp_path):
    """The Bradley-Terry reward model, trained briefly on utility-labelled pairs of drawings (a
    drawing vs a wrong-background, wrong-colour, noisy or dull one), orders held-out prompts' pairs
    far better than chance; it is prompt-aware (the same picture scores higher under its own prompt)
    and differentiable."""
    from pair_files import write_pairs_jsonl

    def write(folder, prompts, seed):
        good = drawings(prompts, seed)
        generator = torch.Generator().manual_seed(seed)
        bad = [
            drawings([swap_word(p, 5)], seed + i)[0]
            if i % 4 == 0
            else drawings([swap_word(p, 1)], seed + i)[0]
            if i % 4 == 1
            else (g + 0.15 * torch.randn(g.shape, generator=generator)).clamp(0, 1)
            if i % 4 == 2
            else 0.5 + 0.3 * (g - 0.5)
            for i, (p, g) in enumerate(zip(prompts, good))
        ]
        flip = torch.rand(len(prompts), generator=generator) < 0.5
        first = [b if f else g for g, b, f in zip(good, bad, flip)]
        second = [g if f else b for g, b, f in zip(good, bad, flip)]
        labels = toy.utility(torch.stack(first), prompts) > toy.utility(
            torch.stack(second), prompts
        )
        labels = labels.float()
        write_pairs_jsonl(folder, prompts, first, second, labels.tolist())

    write(tmp_path, [toy.TRAIN_PROMPTS[i % 48] for i in range(384)], 0)
    write(tmp_path / "heldout", [toy.HELD_OUT_PROMPTS[i % 12] for i in range(96)], 1000)
    config = toy_reward.RewardModelConfig(steps=150, validation=64)
    model, metrics = toy_reward.train_reward_model(
        str(tmp_path), toy.reward_features, 8, config, progress=False
    )
    assert metrics["held_out_prompts_accuracy"] > 0.75 and metrics["validation_accuracy"] > 0.75
    prompts = list(toy.HELD_OUT_PROMPTS)
    images = drawings(prompts, 5).requires_grad_(True)
    scores = model(images, prompts)
    wrong = model(images, [swap_word(p, 5) for p in prompts])
    assert (scores > wrong).float().mean() > 0.75
    scores.sum().backward()
    assert images.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# The door: all that the rest of the house knows of the toy world


def test_the_door_builds_nothing_until_asked(monkeypatch):
    """toy.world() and its settings load no model and sample no pairs; the report prompts are every
    prompt, categorised as training prompt or held-out combination; the judges and sampling are the
    toy's."""

    def refuse(*args, **kwargs):
        raise AssertionError("the door built something before it was asked")

    for name in ("load_base_model", "make_pairs", "load_reward_model"):
        monkeypatch.setattr(toy, name, refuse)
    world = toy.world()
    assert toy.MODEL == "toy" and world.defaults["dpo"] is toy.TRAIN_DEFAULTS["dpo"]
    assert world.prompts == list(toy.TRAIN_PROMPTS) and world.report_prompts == list(toy.PROMPTS)
    held_out = [
        p
        for p, c in zip(world.report_prompts, world.report_categories)
        if c == "held-out combination"
    ]
    assert held_out == list(toy.HELD_OUT_PROMPTS) and len(world.report_categories) == 60
    assert set(world.judges) == {"utility", "fidelity"}
    assert set(world.sampling) == {"num_steps", "guidance", "eta"}


def test_a_new_reward_model_version_trains_a_new_cached_model(tiny_toy, monkeypatch):
    """toy_reward.VERSION is part of the reward model's cache name: once it is bumped for a change
    in what the training learns, a cache written by the old code no longer serves the old model."""
    toy.load_reward_model()
    before = set(tiny_toy.glob("pairs-*/reward-*.safetensors"))
    monkeypatch.setattr(toy_reward, "VERSION", toy_reward.VERSION + 1)
    toy.load_reward_model()
    after = set(tiny_toy.glob("pairs-*/reward-*.safetensors"))
    assert before and len(after - before) == 1


def test_the_door_reaches_the_cached_models(tiny_toy):
    """load_model, pairs_folder and reward go to the (here: test-size) caches;
    evaluate.load_rewards gives the door's reward model behind rewards.Reward's checks (the same
    scores)."""
    import rewards

    world = toy.world()
    sd = world.load_model()
    assert sd.unet.config.sample_size == 16
    assert world.pairs_folder().startswith(str(tiny_toy))
    images, prompts = torch.rand(2, 3, 16, 16), list(toy.PROMPTS[:2])
    (reward,) = evaluate.load_rewards([world.reward_name], "cpu", {}, world).values()
    assert isinstance(reward, rewards.Reward)
    assert torch.equal(reward(images, prompts), world.reward()(images, prompts))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        reward(images * 2, prompts)


def test_the_toy_modules_import_without_a_circle():
    """toy_reward.py imports neither toy.py nor rewards.py nor checkpoint.py, toy_model.py neither
    toy.py nor toy_reward.py, toy.py not rewards.py, and rewards.py knows nothing of the toy:
    evaluate -> toy -> toy_model, toy_reward, one way."""
    import ast
    from pathlib import Path

    def imports(name):
        tree = ast.parse(Path(__file__).with_name(f"{name}.py").read_text())
        return {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | {
            n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
        }

    assert not {"toy", "rewards", "checkpoint"} & imports("toy_reward")
    assert not {"toy", "toy_reward", "rewards", "checkpoint"} & imports("toy_model")
    assert not {"rewards", "checkpoint"} & imports("toy")
    assert not {"toy", "toy_model", "toy_reward"} & imports("rewards")


def test_evaluate_defaults_never_collide_with_the_readme_training_runs(
    tiny_toy, tmp_path, monkeypatch
):
    """Issue 21.3: after `python train.py` and `python train.py --method=tailorpo` (their output
    folders, with their reports' images of other settings, made here without training), `evaluate.py
    --lora FILE` with every output default writes its own folder and refuses nothing."""
    import lora
    import train

    monkeypatch.chdir(tmp_path)
    runs = [train.parse_config(argv).out_dir for argv in ([], ["--method=tailorpo"])]
    assert len(set(runs)) == 2
    for out_dir in runs:  # what final_report leaves: images of other settings under OUT_DIR/eval
        for kind in ("base", "aligned"):
            folder = tmp_path / out_dir / "eval" / "images" / kind
            folder.mkdir(parents=True)
            (folder / "settings.json").write_text(json.dumps({"num_steps": 3, "model": out_dir}))
    sd = toy.world().load_model()
    lora.inject_lora(sd.unet, 2)
    lora.save_lora(sd.unet, tmp_path / runs[0] / "lora.safetensors")
    report = evaluate.main(
        [
            "--lora",
            str(tmp_path / runs[0] / "lora.safetensors"),
            "--max_prompts",
            "2",
            "--seeds",
            "1",
        ]
    )
    written = tmp_path / "out" / "evaluate" / "report.json"
    assert json.loads(written.read_text()) == json.loads(json.dumps(report))
    assert not any(written.is_relative_to(tmp_path / out_dir) for out_dir in runs)


def test_evaluate_reaches_the_toy_reward_through_the_door(tiny_toy, monkeypatch):
    """evaluate.load_rewards with the world loads world.reward_name from world.reward() (no
    registry), behind rewards.Reward's checks, with the reward model's legend."""
    import rewards

    world = toy.world()
    monkeypatch.setattr(rewards, "get_reward", None)  # the registry is not asked
    (reward,) = evaluate.load_rewards([world.reward_name], "cpu", {}, world).values()
    images, prompts = torch.rand(2, 3, 16, 16), list(toy.PROMPTS[:2])
    assert isinstance(reward, rewards.Reward)
    assert torch.equal(reward(images, prompts), world.reward()(images, prompts))
    assert evaluate.legend(world.reward_name, reward).startswith("The learned toy reward")
