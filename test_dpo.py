"""The DPO objective and Diffusion-DPO: golden numbers (log 2 at init, a hand-computed value,
gradient signs, equality with the paper's Eq. 14 under the official scaling), the mask, and the
model-calling steps (shared noise/timestep, one forward each, keyed randomness, float32 under
autocast, step-0 identities)."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dpo
import lora
from testkit import make_tiny_sd


def test_policy_equal_to_reference_gives_log2_and_documented_accuracy():
    err_w = torch.rand(6)
    err_l = torch.rand(6)
    log_ratio_w = dpo.diffusion_log_ratio(err_w, err_w.clone())  # policy error == reference error
    log_ratio_l = dpo.diffusion_log_ratio(err_l, err_l.clone())
    loss, metrics = dpo.dpo_loss(log_ratio_w, log_ratio_l, beta=5000.0)
    assert loss.item() == torch.tensor(2.0).log().item()  # exactly log 2 (in float32)
    assert metrics["implicit_accuracy"].item() == 0.0  # official: a tie counts as wrong
    assert metrics["reward_margin"].item() == 0.0
    _, metrics = dpo.dpo_loss(log_ratio_w, log_ratio_l, 5000.0, tie_credit=0.5)
    assert metrics["implicit_accuracy"].item() == 0.5  # the diffusers convention


def test_hand_computed_value():
    # pair 1: the policy beats the reference on the winner -> logits*beta = -0.5*100*((0.10-0.12) -
    # 0) = +1 pair 2: the reference prefers the winner, the policy does not -> -0.5*100*(0 + 0.02) =
    # -1
    model_w = torch.tensor([0.10, 0.20])
    model_l = torch.tensor([0.12, 0.20])
    ref_w = torch.tensor([0.11, 0.19])
    ref_l = torch.tensor([0.11, 0.21])
    log_ratio_w = dpo.diffusion_log_ratio(model_w, ref_w)
    log_ratio_l = dpo.diffusion_log_ratio(model_l, ref_l)
    beta_logits = 100.0 * (log_ratio_w - log_ratio_l)
    torch.testing.assert_close(beta_logits, torch.tensor([1.0, -1.0]), rtol=0, atol=1e-4)
    loss, metrics = dpo.dpo_loss(log_ratio_w, log_ratio_l, beta=100.0)
    # -log sigmoid(x) = log(1 + e^-x), averaged over the two pairs
    expected = 0.5 * (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0)))
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    assert metrics["implicit_accuracy"].item() == 0.5
    assert abs(metrics["reward_margin"].item()) < 1e-5


def test_dpo_loss_metric_names():
    _, metrics = dpo.dpo_loss(torch.randn(3), torch.randn(3), beta=1.0)
    assert set(metrics) == {"loss", "implicit_accuracy", "reward_margin"}


def test_gradient_lowers_winner_error_and_raises_loser_error():
    model_w = torch.rand(4, requires_grad=True)
    model_l = torch.rand(4, requires_grad=True)
    ref_w = torch.rand(4)
    ref_l = torch.rand(4)
    log_ratio_w = dpo.diffusion_log_ratio(model_w, ref_w)
    log_ratio_l = dpo.diffusion_log_ratio(model_l, ref_l)
    loss, _ = dpo.dpo_loss(log_ratio_w, log_ratio_l, 10.0)
    loss.backward()
    assert (model_w.grad > 0).all()  # descent lowers the policy's error on the preferred image
    assert (model_l.grad < 0).all()  # ... and raises it on the dis-preferred one
    torch.testing.assert_close(model_w.grad, -model_l.grad)


def test_equals_direct_transcription_of_paper_eq14():
    """Eq. 14 with squared L2 norms (sums) and T*omega(lambda_t) = k constant equals the official
    mean-MSE loss when beta_paper * k = 0.5 * beta_code / D (D = C*H*W)."""
    g = torch.Generator().manual_seed(0)
    shape = (5, 4, 8, 8)
    D = 4 * 8 * 8
    # Separate, as in Eq. 14
    eps_w, eps_l = (
        torch.randn(shape, generator=g),
        torch.randn(shape, generator=g),
    )
    theta_w, theta_l, ref_w, ref_l = (
        eps + 0.1 * torch.randn(shape, generator=g)  # near-perfect denoisers
        for eps in (eps_w, eps_l, eps_w, eps_l)
    )
    beta_code = 5000.0
    T = 1000
    beta_paper = 2000.0
    omega = 0.5 * beta_code / (D * T * beta_paper)  # a constant weighting omega(lambda_t)

    def sq_norm(a, b):
        return (a - b).pow(2).sum(dim=(1, 2, 3))

    bracket_w = sq_norm(eps_w, theta_w) - sq_norm(eps_w, ref_w)
    bracket = bracket_w - (sq_norm(eps_l, theta_l) - sq_norm(eps_l, ref_l))
    paper = -torch.log(torch.sigmoid(-beta_paper * T * omega * bracket)).mean()

    mse = dpo.per_sample_mse
    log_ratio_w = dpo.diffusion_log_ratio(mse(theta_w, eps_w), mse(ref_w, eps_w))
    log_ratio_l = dpo.diffusion_log_ratio(mse(theta_l, eps_l), mse(ref_l, eps_l))
    ours, _ = dpo.dpo_loss(log_ratio_w, log_ratio_l, beta=beta_code)
    torch.testing.assert_close(ours, paper, rtol=1e-5, atol=1e-6)
    assert 0.05 < paper.item() < 5  # a non-degenerate value (neither saturated nor log 2)
    assert not math.isclose(paper.item(), math.log(2), rel_tol=1e-3)


def kept_and_masked_pairs():
    """Log-ratios of 6 pairs (graph through the winners'), and a mask keeping pairs 0, 2 and 5."""
    generator = torch.Generator().manual_seed(0)
    log_ratio_w = torch.randn(6, generator=generator).requires_grad_(True)
    log_ratio_l = torch.randn(6, generator=generator)
    mask = torch.tensor([1.0, 0, 1, 0, 0, 1])
    return log_ratio_w, log_ratio_l, mask


def test_masked_loss_is_the_kept_pairs_loss_sum_over_all_pairs():
    """Issue 19.1: a masked pair contributes 0 and the loss divides by the call's pair count N."""
    log_ratio_w, log_ratio_l, mask = kept_and_masked_pairs()
    kept = mask.bool()
    loss, _ = dpo.dpo_loss(log_ratio_w, log_ratio_l, 2.0, mask=mask)
    per_pair = -F.logsigmoid(2.0 * (log_ratio_w[kept] - log_ratio_l[kept]))
    torch.testing.assert_close(loss, per_pair.sum() / 6)


def test_masked_metrics_are_means_over_the_kept_pairs():
    log_ratio_w, log_ratio_l, mask = kept_and_masked_pairs()
    kept = mask.bool()
    _, metrics = dpo.dpo_loss(log_ratio_w, log_ratio_l, 2.0, mask=mask)
    _, kept_metrics = dpo.dpo_loss(log_ratio_w[kept], log_ratio_l[kept], 2.0)
    for key in ("implicit_accuracy", "reward_margin"):
        torch.testing.assert_close(metrics[key], kept_metrics[key])


def test_masked_loss_and_gradient_of_a_batch_are_the_means_of_its_halves():
    """Issue 19.1: halves with different kept counts (2 and 1), as two DDP ranks or two grad_accum
    micro-batches: the mean of their losses and gradients is the full batch's."""
    log_ratio_w, log_ratio_l, mask = kept_and_masked_pairs()
    full, _ = dpo.dpo_loss(log_ratio_w, log_ratio_l, 2.0, mask=mask)
    (full_grad,) = torch.autograd.grad(full, log_ratio_w)
    halves = [
        dpo.dpo_loss(log_ratio_w[rows], log_ratio_l[rows], 2.0, mask=mask[rows])[0]
        for rows in (slice(0, 3), slice(3, 6))
    ]
    mean_of_halves = (halves[0] + halves[1]) / 2
    (halves_grad,) = torch.autograd.grad(mean_of_halves, log_ratio_w)
    torch.testing.assert_close(mean_of_halves, full)
    torch.testing.assert_close(halves_grad, full_grad)


def test_nothing_kept_gives_0_with_a_graph():
    """DDP needs the same backward on every rank, also one whose pairs are all masked."""
    log_ratio_w, log_ratio_l, _ = kept_and_masked_pairs()
    loss, metrics = dpo.dpo_loss(log_ratio_w, log_ratio_l, 2.0, mask=torch.zeros(6))
    loss.backward()
    assert loss.item() == 0 and torch.equal(log_ratio_w.grad, torch.zeros(6))
    assert metrics["implicit_accuracy"] == 0


def test_per_sample_mse():
    eps_pred = torch.randn(3, 4, 2, 2)
    noise = torch.randn(3, 4, 2, 2)
    expected = torch.stack([((eps_pred[i] - noise[i]) ** 2).mean() for i in range(3)])
    torch.testing.assert_close(dpo.per_sample_mse(eps_pred, noise), expected)


# ---- the model-calling steps, with tiny models


class Recorder(torch.nn.Module):
    """Wraps a UNet and records every call's inputs and whether grad was enabled."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []

    def forward(self, x_t, t, context):
        grad_on = torch.is_grad_enabled()
        self.calls.append((x_t.detach().clone(), t.clone(), context.detach().clone(), grad_on))
        return self.unet(x_t, t, context)


def pixel_batch(batch_size=2, size=64, seed=3, first_position=0):
    """A batch as data.py yields it: uint8 pixels, prompts, global positions."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (2 * batch_size, 3, size, size), generator=g, dtype=torch.uint8)
    prompts = ["a cat", "a red dog", "a tree", "a blue car"][:batch_size]
    return {
        "pixels_w": pixels[:batch_size],
        "pixels_l": pixels[batch_size:],
        "prompts": prompts,
        "positions": list(range(first_position, first_position + batch_size)),
    }


def half(batch, rows):
    return {key: value[rows] for key, value in batch.items()}


class RecordedStep:
    """One dpo_train_step at init (policy == reference) with every UNet call and add_noise
    recorded."""

    def __init__(self, seed=0):
        self.sd = make_tiny_sd()
        self.reference = Recorder(copy.deepcopy(self.sd.unet).requires_grad_(False))
        self.sd.unet = Recorder(self.sd.unet)
        self.noised = []
        add_noise = self.sd.schedule.add_noise

        def recording_add_noise(x0, noise, t):
            self.noised.append((x0, noise, t))
            return add_noise(x0, noise, t)

        self.sd.schedule.add_noise = recording_add_noise
        self.batch = pixel_batch()
        self.loss, self.metrics = dpo.dpo_train_step(
            self.sd, self.reference, self.batch, 5000.0, seed
        )
        self.x_t, self.t, self.context, self.grad_on = self.sd.unet.calls[0]


def test_dpo_train_step_makes_one_policy_and_one_reference_forward():
    step = RecordedStep()
    assert len(step.sd.unet.calls) == 1 and len(step.reference.calls) == 1


def test_dpo_train_step_keeps_a_graph_only_through_the_policy():
    step = RecordedStep()
    reference_grad_on = step.reference.calls[0][3]
    assert step.grad_on and not reference_grad_on


def test_dpo_train_step_feeds_policy_and_reference_the_same_x_t_and_t():
    step = RecordedStep()
    x_t_ref, t_ref, _, _ = step.reference.calls[0]
    assert torch.equal(step.x_t, x_t_ref) and torch.equal(step.t, t_ref)


def test_dpo_train_step_stacks_winners_then_losers():
    step = RecordedStep()
    x0, _, _ = step.noised[0]
    assert step.x_t.shape == (4, 4, 8, 8)
    assert not torch.equal(x0[:2], x0[2:])  # different images: the winners, then the losers


def test_dpo_train_step_shares_t_and_eps_between_winner_and_loser():
    step = RecordedStep()
    _, noise, t = step.noised[0]
    assert torch.equal(t[:2], t[2:]) and torch.equal(noise[:2], noise[2:])  # deviation 3


def test_dpo_train_step_repeats_the_caption_for_the_loser():
    step = RecordedStep()
    assert torch.equal(step.context[:2], step.context[2:])  # deviation 5


def test_dpo_train_step_at_init_is_log2_with_accuracy_0():
    step = RecordedStep()
    assert math.isclose(step.loss.item(), math.log(2), rel_tol=1e-6)
    assert step.metrics["implicit_accuracy"].item() == 0.0  # ties count as wrong (deviation 4)


def test_dpo_train_step_metric_names():
    step = RecordedStep()
    assert set(step.metrics) == {
        "loss",
        "implicit_accuracy",
        "reward_margin",
        "model_err_w",
        "model_err_l",
        "ref_err_w",
        "ref_err_l",
    }


def test_dpo_train_step_gradient_reaches_every_policy_parameter():
    step = RecordedStep()
    step.loss.backward()
    assert all(p.grad is not None for p in step.sd.unet.parameters())


def test_dpo_train_step_same_seed_draws_the_same_x_t():
    step = RecordedStep()
    again = dpo.dpo_train_step(step.sd, step.reference, step.batch, 5000.0, seed=0)
    assert again[0].item() == step.loss.item()
    assert torch.equal(step.sd.unet.calls[1][0], step.x_t)  # exact resume


def test_dpo_train_step_another_seed_draws_another_x_t():
    step = RecordedStep()
    dpo.dpo_train_step(step.sd, step.reference, step.batch, 5000.0, seed=1)
    assert not torch.equal(step.sd.unet.calls[1][0], step.x_t)


@pytest.mark.parametrize("method", ["dpo", "sft"])
def test_two_half_batches_equal_one_full_batch(method):
    """Every draw is keyed by (seed, position): two processes with half batches see exactly the
    noise, t and VAE sample of one process with the full batch, so their mean loss (and gradient) is
    the full batch's."""
    sd = make_tiny_sd()
    policy = copy.deepcopy(sd.unet)
    with torch.no_grad():  # a policy != reference, so the loss is not log 2 everywhere
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sd.unet = policy
    reference = copy.deepcopy(make_tiny_sd().unet).requires_grad_(False)
    batch = pixel_batch(batch_size=4, first_position=100)

    def step(b):
        if method == "dpo":
            return dpo.dpo_train_step(sd, reference, b, 500.0, seed=7)
        return dpo.sft_train_step(sd, b, seed=7)

    sd.unet.zero_grad()
    full_loss, full_metrics = step(batch)
    full_loss.backward()
    full_grad = [p.grad.clone() for p in sd.unet.parameters()]
    sd.unet.zero_grad()
    halves = [step(half(batch, slice(0, 2))), step(half(batch, slice(2, 4)))]
    (sum(loss for loss, _ in halves) / 2).backward()
    torch.testing.assert_close(sum(loss for loss, _ in halves) / 2, full_loss, rtol=1e-5, atol=1e-6)
    for key, value in full_metrics.items():
        torch.testing.assert_close(sum(m[key] for _, m in halves) / 2, value, rtol=1e-5, atol=1e-6)
    grad = torch.cat([p.grad.flatten() for p in sd.unet.parameters()])
    full_grad = torch.cat([g.flatten() for g in full_grad])
    assert (
        grad - full_grad
    ).abs().max() <= 1e-4 * full_grad.abs().max()  # up to the order of float sums
    assert not math.isclose(full_loss.item(), math.log(2), rel_tol=1e-4)


def test_latents_noise_and_x_t_are_float32_under_bf16_autocast():
    """Precision policy: a bf16 VAE and text encoder, the step under torch.autocast(bf16): the VAE
    output, eps and x_t stay float32 (issue: add_noise used to cast to a bf16 latent dtype)."""
    sd = make_tiny_sd()
    sd.vae.to(torch.bfloat16)
    sd.text_encoder.to(torch.bfloat16)
    seen = {}
    add_noise = sd.schedule.add_noise

    def recording_add_noise(x0, noise, t):
        seen.update(x0=x0, noise=noise, x_t=add_noise(x0, noise, t))
        return seen["x_t"]

    sd.schedule.add_noise = recording_add_noise
    reference = copy.deepcopy(sd.unet).requires_grad_(False)
    with torch.autocast("cpu", torch.bfloat16):
        loss, _ = dpo.dpo_train_step(sd, reference, pixel_batch(), 5000.0, seed=0)
        assert sd.encode_prompts(["a cat"]).dtype == torch.float32
    assert (
        seen["x_t"].dtype == seen["x0"].dtype == seen["noise"].dtype == loss.dtype == torch.float32
    )


@pytest.mark.parametrize("autocast", [False, True])
def test_step0_with_lora_is_log2_and_accuracy_0_exactly(autocast):
    sd = make_tiny_sd()
    lora.inject_lora(sd.unet, rank=2)

    def reference(x_t, t, context):
        with lora.lora_disabled(sd.unet):
            return sd.unet(x_t, t, context)

    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss, metrics = dpo.dpo_train_step(sd, reference, pixel_batch(), 5000.0, seed=1)
    # B = 0: adapters on == adapters off, bit for bit
    assert loss.item() == torch.tensor(2.0).log().item()
    assert metrics["implicit_accuracy"].item() == 0.0 and metrics["reward_margin"].item() == 0.0
    loss.backward()
    lora_B = [m.lora_B.weight for _, m in lora._lora_modules(sd.unet)]
    assert any(w.grad.abs().max() > 0 for w in lora_B)


def test_sft_step_uses_the_winners_only():
    sd = make_tiny_sd()
    batch = pixel_batch()
    del batch["pixels_l"]  # SFT never looks at the losers
    sd.unet = Recorder(sd.unet)
    loss, metrics = dpo.sft_train_step(sd, batch, seed=2)
    assert torch.isfinite(loss) and len(sd.unet.calls) == 1 and sd.unet.calls[0][0].shape[0] == 2
    assert set(metrics) == {"loss", "model_err_w"}


def host_normalised(pixels_uint8):
    """The loader's former float path: numpy float32 / 255, then * 2 - 1 (Normalize([0.5],
    [0.5]))."""
    pixels = torch.from_numpy(pixels_uint8.numpy().astype(np.float32) / 255.0)
    return pixels * 2 - 1


def test_model_pixels_equals_the_former_host_normalisation_for_every_byte():
    every_byte = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(dpo.model_pixels(every_byte, "cpu"), host_normalised(every_byte))


def test_model_pixels_refuses_float_pixels():
    with pytest.raises(ValueError, match="uint8"):
        dpo.model_pixels(torch.zeros(1, 3, 8, 8), "cpu")


@pytest.mark.parametrize("method", ["dpo", "sft"])
def test_uint8_batch_gives_the_float_path_loss_to_the_last_bit(method, monkeypatch):
    """The same batch through the uint8 path, and through the former path (pixels normalised on the
    host as data.py did, then moved to the device): the losses are equal bit for bit."""
    sd = make_tiny_sd()
    reference = copy.deepcopy(sd.unet).requires_grad_(False)
    with torch.no_grad():  # a policy != reference, so the loss is not log 2 whatever the pixels
        for p in sd.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = pixel_batch(batch_size=3)

    def step():
        if method == "dpo":
            return dpo.dpo_train_step(sd, reference, batch, 500.0, seed=4)[0]
        return dpo.sft_train_step(sd, batch, seed=4)[0]

    uint8_loss = step()
    monkeypatch.setattr(
        dpo, "model_pixels", lambda pixels, device: host_normalised(pixels).to(device)
    )
    float_loss = step()
    assert uint8_loss.item() == float_loss.item()
    assert not math.isclose(uint8_loss.item(), math.log(2), rel_tol=1e-4)


def test_encode_images_is_the_posterior_sample_in_float32():
    sd = make_tiny_sd()
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    posterior = sd.vae.encode(pixels)
    expected = (posterior.mean + posterior.std * noise) * sd.vae.config.scaling_factor
    torch.testing.assert_close(sd.encode_images(pixels, noise), expected)
    torch.testing.assert_close(
        sd.encode_images(pixels), posterior.mean * sd.vae.config.scaling_factor
    )
    sd.vae.to(torch.bfloat16)
    with torch.autocast("cpu", torch.bfloat16):
        latents = sd.encode_images(pixels, noise)
        images = sd.decode_latents(latents)
    assert latents.dtype == images.dtype == torch.float32 and images.shape == (2, 3, 64, 64)
    # bf16 weights: close, not equal
    torch.testing.assert_close(latents, expected, rtol=0.05, atol=0.05)
