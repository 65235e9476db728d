"""Benchmark: one Diffusion-DPO training step (full fine-tune, and LoRA), our trainer vs the
official recipes built on diffusers' UNet; same batch, same weights. bench_gpu.py runs the same
steps (this file's `dpo_step`) on a GPU, with the optimizer step, gradient checkpointing and model
FLOPs utilisation.

ours: train.build_models + train.method_step (dpo.dpo_train_step) with train.py's precision policy:
    trainable weights fp32, the LoRA base in the compute dtype, the full fine-tune's reference an
    fp32 copy, autocast around the UNet forwards only (train.Precision), latents / noise / x_t fp32;
    the LoRA reference is the same UNet with its adapters off (lora.lora_disabled).
official, full fine-tune: diffusers UNet2DConditionModel + AutoencoderKL, transformers
    CLIPTextModel, and the DiffusionDPO train.py loss transcribed (lines 1014-1146,
    `official_dpo_loss`): VAE and text encoder in the compute dtype (weight_dtype there), latents in
    that dtype, a separate frozen ref_unet in the compute dtype (fp16 there, bf16 on GPU here),
    cat([w, l]), shared noise and t, per-sample mean-MSE, inside = -0.5 * beta * (model_diff -
    ref_diff), loss -logsigmoid(inside); the policy fp32 under autocast (accelerate's mixed
    precision).
official, LoRA: diffusers' examples/research_projects/diffusion_dpo/train_diffusion_dpo.py
    (`official_lora`): the frozen base UNet, VAE and text encoder cast to the compute dtype, peft
    adapters (rank 8, alpha 8, gaussian init) on to_q / to_k / to_v / to_out.0, and the reference =
    the same UNet with unet.disable_adapters(); the same loss.
One step = VAE-encode both images + encode the prompts + policy forward on [w; l] + reference
forward + loss + backward (+ gradient clipping and AdamW with --optimizer: on GPU always; on CPU
left out by default, since a full fine-tune with AdamW state does not fit in the 24 GB of RAM of
the CPU machine next to two UNets). Both sides use torch AdamW (ours fused on CUDA as train.py;
official: torch's default, foreach).

Method. Every (implementation, mode) runs in a fresh subprocess, so that nothing one leaves
allocated counts against the other: SD1.5 configs (--config tiny: the test presets), random weights
(each tensor seeded by its name: the same values on both sides), --pairs pairs per step, one
warm-up step then the median of --reps timed steps. Time: wall clock of the step (and process CPU
time, less disturbed by other processes on a shared machine). Memory on CPU: the growth of the
process's peak resident set (resource.getrusage ru_maxrss) from after the imports to after the
steps (tracemalloc does not see torch's allocator); on GPU: torch.cuda.max_memory_allocated.
Winner/loser noise and t: ours draws them keyed by (seed, position), the official recipes from a
generator, so LoRA losses differ by the draws (and by the adapters' values: seeded by name, and the
names differ); without --optimizer a full fine-tune stays at step 0, where both losses should be
log 2 (the official recipe's bf16 reference breaks that on GPU: train.py deviation 2).

    python -m bench.bench_dpo                # CPU, 32x32 latents (256 px): ~7 min, 13 GB of RAM
    python -m bench.bench_dpo --config tiny  # seconds: checks the code paths
"""

import argparse
import copy
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import zlib
from unittest import mock

import torch
import torch.nn.functional as F

import train
import weights
from bench import write_report
from clip import CLIPTextConfig, CLIPTextModel
from dpo import model_pixels
from scheduler import NoiseSchedule
from tokenizer import CLIPTokenizer
from unet import UNet2DConditionModel, UNetConfig
from vae import AutoencoderKL, VAEConfig

BETA = 5000.0  # the official SD1.5 beta (mean-MSE convention)


def model_configs(name: str):
    """(UNetConfig, VAEConfig, CLIPTextConfig) of "sd15" or "tiny" (the test presets)."""
    if name == "sd15":
        return UNetConfig.sd15(), VAEConfig.sd15(), CLIPTextConfig.sd15()
    from testkit import tiny_vae_config  # the test presets

    unet_config = UNetConfig.tiny()
    return (
        unet_config,
        tiny_vae_config(),
        dataclasses.replace(CLIPTextConfig.tiny(), hidden_size=unet_config.cross_attention_dim),
    )


def fill_weights(model, only=""):
    """Fan-in scaled normal weights, unit norm scales, zero biases; each tensor seeded by its name
    (without transformers' "text_model." prefix), so that both implementations get the same values
    whatever order they register their modules in. Drawn on the parameter's device (fast on a
    GPU)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only not in name:
                continue
            seed = zlib.crc32(name.removeprefix("text_model.").encode())
            generator = torch.Generator(p.device).manual_seed(seed)
            std = 1e-3 if "lora_B" in name else p[0].numel() ** -0.5
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=generator, device=p.device) * std)
            else:
                p.fill_(1.0 if "norm" in name else 0.0)


def random_sd(config: str, device) -> weights.StableDiffusion:
    """Our Stable Diffusion with random weights (fill_weights), built on `device`, fp32."""
    unet_config, vae_config, text_config = model_configs(config)
    with torch.device(device):
        models = (
            UNet2DConditionModel(unet_config),
            AutoencoderKL(vae_config),
            CLIPTextModel(text_config),
        )
    for model in models:
        fill_weights(model)
    return weights.StableDiffusion(*models, CLIPTokenizer.default(), NoiseSchedule.sd15())


def diffusers_models(config: str, device):
    """diffusers' UNet and VAE and transformers' CLIP text model, with the same weights as
    random_sd's."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel as DiffusersUNet
    from transformers import CLIPTextConfig as HFTextConfig
    from transformers import CLIPTextModel as HFTextModel

    from testkit import hf_clip_kwargs  # test-only helper: our CLIP config in transformers' names

    unet_config, vae_config, text_config = model_configs(config)
    with torch.device(device):
        models = (
            DiffusersUNet(**unet_config.to_diffusers()),
            DiffusersVAE(**vae_config.to_diffusers()),
            HFTextModel(HFTextConfig(**hf_clip_kwargs(text_config))),
        )
    for model in models:
        fill_weights(model)
    return models


def make_batch(pairs: int, image_size: int, device) -> dict:
    """A Diffusion-DPO batch as data.PairBatches yields it: uint8 pixels (CPU), prompts, global
    positions."""
    generator = torch.Generator().manual_seed(1)
    shape = (2, pairs, 3, image_size, image_size)
    pixels = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    return {
        "pixels_w": pixels[0],
        "pixels_l": pixels[1],
        "prompts": [f"a photo of a cat, pair {i}" for i in range(pairs)],
        "positions": list(range(pairs)),
    }


def official_dpo_loss(unet, reference, schedule, latents_w, latents_l, context, beta, generator):
    """The DiffusionDPO train.py loss (official names in comments), from the latents on."""
    latents = torch.cat([latents_w, latents_l])  # feed = cat(pixel_values.chunk(2, dim=1))
    t = torch.randint(
        0, 1000, (latents_w.shape[0],), generator=generator, device=latents.device
    ).repeat(2)
    noise = torch.randn(latents_w.shape, generator=generator, device=latents.device).repeat(
        2, 1, 1, 1
    )
    noisy = schedule.add_noise(latents, noise, t)
    encoder_hidden_states = context.repeat(2, 1, 1)
    model_pred = unet(noisy, t, encoder_hidden_states).sample
    model_losses = (model_pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_pred = reference(noisy, t, encoder_hidden_states)
        ref_losses = (ref_pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    # Diffusion-DPO Eq. 14 (dpo.py deviations 1-2)
    inside_term = -0.5 * beta * (model_diff - ref_diff)
    return -F.logsigmoid(inside_term).mean()


def build_ours(
    config: str,
    device,
    dtype,
    lora_rank: int,
    checkpointing: bool,
    method: str = "dpo",
    tailorpo=None,
    random_lora: bool = True,
):
    """train.py's models for a random-weight SD: (train config, sd with the Precision policy,
    trainable params, reference). train.build_models runs as in train.py; only the weight loader
    returns random_sd's model. random_lora: LoRA B != 0, as after some training (False: B = 0, the
    policy equals its reference)."""
    cfg = dataclasses.replace(
        train.TrainConfig(),
        model="random",
        method=method,
        lora_rank=lora_rank,
        lora_alpha=float(max(lora_rank, 1)),
        gradient_checkpointing=checkpointing,
        **({"tailorpo": tailorpo} if tailorpo else {}),
    )
    sd = random_sd(config, device)
    with mock.patch.object(weights, "load_stable_diffusion", lambda *args, **kwargs: sd):
        sd, params, reference = train.build_models(cfg, None, torch.device(device), dtype)
    if lora_rank and random_lora:
        fill_weights(sd.unet, only="lora_")
    return cfg, dataclasses.replace(sd, unet=train.Precision(sd.unet, dtype)), params, reference


def optimizer_step(loss, params, optimizer):
    """train.py's update: backward, clip the global gradient norm to 1, AdamW (None: backward
    only)."""
    loss.backward()
    if optimizer is not None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:  # keep the gradient buffers, as between optimizer steps
        for p in params:
            p.grad = None if p.grad is None else p.grad.zero_()


def dpo_step(
    implementation: str,
    config: str,
    mode: str,
    device,
    dtype,
    checkpointing: bool = False,
    optimizer: bool = True,
):
    """(step(batch) -> loss, models to keep alive) for one side of the comparison; the models are
    built on `device` (fp32, the compute dtype where the side's policy says so)."""
    lora_rank = 8 if mode == "lora" else 0
    if implementation == "ours":
        cfg, sd, params, reference = build_ours(config, device, dtype, lora_rank, checkpointing)
        fused = torch.device(device).type == "cuda"  # as train.py
        adamw = torch.optim.AdamW(params, lr=1e-6, fused=fused) if optimizer else None

        def step(batch):
            loss, _ = train.method_step(cfg, sd, reference, batch, None)
            optimizer_step(loss, params, adamw)
            return loss.detach()

        return step, (sd, reference)
    unet, vae, text_encoder = diffusers_models(config, device)
    vae.requires_grad_(False).to(dtype)
    text_encoder.requires_grad_(False).to(dtype)
    if lora_rank:
        params, reference = official_lora(unet, lora_rank, dtype)
    else:
        params, reference = official_full(unet, dtype)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    adamw = torch.optim.AdamW(params, lr=1e-6) if optimizer else None
    tokenizer = CLIPTokenizer.default()
    schedule = NoiseSchedule.sd15()
    device_type = torch.device(device).type
    generator = torch.Generator(device).manual_seed(0)

    def step(batch):
        with torch.autocast(device_type, dtype, enabled=dtype != torch.float32):
            with torch.no_grad():
                pixels = torch.cat([batch["pixels_w"], batch["pixels_l"]])
                feed = model_pixels(pixels, device).to(dtype)
                posterior = vae.encode(feed).latent_dist
                latents = posterior.sample(generator) * vae.config.scaling_factor
                context = text_encoder(tokenizer(batch["prompts"]).to(device))[0]
            latents_w, latents_l = latents.chunk(2)
            loss = official_dpo_loss(
                unet, reference, schedule, latents_w, latents_l, context, BETA, generator
            )
        optimizer_step(loss, params, adamw)
        return loss.detach()

    return step, (unet, vae, text_encoder, reference)


def official_full(unet, dtype):
    """DiffusionDPO train.py's full fine-tune: the policy in fp32 (autocast around it) and a
    separate frozen ref_unet in the compute dtype. Returns (params, reference)."""
    ref_unet = copy.deepcopy(unet).requires_grad_(False).to(dtype)

    def reference(x_t, t, context):
        return ref_unet(x_t.to(dtype), t, context.to(dtype)).sample.float()

    return list(unet.parameters()), reference


def official_lora(unet, rank: int, dtype):
    """diffusers' train_diffusion_dpo.py LoRA recipe: the frozen base UNet cast to the compute dtype
    (weight_dtype), peft adapters (rank r, alpha r, gaussian init) on to_q/to_k/to_v/to_out.0, and
    as the reference the same UNet with its adapters disabled. Returns (params, reference)."""
    from peft import LoraConfig  # test-only reference, as diffusers

    unet.requires_grad_(False).to(dtype)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        init_lora_weights="gaussian",
        target_modules=["to_k", "to_q", "to_v", "to_out.0"],
    )
    unet.add_adapter(config)
    fill_weights(unet, only="lora_")  # B != 0, as after some training (as ours)

    def reference(x_t, t, context):
        unet.disable_adapters()
        try:
            return unet(x_t.to(dtype), t, context.to(dtype)).sample.float()
        finally:
            unet.enable_adapters()

    params = [p for p in unet.parameters() if p.requires_grad]
    return params, reference


def measure(
    implementation: str,
    mode: str,
    config: str,
    latent: int,
    pairs: int,
    reps: int,
    threads: int,
    optimizer: bool,
) -> dict:
    """Runs in its own process: build, warm up, time `reps` steps; returns times, memory and the
    last loss."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    import diffusers  # noqa: F401 (both sides pay the same import before the memory baseline)
    import transformers  # noqa: F401

    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step, _ = dpo_step(implementation, config, mode, device, dtype, optimizer=optimizer)
    batch = make_batch(pairs, latent * 8, device)
    walls = []
    cpus = []
    loss = None
    for rep in range(reps + 1):
        wall = time.perf_counter()
        cpu = time.process_time()
        loss = step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if rep:  # rep 0 is the warm-up
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    if device.type == "cuda":
        memory_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        memory_mb = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_start
        ) / 1024  # KiB on Linux
    return {
        "wall": statistics.median(walls),
        "cpu": statistics.median(cpus),
        "memory_mb": memory_mb,
        "loss": loss.item(),
        "device": str(device),
    }


def report(results: dict, args) -> str:
    """The markdown table of {(implementation, mode): measure() result}, with how to read it."""
    device = results["ours", "full"]["device"]
    memory = "peak RSS growth (MiB)" if device == "cpu" else "peak CUDA memory (MiB)"
    lines = [
        f"# bench_dpo: one Diffusion-DPO step, {args.config} config, {args.pairs} pair(s), "
        f"{args.latent}x{args.latent} latents, {device}",
        "",
        f"torch {torch.__version__}, {args.threads} thread(s); command: `python -m bench.bench_dpo "
        f"--config {args.config} --latent {args.latent} --pairs {args.pairs} --reps {args.reps} "
        f"--threads {args.threads}{' --optimizer' if args.optimizer else ''}`; "
        f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        "",
        "| mode | wall s ours / official | wall ratio | CPU s ours / official | CPU-time ratio | "
        f"{memory} ours / official | memory ratio | loss ours / official |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("full", "lora"):
        ours = results["ours", mode]
        official = results["official", mode]
        wall, cpu, mem = (ours[key] / official[key] for key in ("wall", "cpu", "memory_mb"))
        lines.append(
            f"| {mode} | {ours['wall']:.1f} / {official['wall']:.1f} | {wall:.2f}x | "
            f"{ours['cpu']:.1f} / {official['cpu']:.1f} | {cpu:.2f}x | "
            f"{ours['memory_mb']:.0f} / {official['memory_mb']:.0f} | {mem:.2f}x | "
            f"{ours['loss']:.6f} / {official['loss']:.6f} |"
        )
    lines += [
        "",
        "How to read it (method: the module docstring of bench_dpo.py):",
        "- Both sides do the same arithmetic (VAE encode, text encode, policy forward + backward "
        "on [w; l], one reference forward), so the time ratio is mostly the ratio of the two UNet "
        "implementations (bench_unet.py). On a shared CPU, wall time follows the machine's load; "
        "process CPU time (1 thread) is steadier.",
        "- Full fine-tune on CPU: both sides hold a frozen fp32 reference copy, so memory is about "
        "equal. LoRA: both sides hold one UNet (the base in the compute dtype, fp32 on CPU) and "
        "take the same UNet with its adapters off as the reference (diffusers' "
        "train_diffusion_dpo.py recipe); one fp32 SD1.5 UNet is 859.5M parameters = 3279 MiB.",
        "- Losses: a full fine-tune without --optimizer stays at step 0: log 2 = 0.693147 on both "
        "sides; LoRA (B != 0) differs by the noise and t draws (keyed by position here, a "
        "generator there) and by the adapters' values.",
    ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="sd15", choices=("sd15", "tiny"), help="model configs")
    parser.add_argument(
        "--latent", type=int, default=32, help="latent side (32: 256 px, 64: SD1.5's 512 px)"
    )
    parser.add_argument("--pairs", type=int, default=1, help="preference pairs per step")
    parser.add_argument(
        "--reps", type=int, default=1, help="timed steps per case, after one warm-up step"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per case (1: CPU time is not "
        "inflated by threads spinning while the machine is busy)",
    )
    parser.add_argument(
        "--optimizer", action="store_true", help="include gradient clipping and AdamW"
    )
    parser.add_argument(
        "--out", default="bench/results/bench_dpo.md", help="markdown table to write"
    )
    parser.add_argument(
        "--one", nargs=2, metavar=("IMPLEMENTATION", "MODE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.one:  # the subprocess side
        print(
            json.dumps(
                measure(
                    *args.one,
                    args.config,
                    args.latent,
                    args.pairs,
                    args.reps,
                    args.threads,
                    args.optimizer,
                )
            )
        )
        return
    results = {}
    for mode in ("full", "lora"):
        for implementation in ("ours", "official"):
            command = [
                sys.executable,
                "-m",
                "bench.bench_dpo",
                "--one",
                implementation,
                mode,
                *sys.argv[1:],
            ]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[implementation, mode] = json.loads(output.strip().splitlines()[-1])
            print(implementation, mode, results[implementation, mode], flush=True)

    table = report(results, args)
    write_report(table, args.out)


if __name__ == "__main__":
    main()
