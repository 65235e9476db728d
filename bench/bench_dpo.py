"""Benchmark: one Diffusion-DPO training step (full fine-tune, and LoRA), our code vs a diffusers UNet driven
by the official recipe's computation; same batch, same weights, same run.

    ours       unet.UNet2DConditionModel + dpo.dpo_batch_loss; the reference is a frozen copy (full fine-tune,
               bf16 on GPU as train.py) or the same UNet with the LoRA adapters off (lora.lora_disabled)
    official   diffusers.UNet2DConditionModel + the DiffusionDPO train.py loss transcribed (lines 1014-1146):
               a separate frozen ref_unet (fp16 on GPU there: bf16 here), cat([w, l]), shared noise and t,
               per-sample mean-MSE, inside = -0.5 * beta * (model_diff - ref_diff), loss -logsigmoid(inside);
               with LoRA, the same lora.py adapters on the diffusers UNet and still a separate ref_unet
One step = noise + policy forward on [w; l] + reference forward + loss + backward; the AdamW step is left out
(the same parameters and the same torch AdamW on both sides; with it a full fine-tune would not fit in the
24 GB of RAM of the CPU machine next to the two UNets and their gradients).

Method. Every (implementation, mode) runs in a fresh subprocess, so that nothing one leaves allocated counts
against the other: SD1.5 UNet config, random weights (seed 0, the same tensors for both), 1 pair per step,
one warm-up step then the median of --reps timed steps. Time: wall clock of the step (and process CPU time,
less disturbed by other processes on a shared machine). Memory on CPU: the growth of the process's peak
resident set (resource.getrusage ru_maxrss) from after the imports to after the steps, i.e. weights +
reference + gradients + activations (tracemalloc does not see torch's allocator); on GPU:
torch.cuda.max_memory_allocated. Writes the table to bench/results/bench_dpo.md.

    python -m bench.bench_dpo                # CPU, 32x32 latents: about 3 minutes on 2 cores
    python -m bench.bench_dpo --latent 64    # GPU (cuda if available): the SD1.5 512 px training resolution
"""

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import zlib

import torch
import torch.nn.functional as F


def fill_weights(model, only=""):
    """Fan-in scaled normal weights, unit norm scales, zero biases; each tensor seeded by its name, so that
    both implementations get the same values whatever order they register their modules in."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only not in name:
                continue
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            std = 1e-3 if "lora_B" in name else p[0].numel() ** -0.5
            value = torch.randn(p.shape, generator=generator) * std if p.ndim > 1 else torch.full(
                p.shape, 1.0 if "norm" in name else 0.0)
            p.copy_(value)


def build(implementation: str, mode: str, device: torch.device):
    """(policy, reference_eps_fn, forward(unet, x_t, t, context) -> eps) with identical weights for both."""
    from diffusers import UNet2DConditionModel as DiffusersUNet

    import lora
    from unet import UNet2DConditionModel, UNetConfig

    config = UNetConfig.sd15()
    with torch.device("meta"):
        policy = UNet2DConditionModel(config) if implementation == "ours" else DiffusersUNet(
            **config.to_diffusers())
    policy.to_empty(device=device)
    fill_weights(policy)
    forward = (lambda unet, *a: unet(*a)) if implementation == "ours" else (lambda unet, *a: unet(*a).sample)
    ref_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if mode == "lora":
        frozen_copy = implementation != "ours"
        separate_ref = copy.deepcopy(policy).requires_grad_(False).to(ref_dtype) if frozen_copy else None
        lora.inject_lora(policy, rank=8)
        fill_weights(policy, only="lora_")  # B != 0, as after some training (B starts at zero)
        if separate_ref is None:
            def reference(x_t, t, context):
                with lora.lora_disabled(policy):
                    return forward(policy, x_t, t, context)
            return policy.train(), reference, forward
    else:
        separate_ref = copy.deepcopy(policy).requires_grad_(False).to(ref_dtype)
    reference = lambda x_t, t, c: forward(separate_ref, x_t.to(ref_dtype), t, c.to(ref_dtype)).float()
    return policy.train(), reference, forward


def official_dpo_loss(unet, ref_unet, schedule, latents_w, latents_l, context, beta, generator, forward):
    """The DiffusionDPO train.py loss (official names in comments), from the latents on."""
    latents = torch.cat([latents_w, latents_l])  # feed = cat(pixel_values.chunk(2, dim=1))
    t = torch.randint(0, 1000, (latents_w.shape[0],), generator=generator, device=latents.device).repeat(2)
    noise = torch.randn(latents_w.shape, generator=generator, device=latents.device).repeat(2, 1, 1, 1)
    noisy = schedule.add_noise(latents, noise, t)
    encoder_hidden_states = context.repeat(2, 1, 1)
    model_pred = forward(unet, noisy, t, encoder_hidden_states)
    model_losses = (model_pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_pred = ref_unet(noisy, t, encoder_hidden_states)
        ref_losses = (ref_pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    inside_term = -0.5 * beta * (model_diff - ref_diff)  # Diffusion-DPO Eq. 14 (dpo.py deviations 1-2)
    return -F.logsigmoid(inside_term).mean()


def measure(implementation: str, mode: str, latent: int, reps: int, threads: int) -> dict:
    """Runs in its own process: build, warm up, time `reps` steps; returns times, memory and the last loss."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import diffusers  # noqa: F401 (both sides pay the same import before the memory baseline)

    import dpo
    from scheduler import NoiseSchedule

    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    policy, reference, forward = build(implementation, mode, device)
    schedule = NoiseSchedule.sd15()
    inputs = torch.Generator().manual_seed(1)
    latents_w, latents_l = torch.randn(2, 1, 4, latent, latent, generator=inputs).to(device)
    context = torch.randn(1, 77, 768, generator=inputs).to(device)
    enabled = device.type == "cuda"
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=enabled)
    walls, cpus, loss = [], [], None
    for rep in range(reps + 1):
        generator = torch.Generator(device).manual_seed(rep)  # the same noise and t for both implementations
        wall, cpu = time.perf_counter(), time.process_time()
        with autocast:
            if implementation == "ours":
                loss = dpo.dpo_batch_loss(lambda *a: forward(policy, *a), reference, schedule, latents_w,
                                          latents_l, context, 5000.0, generator)[0]
            else:
                loss = official_dpo_loss(policy, reference, schedule, latents_w, latents_l, context, 5000.0,
                                         generator, forward)
        loss.backward()
        policy.zero_grad(set_to_none=False)  # keep the gradient buffers, as between optimizer steps
        if device.type == "cuda":
            torch.cuda.synchronize()
        if rep:  # rep 0 is the warm-up
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    if device.type == "cuda":
        memory_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        memory_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_start) / 1024  # KiB on Linux
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus), "memory_mb": memory_mb,
            "loss": loss.item(), "device": str(device)}


def report(results: dict, latent: int, reps: int, threads: int) -> str:
    """The markdown table of {(implementation, mode): measure() result}, with how to read it."""
    device = results["ours", "full"]["device"]
    memory = "peak RSS growth (MiB)" if device == "cpu" else "peak CUDA memory (MiB)"
    lines = [f"# bench_dpo: one Diffusion-DPO step, SD1.5 UNet, 1 pair, {latent}x{latent} latents, {device}",
             "", f"torch {torch.__version__}, {threads} thread(s); command: `python -m bench.bench_dpo --latent "
             f"{latent} --reps {reps} --threads {threads}`; load average at the end: "
             f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", "",
             "| mode | wall s ours / official | wall ratio | CPU s ours / official | CPU-time ratio | "
             f"{memory} ours / official | memory ratio | loss ours / official |",
             "|---|---|---|---|---|---|---|---|"]
    for mode in ("full", "lora"):
        ours, official = results["ours", mode], results["official", mode]
        wall, cpu, mem = (ours[key] / official[key] for key in ("wall", "cpu", "memory_mb"))
        lines.append(f"| {mode} | {ours['wall']:.1f} / {official['wall']:.1f} | {wall:.2f}x | "
                     f"{ours['cpu']:.1f} / {official['cpu']:.1f} | {cpu:.2f}x | "
                     f"{ours['memory_mb']:.0f} / {official['memory_mb']:.0f} | {mem:.2f}x | "
                     f"{ours['loss']:.6f} / {official['loss']:.6f} |")
    saved = results["official", "lora"]["memory_mb"] - results["ours", "lora"]["memory_mb"]
    lines += ["", "How to read it (method: the module docstring of bench_dpo.py):",
              "- The losses agree (same weights, noise and timesteps) up to float rounding amplified by "
              "beta: the UNets' eps differ by ~1e-6 (unet.py deviation 6), and the logit multiplies "
              "error differences by 0.5 * beta = 2500.",
              "- Both sides do the same arithmetic (policy forward + backward on [w; l], one reference "
              "forward), so the time ratio is the ratio of the two UNet implementations (bench_unet.py). On "
              "a shared CPU, wall time follows the machine's load; process CPU time (1 thread) is steadier.",
              "- Full fine-tune: both sides hold a frozen reference copy (fp32 on CPU), so memory is equal. "
              f"LoRA: our reference is the same UNet with the adapters off, {saved:.0f} MiB less here; one "
              "fp32 SD1.5 UNet is 859.5M parameters = 3279 MiB."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latent", type=int, default=32, help="latent side (32: 256 px, 64: SD1.5's 512 px)")
    parser.add_argument("--reps", type=int, default=1, help="timed steps per case, after one warm-up step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per case (1: CPU time is not "
                        "inflated by threads spinning while the machine is busy)")
    parser.add_argument("--out", default="bench/results/bench_dpo.md", help="where to write the markdown table")
    parser.add_argument("--one", nargs=2, metavar=("IMPLEMENTATION", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # the subprocess side
        print(json.dumps(measure(*args.one, args.latent, args.reps, args.threads)))
        return
    results = {}
    for mode in ("full", "lora"):
        for implementation in ("ours", "official"):
            command = [sys.executable, __file__, "--one", implementation, mode, f"--latent={args.latent}",
                       f"--reps={args.reps}", f"--threads={args.threads}"]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[implementation, mode] = json.loads(output.strip().splitlines()[-1])
            print(implementation, mode, results[implementation, mode], flush=True)

    table = report(results, args.latent, args.reps, args.threads)
    print(table)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(table)


if __name__ == "__main__":
    main()
