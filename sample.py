"""Text-to-image with Stable Diffusion 1.5: prompt -> CLIP tokens -> DDIM on latents -> VAE decode.

    python sample.py --model stable-diffusion-v1-5 \\
        --prompt "a photo of an astronaut riding a horse" --num_images 4 --steps 50 \\
        --guidance 7.5 --seed 0 --out grid.png

Defaults and seeded noise as diffusers' StableDiffusionPipeline (sampler.generate), with deviations:
1. The negative prompt defaults to "" (diffusers: None, which also encodes ""): the same embeddings.
2. --height/--width default to the model's native size (UNet sample_size * f; 512 for SD1.5), as
   diffusers does.
3. With --model toy, --steps and --guidance default to the toy world's sampling settings.
"""

import math
import sys
from pathlib import Path

import torch
from PIL import Image

import toy
from config import ConfigError, Parser
from lora import merge_lora
from pair_files import to_pil
from sampler import generate, image_size
from state_dicts import CheckpointError
from weights import load_models

SIZE_MULTIPLE = 8  # The VAE of SD1.x halves the resolution three times.
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5


def save_images(images: torch.Tensor, out: str) -> list[Path]:
    """Writes a grid of images [N, 3, H, W] to `out`, and each image to <out stem>_000.png, ..."""
    out = Path(out)
    count, _, height, width = images.shape
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


def make_parser() -> Parser:
    p = Parser(description="Stable Diffusion 1.5 text-to-image: DDIM, classifier-free guidance.")
    p.add_argument("--model", required=True,
                   help="a diffusers folder, a .safetensors/.ckpt file, a hub id, or toy")
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("--negative_prompt", default="",
                   help="what to steer away from (the unconditional text)")
    p.add_argument("--num_images", type=int, default=1, help="images to generate for the prompt")
    p.add_argument("--steps", type=int, default=None,
                   help=f"DDIM steps (default: {DEFAULT_STEPS}; the toy world's with --model toy)")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance scale, <= 1 is off "
                   f"(default: {DEFAULT_GUIDANCE}; the toy world's with --model toy)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the CPU generator that draws x_T, as diffusers does")
    p.add_argument("--height", type=int, default=None,
                   help=f"image height, a multiple of {SIZE_MULTIPLE} (default: the model's)")
    p.add_argument("--width", type=int, default=None,
                   help=f"image width, a multiple of {SIZE_MULTIPLE} (default: the model's)")
    p.add_argument("--unet", default=None,
                   help="replace the UNet: a diffusers unet folder or a .safetensors state dict")
    p.add_argument("--lora", default=None, help="a LoRA .safetensors of train.py (lora.save_lora)")
    p.add_argument("--out", default="grid.png",
                   help="the grid PNG; the single images go beside it as <stem>_000.png, ...")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the frozen weights")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (the first step is slow)")
    return p


def parse_args(argv) -> dict:
    """The options, checked before any model is built; ConfigError names the bad one."""
    args = make_parser().parse_args(argv)
    if args.num_images < 1:
        raise ConfigError(f"--num_images must be >= 1, got {args.num_images}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    if args.eta < 0:
        raise ConfigError(f"--eta must be >= 0, got {args.eta}")
    for flag, path in (("--unet", args.unet), ("--lora", args.lora)):
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{flag}={path}: no such file or folder")
    for flag, size in (("--height", args.height), ("--width", args.width)):
        if size is not None and (size <= 0 or size % SIZE_MULTIPLE):
            raise ConfigError(f"{flag}={size}: height and width must be positive multiples of "
                              f"{SIZE_MULTIPLE}")
    return args


def main(argv=None) -> list[Path]:
    try:
        args = parse_args(argv)
    except ConfigError as error:  # A usage error: one line on stderr, exit status 2 (as argparse).
        print(f"sample.py: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    sampling = {"num_steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE}
    model = args.model
    dtype = getattr(torch, args.dtype)
    try:
        if args.model == toy.MODEL:  # The toy world is reached through toy.py's door only.
            world = toy.world()
            sampling = world.sampling
            model = world.load_model(args.device)
        _, sd = load_models(model, args.unet, args.lora, args.device, dtype)
        image_size(sd, args.height, args.width)
    except (CheckpointError, ValueError) as error:  # One line naming the file or option and why.
        raise SystemExit(f"sample.py: {error}") from None
    if args.lora:
        merge_lora(sd.unet)  # W + scale B A once, so sampling costs what the base model costs.
    if args.compile:  # After the LoRA merge, so that every sampler step runs the compiled graph.
        sd.unet = torch.compile(sd.unet)
    num_steps = sampling["num_steps"] if args.steps is None else args.steps
    guidance = sampling["guidance"] if args.guidance is None else args.guidance
    images = generate(sd, [args.prompt] * args.num_images, negative_prompt=args.negative_prompt,
                      num_steps=num_steps, guidance=guidance, eta=args.eta, seed=args.seed,
                      height=args.height, width=args.width)
    paths = save_images(images, args.out)
    print(f"wrote {paths[0]} and {len(paths) - 1} images")
    return paths


if __name__ == "__main__":
    main()
