"""Benchmark: the sampling loop's own overhead and end-to-end sampling time, ours vs diffusers, in
one run.

On the tiny random SD pipeline of conftest.build_tiny_pipeline (saved by diffusers, loaded by
weights.py) on CPU, both samplers run the same DDIM schedule with classifier-free guidance. Every
UNet call is timed from inside (a wrapper around each UNet's forward), so

    loop overhead per step = (loop time - time inside the UNet calls) / steps

is measured in the same runs as the step time; "UNet alone" times the same calls outside any loop.
End to end = text encoding + sampling + VAE decode to images in [0, 1] (diffusers:
output_type="pt"). Medians over interleaved repeats. torch runs on one thread: with 2 threads on a
shared 2-core machine OpenMP spin-waiting made each tiny UNet call up to 100x slower and the numbers
meaningless. Deviations: none (a benchmark, not a method).

    python -m bench.bench_sampler [--steps 50] [--repeats 3]     # writes
    bench/results/bench_sampler.md
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import write_report
from sampler import generate, sample


class TimedForward:
    """Wraps module.forward and sums the wall time spent in it."""

    def __init__(self, module):
        self.forward, self.seconds, self.calls = module.forward, 0.0, 0
        module.forward = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.forward(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out

    def reset(self):
        self.seconds, self.calls = 0.0, 0


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per sample")
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved repeats (medians are reported)"
    )
    parser.add_argument(
        "--batch", type=int, default=1, help="images per call (the UNet sees 2x with CFG)"
    )
    parser.add_argument("--out", default="bench/results/bench_sampler.md", help="markdown output")
    args = parser.parse_args()
    torch.set_num_threads(1)

    # The tests' tiny SD; diffusers: reference
    from testkit import (
        build_tiny_pipeline,
        save_hf_tokenizer,
    )
    from tokenizer import CLIPTokenizer
    from weights import load_stable_diffusion

    folder = Path(tempfile.mkdtemp()) / "tiny_sd"
    pipe = build_tiny_pipeline()
    pipe.save_pretrained(folder, safe_serialization=True)
    # As conftest.tiny_sd_dir: our tokenizer's vocab.json + merges.txt
    shutil.rmtree(folder / "tokenizer")
    save_hf_tokenizer(CLIPTokenizer.default(), folder / "tokenizer")
    pipe.set_progress_bar_config(disable=True)
    sd = load_stable_diffusion(folder)
    ours_unet = TimedForward(sd.unet)
    theirs_unet = TimedForward(pipe.unet)

    prompts = ["a red circle on a blue background"] * args.batch
    steps = args.steps
    with torch.no_grad():
        cond = sd.encode_prompts(prompts)
        uncond = sd.encode_prompts([""] * len(prompts))
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            prompts, "cpu", 1, True, [""] * len(prompts)
        )
    embeds = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds)
    latents = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x_twice = torch.cat([latents] * 2)
    context = torch.cat([uncond, cond])
    t = torch.tensor(981)

    runs = {  # name -> (function, timed UNet or None)
        "ours: sampler loop": (
            lambda: sample(sd.unet, sd.schedule, cond, uncond, latents, steps, progress=False),
            ours_unet,
        ),
        "ours: loop, eta=1 + trajectory": (
            lambda: sample(
                sd.unet,
                sd.schedule,
                cond,
                uncond,
                latents,
                steps,
                eta=1.0,
                record=True,
                progress=False,
            ),
            ours_unet,
        ),
        "diffusers: pipeline loop": (
            lambda: pipe(
                **embeds, latents=latents, num_inference_steps=steps, output_type="latent"
            ),
            theirs_unet,
        ),
        "ours: UNet alone": (lambda: [sd.unet(x_twice, t, context) for _ in range(steps)], None),
        "diffusers: UNet alone": (
            lambda: [pipe.unet(x_twice, t, context) for _ in range(steps)],
            None,
        ),
        "ours: end to end": (lambda: generate(sd, prompts, num_steps=steps, progress=False), None),
        "diffusers: end to end": (
            lambda: pipe(
                prompts,
                num_inference_steps=steps,
                output_type="pt",
                generator=torch.Generator().manual_seed(0),
            ),
            None,
        ),
    }
    seconds = {name: [] for name in runs}
    overhead = {name: [] for name, (_, unet) in runs.items() if unet is not None}
    with torch.no_grad():
        for fn, _ in runs.values():  # warm up
            fn()
        for _ in range(args.repeats):
            for name, (fn, unet) in runs.items():
                if unet is not None:
                    unet.reset()
                seconds[name].append(timed(fn))
                if unet is not None:
                    assert unet.calls == steps, (name, unet.calls)
                    overhead[name].append(seconds[name][-1] - unet.seconds)
    median = {name: statistics.median(values) for name, values in seconds.items()}

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"# bench_sampler: {steps} DDIM steps, CFG 7.5, batch {args.batch} "
        f"(UNet {2 * args.batch}), tiny SD (8x8 latents), CPU, 1 thread, median of {args.repeats}",
        "",
        f"torch {torch.__version__}; command: `python -m bench.bench_sampler --steps {steps} "
        f"--repeats {args.repeats} --batch {args.batch}`; machine load average at the end: "
        f"{load:.1f} on {os.cpu_count()} cores",
        "",
        "| loop | step (ms) | UNet per step (ms) | loop overhead per step (ms) | overhead / step |",
        "|---|---|---|---|---|",
    ]
    for name, values in overhead.items():
        step = median[name] / steps
        extra = statistics.median(values) / steps
        lines.append(
            f"| {name} | {1e3 * step:.3f} | {1e3 * (step - extra):.3f} | {1e3 * extra:.4f} | "
            f"{100 * extra / step:.2f}% |"
        )
    ours, theirs = (
        statistics.median(overhead[name])
        for name in ("ours: sampler loop", "diffusers: pipeline loop")
    )
    ratio = ours / theirs
    lines += [
        "",
        f"Loop overhead ours / diffusers: {ratio:.2f}x",
        "",
        "| end to end (text + sampling + decode) | seconds | per step (ms) |",
        "|---|---|---|",
    ]
    for name in (
        "ours: UNet alone",
        "diffusers: UNet alone",
        "ours: end to end",
        "diffusers: end to end",
    ):
        lines.append(f"| {name} | {median[name]:.3f} | {1e3 * median[name] / steps:.3f} |")
    end_to_end = median["ours: end to end"] / median["diffusers: end to end"]
    lines += ["", f"End to end ours / diffusers: {end_to_end:.2f}x"]
    report = "\n".join(lines) + "\n"
    write_report(report, args.out)


if __name__ == "__main__":
    main()
