"""Tests of tailorpo.py: the shared-mean identity, the gradient-direction argument, TailorPO-G's
guidance, the UNet-call floor, keyed randomness, precision, config validation, masked pairs and
short CPU runs of the three methods (tiny random SD models, weight-free rewards)."""

import copy
import json
import math
import os
from functools import partial
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import tailorpo
from rewards import get_reward
from sampler import guided_eps
from scheduler import NoiseSchedule, gaussian_log_prob
from tailorpo import TailorPOConfig, step_reward
from testkit import UNetCallCounter, make_tiny_sd

PROMPTS = ["a cat", "a dog", "a red car", "a tree"]
BATCH = {"prompts": PROMPTS, "positions": [0, 1, 2, 3]}
LATENT = 4  # 4x4 latents -> 32x32 images through the tiny VAE: the rollouts stay cheap on CPU


def rollout(sd, cfg, reward, batch=BATCH, seed=0, method="tailorpo"):
    """(pairs, metrics) of one rollout of `method` on `batch`."""
    with torch.no_grad():
        cond = sd.encode_prompts(batch["prompts"])
        uncond = sd.encode_prompts([""])
    run = tailorpo.Rollout(sd, reward, batch, cond, uncond, cfg, seed)
    if method == "trajectory":
        return tailorpo.rollout_trajectory(run)
    return tailorpo.rollout_tailorpo(run, guided=method == "tailorpo-g")


def random_pair(num_pairs, shape=(4, 3, 5), seed=0):
    """Random float64 x_w, x_l, mean_theta, mean_ref [N, *shape] and sigma_t [N, 1, 1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x_w, x_l, mean_theta, mean_ref = torch.randn(
        4, num_pairs, *shape, generator=g, dtype=torch.float64
    )
    sigma_t = 0.05 + torch.rand(num_pairs, 1, 1, 1, generator=g, dtype=torch.float64)
    return x_w, x_l, mean_theta, mean_ref, sigma_t


# --------------------------------------------------------------------------------------------------
# The loss


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_shared_mean_identity_equals_the_four_log_prob_logit(reduction):
    x_w, x_l, mean_theta, mean_ref, sigma_t = random_pair(16)
    beta = 3.0

    def log_p(x, mean):
        # scheduler.py's density, constants included
        return gaussian_log_prob(x, mean, sigma_t, reduction)

    log_ratio_w = log_p(x_w, mean_theta) - log_p(x_w, mean_ref)
    log_ratio_l = log_p(x_l, mean_theta) - log_p(x_l, mean_ref)
    explicit = beta * (log_ratio_w - log_ratio_l)  # the four-log-prob DPO logit
    dims = x_w[0].numel() if reduction == "mean" else 1
    closed_form = (
        beta * ((x_w - x_l) * (mean_theta - mean_ref) / sigma_t**2).flatten(1).sum(1) / dims
    )
    ours = beta * (
        tailorpo.transition_log_ratio(x_w, mean_theta, mean_ref, sigma_t, reduction)
        - tailorpo.transition_log_ratio(x_l, mean_theta, mean_ref, sigma_t, reduction)
    )
    assert explicit.abs().max() > 1  # a non-trivial logit
    torch.testing.assert_close(closed_form, explicit, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours, explicit, atol=1e-6, rtol=0)
    loss, metrics = tailorpo.tailorpo_loss(x_w, x_l, mean_theta, mean_ref, sigma_t, beta, reduction)
    torch.testing.assert_close(loss, -F.logsigmoid(explicit).mean(), atol=1e-6, rtol=0)
    assert metrics["implicit_accuracy"] == (explicit > 0).double().mean()
    assert set(metrics) == {"loss", "implicit_accuracy", "reward_margin"}  # dpo.dpo_loss's names


def test_identity_through_eps_with_c_t():
    """mu_theta - mu_ref = c_t (eps_theta - eps_ref) for the DDIM eta=1 step."""
    schedule = NoiseSchedule.sd15()
    num_steps = 20
    t = schedule.ddim_timesteps(num_steps)[[0, 10, 19]]  # 951, 451, 1
    g = torch.Generator().manual_seed(1)
    x_t, eps_theta, eps_ref, x_w, x_l = torch.randn(5, 3, 4, 2, 2, generator=g, dtype=torch.float64)
    _, mean_theta, sigma_t, _ = schedule.ddim_step(eps_theta, t, x_t, num_steps, eta=1.0)
    mean_ref = schedule.ddim_step(eps_ref, t, x_t, num_steps, eta=1.0).mean
    alpha_bar_t = schedule.alpha_bar(t)
    alpha_bar_prev = schedule.alpha_bar(t - 50)
    c_t = (1 - alpha_bar_prev - sigma_t.flatten() ** 2).sqrt() - (
        alpha_bar_prev / alpha_bar_t
    ).sqrt() * (1 - alpha_bar_t).sqrt()
    assert (c_t < 0).all() and abs(c_t[0].item() + 0.55) < 0.02  # about -0.55 at t=951 (20 steps)
    via_eps = c_t * ((x_w - x_l) * (eps_theta - eps_ref)).flatten(1).sum(1) / sigma_t.flatten() ** 2
    via_mean = tailorpo.transition_log_ratio(
        x_w, mean_theta, mean_ref, sigma_t, "sum"
    ) - tailorpo.transition_log_ratio(x_l, mean_theta, mean_ref, sigma_t, "sum")
    torch.testing.assert_close(via_mean, via_eps, atol=1e-6, rtol=1e-9)


def test_loss_at_initialisation_and_its_gradient():
    """theta == ref: loss = log 2, accuracy 0 (ties count as wrong), and
    d loss / d mu_theta = -beta/2 (x_w - x_l) / (N sigma_t^2 D): the policy mean moves along
    x_w - x_l."""
    x_w, x_l, mean, _, sigma_t = random_pair(8)
    mean_theta = mean.clone().requires_grad_(True)
    loss, metrics = tailorpo.tailorpo_loss(x_w, x_l, mean_theta, mean, sigma_t, beta=10.0)
    assert abs(loss.item() - math.log(2)) < 1e-12 and metrics["implicit_accuracy"] == 0
    loss.backward()
    expected = -10.0 / 2 * (x_w - x_l) / (8 * sigma_t**2 * x_w[0].numel())
    torch.testing.assert_close(mean_theta.grad, expected, atol=1e-12, rtol=1e-9)


def test_ratio_clipping_matches_d3po_spo():
    x_w, x_l, mean_theta, noise, sigma_t = random_pair(32)
    # Log-ratios of order 0.1: some ratios clipped, some not
    mean_ref = mean_theta + 0.5 * sigma_t**2 * noise
    log_ratio_w = tailorpo.transition_log_ratio(x_w, mean_theta, mean_ref, sigma_t)
    log_ratio_l = tailorpo.transition_log_ratio(x_l, mean_theta, mean_ref, sigma_t)
    # D3PO / SPO: clamp(exp(logp - logp_ref), 1 -+ eps)
    ratio_w = torch.exp(log_ratio_w).clamp(0.9, 1.1)
    ratio_l = torch.exp(log_ratio_l).clamp(0.9, 1.1)
    expected = -F.logsigmoid(2.0 * (ratio_w.log() - ratio_l.log())).mean()
    clipped = (torch.cat([log_ratio_w, log_ratio_l]).exp() - 1).abs() > 0.1
    assert clipped.any() and not clipped.all()
    loss, _ = tailorpo.tailorpo_loss(
        x_w, x_l, mean_theta, mean_ref, sigma_t, beta=2.0, clip_ratio=0.1
    )
    torch.testing.assert_close(loss, expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(eta=0.0), "eta must be > 0"),
        (dict(log_prob_reduction="Mean"), "log_prob_reduction must be 'mean' or 'sum', got 'Mean'"),
        (dict(next_state="Random"), "next_state must be 'preferred' or 'random', got 'Random'"),
        (
            dict(num_steps=10, train_start_step=50),
            r"train_start_step must be in \[0, num_steps=10\)",
        ),
        (dict(beta=0.0), "beta must be > 0"),
        (dict(clip_ratio=1.0), r"clip_ratio must be in \[0, 1\)"),
        (dict(steps_per_rollout=-1), "steps_per_rollout must be >= 0"),
    ],
)
def test_config_validation_names_the_field_and_allowed_values(fields, message):
    with pytest.raises(ValueError, match=message):
        TailorPOConfig(**fields)
    cfg = TailorPOConfig()  # a config layer sets fields after construction, then re-validates
    for name, value in fields.items():
        setattr(cfg, name, value)
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_method_errors():
    sd = make_tiny_sd()
    with pytest.raises(ValueError, match="method must be one of"):
        tailorpo.train_step(
            sd, sd.unet, BATCH, get_reward("brightness"), TailorPOConfig(), 0, "d3po"
        )
    with pytest.raises(ValueError, match="needs a differentiable reward"):
        tailorpo.train_step(
            sd,
            sd.unet,
            BATCH,
            get_reward("jpeg_compressibility"),
            TailorPOConfig(),
            0,
            "tailorpo-g",
        )


# --------------------------------------------------------------------------------------------------
# The step-wise reward and the ranking


def test_step_reward_scores_the_decoded_tweedie_estimate():
    """step_reward(x, eps_pred, t) = r(decode(x0_pred)), x0_pred = (x - sqrt(1 - alpha_bar_t)
    eps_pred) / sqrt(alpha_bar_t) (DDIM Eq. 9), written here from the schedule's alpha_bar_t
    table."""
    sd = make_tiny_sd()
    reward = get_reward("brightness")
    x, eps_pred = torch.randn(2, 3, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(5))
    t = 451
    alpha_bar_t = sd.schedule.alphas_cumprod[t].item()
    x0_pred = (x - math.sqrt(1 - alpha_bar_t) * eps_pred) / math.sqrt(alpha_bar_t)
    with torch.no_grad():
        expected = reward(sd.decode_latents(x0_pred), PROMPTS[:3])
        ours = step_reward(sd, reward, x, eps_pred, t, PROMPTS[:3])
    # Both roundings of x0_pred agree to a few float32 ulps (|x0_pred| < 10: ~1e-6), which the tiny
    # decoder and the mean brightness carry through with a gain of order 1.
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_step_reward_after_the_final_step_scores_the_sample_itself():
    sd = make_tiny_sd()
    reward = get_reward("brightness")
    x = torch.randn(3, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = reward(sd.decode_latents(x), PROMPTS[:3])
        assert torch.equal(step_reward(sd, reward, x, None, -1, PROMPTS[:3]), expected)


def test_step_reward_is_float32_under_a_bf16_autocast():
    sd = make_tiny_sd()
    sd.vae.to(torch.bfloat16)

    def bf16_reward(images, prompts):
        return images.mean(dim=(1, 2, 3)).to(torch.bfloat16)

    x = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        eps_pred = torch.zeros_like(x)
        assert step_reward(sd, bf16_reward, x, eps_pred, 451, PROMPTS[:2]).dtype == torch.float32


def test_rank_pairs_prefers_the_higher_reward():
    reward_0 = torch.tensor([0.3, 0.9])
    reward_1 = torch.tensor([0.5, 0.1])
    (reward_w,), (reward_l,) = tailorpo.rank_pairs(reward_0, reward_1, (), ())
    assert torch.equal(reward_w, torch.tensor([0.5, 0.9]))
    assert torch.equal(reward_l, torch.tensor([0.3, 0.1]))


def test_rank_pairs_gives_a_tie_to_candidate_0():
    reward = torch.tensor([0.5, 0.5])
    candidate_0 = torch.zeros(2, 4, 2, 2)
    candidate_1 = torch.ones(2, 4, 2, 2)
    (_, winner), (_, loser) = tailorpo.rank_pairs(
        reward, reward.clone(), (candidate_0,), (candidate_1,)
    )
    assert torch.equal(winner, candidate_0) and torch.equal(loser, candidate_1)


def test_rank_pairs_moves_every_tensor_of_a_candidate_with_it():
    reward_0 = torch.tensor([1.0, 0.0, 2.0])
    reward_1 = torch.tensor([0.0, 1.0, 3.0])
    x_0, x_1, eps_0, eps_1 = torch.randn(4, 3, 4, 2, 2, generator=torch.Generator().manual_seed(8))
    winner, loser = tailorpo.rank_pairs(reward_0, reward_1, (x_0, eps_0), (x_1, eps_1))
    first_wins = [True, False, False]
    for row, first in enumerate(first_wins):
        assert torch.equal(winner[1][row], (x_0 if first else x_1)[row])
        assert torch.equal(winner[2][row], (eps_0 if first else eps_1)[row])
        assert torch.equal(loser[1][row], (x_1 if first else x_0)[row])
        assert torch.equal(loser[2][row], (eps_1 if first else eps_0)[row])


# --------------------------------------------------------------------------------------------------
# The paper's arguments on a tiny model


def test_gradient_direction_follows_the_step_wise_reward():
    """The paper's gradient-direction argument: pairs drawn from the same x_t and ranked by
    step-wise reward give an update whose inner product with the gradient of the expected step-wise
    reward at x_t is positive (first order: E_z r(mu_theta(x_t) + sigma_t z) ~ r(mu_theta(x_t)));
    the same pairs flipped give a negative one. The policy is a perturbed copy of the reference so
    that theta != ref (the flipped case is then not just the negation)."""
    sd = make_tiny_sd()
    reference = copy.deepcopy(sd.unet).requires_grad_(False)
    with torch.no_grad():
        for p in sd.unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    reward = get_reward("brightness")
    schedule = sd.schedule
    num_steps = 5
    pairs = 64
    t = int(schedule.ddim_timesteps(num_steps)[2])
    t_prev = schedule.prev_timestep(t, num_steps)
    with torch.no_grad():
        cond = sd.encode_prompts(["a cat"]).expand(pairs, -1, -1)
        uncond = sd.encode_prompts([""])
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 4, LATENT, LATENT, generator=generator).expand(pairs, -1, -1, -1)

    def step_wise(
        x,
    ):  # r(decode(x0_pred(x))), eps from the frozen reference: a fixed scorer, differentiable
        eps = guided_eps(reference, x, t_prev, cond[: len(x)], uncond, 5.0)
        return step_reward(sd, reward, x, eps, t_prev, ["a cat"] * len(x))

    def mean_theta():
        return schedule.ddim_step(
            guided_eps(sd.unet, x_t, t, cond, uncond, 5.0), t, x_t, num_steps, 1.0
        )[1:3]

    with torch.no_grad():
        mean, sigma_t = mean_theta()
        eps_ref = guided_eps(reference, x_t, t, cond, uncond, 5.0)
        mean_ref = schedule.ddim_step(eps_ref, t, x_t, num_steps, 1.0).mean
        x_0, x_1 = mean + sigma_t * torch.randn(
            2, *mean.shape, generator=torch.Generator().manual_seed(1)
        )
        first_wins = (step_wise(x_0) >= step_wise(x_1)).view(-1, 1, 1, 1)
        x_w = torch.where(first_wins, x_0, x_1)
        x_l = torch.where(first_wins, x_1, x_0)
    params = list(sd.unet.parameters())
    reward_grad = torch.autograd.grad(step_wise(mean_theta()[0][:1]).sum(), params)

    def update_dot_reward_grad(x_w, x_l):  # <-grad_theta L, grad_theta r(mu_theta(x_t))>
        loss, _ = tailorpo.tailorpo_loss(x_w, x_l, mean_theta()[0], mean_ref, sigma_t, beta=10.0)
        return -sum(
            (g * r).sum() for g, r in zip(torch.autograd.grad(loss, params), reward_grad)
        ).item()

    assert update_dot_reward_grad(x_w, x_l) > 0
    assert update_dot_reward_grad(x_l, x_w) < 0
    # and a small SGD step on the TailorPO loss does raise the step-wise reward at x_t
    before = step_wise(mean[:1]).item()
    loss, _ = tailorpo.tailorpo_loss(x_w, x_l, mean_theta()[0], mean_ref, sigma_t, beta=10.0)
    grads = torch.autograd.grad(loss, params)
    grad_norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(1e-3 * g / grad_norm)
        assert step_wise(mean_theta()[0][:1]).item() > before


@pytest.mark.parametrize("final_step", [False, True])
def test_reward_guidance_widens_the_gap(final_step):
    """TailorPO-G: x^+ scores higher than x^w, and the gain grows with the step size (first order:
    step sigma_t ||g||, linear for small steps). At the final step the sample itself is scored."""
    sd = make_tiny_sd()
    reward = get_reward("saturation")
    t_prev = -1 if final_step else int(sd.schedule.ddim_timesteps(5)[1])
    x_w = torch.randn(6, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cond = sd.encode_prompts(PROMPTS[:2] * 3)
        uncond = sd.encode_prompts([""])
        # Held fixed
        eps_w = None if final_step else guided_eps(sd.unet, x_w, t_prev, cond, uncond, 5.0)
    reward_of_x = partial(
        step_reward, sd, reward, eps_pred=eps_w, t=t_prev, prompts=PROMPTS[:2] * 3
    )
    sigma_t = 0.3
    with torch.no_grad():
        base = reward_of_x(x_w)
    with torch.enable_grad():
        x = x_w.clone().requires_grad_(True)
        g_norm = torch.autograd.grad(reward_of_x(x).sum(), x)[0].flatten(1).norm(dim=1)
    gains = []
    for step in (0.01, 0.02, 0.04):
        with torch.no_grad():
            gains.append(
                reward_of_x(tailorpo.reward_guidance(x_w, reward_of_x, sigma_t, step)) - base
            )
    assert (gains[0] > 0).all() and (gains[1] > gains[0]).all() and (gains[2] > gains[1]).all()
    torch.testing.assert_close(gains[0], 0.01 * sigma_t * g_norm, rtol=0.1, atol=0)  # first order


@pytest.mark.parametrize("method", tailorpo.METHODS)
def test_unet_calls_per_trained_step_are_the_floor(method):
    """Rollout: one CFG call per step (x_T, then the two candidates together), plus one per guided
    step before the last for TailorPO-G. Loss: ONE policy call and ONE reference call for all
    trained steps together."""
    sd = make_tiny_sd()
    reference = copy.deepcopy(sd.unet).requires_grad_(False)
    # Steps 1, 2, 3 trained
    cfg = TailorPOConfig(num_steps=4, train_start_step=1, latent_size=LATENT)
    batch = len(PROMPTS)
    trained = 3
    with torch.no_grad():
        cond = sd.encode_prompts(PROMPTS)
        uncond = sd.encode_prompts([""])
    with UNetCallCounter(sd.unet) as rollout_calls:
        pairs, _ = rollout(sd, cfg, get_reward("brightness"), method=method)
    guided_calls = trained - 1 if method == "tailorpo-g" else 0  # no call after the final step
    assert rollout_calls.calls == cfg.num_steps + guided_calls
    assert len(pairs["t"]) == trained * batch
    with UNetCallCounter(sd.unet) as policy, UNetCallCounter(reference) as ref:
        loss, _ = tailorpo.pair_loss(sd, reference, pairs, cond, uncond, cfg)
    states = 2 if method == "trajectory" else 1  # trajectory pairs start from two different x_t
    assert (policy.calls, ref.calls) == (1, 1)
    assert policy.rows == ref.rows == 2 * states * trained * batch  # x2: [uncond; cond]
    assert loss.requires_grad


def test_trained_step_subsets_and_random_next_state():
    sd = make_tiny_sd()
    reward = get_reward("brightness")
    cfg = TailorPOConfig(num_steps=4, steps_per_rollout=2, next_state="random", latent_size=LATENT)
    pairs, metrics = rollout(sd, cfg, reward)
    assert len(pairs["t"]) == 2 * len(PROMPTS)  # each prompt trains its own 2 steps
    for row in range(len(PROMPTS)):
        assert len(pairs["t"][pairs["prompt_index"] == row].unique()) == 2
    assert len(pairs["t"].unique()) > 2  # ... not all the same ones (keyed by position)
    assert (pairs["x_w"] != pairs["x_l"]).any() and metrics["reward_gap"] >= 0
    assert pairs["x_t"].dtype == pairs["x_w"].dtype == torch.float32


@pytest.mark.parametrize("method", tailorpo.METHODS)
def test_pairs_below_the_gap_are_masked_with_the_same_forwards_and_keys(method):
    """DDP: a rank whose pairs all fall below min_reward_gap still runs the same policy forward and
    backward (the all-reduce happens) and reports the same metric keys; its loss is 0."""
    sd = make_tiny_sd()
    reference = copy.deepcopy(sd.unet).requires_grad_(False)
    with torch.no_grad():
        for p in sd.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    reward = get_reward("saturation")
    results = []
    for gap in (0.0, 1e9):
        cfg = TailorPOConfig(num_steps=3, min_reward_gap=gap, latent_size=LATENT)
        with UNetCallCounter(sd.unet) as counter:
            loss, metrics = tailorpo.train_step(sd, reference, BATCH, reward, cfg, 0, method)
        sd.unet.zero_grad()
        loss.backward()
        grads = [p.grad for p in sd.unet.parameters()]
        results.append((counter.calls, counter.rows, set(metrics), loss, metrics, grads))
    (calls, rows, keys, loss, metrics, _), (calls_0, rows_0, keys_0, loss_0, metrics_0, grads_0) = (
        results
    )
    assert (calls, rows, keys) == (calls_0, rows_0, keys_0)
    assert metrics["pairs_kept"] == 1 and metrics_0["pairs_kept"] == 0
    assert loss.item() > 0 and loss_0.item() == 0 and metrics_0["implicit_accuracy"] == 0
    assert all(g is not None and g.abs().max() == 0 for g in grads_0)


@pytest.mark.parametrize("method", tailorpo.METHODS)
def test_two_half_batches_equal_one_full_batch(method):
    """Every draw of a prompt's rollout is keyed by (seed, position): two processes with half the
    prompts roll out exactly what one process with all of them does, so the mean of their losses is
    the full loss."""
    sd = make_tiny_sd()
    reference = copy.deepcopy(sd.unet).requires_grad_(False)
    with torch.no_grad():
        for p in sd.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = TailorPOConfig(num_steps=3, steps_per_rollout=2, next_state="random", latent_size=LATENT)
    reward = get_reward("saturation")
    batch = {"prompts": PROMPTS, "positions": [40, 41, 42, 43]}
    full_loss, full_metrics = tailorpo.train_step(sd, reference, batch, reward, cfg, 5, method)
    halves = [
        tailorpo.train_step(
            sd,
            reference,
            {key: value[rows] for key, value in batch.items()},
            reward,
            cfg,
            5,
            method,
        )
        for rows in (slice(0, 2), slice(2, 4))
    ]
    torch.testing.assert_close(sum(loss for loss, _ in halves) / 2, full_loss, rtol=1e-4, atol=1e-6)
    for key in ("reward_w", "reward_l", "final_reward", "implicit_accuracy", "reward_margin"):
        mean_of_halves = sum(m[key] for _, m in halves) / 2
        torch.testing.assert_close(mean_of_halves, full_metrics[key], rtol=1e-4, atol=1e-6)
    assert not math.isclose(full_loss.item(), math.log(2), rel_tol=1e-4)


def test_rollout_and_rewards_in_float32_under_bf16_autocast():
    """Precision policy: under torch.autocast(bf16) the rollout latents stay float32, and the
    step-wise reward sees float32 images with autocast off."""
    sd = make_tiny_sd()
    sd.vae.to(torch.bfloat16)
    brightness = get_reward("brightness")
    seen = []

    def reward(images, prompts):
        seen.append((images.dtype, torch.is_autocast_enabled("cpu")))
        return brightness(images, prompts)

    reward.differentiable = True
    cfg = TailorPOConfig(num_steps=2, latent_size=LATENT)
    with torch.autocast("cpu", torch.bfloat16):
        pairs, _ = rollout(sd, cfg, reward, method="tailorpo-g")
    assert all(pairs[key].dtype == torch.float32 for key in ("x_t", "x_w", "x_l"))
    assert seen and set(seen) == {(torch.float32, False)}


# --------------------------------------------------------------------------------------------------
# Short CPU runs: the mean final reward of fresh samples rises


def short_run(model_dir, out_dir, method, seed=0, steps=4):
    """train.py's loop on the tiny SD folder: full fine-tune, brightness reward; train.py logs the
    mean reward of the same fresh samples (fixed seeds) at step 0 and at the end. Returns the
    metrics.jsonl rows."""
    import train

    # The claim is read from the eval_reward rows; the end-of-run base-vs-aligned report (80
    # images of 50 DDIM steps) is train.py's, tested there.
    with mock.patch.object(train, "final_report", return_value=None):
        train.main(
            [
                f"--model={model_dir}",
                f"--method={method}",
                "--reward=brightness",
                f"--max_steps={steps}",
                "--batch_size=4",
                "--lora_rank=0",
                "--learning_rate=1e-3",
                "--weight_decay=0",
                "--tailorpo.num_steps=5",
                f"--eval_every={steps}",
                "--eval_prompts=8",
                f"--out_dir={out_dir}",
                f"--seed={seed}",
            ]
        )
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


@pytest.mark.parametrize("method", tailorpo.METHODS)
def test_short_cpu_run_raises_the_reward_of_fresh_samples(tiny_sd_dir, tmp_path, method):
    rows = short_run(tiny_sd_dir, tmp_path, method)
    eval_rewards = [row["eval_reward"] for row in rows if "eval_reward" in row]
    assert eval_rewards[-1] > eval_rewards[0], f"{method}: fresh-sample reward {eval_rewards}"
    steps = [row for row in rows if "loss" in row]
    assert all(row["reward_gap"] >= 0 for row in steps)  # pairs are ranked by reward
    if method == "tailorpo-g":
        assert sum(row["guidance_gap"] for row in steps) > 0
