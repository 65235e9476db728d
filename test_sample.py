"""Tests of sampler.py and sample.py: the fused loop equals the plain DDIM loop, the whole pipeline
equals diffusers' StableDiffusionPipeline on a tiny random model, and the command line writes images
and rejects bad input. Deviations: none (tests).
"""

import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import sample as sample_cli
from sampler import generate, generate_latents, guided_eps, sample
from scheduler import NoiseSchedule, gaussian_log_prob

# --------------------------------------------------------------------------------------------------
# the loop, with a stand-in UNet (each output row depends only on its own row: batching must not
# matter)


def fake_unet(x_t, t, context):
    t = torch.as_tensor(t).reshape(-1, 1, 1, 1)  # [B, 1, 1, 1] or [1, 1, 1, 1]
    return torch.tanh(x_t) * 0.3 + context.mean(1)[:, :4, None, None] + 1e-4 * t


def fake_inputs(device="cpu"):
    generator = torch.Generator().manual_seed(0)
    cond, uncond = (torch.randn(2, 5, 8, generator=generator).to(device) for _ in range(2))
    return cond, uncond, torch.randn(2, 4, 6, 6, generator=generator).to(device)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_fused_loop_equals_plain_ddim_loop(eta):
    schedule, (cond, uncond, latents), guidance = NoiseSchedule.sd15(), fake_inputs(), 7.5
    calls = []
    counting_unet = lambda x, t, c: calls.append(x.shape[0]) or fake_unet(x, t, c)
    result = sample(
        counting_unet,
        schedule,
        cond,
        uncond,
        latents,
        num_steps=10,
        guidance=guidance,
        eta=eta,
        generator=torch.Generator().manual_seed(1),
        record=True,
        progress=False,
    )
    assert calls == [4] * 10  # ONE UNet call per step on [uncond; cond]

    generator = torch.Generator().manual_seed(1)
    x_t = latents
    for i, t in enumerate(schedule.ddim_timesteps(10)):
        eps_uncond = fake_unet(x_t, t, uncond)
        eps_cond = fake_unet(x_t, t, cond)
        eps_pred = eps_uncond + guidance * (eps_cond - eps_uncond)
        assert torch.allclose(
            guided_eps(fake_unet, x_t, t, cond, uncond, guidance), eps_pred, atol=1e-6
        )
        noise = torch.randn(x_t.shape, generator=generator) if eta else None
        x_prev, mean, std, _ = schedule.ddim_step(eps_pred, t, x_t, 10, eta=eta, noise=noise)
        trajectory = {key: value[i] for key, value in result.trajectory.items()}
        assert trajectory["timesteps"] == t
        assert torch.allclose(trajectory["x_t"], x_t, atol=1e-5)
        assert torch.allclose(trajectory["x_prev"], x_prev, atol=1e-5)
        assert torch.allclose(
            trajectory["x0_pred"], schedule.x0_from_eps(x_t, eps_pred, t), atol=1e-4
        )
        if eta:
            assert torch.allclose(
                trajectory["log_prob"], gaussian_log_prob(x_prev, mean, std), atol=1e-4
            )
        x_t = x_prev
    assert torch.allclose(result.latents, x_t, atol=1e-5)
    assert result.trajectory["log_prob"].shape == (10, 2)
    assert result.trajectory["x_t"].shape == (10, 2, 4, 6, 6)


def test_guided_eps_with_per_row_timesteps_and_shared_uncond():
    cond, uncond, x_t = fake_inputs()
    t = torch.tensor([981, 21])
    eps_pred = guided_eps(fake_unet, x_t, t, cond, uncond[:1], 5.0)
    for i in range(2):
        one = slice(i, i + 1)
        eps_uncond, eps_cond = (
            fake_unet(x_t[one], t[i], uncond[:1]),
            fake_unet(x_t[one], t[i], cond[one]),
        )
        assert torch.allclose(eps_pred[one], eps_uncond + 5.0 * (eps_cond - eps_uncond), atol=1e-6)


def test_no_guidance_and_no_record():
    schedule, (cond, uncond, latents) = NoiseSchedule.sd15(), fake_inputs()
    plain = sample(fake_unet, schedule, cond, None, latents, num_steps=3, progress=False)
    assert plain.trajectory is None
    unguided = sample(
        fake_unet, schedule, cond, uncond, latents, num_steps=3, guidance=1.0, progress=False
    )
    assert torch.equal(plain.latents, unguided.latents)  # guidance <= 1: cond alone, as diffusers


def test_loop_never_reads_device_values():
    """On the meta device any .item() / bool(tensor) / host copy of a value raises: the loop is
    sync-free. On CUDA, bench/bench_gpu.py runs the loop under
    torch.cuda.set_sync_debug_mode("error")."""
    cond, uncond, latents = fake_inputs("meta")
    result = sample(
        fake_unet,
        NoiseSchedule.sd15(),
        cond,
        uncond,
        latents,
        num_steps=4,
        eta=1.0,
        record=True,
        progress=False,
    )
    assert result.latents.device.type == "meta" and result.trajectory["log_prob"].shape == (4, 2)


# --------------------------------------------------------------------------------------------------
# end to end against diffusers on the tiny SD folder (conftest.tiny_sd_dir)


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("negative_prompt", [None, "blurry, low quality"])
def test_images_equal_diffusers(tiny_sd, diffusers_pipe, negative_prompt):
    prompts = ["a red circle on a blue background"] * 2
    final = {}

    def keep_latents(pipe, step, t, tensors):
        final["latents"] = tensors["latents"]  # after the last step: x_0
        return tensors

    expected = diffusers_pipe(
        prompts,
        negative_prompt=negative_prompt and [negative_prompt] * 2,
        height=64,
        width=64,
        num_inference_steps=8,
        guidance_scale=7.5,
        output_type="pt",
        generator=torch.Generator("cpu").manual_seed(3),
        callback_on_step_end=keep_latents,
    )
    latents = generate_latents(
        tiny_sd,
        prompts,
        negative_prompt or "",
        num_steps=8,
        guidance=7.5,
        seed=3,
        height=64,
        width=64,
        progress=False,
    )
    assert (latents - final["latents"]).abs().max() <= 1e-4
    images = tiny_sd.decode_latents(latents)
    assert images.shape == (2, 3, 64, 64)
    assert (images - expected.images).abs().max() <= 1 / 255


def test_images_equal_diffusers_with_eta(tiny_sd, diffusers_pipe):
    """eta = 1: the noise of every step comes from the seed's CPU generator after x_T, as in
    diffusers."""
    expected = diffusers_pipe(
        "a cat",
        num_inference_steps=5,
        eta=1.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(5),
    ).images
    images = generate(tiny_sd, ["a cat"], num_steps=5, eta=1.0, seed=5, progress=False)
    assert (images - expected).abs().max() <= 1 / 255


def first_eta_noise(sd, prompts, seed, latents=None):
    """The noise z of the first DDIM step of generate_latents at eta = 1, [B, C, h, w]."""
    seen = []
    ddim_step = sd.schedule.ddim_step

    def recording_ddim_step(eps_pred, t, x_t, num_steps, eta=0.0, noise=None):
        seen.append(noise)
        return ddim_step(eps_pred, t, x_t, num_steps, eta, noise)

    sd.schedule.ddim_step = recording_ddim_step
    try:
        generate_latents(sd, prompts, num_steps=2, eta=1.0, seed=seed, latents=latents,
                         progress=False)
    finally:
        del sd.schedule.ddim_step
    return seen[0]


def test_given_x_T_and_the_eta_noise_are_independent(tiny_sd):
    """Issue 19.3: evaluate.generate draws x_T from manual_seed(seed) and passes it as `latents`;
    the eta > 0 noise must not come from a generator seeded the same way (it was x_T again)."""
    seed = 4
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    noise = first_eta_noise(tiny_sd, ["a cat", "a dog", "a tree"], seed, x_T.expand(3, -1, -1, -1))
    dims = x_T.numel()
    for row in noise:
        correlation = torch.corrcoef(torch.stack([row.flatten(), x_T.flatten()]))[0, 1]
        # Independent normals: the sample correlation has standard deviation 1 / sqrt(D).
        assert abs(correlation) < 5 / math.sqrt(dims)


def test_seeded_x_T_and_eta_noise_follow_diffusers_one_generator(tiny_sd):
    """Without given latents, x_T and then the eta noise come from one generator, as diffusers'."""
    generator = torch.Generator().manual_seed(4)
    torch.randn(2, 4, 8, 8, generator=generator)  # x_T
    expected = torch.randn(2, 4, 8, 8, generator=generator)
    assert torch.equal(first_eta_noise(tiny_sd, ["a cat", "a dog"], 4), expected)


# --------------------------------------------------------------------------------------------------
# command line


def test_cli_writes_grid_and_single_images(tiny_sd_dir, tmp_path):
    out = tmp_path / "samples" / "grid.png"
    paths = sample_cli.main(
        [
            "--model",
            str(tiny_sd_dir),
            "--prompt",
            "a red circle",
            "--num-images",
            "3",
            "--steps",
            "2",
            "--seed",
            "1",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert paths == [out] + [tmp_path / "samples" / f"grid_{i:03d}.png" for i in range(3)]
    # 3 images -> 2 x 2 grid of 64 px (tiny UNet 8 x f 8)
    assert Image.open(out).size == (
        2 * 64,
        2 * 64,
    )
    singles = [Image.open(path) for path in paths[1:]]
    assert all(image.size == (64, 64) for image in singles)
    assert singles[0].tobytes() != singles[1].tobytes()  # different noise per image


def test_cli_unet_and_lora_flags(tiny_sd_dir, tmp_path):
    from lora import inject_lora, save_lora
    from weights import load_stable_diffusion

    unet = load_stable_diffusion(tiny_sd_dir).unet
    for parameter in inject_lora(unet, rank=2):
        torch.nn.init.normal_(parameter, std=0.5, generator=torch.Generator().manual_seed(0))
    save_lora(unet, tmp_path / "lora.safetensors")
    common = ["--model", str(tiny_sd_dir), "--prompt", "a cat", "--steps", "2", "--device", "cpu"]
    base = sample_cli.main(common + ["--out", str(tmp_path / "base.png")])[0]
    same_unet = sample_cli.main(
        common + ["--unet", str(tiny_sd_dir / "unet"), "--out", str(tmp_path / "unet.png")]
    )[0]
    adapted = sample_cli.main(
        common + ["--lora", str(tmp_path / "lora.safetensors"), "--out", str(tmp_path / "lora.png")]
    )[0]
    assert Image.open(base).tobytes() == Image.open(same_unet).tobytes()
    assert Image.open(base).tobytes() != Image.open(adapted).tobytes()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--height", "60"], "multiples of 8"),
        (["--width", "100"], "multiples of 8"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--num-images", "0"], "--num_images must be >= 1"),
    ],
)
def test_cli_rejects_bad_input(tiny_sd_dir, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        sample_cli.main(
            ["--model", str(tiny_sd_dir), "--prompt", "x", "--out", str(tmp_path / "g.png"), *flags]
        )
    assert message in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_cli_rejects_unknown_model_path(tmp_path):
    with pytest.raises(SystemExit, match="^sample.py: .*no such file or folder"):
        sample_cli.main(["--model", str(tmp_path / "no_such_model"), "--prompt", "x"])


@pytest.mark.parametrize("kind", ["corrupt_safetensors", "pickle_with_code", "not_a_lora"])
def test_cli_bad_lora_file_is_one_line_and_runs_no_code(tiny_sd_dir, tmp_path, kind):
    """Issue 10 item 12: `python sample.py --lora FILE` with a corrupt file, a pickle whose
    unpickling runs os.system, or a weights file that is not a LoRA of the model: exit non-zero
    within seconds with one stderr line naming the file and the reason; the pickled code never
    ran."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    from testkit import RunsCode, write_bad_file

    if kind == "not_a_lora":
        path = tmp_path / "unet.safetensors"
        reason = "not a LoRA file"
        save_file({"conv_in.weight": torch.zeros(2, 2)}, path)
    elif kind == "pickle_with_code":  # torch.save of an object whose __reduce__ runs os.system
        path = tmp_path / "evil.pt"
        reason = "refused: this pickle would run code"
        torch.save({"unet.x.lora_A.weight": RunsCode(tmp_path / "pwned")}, path)
    else:
        path, reason = write_bad_file(tmp_path, kind)
    done = subprocess.run(
        [
            sys.executable,
            "sample.py",
            "--model",
            str(tiny_sd_dir),
            "--prompt",
            "x",
            "--steps",
            "1",
            "--lora",
            str(path),
            "--out",
            str(tmp_path / "g.png"),
        ],
        capture_output=True,
        text=True,
        cwd=Path(sample_cli.__file__).parent,
        timeout=120,
    )
    assert done.returncode != 0 and not (tmp_path / "g.png").exists()
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"sample.py: {path}")
    assert re.search(reason, done.stderr), done.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "g.png").exists()


def test_generate_rejects_bad_input(tiny_sd):
    with pytest.raises(ValueError, match="multiples of 8"):
        generate(tiny_sd, ["x"], height=30, width=64)
    with pytest.raises(ValueError, match="num_steps"):
        generate(tiny_sd, ["x"], num_steps=0)


def test_generate_keeps_float32_latents_with_a_bf16_unet(tiny_sd):
    """sampler deviation 3: the UNet runs in its dtype, the DDIM arithmetic on float32 latents."""
    reference = generate_latents(tiny_sd, ["a cat"], num_steps=3, seed=1, progress=False)
    tiny_sd.unet.to(torch.bfloat16)
    latents = generate_latents(tiny_sd, ["a cat"], num_steps=3, seed=1, progress=False)
    assert latents.dtype == torch.float32
    assert (
        latents - reference
    ).abs().max() < 0.1 * reference.abs().max()  # bf16 weights: close, not equal
