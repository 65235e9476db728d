"""Read the papers beside the code: one real step of DDIM, Diffusion-DPO and TailorPO, by equation.

    python walkthrough.py [ddim|dpo|tailorpo|all] [--model toy|PATH] [--seed 0] [--out DIR]

Each block prints an equation as its paper writes it (scheduler.py's notation) and its source; the
code line implementing it, read live from the source (by its `# Eq.` tag or a marker) so the walk
cannot drift from the code; the values on this step, from the library's own functions; the papers'
identities with residuals within float32 bounds (walkthrough_blocks.py shows a walk).
Choices where the papers and the issue are silent:
1. The policy is the model with fresh LoRA adapters (B = 0, as training starts), the reference the
   same UNet with them off: at step 0 both agree bit for bit, so the DPO loss is exactly log 2.
2. --model PATH has no preference data: the pair is two samples of --prompt ranked by --reward.
3. The DDIM and TailorPO walks stop at step --step of a rollout (default: the middle one).
"""

import functools
import math
import sys
from pathlib import Path

import torch

import dpo
import lora
import rewards
import sampler
import tailorpo
import toy
import weights
from config import ConfigError, Parser
from data import PreferencePairs, collate
from scheduler import NoiseSchedule, gaussian_log_prob, keyed_randn
from walkthrough_blocks import Walk, counted_calls, gamma, save_strip

PAIRS = 16  # candidate pairs from one x_t for the direction argument (test_tailorpo.py uses 64)
SD15_DPO = {"beta": 5000.0, "learning_rate": 1e-5, "lora_rank": 8, "lora_alpha": 8.0}  # README
SD15_ONLINE = {"learning_rate": 3e-5, "lora_rank": 8, "lora_alpha": 8.0}  # README's TailorPO-G


def lora_policy(s, rank: int, alpha: float):
    """(LoRA parameters, eps_ref): adapters as training starts (choice 1), in every walk."""
    if not hasattr(s, "lora_start"):
        torch.manual_seed(s.seed)  # the adapters' initialisation (B = 0)
        lora.inject_lora(s.sd.unet, rank, alpha)
        s.lora_start = lora.lora_state_dict(s.sd.unet)
    lora.load_lora(s.sd.unet, s.lora_start)
    s.sd.unet.zero_grad(set_to_none=True)  # no gradient left over from another walk
    adapters = [module for module in s.sd.unet.modules() if isinstance(module, lora.LoRALinear)]
    params = [p for adapter in adapters for p in (adapter.lora_A.weight, adapter.lora_B.weight)]
    def reference(x_t, t, context):  # eps_ref: the adapters off
        with torch.no_grad(), lora.lora_disabled(s.sd.unet):
            return s.sd.unet(x_t, t, context)
    return params, reference


def walk_ddim(s) -> Walk:
    sd = s.sd
    schedule = s.sd.schedule
    steps = s.tailorpo.num_steps
    eta = s.tailorpo.eta
    walk = Walk(1, f"DDIM: step {s.step} of {steps}, prompt {s.prompt!r}")
    cond = sd.encode_prompts([s.prompt])
    uncond = sd.encode_prompts([""])
    x_T = keyed_randn(s.seed, [0], (sd.unet.config.in_channels, *[sd.unet.config.sample_size] * 2),
                      "walk_x_T")
    sampled = sampler.sample(sd.unet, schedule, cond, uncond, x_T, steps, s.guidance, record=True,
                             progress=False)  # DDIM with eta = 0, every step recorded
    x_t = sampled.trajectory["x_t"][s.step]
    t = int(sampled.trajectory["timesteps"][s.step])
    eps_pred = sampler.guided_eps(sd.unet, x_t, t, cond, uncond, s.guidance)
    noise, other_noise = keyed_randn(s.seed, [0, 1], x_t.shape[1:], "walk_z").chunk(2)
    step = schedule.ddim_step(eps_pred, t, x_t, steps, eta, noise)
    t_prev = schedule.prev_timestep(t, steps)
    alpha_bar_t, alpha_bar_prev = schedule.alpha_bar(t).item(), schedule.alpha_bar(t_prev).item()
    walk.block("x0_pred, Tweedie's estimate of x_0", "DDIM Eq. 9; CFG, Ho & Salimans Eq. 6",
               "x0_pred = (x_t - sqrt(1 - alpha_bar_t) eps_pred) / sqrt(alpha_bar_t),\n"
               "eps_pred = eps_uncond + w (eps_cond - eps_uncond)   (one UNet call on both)",
               (NoiseSchedule.x0_from_eps, "# Eq. 9"), (NoiseSchedule.ddim_step, "# Eq. 9"),
               (sampler.guided_eps, "Eq. 6")) \
        .value("t | alpha_bar_t | w", (t, alpha_bar_t, s.guidance)) \
        .value("x_t | eps_pred | x0_pred", (x_t, eps_pred, step.x0_pred)) \
        .check("DDPM Eq. 4 takes (x0_pred, eps_pred) back to x_t",
               (schedule.add_noise(step.x0_pred, eps_pred, t) - x_t).abs().max(),
               gamma(8) * float(x_t.abs().max() + eps_pred.abs().max()))
    still = [schedule.ddim_step(eps_pred, t, x_t, steps, 0.0, z) for z in (noise, other_noise)]
    walk.block("sigma_t(eta)", "DDIM Eq. 16", "sigma_t(eta) = eta sqrt((1 - alpha_bar_prev) / "
               "(1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev)",
               (NoiseSchedule.ddim_step, "# Eq. 16"), (sampler.sample, "# Eq. 12, 16")) \
        .value(f"t-1 | alpha_bar_prev | sigma_t (eta {eta}, 0)",
               (t_prev, alpha_bar_prev, step.sigma_t, still[0].sigma_t)) \
        .check("eta = 0 gives sigma_t = 0", still[0].sigma_t, 0.0) \
        .check("eta = 0 is deterministic: two noises, one x_{t-1}",
               (still[0].x_prev - still[1].x_prev).abs().max(), 0.0)
    walk.block("the direction pointing to x_t, the mean and the sample", "DDIM Eq. 12",
               "direction = sqrt(1 - alpha_bar_prev - sigma_t^2) eps_pred\n"
               "x_{t-1} = sqrt(alpha_bar_prev) x0_pred + direction + sigma_t z,   z ~ N(0, I)",
               (NoiseSchedule.ddim_step, "direction = "), (NoiseSchedule.ddim_step, "sigma_t z"),
               (NoiseSchedule.ddim_step, "mean + sigma_t * noise"),
               (tailorpo.rollout_trajectory, "# Eq. 12")) \
        .value("direction | mean | z | x_{t-1}",
               (step.mean - alpha_bar_prev**0.5 * step.x0_pred, step.mean, noise, step.x_prev))
    walk.block("the transition log-prob: the policy of DDPO and TailorPO", "DDPO Sec. 4.3",
               "log p(x_{t-1} | x_t) = log N(x_{t-1}; mean, sigma_t^2 I) / D   (per dimension)",
               (gaussian_log_prob, "log_density = ")) \
        .value("log p(x_{t-1} | x_t)", gaussian_log_prob(step.x_prev, step.mean, step.sigma_t))
    return walk


def walk_dpo(s) -> Walk:
    sd = s.sd
    beta = s.dpo["beta"]
    seed = s.seed
    positions = [0]
    params, reference = lora_policy(s, s.dpo["lora_rank"], s.dpo["lora_alpha"])
    if s.toy:  # the toy's first pair, as data.py's batches carry it (uint8 pixels)
        batch = collate([PreferencePairs(s.world.pairs_folder(), s.dpo["resolution"], hflip=False,
                                         prompt_dropout=0.0, seed=seed)[0]])
    else:  # choice 2: two samples of the prompt, ranked by the reward
        images = sampler.generate(sd, [s.prompt] * 2, num_steps=s.tailorpo.num_steps,
                                  guidance=s.guidance, seed=seed, progress=False)
        pixels = (images[s.reward(images, [s.prompt] * 2).argsort(descending=True)] * 255).round()
        batch = dict(pixels_w=pixels[:1].byte(), pixels_l=pixels[1:].byte(), prompts=[s.prompt],
                     positions=positions)
    walk = Walk(2, f"Diffusion-DPO: one training step on a pair of {batch['prompts'][0]!r}")
    device = next(sd.unet.parameters()).device
    pixels = dpo.model_pixels(torch.cat([batch["pixels_w"], batch["pixels_l"]]), device)
    x_0 = dpo.keyed_latents(sd, pixels, seed, positions, ("w", "l"))
    walk.block("a preference pair and its prompt", "Diffusion-DPO Sec. 4: (c, x_0^w, x_0^l) ~ D",
               "x_0 = the VAE posterior sample of the image, keyed by (seed, pair position)",
               (dpo.keyed_latents, "encode_images")) \
        .value("prompt c", repr(batch["prompts"][0])) \
        .value("pixels_w (uint8) | x_0^w | x_0^l", (batch["pixels_w"], *x_0.chunk(2)))
    t, eps = dpo.keyed_t_and_eps(sd, x_0[:1], seed, positions)
    t = t.repeat(2)
    eps = eps.repeat(2, 1, 1, 1)  # one draw for the winner and the loser
    x_t = sd.schedule.add_noise(x_0, eps, t)
    alpha_bar_t = sd.schedule.alpha_bar(t[0]).item()
    walk.block("shared t and eps; x_t of winner and loser", "DDPM Eq. 4; dpo.py deviation 3",
               "t ~ U{0..T-1}, eps ~ N(0, I): one draw for both\n"
               "x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps",
               (dpo.dpo_train_step, "eps.repeat(2"), (NoiseSchedule.add_noise, "# Eq. 4"),
               (dpo.dpo_train_step, "DDPM Eq. 4")) \
        .value("t | alpha_bar_t", (int(t[0]), alpha_bar_t)).value("eps", eps[0]) \
        .value("x_t^w | x_t^l", tuple(x_t.chunk(2)))
    with torch.enable_grad():
        loss, m = dpo.dpo_train_step(sd, reference, batch, beta, seed)
    eps_theta = sd.unet(x_t, t, sd.encode_prompts(batch["prompts"]).repeat(2, 1, 1))
    err_theta, err_ref = [torch.stack([m[f"{k}_err_w"], m[f"{k}_err_l"]]) for k in ("model", "ref")]
    walk.block("the four denoising errors", "Diffusion-DPO Eq. 14; DDPM Eq. 14 (L_simple)",
               "err(x) = ||eps - eps_theta(x_t, t, c)||^2 / D, for theta and ref (dpo.py dev. 1);\n"
               "err_theta(w) alone is the SFT baseline's loss",
               (dpo.per_sample_mse, "pow(2)"), (dpo.sft_train_step, "# Eq. 14")) \
        .value("err_theta (w, l) | err_ref (w, l)", (err_theta, err_ref)) \
        .check("step 0: the policy is the reference", (err_theta - err_ref).abs().max(), 0)
    log_ratio = dpo.diffusion_log_ratio(err_theta, err_ref)
    logit = log_ratio[0] - log_ratio[1]
    walk.block("the log-ratios, beta and the logit", "Diffusion-DPO Eq. 14 (dpo.py 1, 2), DPO",
               "log-ratio(x) = log p_theta(x_0) / p_ref(x_0) ~ -0.5 (err_theta(x) - err_ref(x))\n"
               "logit = log-ratio_w - log-ratio_l;  beta * logit is the implicit reward margin",
               (dpo.diffusion_log_ratio, "return -0.5"), (dpo.dpo_loss, "logits = log_ratio_w")) \
        .value("log-ratio_w, _l", log_ratio).value("beta | logit", (beta, logit))
    walk.block("the loss and the implicit accuracy", "Diffusion-DPO Eq. 14; DPO Eq. 7",
               "L = -log sigmoid(beta logit);  implicit accuracy = [logit > 0]",
               (dpo.dpo_loss, "DPO Eq. 7"), (dpo.dpo_train_step, "# Eq. 14")) \
        .value("loss | implicit accuracy", (m["loss"], m["implicit_accuracy"])) \
        .check("step 0: loss = log 2", m["loss"] - math.log(2), gamma(2) * math.log(2)) \
        .check("step 0: implicit accuracy = 0 (a tie is wrong)", m["implicit_accuracy"], 0)
    loss.backward()
    torch.optim.AdamW(params, lr=s.dpo["learning_rate"]).step()
    _, after = dpo.dpo_train_step(sd, reference, batch, beta, seed)
    logit_after = (dpo.diffusion_log_ratio(after["model_err_w"], after["ref_err_w"])
                   - dpo.diffusion_log_ratio(after["model_err_l"], after["ref_err_l"]))
    walk.block("one optimizer step, and how the pair's logit moved", "train.py: AdamW on the LoRA",
               "theta <- AdamW(theta, grad_theta L);  then the same t and eps, scored again",
               (dpo.dpo_train_step, "eps_pred = sd.unet")) \
        .value("lr | logit, loss after", (s.dpo["learning_rate"], logit_after, after["loss"])) \
        .check("the step raised the logit (to first order)", (logit - logit_after).clamp(min=0), 0)
    error_maps = (eps_theta - eps).square().mean(1, keepdim=True)
    images = [*sd.decode_latents(torch.cat([x_0, x_t])), *(error_maps / error_maps.max())]
    labels = ["x_0^w", "x_0^l", f"x_t^w, t={int(t[0])}", "x_t^l", "error^w", "error^l"]
    walk.pictures.append(save_strip(s.out / "dpo.png", list(zip(labels, images))))
    return walk


def log_ratio_tolerance(x, mean_theta, mean_ref, sigma_t) -> float:
    """|closed form (float32) - difference of float64 log-probs| <= gamma_{D+6} x the mean size of
    the closed form's D terms, plus (D+6) 2^-53 x the log-probs' terms for the float64 side."""
    closed = ((2 * x - mean_theta - mean_ref) * (mean_theta - mean_ref) / (2 * sigma_t**2)).abs()
    squares = sum(((x - mean) ** 2 / (2 * sigma_t**2)).mean() for mean in (mean_theta, mean_ref))
    constants = 2 * (sigma_t.flatten()[0].log().abs() + math.log(2 * math.pi))
    float64 = (x[0].numel() + 6) * 2.0**-53 * float(squares + constants)
    return gamma(x[0].numel() + 6) * float(closed.mean()) + float64


def walk_tailorpo(s) -> Walk:
    sd = s.sd
    schedule = s.sd.schedule
    cfg = s.tailorpo
    i = s.step
    rows = [0]
    params, reference = lora_policy(s, s.online["lora_rank"], s.online["lora_alpha"])
    walk = Walk(3, f"TailorPO and TailorPO-G: step {i} of {cfg.num_steps}, prompt {s.prompt!r}")
    cond = sd.encode_prompts([s.prompt])
    uncond = sd.encode_prompts([""])
    run = tailorpo.Rollout(sd, s.reward, {"prompts": [s.prompt], "positions": [0]}, cond, uncond,
                           cfg, s.seed)
    with counted_calls(sd.unet) as rollout_calls:  # the library's rollout, all steps trained
        pairs, _ = tailorpo.rollout_tailorpo(run, guided=False)
    x_t = pairs["x_t"][pairs["t"] == run.timesteps[i]]
    t = run.timesteps[i]  # one row per step
    eps_pred = run.eps(x_t, t, rows)
    step = schedule.ddim_step(eps_pred, t, x_t, cfg.num_steps, cfg.eta)
    t_prev = schedule.prev_timestep(t, cfg.num_steps)
    sigma_t = step.sigma_t
    x_0, x_1 = (step.mean + sigma_t * run.noise(f"step{i}/{k}") for k in (0, 1))
    walk.block("x_t on a rollout, and two candidates from the same mean", "TailorPO Fig. 3",
               "x_T ~ N(0, I), DDIM steps (Eq. 12) down to x_t, then\n"
               "x^k_{t-1} = mu_theta(x_t) + sigma_t z^k, k = 0, 1: one x_t, independent noise",
               (tailorpo.rollout_tailorpo, "schedule.ddim_step("),
               (tailorpo.rollout_tailorpo, "x_1 = step.mean")) \
        .value("t | t-1 | sigma_t", (t, t_prev, sigma_t)) \
        .value("x_t | mu_theta(x_t) | x^0 | x^1", (x_t, step.mean, x_0, x_1)) \
        .check(f"tailorpo.rollout_tailorpo: {cfg.num_steps} steps, {cfg.num_steps} UNet calls",
               len(rollout_calls) - cfg.num_steps, 0)
    with counted_calls(sd.unet) as calls:
        eps_0, eps_1 = run.candidate_eps(x_0, x_1, t_prev, rows)
    reward_0, reward_1 = run.candidate_rewards(x_0, eps_0, x_1, eps_1, t_prev, rows)
    (reward_w, x_w, eps_w), (reward_l, x_l, eps_l) = tailorpo.rank_pairs(
        reward_0, reward_1, (x_0, eps_0), (x_1, eps_1))
    walk.block("x0_pred, the step-wise rewards and the ranking", "TailorPO Prop. 1, Fig. 3",
               "r_t(x_{t-1}) = r(decode(x0_pred(x_{t-1}, eps_theta(x_{t-1}, t-1))))  (DDIM Eq. 9)\n"
               "x^w_{t-1}: the candidate of higher step-wise reward;  x^l_{t-1}: the other",
               (tailorpo.step_reward, "Eq. 9"), (tailorpo.Rollout.candidate_eps, "self.eps("),
               (tailorpo.rank_pairs, "first_wins =")) \
        .value("r_t(x^0) | r_t(x^1) -> r_w | r_l", (reward_0, reward_1, reward_w, reward_l)) \
        .check("one UNet call scores both and gives the next eps_pred", len(calls) - 1, 0)
    reward_of_x = functools.partial(run.reward, eps=eps_w, t=t_prev, rows=rows)
    x_plus = tailorpo.reward_guidance(x_w, reward_of_x, sigma_t, cfg.reward_guidance)
    reward_pushed = reward_of_x(x_plus)
    walk.block("TailorPO-G: the gradient push", "TailorPO-G, Fig. 3 (our step rule)",
               "x^+ = x^w + eta_g sigma_t g / ||g||,  g = grad_x r_t(x) at x^w (eps_pred held)",
               (tailorpo.reward_guidance, "x^+_{t-1}"),
               (tailorpo.rollout_tailorpo, "reward_guidance(")) \
        .value("eta_g | x^+ - x^w", (cfg.reward_guidance, x_plus - x_w)) \
        .value("reward gap: before | after", (reward_w - reward_l, reward_pushed - reward_l)) \
        .check("the push raises the step-wise reward", (reward_w - reward_pushed).clamp(min=0), 0)
    xs = step.mean + sigma_t * keyed_randn(s.seed, range(2 * PAIRS), run.shape, "walk_pairs")
    r = run.reward(xs, run.eps(xs, t_prev, rows * 2 * PAIRS), t_prev, rows * 2 * PAIRS)
    (_, xs_w), (_, xs_l) = tailorpo.rank_pairs(r[:PAIRS], r[PAIRS:], (xs[:PAIRS],), (xs[PAIRS:],))
    with torch.enable_grad():  # d/dmu_theta of the loss on PAIRS ranked pairs that share this mean
        mean = step.mean.clone().requires_grad_(True)
        shared = (mean.expand_as(xs_w), step.mean.expand_as(xs_w), sigma_t)
        loss, _ = tailorpo.tailorpo_loss(xs_w, xs_l, *shared, cfg.beta, cfg.log_prob_reduction)
        (descent,) = torch.autograd.grad(-loss, mean)
        reward_at_mean = run.reward(mean, run.eps(mean, t_prev, rows), t_prev, rows)  # via eps too
        (reward_gradient,) = torch.autograd.grad(reward_at_mean.sum(), mean)
    inner = (descent * reward_gradient).sum()
    walk.block("the update direction", "TailorPO Sec. 3 (the paper's argument, in expectation)",
               "-dL/dmu_theta = c sum_k (x^w_k - x^l_k) / sigma_t^2, c > 0, over pairs from x_t;\n"
               "ranked by r_t, the sum aligns with grad r_t(mu_theta) to first order",
               (tailorpo.transition_log_ratio, "delta_mean =")) \
        .value(f"<-dL/dmu_theta, grad r_t> ({PAIRS} pairs)", inner) \
        .check("the update has a positive inner product with grad r_t", inner.clamp(max=0), 0)
    pair = {"x_t": x_t, "x_w": x_w, "x_l": x_l, "t": pairs["t"][pairs["t"] == t],  # this step's
            "prompt_index": torch.tensor(rows), "keep": torch.ones(1)}  # pair, as the rollout's
    with torch.enable_grad():
        loss, metrics = tailorpo.pair_loss(sd, reference, pair, cond, uncond, cfg)
        loss.backward()
    torch.optim.AdamW(params, lr=s.online["learning_rate"]).step()
    eps = [sampler.guided_eps(unet, x_t, t, cond, uncond, cfg.guidance_scale)
           for unet in (sd.unet, reference)]
    steps = [schedule.ddim_step(e, t, x_t, cfg.num_steps, cfg.eta) for e in eps]
    means = (steps[0].mean, steps[1].mean, sigma_t)  # mu_theta and mu_ref after the step
    ratios = torch.cat([tailorpo.transition_log_ratio(x, *means, cfg.log_prob_reduction)
                        for x in (x_w, x_l)])
    log_probs = [gaussian_log_prob(x.double(), mean.double(), sigma_t.double())  # in float64
                 for x in (x_w, x_l) for mean in means[:2]]
    after, _ = tailorpo.pair_loss(sd, reference, pair, cond, uncond, cfg)
    walk.block("the transition log-ratios and the loss", "TailorPO Sec. 3 (rebuilt); DPO Eq. 7",
               "log-ratio(x) = log N(x; mu_theta, sigma_t^2 I) - log N(x; mu_ref, sigma_t^2 I)\n"
               "  = <2x - mu_theta - mu_ref, mu_theta - mu_ref> / (2 sigma_t^2)   (/ D)\n"
               "L = -log sigmoid(beta (log-ratio_w - log-ratio_l))",
               (tailorpo.transition_log_ratio, "x[0].numel()"),
               (tailorpo.tailorpo_loss, "dpo_loss(")) \
        .value("beta | loss at step 0", (cfg.beta, metrics["loss"])) \
        .value("log-ratio_w, _l after a step", ratios).value("loss after the step", after) \
        .check("step 0: loss = log 2", metrics["loss"] - math.log(2), gamma(2) * math.log(2)) \
        .check("closed form = difference of scheduler.gaussian_log_prob",
               (ratios - torch.cat(log_probs[::2]) + torch.cat(log_probs[1::2])).abs().max(),
               max(log_ratio_tolerance(x, *means) for x in (x_w, x_l)))
    x = torch.cat([x_w, x_l])
    eps = torch.cat([eps_w, eps_l])
    for j in range(i + 1, cfg.num_steps):  # both to x_0 with the same noise (common random numbers)
        t_j = run.timesteps[j]
        noise = run.noise(f"step{j}/0").repeat(2, 1, 1, 1)
        x = schedule.ddim_step(eps, t_j, x, cfg.num_steps, cfg.eta, noise).x_prev
        eps = run.eps(x, schedule.prev_timestep(t_j, cfg.num_steps), rows * 2)
    final = run.reward(x, None, -1, rows * 2)
    walk.block("the next state and, beside it, the trajectory-level label", "TailorPO Fig. 3, 1(a)",
               "x_{t-1} = x^w (TailorPO) or x^+ (TailorPO-G), with its eps_pred;\n"
               "the baseline labels every step by r(x_0) of the trajectories' final images",
               (tailorpo.rollout_tailorpo, "torch.where(loser_next, x_l, x_w)"),
               (tailorpo.rollout_trajectory, "final_reward = rollout.reward")) \
        .value("r(x_0) after x^w | after x^l", (final[0], final[1])) \
        .value("the baseline's label here", "x^w" if final[0] >= final[1] else "x^l (reversed)")
    eps_candidates = torch.cat([eps_w, eps_l, eps_w])  # x^+ with eps_pred held, as in the push
    candidates = schedule.x0_from_eps(torch.cat([x_w, x_l, x_plus]), eps_candidates, t_prev)
    images = sd.decode_latents(torch.cat([schedule.x0_from_eps(x_t, eps_pred, t), candidates]))
    named = (("x^w", reward_w), ("x^l", reward_l), ("x^+", reward_pushed))
    labels = [f"x0_pred(x_t) t={t}"] + [f"x0_pred({n}) r={r.item():.3f}" for n, r in named]
    walk.pictures.append(save_strip(s.out / "tailorpo.png", list(zip(labels, images))))
    return walk


WALKS = {"ddim": walk_ddim, "dpo": walk_dpo, "tailorpo": walk_tailorpo}


def settings(argv: list[str]):
    """The options, checked before any model is built: a bad one raises ConfigError, one line."""
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument("walk", nargs="?", default="all", choices=(*WALKS, "all"))
    parser.add_argument("--model", default=toy.MODEL, help="toy, or SD1.5 weights (path, hub id)")
    parser.add_argument("--prompt", help="the prompt (toy: its first training prompt)")
    parser.add_argument("--reward", choices=list(rewards.REWARDS), help="TailorPO's, which also "
                        "ranks an SD1.5 DPO pair (default: the toy's reward model; saturation)")
    parser.add_argument("--seed", type=int, default=0, help="every draw is keyed by it")
    parser.add_argument("--step", type=int, help="the walked DDIM step (default: the middle one)")
    parser.add_argument("--guidance", type=float, default=7.5, help="CFG scale of the DDIM walk")
    parser.add_argument("--out", default="out/walkthrough", help="the pictures' folder")
    s = parser.parse_args(argv)
    s.toy = s.model == toy.MODEL
    s.out = Path(s.out)
    s.dpo = SD15_DPO
    s.online = SD15_ONLINE
    if s.toy:  # the toy door: its train.py defaults are the walks' settings
        s.world = toy.world()
        s.dpo = s.world.defaults["dpo"]
        s.online = s.world.defaults["tailorpo"]
    s.prompt = s.prompt or (s.world.prompts[0] if s.toy else "a photo of a cat")
    fields = {key.split(".")[1]: v for key, v in s.online.items() if key.startswith("tailorpo.")}
    s.tailorpo = tailorpo.TailorPOConfig(**fields)
    s.step = s.tailorpo.num_steps // 2 if s.step is None else s.step
    if not 0 <= s.step < s.tailorpo.num_steps:
        raise ConfigError(f"--step must be in [0, {s.tailorpo.num_steps}), got {s.step}")
    return s


def main(argv: list[str]) -> list[Walk]:
    """Run and print the walks that argv names; returns them (test_walkthrough reads them)."""
    s = settings(argv)
    try:
        s.sd = s.world.load_model() if s.toy else weights.load_stable_diffusion(s.model)
    except weights.CheckpointError as error:
        accepted = f"{toy.MODEL}, or SD1.5: a diffusers folder, .safetensors/.ckpt, hub id"
        raise ConfigError(f"--model {s.model}: {error} (it takes {accepted})") from None
    toy_reward = s.toy and s.reward is None
    s.reward = s.world.reward() if toy_reward else rewards.get_reward(s.reward or "saturation")
    with torch.no_grad():  # the walks turn gradients on where they train or take gradients
        walks = [WALKS[name](s) for name in (WALKS if s.walk == "all" else (s.walk,))]
    for walk in walks:
        walk.show()
    checks = [ok for walk in walks for block in walk for *_, ok in block.checks]
    print(f"\n{sum(checks)} of {len(checks)} identity checks passed")
    return walks


if __name__ == "__main__":
    try:
        results = main(sys.argv[1:])
    except ConfigError as error:
        raise SystemExit(f"walkthrough.py: {error}") from None
    failed = [b.number for walk in results for b in walk if not all(c[-1] for c in b.checks)]
    sys.exit(f"walkthrough.py: checks failed in blocks {failed}" if failed else 0)
