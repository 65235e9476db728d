"""Both papers' claims on the toy world, at an equal UNet budget, judged by the hidden utility
(toy.py).

    python -m bench.bench_methods                 # ~8 min on the 2-core CPU
    python -m bench.bench_methods --seeds 0,1 --budget 3000 --betas 250 --out /tmp/quick  # a look

Every run starts from the toy base model with a fresh LoRA (rank 4, the method's toy.TRAIN_DEFAULTS
learning rate) and trains until it has spent the same number of UNet forward rows (policy and
reference forwards, rollouts; no CFG in the toy, so one row per image per step):
  sft         eps-MSE on the preferred image of each human pair (the Diffusion-DPO paper's SFT
              baseline)
  dpo         Diffusion-DPO on the human pairs (toy.make_pairs), toy.TRAIN_DEFAULTS
  dpo-ai      Diffusion-DPO on the same pairs, each batch relabelled by the toy reward model (AI
              feedback)
  trajectory  two rollouts from one x_T whose final rewards label every step (D3PO; TailorPO's
              baseline)
  tailorpo    TailorPO: step-wise pairs from the same x_t, ranked by the reward model on x0_pred
  tailorpo-g  TailorPO-G: TailorPO plus reward-gradient guidance of the preferred sample
Each run is judged on fresh samples (toy.SAMPLING) from the same x_T as the base: the hidden
utility, prompt fidelity, the reward model's score, and the utility win rate over the base
(near-ties 1/2, as evaluate.py: |change| <= TIE_FRACTION x the base's seed-to-seed std of u), on
the 48 training prompts x seed 1000 and the 12 held-out prompts x seeds 1000-1003 (96 images). The
table leads with the effect sizes, the mean changes of u and fidelity from the base; mean +- stderr
over run seeds. Each claim is a line with its separation z = (a - b) / sqrt(se_a^2 + se_b^2) of the
mean utility. Then the Figure 2 curve of the TailorPO paper (how often the order of two samples by
the reward of x0_pred at step t disagrees with the order of their final images) and a beta sweep of
Diffusion-DPO (utility and reward against the distance from the base, the mean squared pixel
difference of same-x_T samples).

Choices (numbered; neither paper gives toy settings):
1. The budget counts UNet forward rows of training only; evaluation is outside it. The reward
   model is not a UNet and is not counted. Wall time per run is reported beside it.
2. Each method uses its toy.TRAIN_DEFAULTS (online: 4 prompts per step from TRAIN_PROMPTS; TailorPO
   beta 10).
"""

import argparse
import math
import os
import time
from dataclasses import dataclass, replace

import torch
from PIL import Image, ImageDraw, ImageFont

import data
import dpo
import evaluate
import lora
import plot
import rewards
import tailorpo
import toy
from sampler import generate, guided_eps

METHODS = ("sft", "dpo", "dpo-ai", "trajectory", "tailorpo", "tailorpo-g")
CLAIMS = [  # (a, b, relation, paper)
    ("dpo", "sft", ">", "Diffusion-DPO > SFT (Diffusion-DPO paper)"),
    (
        "dpo-ai",
        "dpo",
        "~",
        "Diffusion-DPO with AI feedback ~ with human pairs (Diffusion-DPO paper)",
    ),
    ("tailorpo", "trajectory", ">", "TailorPO > trajectory-level preferences (TailorPO paper)"),
    ("tailorpo-g", "tailorpo", ">", "TailorPO-G > TailorPO (TailorPO paper)"),
]


@dataclass
class BenchConfig:
    budget: int = 8000  # UNet forward rows of training per run
    seeds: tuple = (0, 1, 2, 3, 4)
    betas: tuple = (25.0, 250.0, 2500.0, 25000.0)  # Diffusion-DPO beta sweep (seed 0)
    eval_seed: int = 1000
    figure_pairs: int = 64  # pairs of samples per point of Figure 2


class RowCounter:
    """Counts the rows (batch entries) of every forward call of a module while active."""

    def __init__(self, module):
        self.rows, self.module = 0, module

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(self._count)
        return self

    def _count(self, module, args):
        self.rows += args[0].shape[0]

    def __exit__(self, *exc):
        self.handle.remove()


# --------------------------------------------------------------------------------------------------
# Runs


def fresh_lora_model(seed: int):
    """(sd with a fresh LoRA, its trainable parameters, reference_unet: the same UNet with LoRA
    off)."""
    sd = toy.load_base_model(progress=False)
    torch.manual_seed(seed)
    defaults = toy.TRAIN_DEFAULTS["dpo"]
    params = lora.inject_lora(sd.unet, defaults["lora_rank"], defaults["lora_alpha"])

    def reference_unet(x_t, t, context):
        with torch.no_grad(), lora.lora_disabled(sd.unet):
            return sd.unet(x_t, t, context)

    return sd, params, reference_unet


def train_run(
    method: str, seed: int, budget: int, reward_fn, pairs_folder: str, beta: float | None = None
):
    """One LoRA run of `method` until `budget` UNet rows are spent -> (sd, steps, rows, seconds)."""
    defaults = toy.TRAIN_DEFAULTS["dpo" if method == "dpo-ai" else method]
    beta = defaults.get("beta") if beta is None else beta  # Diffusion-DPO only
    sd, params, reference_unet = fresh_lora_model(seed)
    optimizer = torch.optim.AdamW(params, lr=defaults["learning_rate"], weight_decay=0.0)
    if method in ("sft", "dpo", "dpo-ai"):
        pairs = data.PreferencePairs(
            pairs_folder,
            defaults["resolution"],
            prompt_dropout=defaults["prompt_dropout"],
            seed=seed,
        )
        batches = iter(data.PairBatches(pairs, defaults["batch_size"]))
    else:
        online = tailorpo.TailorPOConfig(
            num_steps=toy.SAMPLING["num_steps"], guidance_scale=toy.SAMPLING["guidance"]
        )
        order = torch.randperm(10**5, generator=torch.Generator().manual_seed(seed)) % len(
            toy.TRAIN_PROMPTS
        )
    started, steps, last = time.time(), 0, 0
    with RowCounter(sd.unet) as counter:
        while counter.rows + last <= budget:
            before = counter.rows
            if method in ("sft", "dpo", "dpo-ai"):
                batch = next(batches)
                if method == "dpo-ai":
                    with torch.no_grad():
                        batch, _ = data.relabel_with_reward(batch, reward_fn)
                loss, _ = (
                    dpo.sft_train_step(sd, batch, seed)
                    if method == "sft"
                    else dpo.dpo_train_step(sd, reference_unet, batch, beta, seed)
                )
            else:
                positions = list(
                    range(steps * defaults["batch_size"], (steps + 1) * defaults["batch_size"])
                )
                batch = {
                    "prompts": [toy.TRAIN_PROMPTS[order[p]] for p in positions],
                    "positions": positions,
                }
                loss, _ = tailorpo.train_step(
                    sd, reference_unet, batch, reward_fn, online, seed, method
                )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps, last = steps + 1, counter.rows - before
        rows = counter.rows
    sd.unet.eval()
    return sd, steps, rows, time.time() - started


EVAL_SETS = (("train prompts", toy.TRAIN_PROMPTS, 1), ("held-out prompts", toy.HELD_OUT_PROMPTS, 4))


@torch.no_grad()
def sample_eval(sd, cfg: BenchConfig) -> tuple[torch.Tensor, list[str]]:
    """Images [96, 3, 16, 16] and prompts of the evaluation sets, x_T from seeds eval_seed + k."""
    images, prompts = [], []
    for _, prompt_set, num_seeds in EVAL_SETS:
        for k in range(num_seeds):
            seed = cfg.eval_seed + k
            images.append(generate(sd, list(prompt_set), seed=seed, progress=False, **toy.SAMPLING))
            prompts += list(prompt_set)
    return torch.cat(images), prompts


def tie_threshold(u_base: torch.Tensor) -> float:
    """evaluate.py's near-tie threshold of u: TIE_FRACTION x the base's seed-to-seed std, here of
    the held-out prompts (the rows after the training prompts: 4 seeds, seed-major, as sample_eval
    draws them)."""
    held_out = (
        u_base[len(toy.TRAIN_PROMPTS) :].view(EVAL_SETS[1][2], -1).T.flatten()
    )  # prompt-major
    return evaluate.TIE_FRACTION * evaluate.seed_std(held_out, EVAL_SETS[1][2])


@torch.no_grad()
def judge(images, prompts, base_images, reward_fn) -> dict:
    """Per-image scores [N] and win (near-ties 1/2) / distance against the base images from the
    same x_T."""
    u, u_base = toy.utility(images, prompts), toy.utility(base_images, prompts)
    return {
        "utility": u,
        "fidelity": toy.fidelity(images, prompts),
        "reward": reward_fn(images, prompts),
        "win": evaluate.wins(u, u_base, tie_threshold(u_base)),
        "distance": (images - base_images).pow(2).flatten(1).mean(1),
    }


# --------------------------------------------------------------------------------------------------
# Figure 2 of the TailorPO paper


@torch.no_grad()
def disagreement(a, b, final_a, final_b) -> float:
    """Fraction of pairs whose order by (a, b) differs from their order by (final_a, final_b);
    ties 1/2."""
    agree = torch.sign(a - b) * torch.sign(final_a - final_b)
    return ((agree < 0).double() + 0.5 * (agree == 0).double()).mean().item()


@torch.no_grad()
def figure2(sd, reward_fn, cfg: BenchConfig) -> dict:
    """{"t", "trajectory", "same_x_t"}: at each DDIM step t, the fraction of sample pairs whose
    order by the reward of x0_pred(x_t) differs from the order of their final images (ties 1/2).
    trajectory pairs: two eta=1 trajectories from one x_T (the label a trajectory-level method
    assumes at every t); same-x_t pairs: two children x_{t-1} of one x_t (TailorPO's candidates),
    each finished alone."""
    steps, n, schedule = toy.SAMPLING["num_steps"], cfg.figure_pairs, sd.schedule
    prompts = [toy.TRAIN_PROMPTS[(7 * i) % len(toy.TRAIN_PROMPTS)] for i in range(n)]
    cond = sd.encode_prompts(prompts)
    generator = torch.Generator().manual_seed(0)
    timesteps = schedule.ddim_timesteps(steps).tolist()
    score = lambda x: reward_fn(sd.decode_latents(x), prompts * (len(x) // n))
    eps = lambda x, t: guided_eps(sd.unet, x, t, cond.repeat(len(x) // n, 1, 1), None, 1.0)
    step = lambda e, t, x: (
        schedule.ddim_step(
            e, t, x, steps, eta=1.0, noise=torch.randn(x.shape, generator=generator)
        ).x_prev
    )

    x = torch.randn(n, 3, 16, 16, generator=generator).repeat(2, 1, 1, 1)  # the same x_T twice
    stepwise = []
    for i, t in enumerate(timesteps):
        e = eps(x, t)
        if i > 0:
            stepwise.append(score(schedule.x0_from_eps(x, e, t)))
        x = step(e, t, x)
    final = score(x)
    trajectory = [disagreement(s[:n], s[n:], final[:n], final[n:]) for s in stepwise]

    x = torch.randn(n, 3, 16, 16, generator=generator)
    same_x_t = []
    for i, t in enumerate(timesteps[:-1]):
        children = step(eps(x, t).repeat(2, 1, 1, 1), t, x.repeat(2, 1, 1, 1))
        t_prev = timesteps[i + 1]
        r = score(schedule.x0_from_eps(children, eps(children, t_prev), t_prev))
        finished = children
        for later in timesteps[i + 1 :]:
            finished = step(eps(finished, later), later, finished)
        final = score(finished)
        same_x_t.append(disagreement(r[:n], r[n:], final[:n], final[n:]))
        x = children[:n]
    return {"t": timesteps[1:], "trajectory": trajectory, "same_x_t": same_x_t}


# --------------------------------------------------------------------------------------------------
# Report


def stats(values: list[float]) -> tuple[float, float]:
    """(mean, standard error) of a list."""
    if len(values) < 2:
        return values[0], float("nan")
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def bar_chart(path: str, groups: dict[str, dict[str, tuple[float, float]]], title: str) -> str:
    """One panel per metric: a bar per method (mean) with an error bar (+- stderr)."""
    panels, width, height, margin = list(groups.items()), 300, 260, 40
    image = Image.new("RGB", (width * len(panels), height), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    draw.text((4, 2), title, fill="black", font=font)
    for p, (metric, bars) in enumerate(panels):
        left = p * width + margin
        low = min(0.0, min(m - s for m, s in bars.values()))
        high = max(0.0, max(m + s for m, s in bars.values()))
        span = high - low
        # Room for the values' labels beyond the bars' ends.
        if low < 0:
            low -= 0.1 * span
        high += 0.12 * span
        y = lambda v, low=low, high=high: height - 30 - (v - low) / (high - low) * (height - 60)
        draw.text((left, 16), metric, fill="black", font=font)
        draw.line([(left, y(0.0)), (left + width - margin - 10, y(0.0))], fill="black")
        slot = (width - margin - 10) / len(bars)
        for i, (name, (mean, se)) in enumerate(bars.items()):
            x0 = left + i * slot + 3
            colour = plot.COLOURS[i % len(plot.COLOURS)]
            top, bottom = sorted((y(mean), y(max(low, 0.0))))
            draw.rectangle([x0, top, x0 + slot - 6, bottom], fill=colour)
            centre = x0 + (slot - 6) / 2
            if math.isfinite(se):
                draw.line([(centre, y(mean - se)), (centre, y(mean + se))], fill="black", width=2)
                draw.line([(centre - 4, y(mean + se)), (centre + 4, y(mean + se))], fill="black")
                draw.line([(centre - 4, y(mean - se)), (centre + 4, y(mean - se))], fill="black")
            draw.text((centre, height - 26), name[:10], fill="black", font=font, anchor="ma")
            # The value sits past the end of its error bar: above a positive bar, below a negative.
            reach = se if math.isfinite(se) else 0.0
            up = mean >= 0
            end = y(mean + reach) - 3 if up else y(mean - reach) + 3
            anchor = "md" if up else "ma"  # text bottom or top at `end`
            draw.text((centre, end), f"{mean:.2g}", fill="black", font=font, anchor=anchor)
    image.save(path)
    return path


def report(
    runs: dict, base: dict, figure: dict, sweep: dict, cfg: BenchConfig, seconds: float, out: str
):
    """bench_methods.md and .png (bars, Figure 2, beta sweep)."""
    metrics = ("utility", "fidelity", "reward", "win", "distance")
    per_run = {
        m: {k: [r["scores"][k].mean().item() for r in rs] for k in metrics}
        for m, rs in runs.items()
    }
    change = {
        m: {k: [x - base[k].mean().item() for x in v[k]] for k in ("utility", "fidelity")}
        for m, v in per_run.items()
    }
    split = len(toy.TRAIN_PROMPTS)  # the first rows of the evaluation are the training prompts
    lines = [
        "# Method comparison on the toy world (bench_methods.py)",
        "",
        f"Equal budget: {cfg.budget} UNet forward rows of training per run; LoRA rank 4; "
        f"seeds {list(cfg.seeds)}; sampling {toy.SAMPLING}. Judged by the hidden utility u "
        "(toy.utility, in [0, 4]) on 96 fresh images per run (48 training prompts x 1 seed, 12 "
        "held-out prompts x 4 seeds), the same x_T as the base. Total wall time "
        f"{seconds:.0f} s ({torch.get_num_threads()} thread(s), load average "
        f"{os.getloadavg()[0]:.1f} at the end).",
        "",
        f"Base model: utility {base['utility'].mean():.3f}, fidelity "
        f"{base['fidelity'].mean():.3f}, reward {base['reward'].mean():.3f}. Near-ties (win 1/2): "
        f"|change of u| <= {tie_threshold(base['utility']):.3f}, {evaluate.TIE_FRACTION} x the "
        "base's seed-to-seed std of u.",
        "",
        "| method | utility change | fidelity change | win rate vs base | win, train prompts "
        "| win, held-out prompts | utility | fidelity | reward model | steps | UNet rows "
        "| s / run |",
        "|---" * 12 + "|",
    ]

    def cell(values, sign=""):
        mean, stderr = stats(values)
        return f"{mean:{sign}.3f} +- {stderr:.3f}"

    for method, rs in runs.items():
        wins_train = [r["scores"]["win"][:split].mean().item() for r in rs]
        wins_held = [r["scores"]["win"][split:].mean().item() for r in rs]
        steps, seconds = (
            sum(r["steps"] for r in rs) / len(rs),
            sum(r["seconds"] for r in rs) / len(rs),
        )
        effects = [cell(change[method][k], "+") for k in ("utility", "fidelity")]
        lines.append(
            f"| {method} | {effects[0]} | {effects[1]} | {cell(per_run[method]['win'])} | "
            f"{cell(wins_train)} | {cell(wins_held)} | "
            + " | ".join(cell(per_run[method][k]) for k in metrics[:3])
            + f" | {steps:.0f} | {max(r['rows'] for r in rs)} | {seconds:.0f} |"
        )
    lines += [
        "",
        "- utility change: the hidden utility u (toy.utility, in [0, 4]: 3 x fidelity + 0.5 "
        "(vivid + clean)) minus the base's, same x_T",
        "- fidelity change: prompt fidelity (toy.fidelity, in "
        "[0, 1]: asked shape, shape colour, background colour) minus the base's",
        "- win rate: P(u(run) > u(base)) over the 96 images, near-ties 1/2; reward model: the "
        "learned toy reward (a logit)",
    ]
    lines += ["", "Claims (separation z of the mean utility over seeds, in standard errors):", ""]
    for a, b, relation, claim in CLAIMS:
        if a not in per_run or b not in per_run:
            continue
        (mean_a, se_a), (mean_b, se_b) = stats(per_run[a]["utility"]), stats(per_run[b]["utility"])
        z = (mean_a - mean_b) / math.sqrt(se_a**2 + se_b**2)
        holds = abs(z) < 2 if relation == "~" else z >= 2
        lines.append(
            f"- {claim}: {mean_a:.3f} vs {mean_b:.3f}, z = {z:+.3f}: "
            f"{'holds' if holds else 'does NOT hold'} here"
            f"{' (it needs |z| < 2)' if relation == '~' else ' (it needs z >= 2)'}."
        )
    lines += [
        "",
        f"Figure 2 (TailorPO paper), base model, toy reward model, {cfg.figure_pairs} pairs per "
        "point: disagreement between the order by the reward of x0_pred at step t and the order of "
        "the final images.",
        "",
        "| t | " + " | ".join(str(t) for t in figure["t"]) + " |",
        "|---|" + "---|" * len(figure["t"]),
        "| trajectory pairs | " + " | ".join(f"{v:.2f}" for v in figure["trajectory"]) + " |",
        "| same-x_t pairs | " + " | ".join(f"{v:.2f}" for v in figure["same_x_t"]) + " |",
        "",
        "Diffusion-DPO beta sweep (seed 0): a small beta moves further from the base.",
        "",
        "| beta | utility | reward model | win rate | distance from base |",
        "|---|---|---|---|---|",
    ]
    for beta, scores in sweep.items():
        lines.append(
            f"| {beta:g} | {scores['utility'].mean():.3f} | {scores['reward'].mean():.3f} | "
            f"{scores['win'].mean():.2f} | {scores['distance'].mean():.5f} |"
        )
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")

    panels = {
        f"{k} - base": {
            m: stats([x - base[k].mean().item() for x in v[k]]) for m, v in per_run.items()
        }
        for k in metrics[:3]
    }
    panels["win rate vs base"] = {m: stats(v["win"]) for m, v in per_run.items()}
    bars = bar_chart(
        out + ".bars.png",
        panels,
        "mean +- stderr over seeds. Utility, fidelity, toy reward "
        "model: change from the base; win rate by the hidden utility (1/2 = no change)",
    )
    curves = plot.save_line_plot(
        out + ".fig2.png",
        {
            "trajectory pairs": (figure["t"], figure["trajectory"]),
            "same-x_t pairs": (figure["t"], figure["same_x_t"]),
        },
        title="Figure 2: step-wise vs final order disagreement (y: disagreement)",
        xlabel="timestep t",
    )
    betas = list(sweep)
    beta_plot = plot.save_line_plot(
        out + ".beta.png",
        {
            "utility": (
                [sweep[b]["distance"].mean().item() for b in betas],
                [sweep[b]["utility"].mean().item() for b in betas],
            )
        },
        title="DPO beta sweep (y: utility): " + ", ".join(f"{b:g}" for b in betas),
        xlabel="distance from base",
    )
    pictures = [Image.open(p) for p in (bars, curves, beta_plot)]
    canvas = Image.new(
        "RGB",
        (
            max(pictures[0].width, pictures[1].width + pictures[2].width),
            pictures[0].height + max(pictures[1].height, pictures[2].height),
        ),
        "white",
    )
    canvas.paste(pictures[0], (0, 0))
    canvas.paste(pictures[1], (0, pictures[0].height))
    canvas.paste(pictures[2], (pictures[1].width, pictures[0].height))
    canvas.save(out + ".png")
    for p in (bars, curves, beta_plot):
        os.remove(p)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Toy-world test of the Diffusion-DPO and TailorPO claims."
    )
    p.add_argument(
        "--budget", type=int, default=BenchConfig.budget, help="UNet forward rows per run"
    )
    p.add_argument("--seeds", default="0,1,2,3,4", help="run seeds")
    p.add_argument("--methods", default=",".join(METHODS), help="subset of " + ",".join(METHODS))
    p.add_argument(
        "--betas", default="25,250,2500,25000", help="Diffusion-DPO beta sweep ('' = none)"
    )
    p.add_argument("--out", default="bench/results/bench_methods", help="writes OUT.md and OUT.png")
    args = p.parse_args(argv)
    cfg = replace(
        BenchConfig(),
        budget=args.budget,
        seeds=tuple(int(s) for s in args.seeds.split(",")),
        betas=tuple(float(b) for b in args.betas.split(",") if b),
    )
    started = time.time()
    torch.set_num_threads(1)
    pairs_folder = toy.make_pairs()
    world = toy.world()
    reward_fn = rewards.ModelReward(world.reward_name, world.reward())
    base_sd = toy.load_base_model(progress=False)
    base_images, prompts = sample_eval(base_sd, cfg)
    base = judge(base_images, prompts, base_images, reward_fn)
    figure = figure2(base_sd, reward_fn, cfg)
    print(f"base and Figure 2: {time.time() - started:.0f} s", flush=True)
    runs = {}
    for seed in cfg.seeds:
        for method in args.methods.split(","):
            sd, steps, rows, seconds = train_run(method, seed, cfg.budget, reward_fn, pairs_folder)
            scores = judge(*sample_eval(sd, cfg)[:1], prompts, base_images, reward_fn)
            runs.setdefault(method, []).append(
                dict(steps=steps, rows=rows, seconds=seconds, scores=scores)
            )
            print(
                f"{method} seed {seed}: utility {scores['utility'].mean():.3f}, "
                f"win {scores['win'].mean():.2f} "
                f"({steps} steps, {rows} rows, {seconds:.0f} s)",
                flush=True,
            )
    sweep = {}
    for beta in cfg.betas:
        sd, *_ = train_run("dpo", 0, cfg.budget, reward_fn, pairs_folder, beta=beta)
        sweep[beta] = judge(*sample_eval(sd, cfg)[:1], prompts, base_images, reward_fn)
        print(f"beta {beta:g}: utility {sweep[beta]['utility'].mean():.3f}", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    print(report(runs, base, figure, sweep, cfg, time.time() - started, args.out))
    print("wrote", args.out + ".md", args.out + ".png")
    return runs


if __name__ == "__main__":
    main()
