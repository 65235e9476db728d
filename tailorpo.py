"""TailorPO and TailorPO-G (Ren et al. 2025, arXiv 2502.01667v1), and the trajectory baseline.

Online DPO for the policy p_theta(x_{t-1} | x_t) = N(mu_theta(x_t), sigma_t^2 I), the DDIM step
with eta > 0. Trajectory-level methods (D3PO, Figure 1(a)) label EVERY step of two trajectories
with the preference of their final images, though the steps start from different states.
TailorPO (Figure 1(b) and Figure 3), at each step t:
  1. draws two samples x^0_{t-1}, x^1_{t-1} from the SAME x_t: the same mean mu(x_t),
     independent noise;
  2. ranks them by the step-wise reward r(decode(x0_pred(x_{t-1}))) (Proposition 1, step_reward);
  3. TailorPO-G: moves the preferred sample along the reward gradient (x^+_{t-1}) to widen the gap;
  4. applies DPO (dpo.dpo_loss, Rafailov et al. Eq. 7) to the single transition (our
     reconstruction): L = -log sigmoid(beta [log-ratio(x^w) - log-ratio(x^l)]), where
     log-ratio = log p_theta(. | x_t) - log p_ref(. | x_t);
  5. continues the rollout from the preferred sample.
x^w and x^l share x_t, so the logit is <x^w - x^l, mu_theta - mu_ref> / sigma_t^2: the update
moves mu_theta along x^w - x^l, aligned with the reward gradient to first order (the paper's
argument, checked in test_tailorpo).

Deviations from the paper and peer code (hyperparameter choices: beside each TailorPOConfig field):
  1. Log-probs use the per-dimension mean (DDPO/D3PO/SPO); the paper's convention is not in our
     copy.
  2. Candidates are scored with the policy's eps_pred at (x_{t-1}, t-1), which the next step needs
     anyway (SPO).
  3. The trajectory baseline is D3PO's pairs with this file's loss (with clip_ratio=0.1: D3PO's).
  4. final_reward (the rollout's own final sample) is biased upward for TailorPO: compare fresh
     samples.
  5. Every draw of a prompt's rollout (x_T, candidate noise, trained steps, next_state coin) is
     keyed by (seed, its global position) (scheduler.keyed_randn): N processes equal one with an
     N x batch.
  6. Pairs below min_reward_gap are masked in the loss, not dropped: every call runs the same
     forwards, as DDP needs. The loss divides by the call's pair count, kept or not, so ranks and
     micro-batches average exactly (dpo.py says why); the metrics are kept-pair means.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from config import opt
from dpo import dpo_loss
from sampler import guided_eps
from scheduler import keyed_generator, keyed_randn
from stable_diffusion import StableDiffusion

METHODS = ("tailorpo", "tailorpo-g", "trajectory")


@dataclass
class TailorPOConfig:
    num_steps: int = opt(20, "DDIM steps of the rollout (D3PO, SPO)")
    guidance_scale: float = opt(
        5.0, "CFG of the rollout and inside the log-probs' eps_pred (D3PO, SPO)")
    eta: float = opt(1.0, "DDIM eta of the rollout; > 0, since sigma_t = 0 has no density")
    train_start_step: int = opt(
        0, "earlier steps are rolled out without pairs (D3PO: 0; SPO skips 4 of 20)")
    # A memory knob: all trained steps are stacked into ONE loss batch, so the graph grows with
    # their number.
    steps_per_rollout: int = opt(
        0, "0: train every step from train_start_step; k: a random k per prompt")
    # SPO's beta, for "mean" log-probs; "sum" (the exact density) makes the logit D = C*h*w times
    # larger.
    beta: float = opt(10.0, "DPO beta on the transition log-ratio (scale of log_prob_reduction)")
    log_prob_reduction: str = opt(
        "mean", "log-prob over C*h*w: mean (DDPO/D3PO/SPO) or sum (exact density)",
        choices=("mean", "sum"))
    # On mean log-probs LoRA updates rarely reach a ratio of 1.1, and the sigmoid already bounds the
    # step.
    clip_ratio: float = opt(
        0.0, "0: off; eps > 0 clamps exp(log-ratio) to [1-eps, 1+eps] (D3PO/SPO: 0.1)")
    # The noise's component along g/||g|| is N(0, sigma_t^2), so eta_g = 1 adds about the
    # first-order reward gap of two candidates (~1.13 sigma_t ||g||); log p(x^+|x_t) moves O(1)
    # nats of D.
    reward_guidance: float = opt(
        1.0, "TailorPO-G eta_g: the guidance step is eta_g sigma_t along grad r")
    next_state: str = opt(
        "preferred", "which sample continues: preferred (Figure 3) or random (SPO)",
        choices=("preferred", "random"))
    min_reward_gap: float = opt(
        0.0, "pairs with r_w - r_l below this do not count (SPO: 0.3, softmax)")
    latent_size: int = opt(0, "0: the UNet's config.sample_size (64 for SD1.5, 512 px images)")

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise ValueError naming the first bad field and its allowed values (call again after
        edits)."""
        checks = [
            ("num_steps", self.num_steps >= 1, ">= 1"),
            ("eta", self.eta > 0, "> 0 (else sigma_t = 0)"),
            ("train_start_step", 0 <= self.train_start_step < self.num_steps,
             f"in [0, num_steps={self.num_steps})"),
            ("log_prob_reduction", self.log_prob_reduction in ("mean", "sum"), "'mean' or 'sum'"),
            ("next_state", self.next_state in ("preferred", "random"), "'preferred' or 'random'"),
            ("clip_ratio", 0 <= self.clip_ratio < 1, "in [0, 1)"),
            ("beta", self.beta > 0, "> 0"),
        ]
        non_negative = ("guidance_scale", "steps_per_rollout", "reward_guidance", "min_reward_gap",
                        "latent_size")
        checks += [(name, getattr(self, name) >= 0, ">= 0") for name in non_negative]
        for name, ok, values in checks:
            if not ok:
                raise ValueError(f"{name} must be {values}, got {getattr(self, name)!r}")


# ---- The loss (pure functions: no model calls)


def transition_log_ratio(x, mean_theta, mean_ref, sigma_t, reduction: str = "mean") -> torch.Tensor:
    """log p_theta(x | x_t) - log p_ref(x | x_t) [N] for Gaussians sharing sigma_t, constants
    cancelled: <2x - mu_theta - mu_ref, mu_theta - mu_ref> / (2 sigma_t^2) ("sum"; "mean" divides
    by D = C*h*w).

    Shape: x (a sample x_{t-1}), mean_theta, mean_ref (mu(x_t) of the two models) [N, C, h, w];
    sigma_t broadcastable to x. Only the means carry gradients (DDPO's prev_sample.detach()).
    """
    delta_mean = mean_theta - mean_ref
    per_element = (2 * x.detach() - mean_theta - mean_ref) * delta_mean / (2 * sigma_t**2)
    log_ratio = per_element.flatten(1).sum(1)
    if reduction == "mean":
        return log_ratio / x[0].numel()
    return log_ratio


def tailorpo_loss(x_w, x_l, mean_theta, mean_ref, sigma_t, beta: float = 10.0,
                  reduction: str = "mean", clip_ratio: float = 0.0, mask=None):
    """DPO on transitions: dpo_loss of transition log-ratios. Returns (loss 0-d, metrics).

    Shape: x_w, x_l [N, C, h, w], the preferred / dis-preferred x_{t-1} (x_w may be TailorPO-G's
        x^+).
    Shape: mean_theta (with graph), mean_ref [N, C, h, w]; sigma_t [N, 1, 1, 1]. Each may instead
        be a tuple (the winner's, the loser's) when the two samples start from different states
        (the trajectory baseline).
    clip_ratio: as TailorPOConfig's (a clamped ratio passes no gradient); mask [N]: as dpo_loss.
    """
    shared = [v if isinstance(v, tuple) else (v, v) for v in (mean_theta, mean_ref, sigma_t)]
    samples = (x_w, x_l)
    log_ratios = [transition_log_ratio(x, *args, reduction) for x, *args in zip(samples, *shared)]
    if clip_ratio > 0:
        low = math.log(1 - clip_ratio)
        high = math.log(1 + clip_ratio)
        log_ratios = [log_ratio.clamp(low, high) for log_ratio in log_ratios]
    return dpo_loss(*log_ratios, beta, mask=mask)


def reward_guidance(x, reward_of_x, sigma_t, step: float) -> torch.Tensor:
    """TailorPO-G (Figure 3): x^+ = x + step * sigma_t * g / ||g||, g = grad_x reward_of_x(x) per
    sample.

    x: [B, C, h, w]; reward_of_x: [B, C, h, w] -> [B], differentiable; sigma_t broadcastable to x.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        # The images are scored independently, so the gradient of the sum is each sample's gradient.
        (g,) = torch.autograd.grad(reward_of_x(x).sum(), x)
    g_norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.ndim - 1))
    return (x + step * sigma_t * g / g_norm).detach()  # x^+_{t-1} of Figure 3 (our step rule)


# ---- Rollouts (no grad): collect the training pairs


def step_reward(sd, reward_fn, x, eps_pred, t: int, prompts) -> torch.Tensor:
    """The step-wise reward r(decode(x0_pred(x))) [B] float32 of samples x at t (Proposition 1
    bounds its gap to E[r(x_0) | x]). t < 0: x is the final sample, scored itself.
    Differentiable in x (TailorPO-G)."""
    if t < 0:
        x0_pred = x
    else:
        x0_pred = sd.schedule.x0_from_eps(x, eps_pred, t)  # DDIM Eq. 9 (Tweedie)
    # Rewards in float32, whatever the caller's autocast.
    with torch.autocast(x.device.type, enabled=False):
        return reward_fn(sd.decode_latents(x0_pred.float()), prompts).float()


def rank_pairs(reward_0, reward_1, candidate_0: tuple, candidate_1: tuple):
    """Per pair, the preferred and the dis-preferred candidate by reward; a tie goes to candidate 0.

    reward_0, reward_1 [n]: the rewards of candidates 0 and 1. candidate_k: a tuple of tensors
    [n, ...] that belong to candidate k (its sample, its eps_pred, ...).
    Returns (winner, loser), each a tuple (reward [n], *the candidate's tensors, in the same order).
    """
    first_wins = reward_0 >= reward_1  # a tie goes to candidate 0
    winner = []
    loser = []
    for value_0, value_1 in zip((reward_0, *candidate_0), (reward_1, *candidate_1)):
        first_wins_here = first_wins.view(-1, *[1] * (value_0.ndim - 1))
        winner.append(torch.where(first_wins_here, value_0, value_1))
        loser.append(torch.where(first_wins_here, value_1, value_0))
    return tuple(winner), tuple(loser)


def trained_rows(cfg: TailorPOConfig, seed: int, positions) -> list[list[int]]:
    """Per rollout step, the batch rows that train it: each prompt draws its own steps
    (deviation 5)."""
    steps = torch.arange(cfg.train_start_step, cfg.num_steps)
    k = len(steps)
    if 0 < cfg.steps_per_rollout < len(steps):
        k = cfg.steps_per_rollout
    chosen = []
    for position in positions:
        generator = keyed_generator(seed, position, "trained_steps")
        chosen.append(set(steps[torch.randperm(len(steps), generator=generator)[:k]].tolist()))
    return [[row for row, mine in enumerate(chosen) if i in mine] for i in range(cfg.num_steps)]


@dataclass(eq=False)
class Rollout:
    """What both rollouts share: the timesteps, the trained rows, keyed noise, the policy's
    eps_pred and the step-wise rewards of a batch of prompts."""

    sd: StableDiffusion
    reward_fn: Callable  # reward_fn(images [B, 3, H, W] in [0, 1], prompts) -> [B]
    batch: dict  # {"prompts": list[str], "positions": list[int]}
    cond: torch.Tensor  # the prompts' text conditioning [B, 77, D]
    uncond: torch.Tensor  # the empty prompt's [1, 77, D]
    cfg: TailorPOConfig
    seed: int

    def __post_init__(self):
        self.prompts = self.batch["prompts"]
        self.positions = self.batch["positions"]
        self.rows = list(range(len(self.cond)))  # every prompt of the batch
        size = self.cfg.latent_size or self.sd.unet.config.sample_size
        self.shape = (self.sd.unet.config.in_channels, size, size)
        self.timesteps = self.sd.schedule.ddim_timesteps(self.cfg.num_steps).tolist()
        self.trained = trained_rows(self.cfg, self.seed, self.positions)

    def noise(self, stream: str, rows=None) -> torch.Tensor:
        """N(0, I) [len(rows), C, h, w] (every row by default), keyed by (seed, position,
        stream)."""
        positions = [self.positions[row] for row in (self.rows if rows is None else rows)]
        return keyed_randn(self.seed, positions, self.shape, stream, self.cond.device)

    def eps(self, x, t: int, rows):
        """The policy's guided eps_pred at (x, t) for prompts `rows`; zeros after the final step
        (t < 0), where nothing needs it."""
        if t < 0:
            return 0 * x
        return guided_eps(self.sd.unet, x, t, self.cond[rows], self.uncond, self.cfg.guidance_scale)

    def reward(self, x, eps, t: int, rows):
        """step_reward of samples x at t for prompts `rows`."""
        return step_reward(self.sd, self.reward_fn, x, eps, t, [self.prompts[row] for row in rows])

    def candidate_eps(self, x_0, x_1, t_prev: int, rows):
        """eps_pred at (x_{t-1}, t-1) of candidate 0 of every prompt, x_0 [B], and of candidate 1
        of the trained prompts `rows`, x_1 [len(rows)]: (eps_0 [B], eps_1 [len(rows)]).

        ONE UNet call on both serves twice: the step-wise rewards need eps_pred at the candidates,
        and the candidate that continues needs it as the next step's eps_pred. This keeps the
        rollout at the floor of one (CFG) UNet call per step, where scoring separately would cost
        a second one.
        """
        eps = self.eps(torch.cat([x_0, x_1]), t_prev, self.rows + rows)
        return eps[: len(x_0)], eps[len(x_0):]

    def candidate_rewards(self, x_0, eps_0, x_1, eps_1, t_prev: int, rows):
        """The step-wise rewards (reward_0, reward_1) [len(rows)] of the two candidates of the
        prompts `rows`, from ONE reward call (one VAE decode) on both."""
        rewards = self.reward(torch.cat([x_0, x_1]), torch.cat([eps_0, eps_1]), t_prev, rows * 2)
        return rewards.chunk(2)

    def loser_continues(self, i: int, rows) -> torch.Tensor:
        """[len(rows), 1, 1, 1] bool: whether the dis-preferred sample continues after step i.
        Never for next_state="preferred" (Figure 3); for "random" (SPO), a fair coin keyed by
        (seed, position, i)."""
        coins = []
        for row in rows:
            heads = False
            if self.cfg.next_state == "random":
                generator = keyed_generator(self.seed, self.positions[row], f"coin{i}")
                heads = bool(torch.rand((), generator=generator) < 0.5)
            coins.append(heads)
        return torch.tensor(coins, device=self.cond.device).view(-1, 1, 1, 1)


def rollout_metrics(reward_w, reward_l, guidance_gap, keep, final_reward) -> dict:
    """Means over the rollout's pairs (over its prompts for final_reward)."""
    values = dict(reward_w=reward_w, reward_l=reward_l, reward_gap=reward_w - reward_l,
                  guidance_gap=guidance_gap, pairs_kept=keep, final_reward=final_reward)
    return {key: value.mean() for key, value in values.items()}


def stack_pairs(pairs: list[dict]) -> dict:
    """The pairs of every trained step, concatenated key by key: one loss batch."""
    return {key: torch.cat([pair[key] for pair in pairs]) for key in pairs[0]}


@torch.no_grad()
def rollout_tailorpo(rollout: Rollout, guided: bool):
    """The TailorPO rollout of Figure 3. Returns (pairs, metrics): pairs "x_t", "x_w", "x_l"
    [N, C, h, w], "t", "prompt_index", "keep" [N], one row per trained (step, prompt), step by
    step."""
    schedule = rollout.sd.schedule
    cfg = rollout.cfg
    x_t = rollout.noise("x_T")
    eps_pred = rollout.eps(x_t, rollout.timesteps[0], rollout.rows)
    pairs = []
    logs = []
    for i, t in enumerate(rollout.timesteps):
        t_prev = schedule.prev_timestep(t, cfg.num_steps)  # < 0 after the last step
        rows = rollout.trained[i]  # the prompts that train this step
        # 1. the policy mu(x_t) and sigma_t (DDIM Eq. 12 without noise, Eq. 16)
        step = schedule.ddim_step(eps_pred, t, x_t, cfg.num_steps, cfg.eta)
        # 2. two candidates from the same x_t: the same mean, independent noise (DDIM Eq. 12)
        x_0 = step.mean + step.sigma_t * rollout.noise(f"step{i}/0")
        x_1 = step.mean + step.sigma_t * rollout.noise(f"step{i}/1")
        # 3. eps_pred at both: it scores them and is the next step's eps_pred (one UNet call)
        eps_0, eps_1 = rollout.candidate_eps(x_0, x_1[rows], t_prev, rows)
        if not rows:  # nobody trains this step: a plain DDIM step to candidate 0
            x_t = x_0
            eps_pred = eps_0
            continue
        # 4. the trained prompts' two candidates and their step-wise rewards (Proposition 1)
        candidate_0 = (x_0[rows], eps_0[rows])
        candidate_1 = (x_1[rows], eps_1)
        reward_0, reward_1 = rollout.candidate_rewards(*candidate_0, *candidate_1, t_prev, rows)
        # 5. the ranking: winner x^w_{t-1} and loser x^l_{t-1} (a tie goes to candidate 0)
        winner, loser = rank_pairs(reward_0, reward_1, candidate_0, candidate_1)
        reward_w, x_w, eps_w = winner
        reward_l, x_l, eps_l = loser
        reward_plus = reward_w
        # 6. TailorPO-G: push the winner up the reward to x^+ (eps_pred held fixed: no UNet
        # backward)
        if guided:
            reward_of_x = partial(rollout.reward, eps=eps_w, t=t_prev, rows=rows)
            x_w = reward_guidance(x_w, reward_of_x, step.sigma_t, cfg.reward_guidance)
            eps_w = rollout.eps(x_w, t_prev, rows)  # the next step's eps_pred at x^+
            reward_plus = rollout.reward(x_w, eps_w, t_prev, rows)
        # 7. the pair for the loss: x^w and x^l from the same x_t
        keep = (reward_w - reward_l >= cfg.min_reward_gap).float()
        prompt_index = torch.tensor(rows, device=x_t.device)
        pairs.append({"x_t": x_t[rows], "x_w": x_w, "x_l": x_l,
                      "t": torch.full_like(prompt_index, t), "prompt_index": prompt_index,
                      "keep": keep})
        logs.append(torch.stack([reward_w, reward_l, reward_plus - reward_w, keep]))
        # 8. the next state: the winner (Figure 3), or the loser on a keyed coin
        # (next_state="random"); the prompts that do not train continue from candidate 0.
        loser_next = rollout.loser_continues(i, rows)
        x_t = x_0.clone()
        x_t[rows] = torch.where(loser_next, x_l, x_w)
        eps_pred = eps_0.clone()
        eps_pred[rows] = torch.where(loser_next, eps_l, eps_w)
    final_reward = rollout.reward(x_t, None, -1, rollout.rows)
    reward_w, reward_l, guidance_gap, keep = torch.cat(logs, dim=1)
    return stack_pairs(pairs), rollout_metrics(reward_w, reward_l, guidance_gap, keep, final_reward)


@torch.no_grad()
def rollout_trajectory(rollout: Rollout):
    """The trajectory baseline (Figure 1(a), deviation 3): two trajectories from one x_T, whose
    final rewards label EVERY trained step. Returns (pairs, metrics) as rollout_tailorpo, with the
    two states "x_t_w", "x_t_l" in place of "x_t"."""
    schedule = rollout.sd.schedule
    cfg = rollout.cfg
    rows_twice = rollout.rows * 2
    x_T = rollout.noise("x_T")
    x_t = torch.cat([x_T, x_T])  # [2B]: trajectory 0, then trajectory 1, from the same x_T
    recorded = []
    for i, t in enumerate(rollout.timesteps):
        eps_pred = rollout.eps(x_t, t, rows_twice)  # both trajectories in one UNet call
        noise = torch.cat([rollout.noise(f"step{i}/0"), rollout.noise(f"step{i}/1")])
        step = schedule.ddim_step(eps_pred, t, x_t, cfg.num_steps, cfg.eta, noise)  # Eq. 12
        x_prev = step.x_prev
        if rollout.trained[i]:
            recorded.append((x_t, x_prev, t, rollout.trained[i]))
        x_t = x_prev
    final_reward = rollout.reward(x_t, None, -1, rows_twice)  # one reward call on both final images
    reward_0, reward_1 = final_reward.chunk(2)
    (reward_w,), (reward_l,) = rank_pairs(reward_0, reward_1, (), ())
    keep = (reward_w - reward_l >= cfg.min_reward_gap).float()
    pairs = []
    for x_t, x_prev, t, rows in recorded:
        x_t_0, x_t_1 = x_t.chunk(2)
        x_prev_0, x_prev_1 = x_prev.chunk(2)
        # Every trained step takes the label of the final images: trajectory 0's step, or 1's.
        winner, loser = rank_pairs(reward_0[rows], reward_1[rows], (x_t_0[rows], x_prev_0[rows]),
                                   (x_t_1[rows], x_prev_1[rows]))
        _, x_t_w, x_w = winner
        _, x_t_l, x_l = loser
        prompt_index = torch.tensor(rows, device=x_t.device)
        pairs.append({"x_t_w": x_t_w, "x_t_l": x_t_l, "x_w": x_w, "x_l": x_l,
                      "t": torch.full_like(prompt_index, t), "prompt_index": prompt_index,
                      "keep": keep[rows]})
    metrics = rollout_metrics(reward_w, reward_l, torch.zeros_like(reward_w), keep, final_reward)
    return stack_pairs(pairs), metrics


# ---- The train.py plug-in


def pair_loss(sd, reference_unet, pairs, cond, uncond, cfg: TailorPOConfig):
    """The loss on all collected pairs: ONE policy call (with graph), ONE reference call, all steps
    stacked. TailorPO pairs share x_t ("x_t"); trajectory pairs ("x_t_w", "x_t_l") need both
    states in that call."""
    shared = "x_t" in pairs
    if shared:
        x_t = pairs["x_t"]
        t = pairs["t"]
        rows = pairs["prompt_index"]
    else:
        x_t = torch.cat([pairs["x_t_w"], pairs["x_t_l"]])
        t = pairs["t"].repeat(2)
        rows = pairs["prompt_index"].repeat(2)
    eps_theta = guided_eps(sd.unet, x_t, t, cond[rows], uncond, cfg.guidance_scale)
    with torch.no_grad():
        eps_ref = guided_eps(reference_unet, x_t, t, cond[rows], uncond, cfg.guidance_scale)
    # mu_theta(x_t) and mu_ref(x_t), DDIM Eq. 12
    theta = sd.schedule.ddim_step(eps_theta, t, x_t, cfg.num_steps, cfg.eta)
    ref = sd.schedule.ddim_step(eps_ref, t, x_t, cfg.num_steps, cfg.eta)
    mean_theta = theta.mean
    mean_ref = ref.mean
    sigma_t = theta.sigma_t
    if not shared:  # (the winner's, the loser's): the two samples start from different states
        mean_theta = tuple(mean_theta.chunk(2))
        mean_ref = tuple(mean_ref.chunk(2))
        sigma_t = tuple(sigma_t.chunk(2))
    return tailorpo_loss(pairs["x_w"], pairs["x_l"], mean_theta, mean_ref, sigma_t, cfg.beta,
                         cfg.log_prob_reduction, cfg.clip_ratio, pairs["keep"])


def train_step(sd, reference_unet, batch: dict, reward_fn, cfg: TailorPOConfig, seed: int,
               method: str = "tailorpo"):
    """One online step: roll out without grad, then (loss with graph, metrics of dpo_loss and
    rollout_metrics). batch: {"prompts": list[str], "positions": list[int]};
    reference_unet(x_t, t, context) -> eps_pred; reward_fn(images [B,3,H,W] in [0,1], prompts)
    -> [B], with .differentiable for tailorpo-g."""
    if method not in METHODS:
        raise ValueError(f"tailorpo.train_step: method must be one of {METHODS}, got {method!r}")
    if method == "tailorpo-g" and not getattr(reward_fn, "differentiable", False):
        raise ValueError("tailorpo-g needs a differentiable reward for its gradient guidance; this "
                         "reward is not (use --method tailorpo, or a differentiable --reward)")
    with torch.no_grad():
        cond = sd.encode_prompts(list(batch["prompts"]))
        uncond = sd.encode_prompts([""])
    run = Rollout(sd, reward_fn, batch, cond, uncond, cfg, seed)
    if method == "trajectory":
        pairs, metrics = rollout_trajectory(run)
    else:
        pairs, metrics = rollout_tailorpo(run, guided=method == "tailorpo-g")
    loss, loss_metrics = pair_loss(sd, reference_unet, pairs, cond, uncond, cfg)
    return loss, {**metrics, **loss_metrics}
