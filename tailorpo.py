"""TailorPO and TailorPO-G (Ren et al. 2025, arXiv 2502.01667v1), and the trajectory-level baseline.

Online DPO for the policy p_theta(x_{t-1} | x_t) = N(mu_theta(x_t), sigma_t^2 I), the DDIM step with eta > 0.
Trajectory-level methods (D3PO, Figure 1(a)) label EVERY step of two trajectories with the preference of
their final images, though the steps start from different states. TailorPO (Figure 1(b), 3), at each step t:
  1. draws two samples x^0_{t-1}, x^1_{t-1} from the SAME x_t (same mean mu(x_t), independent noise);
  2. ranks them by the step-wise reward r(decode(x0_pred(x_{t-1}))) (Proposition 1, step_reward);
  3. TailorPO-G: moves the preferred sample along the reward gradient (x^+_{t-1}) to widen the reward gap;
  4. applies DPO (dpo.dpo_loss, Rafailov et al. Eq. 7) to the single transition (our reconstruction):
       L = -log sigmoid(beta [log-ratio(x^w) - log-ratio(x^l)]), log-ratio = log p_theta(.|x_t) - log p_ref
  5. continues the rollout from the preferred sample.
x^w, x^l share x_t: the logit is <x^w - x^l, mu_theta - mu_ref> / sigma_t^2, so the update moves mu_theta
along x^w - x^l, aligned with the reward gradient to first order (the paper's argument; test_tailorpo).

Deviations from the paper / peer code (hyperparameter choices: beside each TailorPOConfig field):
  1. Log-probs use the per-dimension mean (DDPO/D3PO/SPO); the paper's convention is not in our copy.
  2. Candidates are scored with the policy's eps_pred at (x_{t-1}, t-1), the next step's call anyway (SPO).
  3. The trajectory baseline is D3PO's pairs with this file's loss (with clip_ratio=0.1: D3PO's loss).
  4. final_reward (the rollout's own final sample) is biased upward for TailorPO: compare fresh samples.
  5. Every draw of a prompt's rollout (x_T, candidate noise, trained steps, next_state coin) is keyed by
     (seed, its global position) (scheduler.keyed_randn): N processes equal one with an N x batch.
  6. Pairs below min_reward_gap are masked in the loss, not dropped: every call runs the same forwards (DDP).
"""

import math
from dataclasses import dataclass
from functools import partial

import torch

from config import opt
from dpo import dpo_loss
from sampler import guided_eps
from scheduler import keyed_generator, keyed_randn

METHODS = ("tailorpo", "tailorpo-g", "trajectory")


@dataclass
class TailorPOConfig:
    num_steps: int = opt(20, "DDIM steps of the rollout (D3PO, SPO)")
    guidance_scale: float = opt(5.0, "CFG of the rollout and inside the log-probs' eps_pred (D3PO, SPO)")
    eta: float = opt(1.0, "DDIM eta of the rollout; > 0, since sigma_t = 0 has no density")
    train_start_step: int = opt(0, "earlier steps are rolled out without pairs (D3PO: 0; SPO skips 4 of 20)")
    # A memory knob: all trained steps are stacked into ONE loss batch, so the graph grows with their number.
    steps_per_rollout: int = opt(0, "0: train every step from train_start_step; k: a random k per prompt")
    # SPO's beta, for "mean" log-probs; "sum" (the exact density) makes the logit D = C*h*w times larger.
    beta: float = opt(10.0, "DPO beta on the transition log-ratio (scale of log_prob_reduction)")
    log_prob_reduction: str = opt("mean", "log-prob over C*h*w: mean (DDPO/D3PO/SPO) or sum (exact density)",
                                  choices=("mean", "sum"))
    # On mean log-probs LoRA updates rarely reach a ratio of 1.1, and the sigmoid already bounds the step.
    clip_ratio: float = opt(0.0, "0: off; eps > 0 clamps exp(log-ratio) to [1-eps, 1+eps] (D3PO/SPO: 0.1)")
    # The noise's component along g/||g|| is N(0, sigma_t^2), so eta_g = 1 adds about the first-order reward
    # gap of two candidates (~1.13 sigma_t ||g||); log p(x^+|x_t) moves O(1) nats of D.
    reward_guidance: float = opt(1.0, "TailorPO-G eta_g: the guidance step is eta_g sigma_t along grad r")
    next_state: str = opt("preferred", "which sample continues: preferred (Figure 3) or random (SPO)",
                          choices=("preferred", "random"))
    min_reward_gap: float = opt(0.0, "pairs with r_w - r_l below this do not count (SPO: 0.3, softmax)")
    latent_size: int = opt(0, "0: the UNet's config.sample_size (64 for SD1.5, 512 px images)")

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise ValueError naming the first bad field and its allowed values (call again after edits)."""
        checks = [("num_steps", self.num_steps >= 1, ">= 1"), ("eta", self.eta > 0, "> 0 (else sigma_t = 0)"),
                  ("train_start_step", 0 <= self.train_start_step < self.num_steps,
                   f"in [0, num_steps={self.num_steps})"),
                  ("log_prob_reduction", self.log_prob_reduction in ("mean", "sum"), "'mean' or 'sum'"),
                  ("next_state", self.next_state in ("preferred", "random"), "'preferred' or 'random'"),
                  ("clip_ratio", 0 <= self.clip_ratio < 1, "in [0, 1)"), ("beta", self.beta > 0, "> 0")]
        checks += [(name, getattr(self, name) >= 0, ">= 0") for name in (
            "guidance_scale", "steps_per_rollout", "reward_guidance", "min_reward_gap", "latent_size")]
        for name, ok, values in checks:
            if not ok:
                raise ValueError(f"{name} must be {values}, got {getattr(self, name)!r}")


# ---- The loss (pure functions: no model calls)


def transition_log_ratio(x, mean_theta, mean_ref, sigma_t, reduction: str = "mean") -> torch.Tensor:
    """log p_theta(x | x_t) - log p_ref(x | x_t) [N] for Gaussians sharing sigma_t, constants cancelled:
    <2x - mu_theta - mu_ref, mu_theta - mu_ref> / (2 sigma_t^2) ("sum"; "mean" divides by D = C*h*w).
    Shape: x (a sample x_{t-1}), mean_theta, mean_ref (mu(x_t) of the two models) [N, C, h, w]; sigma_t
    broadcastable to x. Only the means carry gradients (DDPO's prev_sample.detach()).
    """
    delta_mean = mean_theta - mean_ref
    log_ratio = ((2 * x.detach() - mean_theta - mean_ref) * delta_mean / (2 * sigma_t**2)).flatten(1).sum(1)
    return log_ratio / x[0].numel() if reduction == "mean" else log_ratio


def tailorpo_loss(x_w, x_l, mean_theta, mean_ref, sigma_t, beta: float = 10.0, reduction: str = "mean",
                  clip_ratio: float = 0.0, mask=None):
    """DPO on transitions: dpo_loss of transition log-ratios. Returns (loss 0-d, metrics).
    Shape: x_w, x_l [N, C, h, w], the preferred / dis-preferred x_{t-1} (x_w may be TailorPO-G's x^+).
    Shape: mean_theta (with graph), mean_ref [N, C, h, w]; sigma_t [N, 1, 1, 1]. Each may instead be a tuple
        (the winner's, the loser's) when the two samples start from different states (trajectory baseline).
    clip_ratio: as TailorPOConfig's (a clamped ratio passes no gradient); mask [N]: as dpo_loss.
    """
    shared = [v if isinstance(v, tuple) else (v, v) for v in (mean_theta, mean_ref, sigma_t)]
    log_ratios = [transition_log_ratio(x, *args, reduction) for x, *args in zip((x_w, x_l), *shared)]
    if clip_ratio > 0:
        log_ratios = [r.clamp(math.log(1 - clip_ratio), math.log(1 + clip_ratio)) for r in log_ratios]
    return dpo_loss(*log_ratios, beta, mask=mask)


def reward_guidance(x, reward_of_x, sigma_t, step: float) -> torch.Tensor:
    """TailorPO-G: x^+ = x + step * sigma_t * g / ||g||, g = grad_x reward_of_x(x) per sample (Figure 3).
    x: [B, C, h, w]; reward_of_x: [B, C, h, w] -> [B], differentiable; sigma_t broadcastable to x."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(reward_of_x(x).sum(), x)  # images scored independently: per-sample grads
    g_norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.ndim - 1))
    return (x + step * sigma_t * g / g_norm).detach()  # x^+_{t-1} of Figure 3 (our step rule)


# ---- Rollouts (no grad): collect the training pairs


def step_reward(sd, reward_fn, x, eps_pred, t: int, prompts) -> torch.Tensor:
    """Step-wise reward r(decode(x0_pred(x))) [B] float32 of samples x at t (Proposition 1 bounds its gap to
    E[r(x_0) | x]). t < 0: x is the final sample, scored itself. Differentiable in x (TailorPO-G)."""
    x0_pred = x if t < 0 else sd.schedule.x0_from_eps(x, eps_pred, t)  # DDIM Eq. 9 (Tweedie)
    with torch.autocast(x.device.type, enabled=False):  # rewards in fp32 whatever the caller's autocast
        return reward_fn(sd.decode_latents(x0_pred.float()), prompts).float()


def rank_pairs(reward_0, reward_1):
    """Indices of the preferred / dis-preferred candidate in cat([candidates_0, candidates_1]), [n] each, for
    rewards [n] of candidates 0 and 1; a tie goes to candidate 0."""
    rows = torch.arange(len(reward_0), device=reward_0.device)
    first_wins = reward_0 >= reward_1
    return torch.where(first_wins, rows, rows + len(rows)), torch.where(first_wins, rows + len(rows), rows)


def trained_rows(cfg: TailorPOConfig, seed: int, positions) -> list[list[int]]:
    """Per rollout step, the batch rows that train it: each prompt draws its own steps (deviation 5)."""
    steps = torch.arange(cfg.train_start_step, cfg.num_steps)
    k = cfg.steps_per_rollout if 0 < cfg.steps_per_rollout < len(steps) else len(steps)
    chosen = [set(steps[torch.randperm(len(steps), generator=keyed_generator(seed, p, "trained_steps"))[:k]]
                  .tolist()) for p in positions]
    return [[row for row, mine in enumerate(chosen) if i in mine] for i in range(cfg.num_steps)]


class Rollout:
    """What both rollouts share: timesteps, trained rows, keyed noise, the policy's eps_pred, step rewards."""

    def __init__(self, sd, reward_fn, batch: dict, cond, uncond, cfg: TailorPOConfig, seed: int):
        self.sd, self.reward_fn, self.cond, self.uncond, self.cfg = sd, reward_fn, cond, uncond, cfg
        self.seed, self.prompts, self.positions = seed, batch["prompts"], batch["positions"]
        size, self.rows = cfg.latent_size or sd.unet.config.sample_size, list(range(len(cond)))
        self.shape = (sd.unet.config.in_channels, size, size)
        self.timesteps = sd.schedule.ddim_timesteps(cfg.num_steps).tolist()
        self.trained = trained_rows(cfg, seed, self.positions)

    def noise(self, stream: str, rows=None) -> torch.Tensor:  # N(0, I) [len(rows), C, h, w], keyed
        positions = [self.positions[row] for row in (self.rows if rows is None else rows)]
        return keyed_randn(self.seed, positions, self.shape, stream, self.cond.device)

    def eps(self, x, t: int, rows):  # zeros after the final step (t < 0), where no eps_pred is needed
        unet, guidance = self.sd.unet, self.cfg.guidance_scale
        return guided_eps(unet, x, t, self.cond[rows], self.uncond, guidance) if t >= 0 else 0 * x

    def reward(self, x, eps, t: int, rows):
        return step_reward(self.sd, self.reward_fn, x, eps, t, [self.prompts[row] for row in rows])


def rollout_metrics(reward_w, reward_l, guidance_gap, keep, final_reward) -> dict:
    values = dict(reward_w=reward_w, reward_l=reward_l, reward_gap=reward_w - reward_l,
                  guidance_gap=guidance_gap, pairs_kept=keep, final_reward=final_reward)
    return {key: value.mean() for key, value in values.items()}


@torch.no_grad()
def rollout_tailorpo(rollout: Rollout, guided: bool):
    """TailorPO rollout (Figure 3). Returns (pairs, metrics): pairs "x_t", "x_w", "x_l" [N, C, h, w], "t",
    "prompt_index", "keep" [N], one row per trained (step, prompt), ordered step by step."""
    schedule, cfg, rows_all = rollout.sd.schedule, rollout.cfg, rollout.rows
    x = rollout.noise("x_T")
    eps = rollout.eps(x, rollout.timesteps[0], rows_all)
    pairs, logs = [], []
    for i, t in enumerate(rollout.timesteps):
        t_prev, rows = schedule.prev_timestep(t, cfg.num_steps), rollout.trained[i]  # < 0 after the last step
        step = schedule.ddim_step(eps, t, x, cfg.num_steps, cfg.eta, rollout.noise(f"step{i}/0"))  # Eq. 12
        if not rows:  # nobody trains this step: a plain DDIM step
            x, eps = step.x_prev, rollout.eps(step.x_prev, t_prev, rows_all)
            continue
        # 1. the trained prompts' second sample from the same x_t: same mean, independent noise (DDIM Eq. 12)
        x_all = torch.cat([step.x_prev, step.mean[rows] + step.sigma_t * rollout.noise(f"step{i}/1", rows)])
        # 2. ONE UNet call on every prompt's sample 0 and these: it scores them and is the next eps_pred
        eps_all = rollout.eps(x_all, t_prev, rows_all + rows)
        pair = rows + list(range(len(rows_all), len(x_all)))  # in x_all: candidates 0, then candidates 1
        x_pair, eps_pair = x_all[pair], eps_all[pair]
        reward = rollout.reward(x_pair, eps_pair, t_prev, rows * 2)
        # 3. rank
        index_w, index_l = rank_pairs(*reward.chunk(2))
        x_w, x_l, eps_w, eps_l = x_pair[index_w], x_pair[index_l], eps_pair[index_w], eps_pair[index_l]
        reward_w, reward_l = reward[index_w], reward[index_l]
        reward_plus = reward_w
        # 4. TailorPO-G: push the preferred sample up the reward, eps_pred held fixed (no UNet backward)
        if guided:
            reward_of_x = partial(rollout.reward, eps=eps_w, t=t_prev, rows=rows)
            x_w = reward_guidance(x_w, reward_of_x, step.sigma_t, cfg.reward_guidance)
            eps_w = rollout.eps(x_w, t_prev, rows)
            reward_plus = rollout.reward(x_w, eps_w, t_prev, rows)
        keep, index = (reward_w - reward_l >= cfg.min_reward_gap).float(), torch.tensor(rows, device=x.device)
        pairs.append({"x_t": x[rows], "x_w": x_w, "x_l": x_l, "t": torch.full_like(index, t),
                      "prompt_index": index, "keep": keep})
        logs.append(torch.stack([reward_w, reward_l, reward_plus - reward_w, keep]))
        # 5. the next state: the preferred sample (Figure 3), or either one by a keyed fair coin (SPO)
        coins = [cfg.next_state == "random" and bool(torch.rand((), generator=keyed_generator(
            rollout.seed, rollout.positions[row], f"coin{i}")) < 0.5) for row in rows]
        loser_next = torch.tensor(coins, device=x.device).view(-1, 1, 1, 1)
        x, eps = step.x_prev.clone(), eps_all[: len(rows_all)].clone()  # the others continue from sample 0
        x[rows], eps[rows] = torch.where(loser_next, x_l, x_w), torch.where(loser_next, eps_l, eps_w)
    final_reward = rollout.reward(x, None, -1, rows_all)
    pairs = {key: torch.cat([p[key] for p in pairs]) for key in pairs[0]}
    return pairs, rollout_metrics(*torch.cat(logs, dim=1), final_reward)


@torch.no_grad()
def rollout_trajectory(rollout: Rollout):
    """The trajectory baseline (Figure 1(a), deviation 3): two trajectories from one x_T; their final rewards
    label EVERY trained step. Returns (pairs, metrics) as rollout_tailorpo, with states "x_t_w", "x_t_l"."""
    schedule, cfg, rows_all = rollout.sd.schedule, rollout.cfg, rollout.rows
    x = rollout.noise("x_T").repeat(2, 1, 1, 1)  # [2B]: trajectory 0, then 1, from the same x_T
    recorded = []
    for i, t in enumerate(rollout.timesteps):
        eps = rollout.eps(x, t, rows_all * 2)
        noise = torch.cat([rollout.noise(f"step{i}/0"), rollout.noise(f"step{i}/1")])
        x_prev = schedule.ddim_step(eps, t, x, cfg.num_steps, cfg.eta, noise).x_prev  # Eq. 12 (DDIM)
        if rollout.trained[i]:
            recorded.append((x, x_prev, t, rollout.trained[i]))
        x = x_prev
    final_reward = rollout.reward(x, None, -1, rows_all * 2)  # [2B], the final images
    index_w, index_l = rank_pairs(*final_reward.chunk(2))
    reward_w, reward_l = final_reward[index_w], final_reward[index_l]
    keep = (reward_w - reward_l >= cfg.min_reward_gap).float()
    parts = [{"x_t_w": x_t[index_w[rows]], "x_t_l": x_t[index_l[rows]], "x_w": x_prev[index_w[rows]],
              "x_l": x_prev[index_l[rows]], "t": torch.full((len(rows),), t, device=x.device),
              "prompt_index": torch.tensor(rows, device=x.device), "keep": keep[rows]}
             for x_t, x_prev, t, rows in recorded]
    pairs = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    return pairs, rollout_metrics(reward_w, reward_l, torch.zeros_like(reward_w), keep, final_reward)


# ---- The train.py plug-in


def pair_loss(sd, reference_unet, pairs, cond, uncond, cfg: TailorPOConfig):
    """The loss on all collected pairs: ONE policy call (with graph), ONE reference call, all steps stacked.
    TailorPO pairs share x_t ("x_t"); trajectory pairs ("x_t_w", "x_t_l") need both states in that call."""
    shared = "x_t" in pairs
    x_t = pairs["x_t"] if shared else torch.cat([pairs["x_t_w"], pairs["x_t_l"]])
    t, rows = (pairs[key].repeat(1 if shared else 2) for key in ("t", "prompt_index"))
    eps_theta = guided_eps(sd.unet, x_t, t, cond[rows], uncond, cfg.guidance_scale)
    with torch.no_grad():
        eps_ref = guided_eps(reference_unet, x_t, t, cond[rows], uncond, cfg.guidance_scale)
    theta, ref = (sd.schedule.ddim_step(eps, t, x_t, cfg.num_steps, cfg.eta) for eps in (eps_theta, eps_ref))
    means_and_std = [v if shared else tuple(v.chunk(2)) for v in (theta.mean, ref.mean, theta.sigma_t)]
    return tailorpo_loss(pairs["x_w"], pairs["x_l"], *means_and_std, cfg.beta, cfg.log_prob_reduction,
                         cfg.clip_ratio, pairs["keep"])


def train_step(sd, reference_unet, batch: dict, reward_fn, cfg: TailorPOConfig, seed: int,
               method: str = "tailorpo"):
    """One online step: roll out without grad, then (loss with graph, metrics of dpo_loss, rollout_metrics).
    batch: {"prompts": list[str], "positions": list[int]}; reference_unet(x_t, t, context) -> eps_pred;
    reward_fn(images [B,3,H,W] in [0,1], prompts) -> [B], with .differentiable for tailorpo-g."""
    if method not in METHODS:
        raise ValueError(f"tailorpo.train_step: method must be one of {METHODS}, got {method!r}")
    if method == "tailorpo-g" and not getattr(reward_fn, "differentiable", False):
        raise ValueError("tailorpo-g needs a differentiable reward for its gradient guidance; this reward is "
                         "not (use --method tailorpo, or a differentiable --reward)")
    with torch.no_grad():
        cond, uncond = sd.encode_prompts(list(batch["prompts"])), sd.encode_prompts([""])
    run = Rollout(sd, reward_fn, batch, cond, uncond, cfg, seed)
    guided = method == "tailorpo-g"
    pairs, metrics = rollout_trajectory(run) if method == "trajectory" else rollout_tailorpo(run, guided)
    loss, loss_metrics = pair_loss(sd, reference_unet, pairs, cond, uncond, cfg)
    return loss, {**metrics, **loss_metrics}
