"""Text-to-image with Stable Diffusion 1.5: prompt -> CLIP text tokens -> DDIM in latent space -> VAE decode.

    python sample.py --model stable-diffusion-v1-5 --prompt "a photo of an astronaut riding a horse" \\
        --num-images 4 --steps 50 --guidance 7.5 --seed 0 --out grid.png

Defaults and seeded noise as diffusers' StableDiffusionPipeline (sampler.generate), with these deviations:
1. The negative prompt defaults to "" (diffusers: None, which also encodes ""), i.e. the same embeddings.
2. --height/--width default to the model's native size (UNet sample_size * f; 512 for SD1.5) as diffusers.
"""

import argparse
import math
from pathlib import Path

import torch
from PIL import Image

from data import to_pil

from lora import merge_lora
from sampler import generate, image_size
from weights import CheckpointError, load_models


def save_images(images: torch.Tensor, out: str) -> list[Path]:
    """Writes a grid of images [N, 3, H, W] to `out` and each one to <out stem>_000.png, ... beside it."""
    out, (count, _, height, width) = Path(out), images.shape
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = math.ceil(math.sqrt(count))
    grid = Image.new("RGB", (columns * width, math.ceil(count / columns) * height))
    paths = [out.with_name(f"{out.stem}_{i:03d}.png") for i in range(count)]
    for i, path in enumerate(paths):
        image = to_pil(images[i])
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
        image.save(path)
    grid.save(out)
    return [out, *paths]


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description="Stable Diffusion 1.5 text-to-image (DDIM + guidance).")
    p.add_argument("--model", required=True, help="diffusers folder, .safetensors/.ckpt file, hub id, or toy")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (the unconditional text)")
    p.add_argument("--num-images", type=int, default=1, help="images to generate for the prompt")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (<= 1: off)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    p.add_argument("--seed", type=int, default=0, help="seed of the CPU generator for x_T (as diffusers)")
    p.add_argument("--height", type=int, default=None, help="image height, multiple of 8 (default: model's)")
    p.add_argument("--width", type=int, default=None, help="image width, multiple of 8 (default: model's)")
    p.add_argument("--unet", default=None, help="replace the UNet: a diffusers unet folder or .safetensors")
    p.add_argument("--lora", default=None, help="LoRA .safetensors from train.py (lora.save_lora)")
    p.add_argument("--out", default="grid.png", help="grid PNG; single images: <stem>_000.png, ... beside it")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="dtype")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first step)")
    args = p.parse_args(argv)
    for flag, value in (("--steps", args.steps), ("--num-images", args.num_images)):
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    try:
        _, sd = load_models(args.model, args.unet, args.lora, args.device, getattr(torch, args.dtype))
        image_size(sd, args.height, args.width)
    except CheckpointError as error:  # missing, corrupt or mismatched weights: one line naming file and why
        raise SystemExit(f"sample.py: {error}") from None
    except ValueError as error:  # --height/--width: not multiples of the model's VAE factor
        p.error(str(error))
    if args.lora:
        merge_lora(sd.unet)  # W + scale B A once, so sampling costs what the base model costs
    if args.compile:  # once per process, after the LoRA merge: every sampler step runs the compiled graph
        sd.unet = torch.compile(sd.unet)
    images = generate(sd, [args.prompt] * args.num_images, negative_prompt=args.negative_prompt,
                      num_steps=args.steps, guidance=args.guidance, eta=args.eta, seed=args.seed,
                      height=args.height, width=args.width)
    paths = save_images(images, args.out)
    print(f"wrote {paths[0]} and {len(paths) - 1} images")
    return paths


if __name__ == "__main__":
    main()
