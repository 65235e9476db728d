"""Tests of scheduler.py: golden SD1.5 numbers, parity with diffusers' DDIMScheduler, the transition
log-prob, the precision floor (float32) and the keyed randomness.

diffusers is a test-only reference. It computes the schedule in float32, we in float64 (scheduler.py
deviation 1), so the step formula is checked with identical alpha_bar values in float64 (<= 1e-6, in
fact ~1e-15), and the float32 step against diffusers' own schedule (<= 5e-6: its float32
alphas_cumprod is off by up to 4.7e-7, which one step at t = 951 amplifies by ~1/sqrt(alpha_bar_t) =
11). Deviations: none (tests).
"""

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler

from scheduler import NoiseSchedule, gaussian_log_prob, keyed_generator, keyed_randn
from testkit import SD15_SCHEDULER_CONFIG

# keyed_randn(0, [0], (3,), "eps")[0]: blake2b("0/0/eps") seeds torch's CPU generator; a change of
# either would silently change every run's noise (and break resuming an older run), so it is pinned
# here
GOLDEN_KEYED_RANDN = [0.863409161567688, -0.317278653383255, 1.504529595375061]


def diffusers_ddim(alphas_cumprod=None):
    scheduler = DDIMScheduler(**SD15_SCHEDULER_CONFIG)
    if alphas_cumprod is not None:  # same alpha_bar values: checks the step formula alone
        scheduler.alphas_cumprod = alphas_cumprod.clone()
        scheduler.final_alpha_cumprod = alphas_cumprod[0].clone()
    return scheduler


def random_tensors(n, dtype, shape=(3, 4, 8, 8)):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=dtype) for _ in range(n)]


def test_sd15_golden_alpha_bar_and_timesteps():
    schedule = NoiseSchedule.sd15()
    assert schedule.num_train_timesteps == 1000 and schedule.alphas_cumprod.dtype == torch.float64
    golden = {
        0: 0.99915,
        1: 0.998296,
        21: 0.98038,
        401: 0.42288,
        451: 0.34556,
        901: 0.014005,
        951: 0.0081550,
        981: 0.0057755,
        999: 0.0046601,
    }  # computed independently in float64
    for t, value in golden.items():
        assert schedule.alpha_bar(t).item() == pytest.approx(value, rel=2e-5), t
    assert schedule.alpha_bar(-1).item() == schedule.alpha_bar(0).item()  # set_alpha_to_one False
    assert schedule.ddim_timesteps(50).tolist() == list(range(981, 0, -20))
    assert schedule.ddim_timesteps(20).tolist() == list(range(951, 0, -50))
    assert schedule.prev_timestep(1, 20) == -49


def test_sd15_golden_sigma_eta1():
    schedule = NoiseSchedule.sd15()
    golden = {
        20: {951: 0.64439, 451: 0.40155, 1: 0.020648},
        50: {981: 0.45446, 481: 0.28769, 1: 0.020648},
    }
    x = torch.zeros(3, 1, 1, 1, dtype=torch.float64)
    for num_steps, values in golden.items():  # sigma_t at eta 1, computed independently (5 digits)
        t = torch.tensor(list(values))
        sigma = schedule.ddim_step(x, t, x, num_steps, eta=1.0).sigma_t
        assert sigma.flatten().tolist() == pytest.approx(list(values.values()), rel=2e-5)
        assert schedule.ddim_step(x, t, x, num_steps, eta=0.0).sigma_t.abs().max() == 0


def test_schedule_matches_diffusers():
    schedule = NoiseSchedule.sd15()
    reference = diffusers_ddim()
    assert (schedule.alphas_cumprod - reference.alphas_cumprod.double()).abs().max() <= 1e-6
    assert (
        schedule.betas - reference.betas.double()
    ).abs().max() <= 1e-8  # float32 rounding of 0.012
    for num_steps in (20, 50):
        reference.set_timesteps(num_steps)
        assert torch.equal(schedule.ddim_timesteps(num_steps), reference.timesteps)


def test_add_noise_and_x0_matches_diffusers():
    schedule = NoiseSchedule.sd15()
    x0, noise = random_tensors(2, torch.float32)
    t = torch.tensor([0, 500, 999])
    assert (
        schedule.add_noise(x0, noise, t) - diffusers_ddim().add_noise(x0, noise, t)
    ).abs().max() <= 1e-6
    x0, noise = random_tensors(2, torch.float64)
    x_t = schedule.add_noise(x0, noise, t)
    expected = diffusers_ddim(schedule.alphas_cumprod).add_noise(x0, noise, t)
    assert (x_t - expected).abs().max() <= 1e-6
    assert (
        schedule.x0_from_eps(x_t, noise, t) - x0
    ).abs().max() <= 1e-9  # Tweedie inverts Eq. 4 given eps


@pytest.mark.parametrize("num_steps", [20, 50])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_diffusers(num_steps, eta):
    schedule = NoiseSchedule.sd15()
    # x0_pred reaches ~60 at t = 981, where a float32 ulp is 4e-6, hence its looser float32
    # tolerance
    cases = (
        (torch.float64, diffusers_ddim(schedule.alphas_cumprod), 1e-6, 1e-6),
        (torch.float32, diffusers_ddim(), 5e-6, 1e-4),
    )
    for dtype, reference, tolerance, x0_tolerance in cases:
        x_t, eps_pred, noise = random_tensors(3, dtype)
        reference.set_timesteps(num_steps)
        for t in reference.timesteps:
            out = reference.step(eps_pred, t, x_t, eta=eta, variance_noise=noise if eta else None)
            batch_t = t.repeat(len(x_t))  # [B] timesteps, as training code calls it
            for ours in (
                schedule.ddim_step(eps_pred, t, x_t, num_steps, eta=eta, noise=noise),
                schedule.ddim_step(eps_pred, batch_t, x_t, num_steps, eta=eta, noise=noise),
            ):
                assert ours.x_prev.dtype == dtype
                assert (ours.x_prev - out.prev_sample).abs().max() <= tolerance, (dtype, int(t))
                assert (ours.x0_pred - out.pred_original_sample).abs().max() <= x0_tolerance


def test_ddim_step_mixes_timesteps_in_a_batch():
    schedule = NoiseSchedule.sd15()
    x_t, eps_pred, noise = random_tensors(3, torch.float64)
    t = torch.tensor([981, 481, 1])
    batched = schedule.ddim_step(eps_pred, t, x_t, 50, eta=1.0, noise=noise)
    for i in range(3):
        one = slice(i, i + 1)
        single = schedule.ddim_step(
            eps_pred[one], int(t[i]), x_t[one], 50, eta=1.0, noise=noise[one]
        )
        for name in batched._fields:  # x_prev, mean, sigma_t, x0_pred
            assert torch.allclose(
                getattr(batched, name)[i : i + 1], getattr(single, name), atol=1e-12
            )
    mean_only = schedule.ddim_step(eps_pred, t, x_t, 50, eta=1.0)  # no noise: the mean
    assert torch.equal(mean_only.x_prev, batched.mean) and torch.equal(mean_only.mean, batched.mean)
    assert torch.allclose(batched.x_prev, batched.mean + batched.sigma_t * noise, atol=1e-12)


def test_lookups_do_not_read_device_data():
    """On the meta device any .item() / host read of a value raises: the step is free of host
    syncs."""
    schedule = NoiseSchedule.sd15()
    x = torch.empty(2, 4, 8, 8, device="meta")
    t = torch.empty(2, dtype=torch.long, device="meta")
    step = schedule.ddim_step(x, t, x, 50, eta=1.0, noise=x)
    assert step.mean.shape == x.shape and step.sigma_t.shape == (2, 1, 1, 1)
    assert step.x_prev.device.type == "meta"
    # A 0-d t (sampler)
    assert schedule.ddim_step(x, t[0], x, 50, eta=1.0, noise=x).x_prev.shape == x.shape
    assert schedule.add_noise(x, x, t).device.type == "meta"


@pytest.mark.parametrize("std_shape", [(), (3, 1, 1, 1)])
def test_gaussian_log_prob_matches_torch_normal(std_shape):
    x, mean = random_tensors(2, torch.float64)
    std = (
        torch.rand(std_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.1
    )
    reference = torch.distributions.Normal(mean, std).log_prob(x)
    assert torch.allclose(
        gaussian_log_prob(x, mean, std, "sum"), reference.sum((1, 2, 3)), atol=1e-10
    )
    assert torch.allclose(
        gaussian_log_prob(x, mean, std, "mean"), reference.mean((1, 2, 3)), atol=1e-12
    )
    # "mean" is the default (DDPO / D3PO / SPO)
    assert gaussian_log_prob(x, mean, std).shape == (3,)
    with pytest.raises(ValueError, match="reduction"):
        gaussian_log_prob(x, mean, std, "max")


def test_log_prob_of_a_ddim_step_sample():
    schedule = NoiseSchedule.sd15()
    x_t, eps_pred, noise = random_tensors(3, torch.float64)
    t = torch.tensor([951, 451, 1])
    x_prev, mean, std, _ = schedule.ddim_step(eps_pred, t, x_t, 20, eta=1.0, noise=noise)
    # x_prev = mean + sigma_t z, so log p = -|z|^2/2 - D log sigma_t - D/2 log(2 pi)
    dims = 4 * 8 * 8
    expected = (
        -0.5 * noise.pow(2).sum((1, 2, 3))
        - dims * std.flatten().log()
        - dims / 2 * math.log(2 * math.pi)
    )
    assert torch.allclose(gaussian_log_prob(x_prev, mean, std, "sum"), expected, atol=1e-9)


def test_from_config_reads_a_diffusers_scheduler_config(tmp_path):
    diffusers_ddim().save_config(tmp_path)  # the scheduler_config.json of a model folder
    config = json.loads((tmp_path / "scheduler_config.json").read_text())
    schedule = NoiseSchedule.from_config(config)
    assert torch.equal(schedule.alphas_cumprod, NoiseSchedule.sd15().alphas_cumprod)
    linear = NoiseSchedule.from_config({**config, "beta_schedule": "linear", "steps_offset": 0})
    assert linear.betas[0].item() == pytest.approx(0.00085) and linear.ddim_timesteps(50)[-1] == 0
    unsupported = (
        ("prediction_type", "v_prediction"),
        ("clip_sample", True),
        ("beta_schedule", "cosine"),
    )
    for key, value in unsupported:
        with pytest.raises(ValueError, match=key):
            NoiseSchedule.from_config({**config, key: value}, source="scheduler_config.json")
    with pytest.raises(ValueError, match="num_steps"):
        schedule.ddim_timesteps(0)


def without(config: dict, *keys) -> dict:
    return {key: value for key, value in config.items() if key not in keys}


def test_from_config_without_set_alpha_to_one_and_steps_offset_follows_diffusers():
    """Issue 19.10: absent keys take diffusers' DDIMScheduler defaults (True, 0), not SD1.5's."""
    config = without(SD15_SCHEDULER_CONFIG, "set_alpha_to_one", "steps_offset")
    ours = NoiseSchedule.from_config(config)
    theirs = DDIMScheduler.from_config(config)
    theirs.set_timesteps(20)
    assert ours.final_alpha_bar.item() == theirs.final_alpha_cumprod.item() == 1.0
    assert ours.ddim_timesteps(20).tolist() == theirs.timesteps.tolist()


def test_from_config_without_betas_follows_diffusers():
    config = without(SD15_SCHEDULER_CONFIG, "beta_start", "beta_end", "beta_schedule")
    ours = NoiseSchedule.from_config(config)
    theirs = DDIMScheduler.from_config(config)
    # diffusers keeps betas and alphas_cumprod in float32 (ours: float64): at most one float32
    # rounding (2^-24 relative) per factor of the product of 1000.
    bound = 1000 * 2**-24
    ours_float32 = ours.alphas_cumprod.float()
    torch.testing.assert_close(ours_float32, theirs.alphas_cumprod, rtol=bound, atol=0)


def test_from_config_reads_an_absent_clip_sample_as_no_clipping():
    """scheduler.py deviation 2: a config without clip_sample loads (nothing here clips)."""
    config = without(SD15_SCHEDULER_CONFIG, "clip_sample")
    assert NoiseSchedule.from_config(config).final_alpha_bar.item() < 1


def test_schedule_arithmetic_is_at_least_float32():
    """Precision policy: a bf16 x_0 (or eps_pred) gives float32 x_t and DDIM steps; float64 stays
    float64."""
    schedule = NoiseSchedule.sd15()
    x0, noise = random_tensors(2, torch.float32)
    t = torch.tensor([1, 500, 999])
    x_t = schedule.add_noise(x0.bfloat16(), noise, t)
    assert x_t.dtype == torch.float32
    torch.testing.assert_close(x_t, schedule.add_noise(x0.bfloat16().float(), noise, t))
    step = schedule.ddim_step(noise.bfloat16(), t, x_t.bfloat16(), 50, eta=1.0, noise=noise)
    assert step.x_prev.dtype == step.mean.dtype == step.x0_pred.dtype == torch.float32
    assert schedule.add_noise(x0.double(), noise.double(), t).dtype == torch.float64


def test_keyed_randn_is_a_function_of_seed_position_and_stream():
    """The project's training randomness: row i depends only on (seed, positions[i], stream), never
    on the batch it is drawn in; the numbers are fixed across processes and versions (golden
    values)."""
    full = keyed_randn(3, [10, 11, 12, 13], (2, 5), "eps")
    assert full.shape == (4, 2, 5) and full.dtype == torch.float32
    # A second process's half batch
    assert torch.equal(keyed_randn(3, [12, 13], (2, 5), "eps"), full[2:])
    assert torch.equal(keyed_randn(3, [13, 10], (2, 5), "eps"), full[[3, 0]])
    for other in (keyed_randn(4, [10], (2, 5), "eps"), keyed_randn(3, [10], (2, 5), "vae_w")):
        # Another seed or stream: independent noise
        assert not torch.allclose(other[0], full[0], atol=0.1)
    golden = keyed_randn(0, [0], (3,), "eps")[0].tolist()
    assert golden == pytest.approx(GOLDEN_KEYED_RANDN, abs=1e-6)
    first = torch.randint(1000, (), generator=keyed_generator(0, 7, "t")).item()
    assert first == torch.randint(1000, (), generator=keyed_generator(0, 7, "t")).item()
