"""Benchmark: our SD1.5 UNet forward vs diffusers' UNet2DConditionModel, same weights, same run
(fp32 CPU).

SD1.5 config, random weights (PyTorch default init, seed 0), batch 2 at a 32x32 latent, 77 text
tokens, torch.inference_mode. Both models share the same weight tensors. The two models run
alternately (ours, diffusers, ours, ...) so that load changes on the machine hit both alike; we
report the median of the reps. Two passes: torch's default thread count (wall time is the headline),
then 1 thread, whose process CPU time is the steadiest measure on a shared machine (with 2 threads,
spin-waiting under load inflates CPU time). Writes the table to bench/results/bench_unet.md with the
load average. diffusers is a test-only reference (pip install diffusers).

    python -m bench.bench_unet            # about 2 minutes on 2 CPU cores (--reps 3: about 1)
"""

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from unet import UNet2DConditionModel, UNetConfig


def timed(model, sample, timestep, context):
    """(wall seconds, process CPU seconds) of one forward; CPU time is less disturbed by other
    processes."""
    wall, cpu = time.perf_counter(), time.process_time()
    model(sample, timestep, context)
    return time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2, help="batch size")
    parser.add_argument(
        "--latent", type=int, default=32, help="latent height = width (64 is 512 px)"
    )
    parser.add_argument(
        "--reps", type=int, default=5, help="timed forwards per model (after a warm-up)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads of the first pass (default: torch's); a second pass uses 1",
    )
    parser.add_argument(
        "--out", default="bench/results/bench_unet.md", help="markdown file for the table"
    )
    args = parser.parse_args()
    from diffusers import UNet2DConditionModel as DiffusersUNet

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = UNetConfig.sd15()
    ours = UNet2DConditionModel(config).eval()
    with torch.device("meta"):
        reference = DiffusersUNet(**config.to_diffusers())
    reference.load_state_dict(
        ours.state_dict(), strict=True, assign=True
    )  # the same tensors, no copy
    reference.eval()

    sample = torch.randn(args.batch, 4, args.latent, args.latent)
    context = torch.randn(args.batch, 77, config.cross_attention_dim)
    timestep = torch.full((args.batch,), 500)
    models = {"ours (unet.py)": ours, "diffusers": lambda *a: reference(*a).sample}
    passes = {f"{n} thread{'s' * (n > 1)}": n for n in dict.fromkeys([torch.get_num_threads(), 1])}
    load_before = os.getloadavg()
    times = {}  # (pass, model) -> [(wall, cpu)]
    with torch.inference_mode():
        expected = reference(sample, timestep, context).sample
        error = (ours(sample, timestep, context) - expected).abs().max().item()
        for pass_name, threads in passes.items():
            torch.set_num_threads(threads)
            for model in models.values():  # warm-up at this thread count
                model(sample, timestep, context)
            for _ in range(args.reps):
                for name, model in models.items():
                    times.setdefault((pass_name, name), []).append(
                        timed(model, sample, timestep, context)
                    )
    load_after = os.getloadavg()

    import diffusers

    processor = platform.processor() or platform.machine()
    lines = [
        f"SD1.5 UNet forward, fp32 CPU, batch {args.batch}, "
        f"latent {args.latent}x{args.latent}, 77 tokens, "
        f"{args.reps} reps per pass after 1 warm-up (interleaved), "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"{os.cpu_count()} CPUs, {processor}; load average (1/5/15 min) "
        f"{'/'.join(f'{x:.2f}' for x in load_before)} before, "
        f"{'/'.join(f'{x:.2f}' for x in load_after)} after",
        "",
        "| threads | model | median wall s | min wall s | wall ratio | median CPU s | CPU ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    ratios = {}
    for pass_name in passes:
        wall = {name: [w for w, _ in times[(pass_name, name)]] for name in models}
        cpu = {name: statistics.median(c for _, c in times[(pass_name, name)]) for name in models}
        median = {name: statistics.median(values) for name, values in wall.items()}
        ratios[pass_name] = (
            median["ours (unet.py)"] / median["diffusers"],
            cpu["ours (unet.py)"] / cpu["diffusers"],
        )
        for name in models:
            lines.append(
                f"| {pass_name} | {name} | {median[name]:.3f} | {min(wall[name]):.3f} | "
                f"{median[name] / median['diffusers']:.3f} | {cpu[name]:.3f} | "
                f"{cpu[name] / cpu['diffusers']:.3f} |"
            )
    summary = "; ".join(f"{p}: wall {w:.3f}, CPU {c:.3f}" for p, (w, c) in ratios.items())
    lines += [
        "",
        f"max abs output difference: {error:.2e}; ours/diffusers ratio of medians: {summary} "
        "(expected near 1.0: the same modules, unet.py has no device-specific path)",
    ]
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
