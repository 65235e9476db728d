"""Benchmark: TailorPO's loss with the shared-mean identity (ONE stacked CFG forward per model for
all trained steps, tailorpo.pair_loss) vs a naive per-sample implementation (per trained step,
separate CFG forwards of policy and reference for the winner's and for the loser's log-probability:
4 calls per step), on the same rollout pairs, tiny and small UNets on CPU. Then the reward rise of
short train.py runs.

    python -m bench.bench_tailorpo                  # writes bench/results/bench_tailorpo.md
    python -m bench.bench_tailorpo --seeds 5 --threads 1

Both losses are the same function of the same pairs (the table shows their difference); what differs
is the number of UNet calls, their batch sizes and the backward through two policy graphs per step
instead of one. The reward-rise part needs the test-only reference diffusers (it writes the tiny SD
folder as conftest does).
"""

import argparse
import copy
import itertools
import json
import math
import os
import tempfile
import time
from dataclasses import replace
from unittest import mock

import torch

import evaluate
import tailorpo
from bench import write_report
from dpo import dpo_loss
from rewards import get_reward
from sampler import guided_eps
from scheduler import gaussian_log_prob
from tailorpo import TailorPOConfig
from testkit import UNetCallCounter, make_tiny_sd, save_hf_tokenizer
from tokenizer import CLIPTokenizer
from unet import UNetConfig

PROMPTS = ["a cat", "a dog", "a red car", "a tree"]


def log_prob(sd, unet, x, x_t, t, context, uncond, cfg):
    """log p(x | x_t) under `unet` from its own CFG forward at x_t, as a per-sample
    implementation does."""
    eps_pred = guided_eps(unet, x_t, t, context, uncond, cfg.guidance_scale)
    _, mean, sigma_t, _ = sd.schedule.ddim_step(eps_pred, t, x_t, cfg.num_steps, cfg.eta)
    return gaussian_log_prob(x, mean, sigma_t, cfg.log_prob_reduction)


def naive_pair_loss(sd, reference_unet, pairs, cond, uncond, cfg: TailorPOConfig):
    """The loss without the identity: every log-probability gets its own CFG forward, step by
    step."""
    log_ratios_w = []
    log_ratios_l = []
    keeps = []
    for t in pairs["t"].unique(sorted=True).flip(0).tolist():
        rows = pairs["t"] == t
        state = (pairs["x_t"][rows], t, cond[pairs["prompt_index"][rows]], uncond, cfg)
        x_w = pairs["x_w"][rows]
        x_l = pairs["x_l"][rows]
        log_p_theta_w, log_p_theta_l = (
            log_prob(sd, sd.unet, x_w, *state),
            log_prob(sd, sd.unet, x_l, *state),
        )
        with torch.no_grad():
            log_p_ref_w = log_prob(sd, reference_unet, x_w, *state)
            log_p_ref_l = log_prob(sd, reference_unet, x_l, *state)
        log_ratios_w.append(log_p_theta_w - log_p_ref_w)
        log_ratios_l.append(log_p_theta_l - log_p_ref_l)
        keeps.append(pairs["keep"][rows])
    log_ratio_w = torch.cat(log_ratios_w)
    log_ratio_l = torch.cat(log_ratios_l)
    # (clip_ratio 0 here)
    return dpo_loss(log_ratio_w, log_ratio_l, cfg.beta, mask=torch.cat(keeps))


def time_losses(loss_fns, sd, reference, pairs, cond, uncond, cfg, repeats):
    """Per loss function: (fastest seconds of forward + backward, UNet calls, loss value). The
    functions take turns within each repetition and the minimum is kept: load from other processes
    hits both alike."""
    results = [[math.inf, 0, 0.0] for _ in loss_fns]
    for _ in range(repeats):
        for result, loss_fn in zip(results, loss_fns):
            sd.unet.zero_grad(set_to_none=True)
            with UNetCallCounter(sd.unet, reference) as counter:
                start = time.perf_counter()
                loss, _ = loss_fn(sd, reference, pairs, cond, uncond, cfg)
                loss.backward()
                result[:] = min(result[0], time.perf_counter() - start), counter.calls, loss.item()
    return results


def bench_loss(repeats):
    small = replace(
        UNetConfig.tiny(),
        block_out_channels=(64, 128),
        cross_attention=(True, True),
        num_heads=4,
        norm_num_groups=16,
        sample_size=16,
    )
    rows = []
    for name, unet_config, latent in (
        ("tiny (32, 64), 8x8", UNetConfig.tiny(), 8),
        ("small (64, 128), 16x16", small, 16),
    ):
        sd = make_tiny_sd(unet_config=unet_config)
        reference = copy.deepcopy(sd.unet).requires_grad_(False)
        with torch.no_grad():  # a little training so that policy != reference
            for p in sd.unet.parameters():
                p.add_(0.01 * torch.randn_like(p))
        cfg = TailorPOConfig(num_steps=10, latent_size=latent)
        with torch.no_grad():
            cond = sd.encode_prompts(PROMPTS)
            uncond = sd.encode_prompts([""])
        reward = get_reward("brightness")
        rollout_seconds = math.inf
        batch = {"prompts": PROMPTS, "positions": list(range(len(PROMPTS)))}
        for _ in range(2):  # the faster of two identical rollouts (the same pairs)
            start = time.perf_counter()
            with UNetCallCounter(sd.unet) as rollout:
                run = tailorpo.Rollout(sd, reward, batch, cond, uncond, cfg, seed=0)
                pairs, _ = tailorpo.rollout_tailorpo(run, guided=False)
            rollout_seconds = min(rollout_seconds, time.perf_counter() - start)
        losses = (tailorpo.pair_loss, naive_pair_loss)
        ours, naive = time_losses(losses, sd, reference, pairs, cond, uncond, cfg, repeats)
        steps = cfg.num_steps
        rows.append(
            {
                "model": name,
                "pairs": f"{steps} steps x {len(PROMPTS)} prompts",
                "calls": f"{ours[1]} / {naive[1]}",
                "calls_per_step": f"{ours[1] / steps:.1f} / {naive[1] / steps:.1f}",
                "loss_ms": f"{1e3 * ours[0] / steps:.1f} / {1e3 * naive[0] / steps:.1f}",
                "loss_ratio": f"{ours[0] / naive[0]:.2f}",
                "step_ratio": f"{(rollout_seconds + ours[0]) / (rollout_seconds + naive[0]):.2f}",
                "rollout_calls": rollout.calls,
                "loss_diff": f"{abs(ours[2] - naive[2]):.1e}",
            }
        )
    return rows


def bench_reward_rise(seeds: int, steps: int):
    """train.py runs (full fine-tune, brightness reward) on a tiny random SD folder: the reward
    rises."""
    import shutil

    import train

    # Test-only: diffusers writes the folder, as the tests do
    from testkit import (
        build_tiny_pipeline,
    )

    rises = {}
    with tempfile.TemporaryDirectory() as folder:
        build_tiny_pipeline().save_pretrained(folder, safe_serialization=True)
        shutil.rmtree(os.path.join(folder, "tokenizer"))
        save_hf_tokenizer(CLIPTokenizer.default(), os.path.join(folder, "tokenizer"))
        for method, seed in itertools.product(tailorpo.METHODS, range(seeds)):
            out = os.path.join(folder, f"run-{method}-{seed}")
            # The rise is read from train.py's eval_reward rows; its end-of-run base-vs-aligned
            # report (80 images of 50 DDIM steps) is not needed here.
            with mock.patch.object(train, "final_report", return_value=None):
                train.main(
                    [
                        f"--model={folder}",
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
                        f"--out_dir={out}",
                        f"--seed={seed}",
                    ]
                )
            with open(os.path.join(out, "metrics.jsonl")) as log:
                evals = [row["eval_reward"] for row in map(json.loads, log) if "eval_reward" in row]
            rises.setdefault(method, []).append(evals[-1] - evals[0])
    return rises


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (fastest kept)")
    parser.add_argument("--seeds", type=int, default=3, help="train.py runs per method (0: skip)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of each train.py run")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    parser.add_argument(
        "--out", default="bench/results/bench_tailorpo.md", help="markdown file (tables)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = [
        f"# bench_tailorpo (torch {torch.__version__}, CPU, {torch.get_num_threads()} threads)",
        "",
        "Loss phase on the same rollout pairs (forward + backward): ours (shared mean, one "
        "stacked call per model) / naive (one CFG call per log-probability per step); 4 prompts, "
        "CFG 5, 10 steps.",
        "",
        "| model | pairs | UNet calls ours / naive | per trained step | loss ms per trained step "
        "ours / naive | ratio | full step ratio (incl. rollout) | rollout calls | abs loss diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in bench_loss(args.repeats):
        lines.append("| " + " | ".join(str(v) for v in row.values()) + " |")
    if args.seeds:
        rises = bench_reward_rise(args.seeds, args.steps)
        lines += [
            "",
            f"Reward rise of fresh samples (brightness; 8 prompts, fixed seeds) after {args.steps} "
            "train.py steps (tiny random SD, full fine-tune, lr 1e-3, 4 prompts a step, 5 DDIM "
            f"steps), mean +- stderr over {args.seeds} seeds:",
            "",
            "| method | rise | per seed |",
            "|---|---|---|",
        ]
        for method, values in rises.items():
            stats = evaluate.mean_stderr(torch.tensor(values))
            lines.append(
                f"| {method} | {stats['mean']:+.4f} +- {stats['stderr']:.4f} | "
                + ", ".join(f"{v:+.4f}" for v in values)
                + " |"
            )
    text = "\n".join(lines) + "\n"
    write_report(text, args.out)


if __name__ == "__main__":
    main()
