"""Method comparison on the toy world (toy.py): Diffusion-DPO with AI feedback, the trajectory-level
baseline, TailorPO and TailorPO-G at an EQUAL budget of UNet evaluations, and the paper's Figure 2
(preference-order disagreement between intermediate steps and final images, as a function of t).

    python -m bench.bench_methods                 # writes bench/results/bench_methods.md and bench/results/bench_methods.png
    python -m bench.bench_methods --budget 6000 --seeds 0,1,2

Part 1, methods. Every run starts from the same cached toy base model, injects LoRA (rank 4, reference = the
adapters off), and trains with AdamW until its next step would exceed `budget` UNet rows: each UNet forward
of a batch of n counts n (a classifier-free-guided call on [uncond; cond] counts 2 per image), counted by a
forward pre-hook (tailorpo.UNetCallCounter) on the one UNet, so rollouts, reference calls and the policy calls
of the losses all count. Backward passes are not counted (their cost follows the policy forward rows).
  dpo-ai      Diffusion-DPO (dpo.dpo_train_step, Wallace et al. Eq. 14) on an offline set of pairs: the base
              model draws two images per prompt (DDIM, eta 0, different seeds) and the reward ranks them
              (the paper's AI-feedback variant). Half the budget generates the pairs, half trains on them.
  trajectory  tailorpo.train_step(method="trajectory"): two trajectories from the same x_T, the final images'
              reward labels every step (D3PO's pairs; the paper's Figure 1(a)).
  tailorpo    tailorpo.train_step(method="tailorpo"): pairs from the same x_t ranked by the step-wise reward.
  tailorpo-g  the same plus reward-gradient guidance of the preferred sample.
The score of a run is the mean reward of fresh images (all 60 toy prompts x eval seeds, DDIM eta 0, not
counted in the budget) after training; the table gives mean +- standard error over the run seeds.

Part 2, Figure 2 of the paper. For pairs of samples from the base model we compare the order of their
step-wise rewards r(x0_pred) at step t with the order of the rewards of their final images:
  trajectory pairs   two DDIM eta=1 trajectories from the same x_T; at each t, r(x0_pred(x_t^a)) vs
                     r(x0_pred(x_t^b)).
                     This is the label a trajectory-level method assumes to hold at every t.
  same-x_t pairs     at each t, two children x_{t-1} of the same x_t (TailorPO's candidates), ranked by
                     r(x0_pred(x_{t-1})); each child is then denoised to x_0 on its own (eta=1).
The disagreement rate at t is the fraction of pairs whose two orders differ (ties count 1/2).

Choices (numbered; the paper's hyperparameters were not available to us):
1. Rollouts and evaluation use 10 DDIM steps and guidance 3 (the toy base model samples cleanly with them),
   LoRA rank 4, AdamW lr 3e-3 for every method, 4 prompts per step; TailorPO beta 10 (mean log-prob).
2. Diffusion-DPO: beta 5000 (official, mean-MSE convention), lr 3e-3 as the others, no prompt dropout.
3. Equal budget in UNet forward rows (our measure of "UNet evaluations"); wall time is reported beside it.
"""

import argparse
import math
import os
import time
from dataclasses import dataclass, field, replace

import torch

import dpo
import evaluate
import lora
import tailorpo
import toy
from tailorpo import TailorPOConfig, UNetCallCounter

METHODS = ("dpo-ai", "trajectory", "tailorpo", "tailorpo-g")


@dataclass
class BenchConfig:
    budget: int = 4000  # UNet forward rows per run (CFG = 2 rows per image), DPO's pair generation included
    seeds: tuple = (0, 1, 2)  # one run per method and seed
    reward: str = "saturation"  # rewards.py name (weight-free, differentiable)
    batch_size: int = 4  # prompts (online) or pairs (DPO) per optimizer step
    lora_rank: int = 4
    learning_rate: float = 3e-3
    dpo_beta: float = 5000.0
    eval_seeds: tuple = (1000,)  # fresh images per prompt for the final reward (all 60 prompts)
    figure_pairs: int = 64  # pairs of samples per curve of Figure 2
    figure_steps: int = 10  # DDIM steps of Figure 2's trajectories
    tailorpo: TailorPOConfig = field(default_factory=lambda: TailorPOConfig(num_steps=10, guidance_scale=3.0))


# ----------------------------------------------------------------------------------------------------------
# Part 1: the methods at an equal UNet budget


def fresh_reward(sd, reward_fn, cfg: BenchConfig) -> torch.Tensor:
    """Rewards [60 * len(eval_seeds)] of fresh images (DDIM eta 0, the rollout's steps and guidance)."""
    scores, _ = evaluate.generate_and_score(sd, toy.PROMPTS, list(cfg.eval_seeds), {"r": reward_fn},
                                            cfg.tailorpo.num_steps, cfg.tailorpo.guidance_scale, 0.0, 60,
                                            (0, 0), progress=False)
    return scores["r"]


def ai_feedback_pairs(sd, reward_fn, num_pairs: int, cfg: BenchConfig, seed: int) -> list[dict]:
    """Diffusion-DPO's AI-feedback data: two base-model images per prompt, the reward picks the winner."""
    from sample import generate

    prompts = [toy.PROMPTS[i % len(toy.PROMPTS)] for i in range(num_pairs)]
    images = [generate(sd, prompts, num_steps=cfg.tailorpo.num_steps, guidance=cfg.tailorpo.guidance_scale,
                       seed=seed * 1000 + k, progress=False) for k in range(2)]
    with torch.no_grad():
        first_wins = reward_fn(images[0], prompts) >= reward_fn(images[1], prompts)
    pixels = [image * 2 - 1 for image in images]  # [0, 1] -> [-1, 1], data.py's convention
    pixels_w = torch.where(first_wins.view(-1, 1, 1, 1), pixels[0], pixels[1])
    pixels_l = torch.where(first_wins.view(-1, 1, 1, 1), pixels[1], pixels[0])
    return [{"pixels_w": pixels_w[i:i + cfg.batch_size], "pixels_l": pixels_l[i:i + cfg.batch_size],
             "prompts": prompts[i:i + cfg.batch_size]} for i in range(0, num_pairs, cfg.batch_size)]


def train_run(method: str, seed: int, cfg: BenchConfig, reward_fn) -> dict:
    """One LoRA run of `method` until the UNet budget is spent; returns its final rewards and counts."""
    sd = toy.load_base_model(progress=False)
    torch.manual_seed(seed)
    params = lora.inject_lora(sd.unet, cfg.lora_rank, cfg.lora_rank)

    def reference_unet(x_t, t, context):
        with torch.no_grad(), lora.lora_disabled(sd.unet):
            return sd.unet(x_t, t, context)

    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(10**4, generator=torch.Generator().manual_seed(seed)) % len(toy.PROMPTS)
    started, steps, last_rows = time.time(), 0, 0
    with UNetCallCounter(sd.unet) as counter:
        if method == "dpo-ai":  # generation: 2 images x steps x 2 (CFG) rows per pair, half the budget
            num_pairs = cfg.budget // 2 // (4 * cfg.tailorpo.num_steps)
            with lora.lora_disabled(sd.unet):
                batches = ai_feedback_pairs(sd, reward_fn, num_pairs, cfg, seed)
        while counter.rows + last_rows <= cfg.budget:
            before = counter.rows
            if method == "dpo-ai":
                loss, _ = dpo.dpo_train_step(sd, reference_unet, batches[steps % len(batches)], cfg.dpo_beta,
                                             generator)
            else:
                prompts = [toy.PROMPTS[i] for i in order[steps * cfg.batch_size:(steps + 1) * cfg.batch_size]]
                loss, _ = tailorpo.train_step(sd, reference_unet, prompts, reward_fn, cfg.tailorpo, generator,
                                              method=method)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps, last_rows = steps + 1, counter.rows - before
        rows = counter.rows
    seconds = time.time() - started
    sd.unet.eval()
    return {"method": method, "seed": seed, "steps": steps, "rows": rows, "seconds": seconds,
            "scores": fresh_reward(sd, reward_fn, cfg)}


# ----------------------------------------------------------------------------------------------------------
# Part 2: Figure 2, preference-order disagreement vs t


def disagreement(a: torch.Tensor, b: torch.Tensor, final_a: torch.Tensor, final_b: torch.Tensor) -> float:
    """Fraction of pairs whose order by (a, b) differs from their order by (final_a, final_b); ties 1/2."""
    agree = torch.sign(a - b) * torch.sign(final_a - final_b)
    return ((agree < 0).double() + 0.5 * (agree == 0).double()).mean().item()


@torch.no_grad()
def figure2(sd, reward_fn, cfg: BenchConfig) -> dict:
    """{"t": [S-1], "trajectory": [S-1], "same_x_t": [S-1]} disagreement rates (see the header)."""
    from sample import decode
    from sampler import guided_eps

    steps, n = cfg.figure_steps, cfg.figure_pairs
    schedule, unet = sd.schedule, sd.unet
    prompts = [toy.PROMPTS[(7 * i) % len(toy.PROMPTS)] for i in range(n)]
    cond, uncond = sd.encode_prompts(prompts), sd.encode_prompts([""] * n)
    guidance = cfg.tailorpo.guidance_scale
    generator = torch.Generator().manual_seed(0)
    timesteps = schedule.ddim_timesteps(steps).tolist()
    score = lambda x: reward_fn(decode(sd, x), prompts * (len(x) // n))
    eps = lambda x, t: guided_eps(unet, x, t, cond.repeat(len(x) // n, 1, 1),
                                  uncond.repeat(len(x) // n, 1, 1), guidance)

    def denoise(x, start: int):  # eta=1 DDIM from x at timesteps[start] to x_0
        for t in timesteps[start:]:
            x = schedule.ddim_step(eps(x, t), t, x, steps, eta=1.0, generator=generator)
        return x

    # trajectory pairs: [x_T; x_T] denoised with independent noise, step-wise rewards recorded on the way
    x = torch.randn(n, 3, 16, 16, generator=generator).repeat(2, 1, 1, 1)
    stepwise = []
    for i, t in enumerate(timesteps):
        e = eps(x, t)
        if i > 0:  # at i = 0 both are x_T
            stepwise.append(score(schedule.x0_from_eps(x, e, t)))
        x = schedule.ddim_step(e, t, x, steps, eta=1.0, generator=generator)
    final = score(x)
    trajectory = [disagreement(s[:n], s[n:], final[:n], final[n:]) for s in stepwise]

    # same-x_t pairs: branch two children at each step of one trajectory, score them, finish both
    x = torch.randn(n, 3, 16, 16, generator=generator)
    same_x_t = []
    for i, t in enumerate(timesteps[:-1]):
        e = eps(x, t)
        children = schedule.ddim_step(e.repeat(2, 1, 1, 1), t, x.repeat(2, 1, 1, 1), steps, eta=1.0,
                                      generator=generator)
        t_prev = timesteps[i + 1]
        r = score(schedule.x0_from_eps(children, eps(children, t_prev), t_prev))
        final = score(denoise(children, i + 1))
        same_x_t.append(disagreement(r[:n], r[n:], final[:n], final[n:]))
        x = children[:n]  # continue the spine from one child
    return {"t": timesteps[1:], "trajectory": trajectory, "same_x_t": same_x_t}


# ----------------------------------------------------------------------------------------------------------
# Report


def write_plot(path: str, runs: list[dict], base: float, figure: dict, cfg: BenchConfig) -> str:
    """Left: Figure 2 (disagreement vs t); right: final reward per method, one point per seed + base line."""
    from PIL import Image

    import plot

    curves = {"trajectory pairs (x_t^a vs x_t^b)": (figure["t"], figure["trajectory"]),
              "same-x_t pairs (TailorPO)": (figure["t"], figure["same_x_t"])}
    left = plot.save_line_plot(path + ".left.png", curves, xlabel="timestep t", ylabel="disagreement rate",
                               title="Figure 2: step-wise vs final-image order disagreement")
    methods = list(dict.fromkeys(r["method"] for r in runs))
    curves = {"base model": ([0, len(methods) - 1], [base, base])}
    for m, method in enumerate(methods):
        scores = [r["scores"].mean().item() for r in runs if r["method"] == method]
        curves[method] = ([m] * len(scores), scores)  # one point per seed
    names = ", ".join(f"{m}={name}" for m, name in enumerate(methods))
    right = plot.save_line_plot(path + ".right.png", curves, xlabel=f"method ({names})", ylabel=cfg.reward,
                                title=f"final {cfg.reward}, {cfg.budget} UNet rows (segment: seed range)")
    images = [Image.open(p) for p in (left, right)]
    canvas = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white")
    canvas.paste(images[0], (0, 0))
    canvas.paste(images[1], (images[0].width, 0))
    canvas.save(path)
    for p in (left, right):
        os.remove(p)
    return path


def markdown(runs, base_scores, figure, cfg: BenchConfig, seconds: float) -> str:
    base_mean, base_stderr = base_scores.mean().item(), base_scores.std().item() / math.sqrt(len(base_scores))
    lines = [
        "# Method comparison on the toy world (bench_methods.py)", "",
        f"Reward `{cfg.reward}`; budget {cfg.budget} UNet forward rows per run (CFG = 2 rows per image); "
        f"LoRA rank {cfg.lora_rank}, AdamW lr {cfg.learning_rate}, {cfg.batch_size} prompts/pairs per step; "
        f"rollouts {cfg.tailorpo.num_steps} DDIM steps, guidance {cfg.tailorpo.guidance_scale}; seeds "
        f"{list(cfg.seeds)}. Final reward: {len(base_scores)} fresh images per run (60 prompts x "
        f"{len(cfg.eval_seeds)} seeds, DDIM eta 0). Total wall time {seconds:.0f} s "
        f"({torch.get_num_threads()} threads).", "",
        f"Base model: {base_mean:.4f} +- {base_stderr:.4f} (stderr over images).", "",
        "| method | final reward (mean +- stderr over seeds) | delta vs base | win rate vs base "
        "| optimizer steps | UNet rows | wall s / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        stats = evaluate.mean_stderr(torch.tensor([r["scores"].mean().item() for r in mine]))
        mean, stderr = stats["mean"], stats["stderr"]
        wins = sum(evaluate.win_rate(r["scores"], base_scores)["win_rate"] for r in mine) / len(mine)
        lines.append(f"| {method} | {mean:.4f} +- {stderr:.4f} | {mean - base_mean:+.4f} | {wins:.2f} | "
                     f"{sum(r['steps'] for r in mine) / len(mine):.0f} | {max(r['rows'] for r in mine)} | "
                     f"{sum(r['seconds'] for r in mine) / len(mine):.0f} |")
    lines += ["", "Figure 2 (base model, saturation): disagreement between the order of two samples by their "
              "step-wise reward r(x0_pred) at t and by their final images' reward "
              f"({cfg.figure_pairs} pairs per point, {cfg.figure_steps} DDIM steps, eta 1).", "",
              "| t | " + " | ".join(str(t) for t in figure["t"]) + " |",
              "|---|" + "---|" * len(figure["t"]),
              "| trajectory pairs | " + " | ".join(f"{v:.2f}" for v in figure["trajectory"]) + " |",
              "| same-x_t pairs | " + " | ".join(f"{v:.2f}" for v in figure["same_x_t"]) + " |", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Toy-world comparison of Diffusion-DPO (AI feedback), the "
                                "trajectory baseline, TailorPO and TailorPO-G at an equal UNet budget.")
    p.add_argument("--budget", type=int, default=BenchConfig.budget, help="UNet forward rows per run")
    p.add_argument("--seeds", default="0,1,2", help="run seeds, e.g. 0,1,2")
    p.add_argument("--methods", default=",".join(METHODS), help="subset of " + ",".join(METHODS))
    p.add_argument("--figure-pairs", type=int, default=BenchConfig.figure_pairs, help="pairs per point")
    p.add_argument("--out", default="bench/results/bench_methods", help="writes OUT.md and OUT.png")
    args = p.parse_args(argv)
    import rewards

    cfg = replace(BenchConfig(), budget=args.budget, seeds=tuple(int(s) for s in args.seeds.split(",")),
                  figure_pairs=args.figure_pairs)
    started = time.time()
    reward_fn = rewards.get_reward(cfg.reward)
    base = toy.load_base_model()
    base_scores = fresh_reward(base, reward_fn, cfg)
    figure = figure2(base, reward_fn, cfg)
    print("Figure 2 done", f"{time.time() - started:.0f} s", flush=True)
    runs = []
    for seed in cfg.seeds:
        for method in args.methods.split(","):
            runs.append(train_run(method, seed, cfg, reward_fn))
            r = runs[-1]
            print(f"{method} seed {seed}: {r['scores'].mean():.4f} after {r['steps']} steps, {r['rows']} "
                  f"rows, {r['seconds']:.0f} s", flush=True)
    table = markdown(runs, base_scores, figure, cfg, time.time() - started)
    print(table)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(table)
    plot_path = write_plot(args.out + ".png", runs, base_scores.mean().item(), figure, cfg)
    print("wrote", args.out + ".md", plot_path)
    return runs


if __name__ == "__main__":
    main()
